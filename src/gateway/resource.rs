//! The HTTP resource of a WebRTC session (`/api/sessions/{key}`): 128 random bits, so only the
//! client that made the call can restart its ICE or hang it up. Session ids are sequential and
//! appear in logs; they name a session, they do not reach it.

use std::fmt;

/// Hex digits in a key: 128 bits.
const KEY_CHARS: usize = 32;

/// The unguessable part of a session's resource URL.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ResourceKey(String);

impl ResourceKey {
    /// A fresh key from the operating system's entropy, through `rand`'s reseeded CSPRNG.
    pub fn generate() -> Self {
        let bits: u128 = rand::random();
        Self(format!("{bits:0width$x}", width = KEY_CHARS))
    }

    /// `text` as a key when it has a key's shape (32 lowercase hex digits).
    pub fn parse(text: &str) -> Option<Self> {
        let shaped = text.len() == KEY_CHARS
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        shaped.then(|| Self(text.to_owned()))
    }

    /// The URL path the client sends PATCH and DELETE to.
    pub fn path(&self) -> String {
        format!("/api/sessions/{}", self.0)
    }
}

/// Never printed whole: a log line with it would hand the session to whoever reads the log.
impl fmt::Debug for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResourceKey({}…)", &self.0[..4])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_and_round_trip_through_their_path() {
        let (a, b) = (ResourceKey::generate(), ResourceKey::generate());
        assert_ne!(a, b);
        let path = a.path();
        let text = path.strip_prefix("/api/sessions/").unwrap();
        assert_eq!(text.len(), KEY_CHARS);
        assert_eq!(ResourceKey::parse(text), Some(a.clone()));
        assert!(!format!("{a:?}").contains(text));
    }

    #[test]
    fn session_ids_and_other_shapes_are_not_keys() {
        let key = ResourceKey::generate().path();
        let key = key.strip_prefix("/api/sessions/").unwrap();
        for bad in [
            "s0000002a",
            "",
            &key[1..],
            &format!("{key}0"),
            &key.to_ascii_uppercase().replace(char::is_numeric, "A"),
            "../../../../etc/passwd0000000000",
        ] {
            assert_eq!(ResourceKey::parse(bad), None, "{bad}");
        }
    }
}

//! Digest authentication of callers (`--sip-caller-auth USER:PASSWORD`; RFC 3261 §22, the
//! MD5 digest of RFC 2617 with `qop=auth`): a new call's INVITE must prove it knows the
//! password, so SIP can face networks where an address proves nothing. Nonces carry their
//! own time and an HMAC of it under a key made at start, so nothing is stored per caller; a
//! nonce older than five minutes is stale and answered with a fresh one.

use super::message::Request;
use super::register::{digest_param, md5_hex};
use crate::gateway::routes::constant_time_eq;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The realm our challenges name.
pub const REALM: &str = "duplex";
/// How long a nonce may be answered.
const NONCE_LIFETIME: Duration = Duration::from_secs(300);

/// What an INVITE's credentials come to.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// None given, or for a nonce that is not ours or too old (`stale`): challenge again.
    Challenge {
        stale: bool,
    },
    /// Given, and wrong: the reason.
    Refused(&'static str),
}

/// The one caller account, and the key that signs our nonces.
pub struct CallerAuth {
    user: String,
    password: String,
    key: [u8; 32],
}

impl std::fmt::Debug for CallerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CallerAuth({})", self.user)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn same(a: &str, b: &str) -> bool {
    constant_time_eq(a.as_bytes(), b.as_bytes())
}

impl CallerAuth {
    /// `USER:PASSWORD`, as the flag takes it.
    pub fn parse(account: &str) -> Result<Self, String> {
        let (user, password) = account
            .split_once(':')
            .filter(|(user, password)| !user.is_empty() && !password.is_empty())
            .ok_or("expected USER:PASSWORD, both non-empty")?;
        let mut key = [0u8; 32];
        rand::fill(&mut key);
        Ok(Self {
            user: user.to_owned(),
            password: password.to_owned(),
            key,
        })
    }

    fn signature(&self, issued: u64) -> String {
        let mut mac = Hmac::<Sha1>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(&issued.to_be_bytes());
        mac.finalize().into_bytes()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn nonce_at(&self, issued: u64) -> String {
        format!("{issued:x}.{}", self.signature(issued))
    }

    /// The nonce's age, if it is one of ours.
    fn nonce_age(&self, nonce: &str, now: u64) -> Option<u64> {
        let (issued, signature) = nonce.split_once('.')?;
        let issued = u64::from_str_radix(issued, 16).ok()?;
        same(signature, &self.signature(issued)).then(|| now.saturating_sub(issued))
    }

    /// The `WWW-Authenticate` header of a 401.
    pub fn challenge(&self, stale: bool) -> (&'static str, String) {
        let stale = if stale { ", stale=true" } else { "" };
        let value = format!(
            "Digest realm=\"{REALM}\", nonce=\"{}\", algorithm=MD5, qop=\"auth\"{stale}",
            self.nonce_at(now_secs())
        );
        ("WWW-Authenticate", value)
    }

    /// Checks an INVITE's `Authorization` (or `Proxy-Authorization`).
    pub fn check(&self, request: &Request) -> Verdict {
        self.check_at(request, now_secs())
    }

    fn check_at(&self, request: &Request, now: u64) -> Verdict {
        let Some(credentials) = request
            .header("Authorization")
            .or_else(|| request.header("Proxy-Authorization"))
            .and_then(|value| value.strip_prefix("Digest "))
        else {
            return Verdict::Challenge { stale: false };
        };
        let param = |key: &str| digest_param(credentials, key).unwrap_or_default();
        if param("realm") != REALM || !same(param("username"), &self.user) {
            return Verdict::Refused("unknown user or realm");
        }
        if !matches!(param("algorithm"), "" | "MD5" | "md5") {
            return Verdict::Refused("only the MD5 digest is taken");
        }
        match self.nonce_age(param("nonce"), now) {
            None => return Verdict::Challenge { stale: false },
            Some(age) if age > NONCE_LIFETIME.as_secs() => {
                return Verdict::Challenge { stale: true };
            }
            Some(_) => {}
        }
        let ha1 = md5_hex(&format!("{}:{REALM}:{}", self.user, self.password));
        let ha2 = md5_hex(&format!("{}:{}", request.method, param("uri")));
        let nonce = param("nonce");
        let expected = match param("qop") {
            "auth" => md5_hex(&format!(
                "{ha1}:{nonce}:{}:{}:auth:{ha2}",
                param("nc"),
                param("cnonce")
            )),
            "" => md5_hex(&format!("{ha1}:{nonce}:{ha2}")),
            _ => return Verdict::Refused("only qop=auth is taken"),
        };
        match same(param("response"), &expected) {
            true => Verdict::Accepted,
            false => Verdict::Refused("wrong credentials"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invite(authorization: &str) -> Request {
        let text = format!(
            "INVITE sip:agent@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.5;branch=z9hG4bK1\r\n\
From: <sip:pbx@10.0.0.5>;tag=1\r\nTo: <sip:agent@10.0.0.1>\r\nCall-ID: a\r\nCSeq: 1 INVITE\r\n\
{authorization}Content-Length: 0\r\n\r\n"
        );
        Request::parse(text.as_bytes()).unwrap()
    }

    fn answer(password: &str, nonce: &str) -> Request {
        let ha1 = md5_hex(&format!("pbx:{REALM}:{password}"));
        let ha2 = md5_hex("INVITE:sip:agent@10.0.0.1");
        let response = md5_hex(&format!("{ha1}:{nonce}:00000001:c0ffee:auth:{ha2}"));
        invite(&format!(
            "Authorization: Digest username=\"pbx\", realm=\"{REALM}\", nonce=\"{nonce}\", \
uri=\"sip:agent@10.0.0.1\", qop=auth, nc=00000001, cnonce=\"c0ffee\", response=\"{response}\"\r\n"
        ))
    }

    #[test]
    fn a_caller_proves_the_password_with_a_fresh_nonce_of_ours() {
        let auth = CallerAuth::parse("pbx:s3cret").unwrap();
        assert_eq!(auth.check(&invite("")), Verdict::Challenge { stale: false });
        let (name, challenge) = auth.challenge(false);
        assert_eq!(name, "WWW-Authenticate");
        let nonce = digest_param(challenge.strip_prefix("Digest ").unwrap(), "nonce").unwrap();
        assert_eq!(auth.check(&answer("s3cret", nonce)), Verdict::Accepted);
        assert_eq!(
            auth.check(&answer("guess", nonce)),
            Verdict::Refused("wrong credentials")
        );
        // A nonce we did not sign, or signed too long ago.
        let forged = format!("{:x}.{}", now_secs(), "0".repeat(24));
        let fresh_again = Verdict::Challenge { stale: false };
        assert_eq!(auth.check(&answer("s3cret", &forged)), fresh_again);
        let old = auth.nonce_at(now_secs() - 301);
        let request = answer("s3cret", &old);
        assert_eq!(auth.check(&request), Verdict::Challenge { stale: true });
        // Another server's key signs other nonces.
        let other = CallerAuth::parse("pbx:s3cret").unwrap();
        assert_eq!(other.check(&answer("s3cret", nonce)), fresh_again);
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    #[test]
    fn the_account_is_read_as_user_colon_password() {
        assert!(CallerAuth::parse("pbx:pass:word").is_ok());
        assert!(CallerAuth::parse("nopassword").is_err());
        assert!(CallerAuth::parse(":x").is_err());
    }
}

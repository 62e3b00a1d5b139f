//! SRTP keyed in the SDP (SDES, RFC 4568): a call whose offer carries `a=crypto` gets its RTP
//! encrypted and authenticated both ways (RFC 3711), each side with its own master key. The
//! keys travel in the SIP messages, so they are only as private as the signaling (a trunk on
//! a trusted network, or SIP over TLS).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::BytesMut;
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;

/// The crypto suites answered: AES-128 in counter mode with an 80- or 32-bit HMAC-SHA1 tag,
/// the two every SDES implementation has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    Aes128Sha1_80,
    Aes128Sha1_32,
}

/// Master key (16 bytes) and salt (14) as `inline:` carries them.
const KEY_AND_SALT: usize = 30;
const KEY: usize = 16;

impl Suite {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "AES_CM_128_HMAC_SHA1_80" => Some(Self::Aes128Sha1_80),
            "AES_CM_128_HMAC_SHA1_32" => Some(Self::Aes128Sha1_32),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Aes128Sha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Self::Aes128Sha1_32 => "AES_CM_128_HMAC_SHA1_32",
        }
    }

    fn profile(self) -> ProtectionProfile {
        match self {
            Self::Aes128Sha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
            Self::Aes128Sha1_32 => ProtectionProfile::Aes128CmHmacSha1_32,
        }
    }
}

/// One negotiated `a=crypto`: the offer's tag and suite, the caller's key and ours.
#[derive(Clone, PartialEq, Eq)]
pub struct Crypto {
    pub tag: u32,
    pub suite: Suite,
    remote_key: Vec<u8>,
    local_key: Vec<u8>,
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys stay out of logs.
        write!(f, "Crypto({} {})", self.tag, self.suite.name())
    }
}

impl Crypto {
    /// The first of an offer's `a=crypto` values we can take (a suite above, an `inline:`
    /// key of the right length, no MKI), with a fresh key of ours.
    pub fn choose<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let mut local_key = vec![0u8; KEY_AND_SALT];
        rand::fill(&mut local_key[..]);
        values.into_iter().find_map(|value| {
            let mut fields = value.split_whitespace();
            let tag = fields.next()?.parse().ok()?;
            let suite = Suite::parse(fields.next()?)?;
            let key_params = fields.next()?.strip_prefix("inline:")?;
            let mut parts = key_params.split('|');
            let remote_key = STANDARD.decode(parts.next()?).ok()?;
            // A lifetime may follow; an MKI (`n:len`) is not handled, nor is any session
            // parameter (UNENCRYPTED_SRTP, KDR=…): RFC 4568 §6.3 has the line refused.
            let has_mki = parts.any(|part| part.contains(':'));
            let has_session_params = fields.next().is_some();
            let usable = remote_key.len() == KEY_AND_SALT && !has_mki && !has_session_params;
            usable.then(|| Self {
                tag,
                suite,
                remote_key,
                local_key: local_key.clone(),
            })
        })
    }

    /// The SDES line of an offer of ours (a call the agent places): tag 1,
    /// `AES_CM_128_HMAC_SHA1_80`, a fresh key; the answer's brings the other side's key.
    pub fn offered() -> Self {
        let mut local_key = vec![0u8; KEY_AND_SALT];
        rand::fill(&mut local_key[..]);
        Self {
            tag: 1,
            suite: Suite::Aes128Sha1_80,
            remote_key: Vec::new(),
            local_key,
        }
    }

    /// The answer's crypto to our `offered` one, with our key: None when it answers another
    /// tag or suite.
    pub fn answering(self, offered: &Self) -> Option<Self> {
        (self.tag == offered.tag && self.suite == offered.suite).then(|| self.keep_ours(offered))
    }

    /// A new offer's crypto within the call: our key stays, so the stream we send goes on.
    pub fn keep_ours(mut self, previous: &Self) -> Self {
        self.local_key = previous.local_key.clone();
        self
    }

    /// The `a=crypto` line of our answer: the offer's tag and suite, our key.
    pub fn answer_line(&self) -> String {
        let key = STANDARD.encode(&self.local_key);
        format!(
            "a=crypto:{} {} inline:{key}\r\n",
            self.tag,
            self.suite.name()
        )
    }
}

/// Why SRTP could not start.
#[derive(Debug, thiserror::Error)]
#[error("SRTP: {0}")]
pub struct SrtpError(String);

/// A call's two SRTP contexts: the caller's stream decrypted, ours encrypted.
pub struct SrtpSession {
    inbound: Context,
    outbound: Context,
    remote_key: Vec<u8>,
}

fn context(key_and_salt: &[u8], suite: Suite) -> Result<Context, SrtpError> {
    let provider = rtc::crypto::default_provider().map_err(|e| SrtpError(e.to_string()))?;
    let (key, salt) = key_and_salt.split_at(KEY);
    Context::new(key, salt, suite.profile(), None, None, provider.crypto())
        .map_err(|e| SrtpError(e.to_string()))
}

impl SrtpSession {
    pub fn new(crypto: &Crypto) -> Result<Self, SrtpError> {
        Ok(Self {
            inbound: context(&crypto.remote_key, crypto.suite)?,
            outbound: context(&crypto.local_key, crypto.suite)?,
            remote_key: crypto.remote_key.clone(),
        })
    }

    /// Follows a re-INVITE: a new key of the caller's starts its stream's context afresh.
    pub fn update(&mut self, crypto: &Crypto) -> Result<(), SrtpError> {
        if crypto.remote_key != self.remote_key {
            self.inbound = context(&crypto.remote_key, crypto.suite)?;
            self.remote_key = crypto.remote_key.clone();
        }
        Ok(())
    }

    /// The caller's packet, decrypted; None when it fails authentication.
    pub fn decrypt(&mut self, packet: &[u8]) -> Option<BytesMut> {
        self.inbound.decrypt_rtp(packet).ok()
    }

    /// Our packet, encrypted and tagged.
    pub fn encrypt(&mut self, packet: &[u8]) -> Option<BytesMut> {
        self.outbound.encrypt_rtp(packet).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_B64: &str = "WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz";

    #[test]
    fn the_first_usable_crypto_line_is_taken_and_answered_with_our_key() {
        let offered = [
            "1 AES_256_CM_HMAC_SHA1_80 inline:d0RmdmcmVCspeEc3QGZiNWpVLFJhQX1cfHAwJSoj",
            "2 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4",
            &format!("3 AES_CM_128_HMAC_SHA1_32 inline:{KEY_B64}|2^31"),
        ];
        let crypto = Crypto::choose(offered).unwrap();
        assert_eq!((crypto.tag, crypto.suite), (3, Suite::Aes128Sha1_32));
        let line = crypto.answer_line();
        assert!(
            line.starts_with("a=crypto:3 AES_CM_128_HMAC_SHA1_32 inline:"),
            "{line}"
        );
        assert!(!line.contains(KEY_B64), "our own key, not the caller's");
        assert!(!format!("{crypto:?}").contains("inline"));
        assert!(Crypto::choose(["1 AES_CM_128_HMAC_SHA1_80 inline:c2hvcnQ="]).is_none());
        assert!(Crypto::choose(["garbage"]).is_none());
        let unencrypted = format!("1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64} UNENCRYPTED_SRTP");
        assert!(Crypto::choose([unencrypted.as_str()]).is_none());
    }

    #[test]
    fn each_side_decrypts_what_the_other_encrypts_and_forgeries_fail() {
        let offer = format!("1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64}");
        let ours = Crypto::choose([offer.as_str()]).unwrap();
        // The caller's view: its key is our remote key and the other way round.
        let theirs = Crypto {
            remote_key: ours.local_key.clone(),
            local_key: ours.remote_key.clone(),
            ..ours.clone()
        };
        let (mut us, mut caller) = (
            SrtpSession::new(&ours).unwrap(),
            SrtpSession::new(&theirs).unwrap(),
        );
        let mut packet = vec![0x80, 0x00, 0x12, 0x34, 0, 0, 0, 160, 0, 0, 0, 7];
        packet.extend_from_slice(&[0xd5; 160]);
        let sealed = caller.encrypt(&packet).unwrap();
        assert_ne!(&sealed[12..172], &packet[12..], "the payload is encrypted");
        assert_eq!(&us.decrypt(&sealed).unwrap()[..], &packet[..]);
        let mut forged = sealed.to_vec();
        forged[20] ^= 1;
        assert!(us.decrypt(&forged).is_none());
        let back = us.encrypt(&packet).unwrap();
        assert_eq!(&caller.decrypt(&back).unwrap()[..], &packet[..]);
    }
}

//! Registration with a PBX as one of its extensions (`--sip-register sip:7000@pbx`): REGISTER
//! with HTTP-digest credentials (RFC 3261 §10, §22; RFC 2617's MD5 with or without
//! `qop=auth`), refreshed before it expires, so the PBX sends the extension's calls here.

use super::message::{self, RequestHead, header_lines, header_param, text_header};
use super::transport::{Peer, Transport, split_host_port};
use md5::{Digest, Md5};
use std::net::SocketAddr;

/// The registration lifetime asked for, in seconds.
pub const REQUESTED_EXPIRES: u32 = 300;

/// What `--sip-register` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterSettings {
    /// The address of record, `sip:user@host[:port]`.
    pub aor: String,
    pub user: String,
    /// Where REGISTER goes: the AOR's host and port (5060 by default).
    pub registrar: String,
    /// The digest user (the extension's by default) and its password.
    pub auth_user: String,
    pub password: String,
    /// What carries the registration (`;transport=tcp|tls`, or `sips:`), and then the calls
    /// placed through the PBX.
    pub transport: Transport,
}

impl RegisterSettings {
    pub fn parse(aor: &str, password: String, auth_user: Option<String>) -> Result<Self, String> {
        let (rest, sips) = match (aor.strip_prefix("sip:"), aor.strip_prefix("sips:")) {
            (Some(rest), _) => (rest, false),
            (None, Some(rest)) => (rest, true),
            (None, None) => {
                return Err(format!(
                    "{aor:?} is not a sip: URI like sip:7000@pbx.example"
                ));
            }
        };
        let (user, host) = rest
            .split_once('@')
            .filter(|(user, host)| !user.is_empty() && !host.is_empty())
            .ok_or_else(|| format!("{aor:?} names no extension: sip:7000@pbx.example"))?;
        let (host, params) = host.split_once(';').unwrap_or((host, ""));
        let transport = Transport::of(params, sips)?;
        let (name, port) = split_host_port(host, transport.default_port())
            .ok_or_else(|| format!("{aor:?} names no PBX host: sip:7000@pbx.example"))?;
        Ok(Self {
            aor: format!("sip:{user}@{host}"),
            user: user.to_owned(),
            registrar: format!("{name}:{port}"),
            auth_user: auth_user.unwrap_or_else(|| user.to_owned()),
            password,
            transport,
        })
    }

    /// The registrar's host name (or address) alone: what its TLS certificate must name.
    pub fn registrar_name(&self) -> &str {
        let (name, _) = self
            .registrar
            .rsplit_once(':')
            .unwrap_or((&self.registrar, ""));
        name.trim_matches(['[', ']'])
    }

    /// One REGISTER of `dialog`'s contact for its lifetime (0 withdraws it), `authorization`
    /// the header answering a challenge, if any.
    pub fn request(
        &self,
        dialog: &RegisterDialog,
        authorization: Option<&(String, String)>,
        via: &Peer,
    ) -> String {
        let contact = dialog.contact;
        let mut head = RequestHead {
            method: "REGISTER",
            uri: &format!("sip:{}", self.registrar_host()),
            transport: via.transport(),
            via: contact,
            branch: &message::new_branch(),
            from: &format!("<{}>;tag={}", self.aor, dialog.tag),
            to: &format!("<{}>", self.aor),
            call_id: &dialog.call_id,
            cseq: dialog.cseq,
        }
        .write();
        head.push_str(&format!(
            "Contact: <sip:{}@{contact}{}>\r\nExpires: {}\r\nUser-Agent: duplex\r\n",
            self.user,
            via.contact_param(),
            dialog.expires
        ));
        if let Some((name, value)) = authorization {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        message::finish(head, &[], None)
    }

    /// The registrar's host, as the REGISTER's request URI names it.
    pub fn registrar_host(&self) -> &str {
        self.aor.split_once('@').map_or("", |(_, host)| host)
    }

    /// The header answering a 401 (`Authorization`) or 407 (`Proxy-Authorization`) challenge
    /// to a REGISTER.
    pub fn answer_challenge(&self, response: &str) -> Result<(String, String), String> {
        let uri = format!("sip:{}", self.registrar_host());
        self.authorize(response, "REGISTER", &uri)
    }

    /// The header answering a challenge to a request of `method` for `uri` (an INVITE the
    /// agent places through the PBX) with this extension's credentials.
    pub fn authorize(
        &self,
        response: &str,
        method: &str,
        uri: &str,
    ) -> Result<(String, String), String> {
        let (name, challenge) = ["WWW-Authenticate", "Proxy-Authenticate"]
            .iter()
            .find_map(|name| Some((*name, text_header(response, name)?)))
            .ok_or("a 401/407 without a challenge")?;
        let params = challenge
            .strip_prefix("Digest ")
            .ok_or_else(|| format!("a challenge this client cannot answer: {challenge}"))?;
        let param = |key: &str| digest_param(params, key);
        let realm = param("realm").ok_or("a challenge without a realm")?;
        let nonce = param("nonce").ok_or("a challenge without a nonce")?;
        if param("algorithm").is_some_and(|a| !a.eq_ignore_ascii_case("MD5")) {
            return Err(format!(
                "digest algorithm {:?}: only MD5",
                param("algorithm")
            ));
        }
        let ha1 = md5_hex(&format!("{}:{realm}:{}", self.auth_user, self.password));
        let ha2 = md5_hex(&format!("{method}:{uri}"));
        let auth = param("qop").filter(|q| q.split(',').any(|q| q.trim() == "auth"));
        let mut value = format!(
            "Digest username=\"{}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", algorithm=MD5",
            self.auth_user
        );
        let response = match auth {
            Some(_) => {
                let cnonce = format!("{:016x}", rand::random::<u64>());
                value.push_str(&format!(", qop=auth, nc=00000001, cnonce=\"{cnonce}\""));
                md5_hex(&format!("{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}"))
            }
            None => md5_hex(&format!("{ha1}:{nonce}:{ha2}")),
        };
        value.push_str(&format!(", response=\"{response}\""));
        if let Some(opaque) = param("opaque") {
            value.push_str(&format!(", opaque=\"{opaque}\""));
        }
        let header = match name {
            "WWW-Authenticate" => "Authorization",
            _ => "Proxy-Authorization",
        };
        Ok((header.to_owned(), value))
    }
}

/// What carries over between one registration's REGISTERs.
pub struct RegisterDialog {
    pub call_id: String,
    pub tag: String,
    pub cseq: u32,
    /// The lifetime asked for: ours, the registrar's `Min-Expires` after a 423, or 0 to
    /// withdraw the binding.
    pub expires: u32,
    /// Where calls should come: our SIP address as the registrar reaches it.
    pub contact: SocketAddr,
}

impl RegisterDialog {
    pub fn new() -> Self {
        Self {
            call_id: format!("{:032x}@duplex", rand::random::<u128>()),
            tag: format!("{:016x}", rand::random::<u64>()),
            cseq: 0,
            expires: REQUESTED_EXPIRES,
            contact: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

impl Default for RegisterDialog {
    fn default() -> Self {
        Self::new()
    }
}

/// A response's status code.
pub fn status(response: &str) -> Option<u16> {
    response.strip_prefix("SIP/2.0 ")?.get(..3)?.parse().ok()
}

/// How long the registrar granted our binding (`contact`): its Contact's `expires` (a 200
/// lists every binding of the address, other devices' too), else the Expires header, else
/// what was `asked`.
pub fn granted_expires(response: &str, contact: SocketAddr, asked: u32) -> u32 {
    let ours = format!("@{contact}");
    header_lines(response)
        .filter(|(name, _)| name.eq_ignore_ascii_case("Contact"))
        .flat_map(|(_, value)| value.split(','))
        .find(|binding| binding.contains(&ours))
        .and_then(|binding| header_param(binding, "expires")?.trim().parse().ok())
        .or_else(|| text_header(response, "Expires")?.trim().parse().ok())
        .unwrap_or(asked)
}

/// The `Min-Expires` of a 423 Interval Too Brief.
pub fn min_expires(response: &str) -> Option<u32> {
    text_header(response, "Min-Expires")?.trim().parse().ok()
}

/// Whether a challenge says only the nonce was stale (the credentials were right).
pub fn is_stale(response: &str) -> bool {
    ["WWW-Authenticate", "Proxy-Authenticate"]
        .iter()
        .filter_map(|name| text_header(response, name))
        .any(|challenge| {
            digest_param(challenge, "stale").is_some_and(|s| s.eq_ignore_ascii_case("true"))
        })
}

/// A `key="value"` or `key=value` of a digest challenge.
pub fn digest_param<'a>(params: &'a str, key: &str) -> Option<&'a str> {
    params.split(',').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case(key)
            .then(|| value.trim().trim_matches('"'))
    })
}

pub fn md5_hex(text: &str) -> String {
    Md5::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uri_names_the_extension_and_the_registrar() {
        let settings = RegisterSettings::parse("sip:7000@pbx.example", "pw".into(), None).unwrap();
        assert_eq!(settings.registrar, "pbx.example:5060");
        assert_eq!(
            (settings.user.as_str(), settings.auth_user.as_str()),
            ("7000", "7000")
        );
        let with_port =
            RegisterSettings::parse("sip:7000@10.0.0.2:5080", "pw".into(), Some("u".into()));
        assert_eq!(with_port.unwrap().registrar, "10.0.0.2:5080");
        let tls = RegisterSettings::parse("sips:7000@pbx.example", "pw".into(), None).unwrap();
        assert_eq!(
            (tls.registrar.as_str(), tls.transport, tls.registrar_name()),
            ("pbx.example:5061", Transport::Tls, "pbx.example")
        );
        let tcp = RegisterSettings::parse("sip:7000@[::1]:5080;transport=tcp", "pw".into(), None);
        let tcp = tcp.unwrap();
        assert_eq!(
            (tcp.transport, tcp.registrar_name()),
            (Transport::Tcp, "::1")
        );
        assert_eq!(tcp.aor, "sip:7000@[::1]:5080");
        for bad in [
            "7000@pbx",
            "sip:pbx.example",
            "sip:@pbx",
            "sip:7000@",
            "sip:7000@h;transport=ws",
        ] {
            assert!(
                RegisterSettings::parse(bad, String::new(), None).is_err(),
                "{bad}"
            );
        }
    }

    /// RFC 2617 §3.5's worked example, with its user, password, nonce and cnonce, for the
    /// computation; the URI and method differ, so the response is recomputed here.
    #[test]
    fn a_digest_challenge_is_answered_as_rfc_2617_computes_it() {
        let settings =
            RegisterSettings::parse("sip:Mufasa@pbx.example", "Circle Of Life".into(), None)
                .unwrap();
        let challenge = "SIP/2.0 401 Unauthorized\r\nWWW-Authenticate: Digest realm=\"testrealm@host.com\", \
nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"\r\n\r\n";
        let (name, value) = settings.answer_challenge(challenge).unwrap();
        assert_eq!(name, "Authorization");
        let ha1 = md5_hex("Mufasa:testrealm@host.com:Circle Of Life");
        assert_eq!(ha1, "939e7578ed9e3c518a452acee763bce9");
        let ha2 = md5_hex("REGISTER:sip:pbx.example");
        let expected = md5_hex(&format!("{ha1}:dcd98b7102dd2f0e8b11d0f600bfb0c093:{ha2}"));
        assert!(
            value.contains(&format!("response=\"{expected}\"")),
            "{value}"
        );
        assert!(value.contains("opaque=\"5ccc069c403ebaf9f0171e9517f40e41\""));
        let sha = challenge.replace("opaque", "algorithm=SHA-256, opaque");
        assert!(settings.answer_challenge(&sha).is_err());
    }

    #[test]
    fn the_granted_lifetime_is_read_from_contact_or_expires() {
        let ours: SocketAddr = "10.0.0.9:5060".parse().unwrap();
        let both = "SIP/2.0 200 OK\r\nContact: <sip:7000@10.0.0.5:5060>;expires=3600, \
<sip:7000@10.0.0.9:5060>;expires=120\r\nExpires: 60\r\n\r\n";
        assert_eq!(granted_expires(both, ours, 300), 120);
        assert_eq!(
            granted_expires("SIP/2.0 200 OK\r\nExpires: 60\r\n\r\n", ours, 300),
            60
        );
        assert_eq!(granted_expires("SIP/2.0 200 OK\r\n\r\n", ours, 300), 300);
        assert_eq!(
            min_expires("SIP/2.0 423 Interval Too Brief\r\nMin-Expires: 900\r\n"),
            Some(900)
        );
        assert!(is_stale(
            "SIP/2.0 401 U\r\nWWW-Authenticate: Digest realm=\"r\", nonce=\"n\", stale=TRUE\r\n"
        ));
        assert_eq!(status("SIP/2.0 401 Unauthorized\r\n"), Some(401));
    }
}

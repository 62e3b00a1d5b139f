//! The STUN and TURN servers WebRTC peers gather candidates from: checked once at start, used by
//! every peer the server answers with, and handed to the page (`GET /api/ice`, behind the token)
//! so a browser gathers from them too.
//!
//! A STUN server lets a server behind NAT learn and announce its public address; a TURN server
//! relays the media when no direct path exists (both sides behind NAT, UDP blocked). The
//! server's own peers (webrtc-rs) use `stun:` and `turn:` over UDP only; `turns:`, `stuns:` and
//! `?transport=tcp` are handed to browsers, which can use them.
//!
//! TURN credentials are either one fixed username and credential, or minted for each peer from
//! a secret shared with the TURN server (the TURN REST scheme coturn's `use-auth-secret`
//! checks): the username is the expiry time and the credential its HMAC-SHA1 under the secret,
//! so a browser is handed a credential that lapses instead of the server's password.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rtc::ice::url::{SchemeType, Url};
use serde::Serialize;
use sha1::Sha1;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use webrtc::peer_connection::{
    RTCConfiguration, RTCConfigurationBuilder, RTCIceServer, RTCIceTransportPolicy,
};

/// The name in every minted TURN username.
const REST_USER: &str = "duplex";

/// How TURN servers learn who is relaying.
#[derive(Clone, Default)]
pub enum TurnAuth {
    /// No TURN server.
    #[default]
    None,
    /// One username and credential, as given.
    Fixed {
        username: String,
        credential: String,
    },
    /// Minted per peer from the secret shared with the TURN server, valid for `lifetime`.
    Secret { secret: String, lifetime: Duration },
}

/// Names the kind and the username, never a credential or the secret.
impl std::fmt::Debug for TurnAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Fixed { username, .. } => write!(f, "Fixed {{ username: {username:?}, .. }}"),
            Self::Secret { lifetime, .. } => write!(f, "Secret {{ lifetime: {lifetime:?}, .. }}"),
        }
    }
}

impl TurnAuth {
    fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }

    /// A username and credential for a peer starting at `now`.
    fn credentials(&self, now: SystemTime) -> (String, String) {
        match self {
            Self::None => (String::new(), String::new()),
            Self::Fixed {
                username,
                credential,
            } => (username.clone(), credential.clone()),
            Self::Secret { secret, lifetime } => {
                let expiry = (now + *lifetime)
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let username = format!("{expiry}:{REST_USER}");
                (username.clone(), rest_credential(secret, &username))
            }
        }
    }
}

/// The TURN REST credential of `username`: base64 of its HMAC-SHA1 under `secret`.
fn rest_credential(secret: &str, username: &str) -> String {
    let mut mac =
        Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The ICE servers and policy, as given on the command line and checked.
#[derive(Debug, Clone, Default)]
pub struct IceConfig {
    urls: Vec<String>,
    auth: TurnAuth,
    relay_only: bool,
}

/// What is wrong with the ICE settings, said in the flags' terms.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IceError {
    #[error(
        "--ice-server {url}: {why}; write stun:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]"
    )]
    BadUrl { url: String, why: String },
    #[error(
        "--ice-server {0} is a TURN server: give --turn-secret (shared with it) or --ice-username and --ice-credential"
    )]
    NoCredentials(String),
    #[error("TURN credentials were given, and no --ice-server is a TURN server")]
    CredentialsWithoutTurn,
    #[error(
        "--ice-relay-only needs a turn: server over UDP (the server's own peers relay through no other kind)"
    )]
    RelayOnlyWithoutTurn,
}

/// Whether the server's own peers (webrtc-rs) can gather from `url`.
fn server_can_use(url: &Url) -> bool {
    match url.scheme {
        SchemeType::Stun => true,
        SchemeType::Turn => url.proto.to_string() == "udp",
        _ => false,
    }
}

fn is_turn(url: &Url) -> bool {
    matches!(url.scheme, SchemeType::Turn | SchemeType::Turns)
}

impl IceConfig {
    /// Checks `urls` and the TURN credentials they share. With `relay_only`, peers gather relay
    /// candidates only: every call's media goes through the TURN server.
    pub fn new(urls: Vec<String>, auth: TurnAuth, relay_only: bool) -> Result<Self, IceError> {
        let mut parsed = Vec::with_capacity(urls.len());
        for raw in &urls {
            let url = Url::parse_url(raw).map_err(|err| IceError::BadUrl {
                url: raw.clone(),
                why: err.to_string(),
            })?;
            if is_turn(&url) && auth.is_none() {
                return Err(IceError::NoCredentials(raw.clone()));
            }
            parsed.push(url);
        }
        if !auth.is_none() && !parsed.iter().any(is_turn) {
            return Err(IceError::CredentialsWithoutTurn);
        }
        if relay_only && !parsed.iter().any(|url| is_turn(url) && server_can_use(url)) {
            return Err(IceError::RelayOnlyWithoutTurn);
        }
        for (raw, url) in urls.iter().zip(&parsed) {
            if !server_can_use(url) {
                tracing::warn!(
                    url = %raw,
                    "the server's own peers use only stun: and turn: over UDP; this server is handed to browsers only"
                );
            }
        }
        Ok(Self {
            urls,
            auth,
            relay_only,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// Whether a TURN server is among them (and with it, credentials).
    pub fn has_turn(&self) -> bool {
        !self.auth.is_none()
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    pub fn relay_only(&self) -> bool {
        self.relay_only
    }

    /// The servers with credentials for a peer starting now.
    fn servers(&self) -> Vec<RTCIceServer> {
        if self.urls.is_empty() {
            return Vec::new();
        }
        let (username, credential) = self.auth.credentials(SystemTime::now());
        vec![RTCIceServer {
            urls: self.urls.clone(),
            username,
            credential,
        }]
    }

    fn policy(&self) -> RTCIceTransportPolicy {
        if self.relay_only {
            RTCIceTransportPolicy::Relay
        } else {
            RTCIceTransportPolicy::All
        }
    }

    /// The configuration of one of the server's peers.
    pub fn configuration(&self) -> RTCConfiguration {
        RTCConfigurationBuilder::new()
            .with_ice_servers(self.servers())
            .with_ice_transport_policy(self.policy())
            .build()
    }

    /// WHIP's `Link` header values (RFC 9725 §4.6), one per server, TURN ones with credentials
    /// minted now: how a WHIP client learns them, from the 201 that answers its offer.
    pub fn link_headers(&self) -> Vec<String> {
        let (username, credential) = self.auth.credentials(SystemTime::now());
        self.urls
            .iter()
            .map(|raw| {
                let turn = Url::parse_url(raw).is_ok_and(|url| is_turn(&url));
                let mut link = format!("<{raw}>; rel=\"ice-server\"");
                if turn {
                    link += &format!(
                        "; username=\"{}\"; credential=\"{}\"; credential-type=\"password\"",
                        quoted(&username),
                        quoted(&credential)
                    );
                }
                link
            })
            .collect()
    }

    /// What the page passes to `new RTCPeerConnection(...)`: the W3C `RTCConfiguration` fields,
    /// with credentials minted now.
    pub fn for_page(&self) -> PageIce {
        PageIce {
            ice_servers: self
                .servers()
                .into_iter()
                .map(|server| PageIceServer {
                    urls: server.urls,
                    username: (!server.username.is_empty()).then_some(server.username),
                    credential: (!server.credential.is_empty()).then_some(server.credential),
                })
                .collect(),
            ice_transport_policy: if self.relay_only { "relay" } else { "all" },
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PageIce {
    pub ice_servers: Vec<PageIceServer>,
    pub ice_transport_policy: &'static str,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PageIceServer {
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// `text` as the inside of an HTTP quoted-string.
fn quoted(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// What one peer's gathering found beyond its own addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gathered {
    /// Addresses STUN servers saw this server at (`srflx`), `ip:port`.
    pub public: Vec<String>,
    /// Relay addresses TURN servers gave it (`relay`), `ip:port`.
    pub relays: Vec<String>,
    /// Whether gathering ended within the server's cap.
    pub complete: bool,
}

impl Gathered {
    /// The server-reflexive and relay candidates of `sdp`, each address once.
    pub fn from_sdp(sdp: &str, complete: bool) -> Self {
        let mut gathered = Self {
            complete,
            ..Self::default()
        };
        for candidate in candidates(sdp) {
            let list = match candidate.kind {
                "srflx" => &mut gathered.public,
                "relay" => &mut gathered.relays,
                _ => continue,
            };
            let address = format!("{}:{}", candidate.ip, candidate.port);
            if !list.contains(&address) {
                list.push(address);
            }
        }
        gathered
    }
}

/// One `a=candidate:` line of an SDP, the parts that say where it leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// `host`, `srflx`, `prflx` or `relay`.
    pub kind: &'a str,
    pub ip: &'a str,
    pub port: u16,
}

/// The well-formed ICE candidates an SDP carries (RFC 8839: foundation, component, transport,
/// priority, address, port, `typ`, type).
pub fn candidates(sdp: &str) -> impl Iterator<Item = Candidate<'_>> {
    sdp.lines()
        .filter_map(|line| line.strip_prefix("a=candidate:"))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match *fields.get(4..8)? {
                [ip, port, "typ", kind] => Some(Candidate {
                    kind,
                    ip,
                    port: port.parse().ok()?,
                }),
                _ => None,
            }
        })
}

impl IceConfig {
    /// What `gathered` says of these servers: `Ok` with what they gave, or `Err` with what is
    /// missing. Only the kinds the server's own peers use count (`stun:`, `turn:` over UDP).
    pub fn judge(&self, gathered: &Gathered) -> Result<String, String> {
        let parsed: Vec<Url> = self
            .urls
            .iter()
            .filter_map(|raw| Url::parse_url(raw).ok())
            .filter(server_can_use)
            .collect();
        let wants_public = parsed.iter().any(|url| url.scheme == SchemeType::Stun);
        let wants_relay = parsed.iter().any(is_turn);
        let mut missing = Vec::new();
        if wants_public && gathered.public.is_empty() && !self.relay_only {
            missing.push("no STUN server told this server its public address");
        }
        if wants_relay && gathered.relays.is_empty() {
            missing.push("no TURN server gave this server a relay (unreachable, or it refused the credentials)");
        }
        if !missing.is_empty() {
            let late = if gathered.complete { "" } else { " within 3 s" };
            return Err(format!("{}{late}", missing.join("; ")));
        }
        let mut found = Vec::new();
        if !gathered.public.is_empty() {
            found.push(format!("public address {}", gathered.public.join(", ")));
        }
        if !gathered.relays.is_empty() {
            found.push(format!("relay {}", gathered.relays.join(", ")));
        }
        if found.is_empty() {
            found.push("browsers only: the server's peers use none of these servers".into());
        }
        Ok(found.join("; "))
    }
}

/// How many ICE candidates an SDP carries.
pub fn candidate_count(sdp: &str) -> usize {
    candidates(sdp).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(urls: &[&str], user: Option<&str>, relay_only: bool) -> Result<IceConfig, IceError> {
        let auth = match user {
            Some(user) => TurnAuth::Fixed {
                username: user.to_owned(),
                credential: "secret".to_owned(),
            },
            None => TurnAuth::None,
        };
        let urls = urls.iter().map(|url| url.to_string()).collect();
        IceConfig::new(urls, auth, relay_only)
    }

    #[test]
    fn no_servers_gather_host_candidates_only() {
        let ice = config(&[], None, false).unwrap();
        assert!(ice.is_empty());
        assert!(ice.configuration().ice_servers().is_empty());
        let page = serde_json::to_value(ice.for_page()).unwrap();
        assert_eq!(
            page,
            serde_json::json!({"iceServers": [], "iceTransportPolicy": "all"})
        );
    }

    #[test]
    fn stun_and_turn_servers_reach_the_peers_and_the_page() {
        let ice = config(
            &["stun:stun.example.com:19302", "turn:203.0.113.7:3478"],
            Some("duplex"),
            true,
        )
        .unwrap();
        let peer = ice.configuration();
        assert_eq!(peer.ice_transport_policy(), RTCIceTransportPolicy::Relay);
        assert_eq!(peer.ice_servers()[0].urls.len(), 2);
        assert_eq!(peer.ice_servers()[0].username, "duplex");
        let page = serde_json::to_value(ice.for_page()).unwrap();
        assert_eq!(
            page,
            serde_json::json!({
                "iceServers": [{
                    "urls": ["stun:stun.example.com:19302", "turn:203.0.113.7:3478"],
                    "username": "duplex",
                    "credential": "secret",
                }],
                "iceTransportPolicy": "relay",
            })
        );
    }

    #[test]
    fn bad_settings_are_refused_with_the_flag_to_fix() {
        let bad_url = config(&["stun://stun.example.com"], None, false).unwrap_err();
        assert!(
            matches!(&bad_url, IceError::BadUrl { url, .. } if url == "stun://stun.example.com")
        );
        assert!(bad_url.to_string().contains("write stun:HOST"), "{bad_url}");
        assert!(matches!(
            config(&["http:example.com"], None, false),
            Err(IceError::BadUrl { .. })
        ));
        assert_eq!(
            config(&["turn:203.0.113.7"], None, false).unwrap_err(),
            IceError::NoCredentials("turn:203.0.113.7".into())
        );
        assert_eq!(
            config(&["stun:203.0.113.7"], Some("duplex"), false).unwrap_err(),
            IceError::CredentialsWithoutTurn
        );
        assert_eq!(
            config(&["stun:203.0.113.7"], None, true).unwrap_err(),
            IceError::RelayOnlyWithoutTurn
        );
        // A TURN server the server's peers cannot reach over UDP leaves them nothing to relay.
        assert_eq!(
            config(&["turns:turn.example.com"], Some("duplex"), true).unwrap_err(),
            IceError::RelayOnlyWithoutTurn
        );
        assert!(config(&["turns:turn.example.com"], Some("duplex"), false).is_ok());
    }

    #[test]
    fn a_shared_secret_mints_credentials_that_lapse() {
        let auth = TurnAuth::Secret {
            secret: "north-wind".into(),
            lifetime: Duration::from_secs(3600),
        };
        let (username, credential) =
            auth.credentials(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert_eq!(username, "1700003600:duplex");
        // Python: base64(hmac.new(b"north-wind", b"1700003600:duplex", sha1).digest())
        assert_eq!(credential, "xBj8pUUwSkO3sCNqomlLGDwBd7s=");

        let ice = IceConfig::new(vec!["turn:203.0.113.7".into()], auth, false).unwrap();
        let page = ice.for_page();
        let minted = page.ice_servers[0].username.as_deref().unwrap();
        let expiry: u64 = minted.strip_suffix(":duplex").unwrap().parse().unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!((now + 3599..=now + 3601).contains(&expiry), "{minted}");
        assert_eq!(
            page.ice_servers[0].credential.as_deref(),
            Some(rest_credential("north-wind", minted).as_str())
        );
    }

    #[test]
    fn gathering_is_judged_by_what_the_servers_should_have_given() {
        let sdp = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
            a=candidate:1 1 udp 2130706431 10.0.0.5 40000 typ host\r\n\
            a=candidate:2 1 udp 1694498815 203.0.113.7 40000 typ srflx raddr 10.0.0.5 rport 40000\r\n\
            a=candidate:2 2 udp 1694498815 203.0.113.7 40000 typ srflx raddr 10.0.0.5 rport 40000\r\n\
            a=candidate:3 1 udp 16777215 198.51.100.9 49152 typ relay raddr 203.0.113.7 rport 40000\r\n";
        let all = Gathered::from_sdp(sdp, true);
        assert_eq!(all.public, ["203.0.113.7:40000"]);
        assert_eq!(all.relays, ["198.51.100.9:49152"]);
        let both = config(
            &["stun:s.example.com", "turn:t.example.com"],
            Some("u"),
            false,
        )
        .unwrap();
        assert_eq!(
            both.judge(&all).unwrap(),
            "public address 203.0.113.7:40000; relay 198.51.100.9:49152"
        );
        let nothing = Gathered::from_sdp("", false);
        let problem = both.judge(&nothing).unwrap_err();
        assert!(problem.contains("no STUN server"), "{problem}");
        assert!(problem.contains("no TURN server"), "{problem}");
        assert!(problem.ends_with("within 3 s"), "{problem}");
        let stun_only = config(&["stun:s.example.com"], None, false).unwrap();
        assert!(
            stun_only
                .judge(&Gathered {
                    relays: vec![],
                    ..all.clone()
                })
                .is_ok()
        );
        let browsers_only = config(&["turns:t.example.com"], Some("u"), false).unwrap();
        assert!(
            browsers_only
                .judge(&nothing)
                .unwrap()
                .starts_with("browsers only")
        );
    }

    #[test]
    fn debug_output_never_shows_a_credential_or_the_secret() {
        let fixed = TurnAuth::Fixed {
            username: "duplex".into(),
            credential: "hunter2".into(),
        };
        let secret = TurnAuth::Secret {
            secret: "north-wind".into(),
            lifetime: Duration::from_secs(60),
        };
        let ice = IceConfig::new(vec!["turn:203.0.113.7".into()], secret.clone(), false).unwrap();
        let shown = format!("{fixed:?} {secret:?} {ice:?}");
        assert!(shown.contains("duplex"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("north-wind"), "{shown}");
    }

    #[test]
    fn whip_clients_get_a_link_per_server_with_turn_credentials_quoted() {
        let auth = TurnAuth::Fixed {
            username: "du\"plex".into(),
            credential: "a\\b".into(),
        };
        let urls = vec![
            "stun:s.example.com".into(),
            "turn:t.example.com?transport=udp".into(),
        ];
        let links = IceConfig::new(urls, auth, false).unwrap().link_headers();
        assert_eq!(
            links,
            [
                r#"<stun:s.example.com>; rel="ice-server""#,
                r#"<turn:t.example.com?transport=udp>; rel="ice-server"; username="du\"plex"; credential="a\\b"; credential-type="password""#,
            ]
        );
        assert!(IceConfig::default().link_headers().is_empty());
    }

    #[test]
    fn candidates_are_counted_in_an_sdp() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=candidate:1 1 udp 1 127.0.0.1 5000 typ relay\r\na=candidate:2 1 udp 2 127.0.0.1 5001 typ host\r\na=candidate:3 1 udp 2 127.0.0.1\r\n";
        assert_eq!(candidate_count(sdp), 2, "the cut-off line is no candidate");
        let relay = candidates(sdp).next().unwrap();
        assert_eq!(
            relay,
            Candidate {
                kind: "relay",
                ip: "127.0.0.1",
                port: 5000
            }
        );
        assert_eq!(candidate_count("v=0\r\n"), 0);
    }
}

//! SIP messages (RFC 3261 §7) as far as a user agent that answers calls needs them: a request's
//! method, URI, headers and body in; responses that copy the request's dialog headers out, and
//! the BYE a server sends to end a call.

use std::fmt::Write;
use std::net::SocketAddr;

/// Datagrams larger than this are refused unread (a real INVITE is one or two kilobytes).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub uri: String,
    /// Every header in order, names in their full form (compact forms expanded).
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// Why a datagram is not a request this server can answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not UTF-8 text")]
    NotText,
    #[error("no request line")]
    NoRequestLine,
    #[error("a response, not a request")]
    Response,
    #[error("malformed request line {0:?}")]
    BadRequestLine(String),
    #[error("malformed header line {0:?}")]
    BadHeader(String),
    #[error("missing header {0}")]
    Missing(&'static str),
    #[error("Content-Length {declared} but {actual} bytes of body")]
    BodyLength { declared: usize, actual: usize },
}

impl Request {
    /// Parses one datagram. Every request must carry the headers a response copies.
    pub fn parse(datagram: &[u8]) -> Result<Self, ParseError> {
        let text = std::str::from_utf8(datagram).map_err(|_| ParseError::NotText)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .or_else(|| text.split_once("\n\n"))
            .unwrap_or((text, ""));
        let mut lines = head.lines().skip_while(|line| line.trim().is_empty());
        let request_line = lines.next().ok_or(ParseError::NoRequestLine)?;
        if request_line.starts_with("SIP/2.0 ") {
            return Err(ParseError::Response);
        }
        let (method, uri) = parse_request_line(request_line)?;
        let headers = parse_headers(lines)?;
        let request = Self {
            method,
            uri,
            headers,
            body: body.to_owned(),
        };
        for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
            request.header(name).ok_or(ParseError::Missing(name))?;
        }
        request.check_body_length()?;
        Ok(request)
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        first_header(&self.headers, name)
    }

    pub fn call_id(&self) -> &str {
        self.header("Call-ID").unwrap_or_default()
    }

    /// The tag of `From` or `To` (`header` names which), if any.
    pub fn tag(&self, header: &str) -> Option<&str> {
        header_param(self.header(header)?, "tag")
    }

    /// The URI of the `Contact` header: where requests within the dialog go.
    pub fn contact_uri(&self) -> Option<&str> {
        header_uri(self.header("Contact")?)
    }

    /// Records where the request came from in its top Via, as responses must carry it: the
    /// source address when it differs from the Via's host (RFC 3261 §18.2.1), and with it the
    /// source port where the Via asks for `rport` (RFC 3581, callers behind NAT).
    pub fn note_source(&mut self, source: SocketAddr) {
        let Some((_, via)) = self
            .headers
            .iter_mut()
            .find(|(name, _)| name.eq_ignore_ascii_case("Via"))
        else {
            return;
        };
        let (top, rest) = match via.split_once(',') {
            Some((top, rest)) => (top.to_owned(), Some(rest.to_owned())),
            None => (via.clone(), None),
        };
        let mut params: Vec<String> = top.split(';').map(str::to_owned).collect();
        let wants_rport = params
            .iter()
            .any(|p| p.trim().eq_ignore_ascii_case("rport"));
        let host = params[0].split_whitespace().nth(1).unwrap_or_default();
        let same_host = host
            .rsplit_once(':')
            .map_or(host, |(h, _)| h)
            .trim_matches(['[', ']'])
            == source.ip().to_string();
        params.retain(|p| !p.trim().eq_ignore_ascii_case("rport"));
        if wants_rport {
            params.push(format!("rport={}", source.port()));
        }
        if wants_rport || !same_host {
            params.push(format!("received={}", source.ip()));
        }
        let top = params.join(";");
        *via = match rest {
            Some(rest) => format!("{top},{rest}"),
            None => top,
        };
    }

    /// Every header called `name`, in order.
    pub fn headers_named(&self, name: &str) -> Vec<String> {
        named_headers(&self.headers, name)
    }

    /// A response to this request: its Via, From, Call-ID and CSeq copied (and Record-Route
    /// into an INVITE's 2xx, RFC 3261 §12.1.1), To with `to_tag` added when it has none (a
    /// fresh tag on any final response without one, §8.2.6.2), then `extra` and `body`.
    pub fn response(
        &self,
        status: u16,
        reason: &str,
        to_tag: Option<&str>,
        extra: &[(&str, String)],
        body: Option<(&str, &str)>,
    ) -> String {
        let mut out = format!("SIP/2.0 {status} {reason}\r\n");
        let routed = self.method == "INVITE" && (200..300).contains(&status);
        for (name, value) in &self.headers {
            let copied = ["Via", "From", "Call-ID", "CSeq"]
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n))
                || (routed && name.eq_ignore_ascii_case("Record-Route"));
            if copied {
                let _ = write!(out, "{name}: {value}\r\n");
            }
        }
        let to = self.header("To").unwrap_or_default();
        let fresh;
        let tag = match to_tag {
            Some(tag) => Some(tag),
            None if status >= 200 => {
                fresh = format!("{:016x}", rand::random::<u64>());
                Some(fresh.as_str())
            }
            None => None,
        };
        match tag {
            Some(tag) if header_param(to, "tag").is_none() => {
                let _ = write!(out, "To: {to};tag={tag}\r\n");
            }
            _ => {
                let _ = write!(out, "To: {to}\r\n");
            }
        }
        finish(out, extra, body)
    }

    fn check_body_length(&self) -> Result<(), ParseError> {
        let Some(declared) = self.header("Content-Length") else {
            return Ok(());
        };
        let declared: usize = declared
            .trim()
            .parse()
            .map_err(|_| ParseError::BadHeader(format!("Content-Length: {declared}")))?;
        let actual = self.body.len();
        if declared > actual {
            return Err(ParseError::BodyLength { declared, actual });
        }
        Ok(())
    }
}

/// The first lines of a request we send: its request line, our Via (over `transport`, at
/// `via`, with `branch` and `rport`), Max-Forwards, From, To, Call-ID and CSeq.
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub uri: &'a str,
    pub transport: &'a str,
    pub via: SocketAddr,
    pub branch: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub call_id: &'a str,
    pub cseq: u32,
}

impl RequestHead<'_> {
    pub fn write(&self) -> String {
        let Self {
            method,
            uri,
            transport,
            via,
            branch,
            from,
            to,
            call_id,
            cseq,
        } = self;
        format!(
            "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/{transport} {via};branch={branch};rport\r\n\
Max-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
        )
    }
}

/// A fresh Via branch: a new transaction (RFC 3261's magic cookie and 64 random bits).
pub fn new_branch() -> String {
    format!("z9hG4bK{:016x}", rand::random::<u64>())
}

/// The extra headers, Content-Length and body after a start line and the copied headers.
pub fn finish(mut out: String, extra: &[(&str, String)], body: Option<(&str, &str)>) -> String {
    for (name, value) in extra {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    match body {
        Some((content_type, body)) => {
            let _ = write!(
                out,
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
        None => out.push_str("Content-Length: 0\r\n\r\n"),
    }
    out
}

/// The value of `;name=value` among a header's parameters.
pub fn header_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let params = match value.rfind('>') {
        Some(end) => &value[end + 1..],
        None => value,
    };
    params.split(';').skip(1).find_map(|param| {
        let (key, val) = param.split_once('=')?;
        key.trim().eq_ignore_ascii_case(name).then(|| val.trim())
    })
}

/// The headers of a message's text (a response, or a request not parsed as one): each name
/// in its full form with its value, up to the blank line before the body.
pub fn header_lines(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines()
        .skip(1)
        .take_while(|line| !line.is_empty())
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((full_name(name.trim()), value.trim()))
        })
}

/// The first header called `name` (case-insensitive, compact forms too) in a message's text.
pub fn text_header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    header_lines(text).find_map(|(n, value)| n.eq_ignore_ascii_case(name).then_some(value))
}

/// Whether a datagram is a response (to a request we sent: a BYE, a REGISTER, an INVITE).
pub fn is_response(datagram: &[u8]) -> bool {
    datagram.starts_with(b"SIP/2.0 ")
}

/// A response to a request we sent, as far as our client transactions read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub phrase: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn parse(text: &str) -> Option<Self> {
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
        let mut lines = head.lines();
        let status_line = lines.next()?.strip_prefix("SIP/2.0 ")?;
        let (code, phrase) = status_line.split_once(' ').unwrap_or((status_line, ""));
        let status = code.parse().ok().filter(|s| (100..700).contains(s))?;
        Some(Self {
            status,
            phrase: phrase.trim().to_owned(),
            headers: parse_headers(lines).ok()?,
            body: body.to_owned(),
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        first_header(&self.headers, name)
    }

    /// The tag of `From` or `To`.
    pub fn tag(&self, header: &str) -> Option<&str> {
        header_param(self.header(header)?, "tag")
    }

    /// The number and method of its CSeq: which of our requests it answers.
    pub fn cseq(&self) -> Option<(u32, &str)> {
        let (number, method) = self.header("CSeq")?.split_once(char::is_whitespace)?;
        Some((number.parse().ok()?, method.trim()))
    }

    /// The URI of its `Contact`: where requests within the dialog it sets up go.
    pub fn contact_uri(&self) -> Option<&str> {
        header_uri(self.header("Contact")?)
    }

    pub fn headers_named(&self, name: &str) -> Vec<String> {
        named_headers(&self.headers, name)
    }

    /// Its status line, as a log or a report quotes it.
    pub fn status_line(&self) -> String {
        format!("{} {}", self.status, self.phrase)
    }
}

/// The entries of a header that lists several, comma-separated (`<sip:p2;lr>, <sip:p1;lr>`):
/// split at the commas outside angle brackets and quotes.
pub fn split_list(value: &str) -> Vec<String> {
    let (mut entries, mut start, mut depth, mut quoted) = (Vec::new(), 0, 0i32, false);
    for (at, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => depth += 1,
            '>' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                entries.push(value[start..at].trim().to_owned());
                start = at + 1;
            }
            _ => {}
        }
    }
    entries.push(value[start..].trim().to_owned());
    entries.retain(|entry| !entry.is_empty());
    entries
}

/// The first of `headers` called `name` (case-insensitive).
fn first_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Every one of `headers` called `name`, in order.
fn named_headers(headers: &[(String, String)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .collect()
}

/// The URI of a name-addr (`"Bob" <sip:bob@host>;tag=1`) or an addr-spec (`sip:bob@host`).
fn header_uri(value: &str) -> Option<&str> {
    match value.split_once('<') {
        Some((_, rest)) => rest.split_once('>').map(|(uri, _)| uri),
        None => value.split(';').next().map(str::trim),
    }
}

/// What the front of a stream (SIP over TCP) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framed {
    /// Not a whole message yet.
    Partial,
    /// A keep-alive (RFC 5626 §4.4.1): a double CRLF "ping" of this many bytes, answered
    /// with one CRLF.
    Ping(usize),
    /// A lone CRLF (a "pong", or padding): skipped.
    Padding(usize),
    /// One whole message of this many bytes: its headers and the body its Content-Length
    /// gives (none when it has none).
    Message(usize),
}

/// Why a stream cannot be read as SIP: the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a message longer than {MAX_MESSAGE_BYTES} bytes")]
    TooBig,
    #[error("a Content-Length that is not a number")]
    BadLength,
}

/// Splits the next message off the front of a SIP stream (RFC 3261 §18.3).
pub fn frame(stream: &[u8]) -> Result<Framed, FrameError> {
    if stream.starts_with(b"\r\n\r\n") {
        return Ok(Framed::Ping(4));
    }
    if stream == b"\r\n" {
        // Half a ping, perhaps: wait for the rest.
        return Ok(Framed::Partial);
    }
    if stream.starts_with(b"\r\n") {
        return Ok(Framed::Padding(2));
    }
    let Some(head_end) = stream.windows(4).position(|w| w == b"\r\n\r\n") else {
        return match stream.len() > MAX_MESSAGE_BYTES {
            true => Err(FrameError::TooBig),
            false => Ok(Framed::Partial),
        };
    };
    let head = String::from_utf8_lossy(&stream[..head_end + 2]);
    let body = match text_header(&head, "Content-Length") {
        Some(length) => length.parse::<usize>().map_err(|_| FrameError::BadLength)?,
        None => 0,
    };
    let total = (head_end + 4).saturating_add(body);
    if total > MAX_MESSAGE_BYTES {
        return Err(FrameError::TooBig);
    }
    Ok(match stream.len() >= total {
        true => Framed::Message(total),
        false => Framed::Partial,
    })
}

fn parse_request_line(line: &str) -> Result<(String, String), ParseError> {
    let bad = || ParseError::BadRequestLine(line.chars().take(80).collect());
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some("SIP/2.0"), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) || uri.is_empty() {
        return Err(bad());
    }
    Ok((method.to_owned(), uri.to_owned()))
}

fn parse_headers<'a>(
    lines: impl Iterator<Item = &'a str>,
) -> Result<Vec<(String, String)>, ParseError> {
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            // A folded line continues the header before it.
            let (_, value) = headers
                .last_mut()
                .ok_or_else(|| ParseError::BadHeader(line.into()))?;
            value.push(' ');
            value.push_str(line.trim());
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ParseError::BadHeader(line.chars().take(80).collect()))?;
        headers.push((full_name(name.trim()).to_owned(), value.trim().to_owned()));
    }
    Ok(headers)
}

/// RFC 3261 §7.3.3's compact header names in their full form.
fn full_name(name: &str) -> &str {
    match name {
        "v" | "V" => "Via",
        "f" | "F" => "From",
        "t" | "T" => "To",
        "i" | "I" => "Call-ID",
        "m" | "M" => "Contact",
        "l" | "L" => "Content-Length",
        "c" | "C" => "Content-Type",
        other => other,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An INVITE as baresip 1.0 sends it.
    pub(crate) const INVITE: &str = "INVITE sip:NATF0@127.0.0.1:5070;transport=udp SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:15080;branch=z9hG4bK58c0bcad3902ad7c;rport\r\n\
Contact: <sip:tester-0x5592561bd4a0@127.0.0.1:15080>\r\n\
Max-Forwards: 70\r\n\
To: <sip:NATF0@127.0.0.1:5070;transport=udp>\r\n\
From: <sip:tester@127.0.0.1>;tag=8716cb073e5bc7b2\r\n\
Call-ID: ee2b285254bc8bd8\r\n\
CSeq: 60299 INVITE\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 146\r\n\
\r\n\
v=0\r\n\
o=- 579496876 2021537462 IN IP4 127.0.0.1\r\n\
s=-\r\n\
c=IN IP4 127.0.0.1\r\n\
t=0 0\r\n\
m=audio 12996 RTP/AVP 0 8 101\r\n\
a=rtpmap:101 telephone-event/8000\r\n";

    #[test]
    fn an_invite_parses_and_its_response_copies_the_dialog_headers() {
        let invite = Request::parse(INVITE.as_bytes()).unwrap();
        assert_eq!(invite.method, "INVITE");
        assert_eq!(invite.call_id(), "ee2b285254bc8bd8");
        assert_eq!(invite.tag("From"), Some("8716cb073e5bc7b2"));
        assert_eq!(invite.tag("To"), None);
        assert_eq!(
            invite.contact_uri(),
            Some("sip:tester-0x5592561bd4a0@127.0.0.1:15080")
        );
        assert!(invite.body.starts_with("v=0"));
        let ok = invite.response(
            200,
            "OK",
            Some("abc"),
            &[],
            Some(("application/sdp", "v=0\r\n")),
        );
        assert!(ok.starts_with("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:15080;branch="));
        assert!(ok.contains("\r\nTo: <sip:NATF0@127.0.0.1:5070;transport=udp>;tag=abc\r\n"));
        assert!(ok.contains("\r\nCSeq: 60299 INVITE\r\n"));
        assert!(ok.ends_with("Content-Length: 5\r\n\r\nv=0\r\n"), "{ok}");
    }

    #[test]
    fn the_source_is_noted_in_the_top_via() {
        let mut invite = Request::parse(INVITE.as_bytes()).unwrap();
        invite.note_source("198.51.100.7:40123".parse().unwrap());
        let ok = invite.response(200, "OK", Some("t"), &[], None);
        assert!(
            ok.contains("\r\nVia: SIP/2.0/UDP 127.0.0.1:15080;branch=z9hG4bK58c0bcad3902ad7c;rport=40123;received=198.51.100.7\r\n"),
            "{ok}"
        );
        let mut plain = Request::parse(INVITE.replace(";rport", "").as_bytes()).unwrap();
        plain.note_source("127.0.0.1:15080".parse().unwrap());
        assert_eq!(
            plain.header("Via"),
            Some("SIP/2.0/UDP 127.0.0.1:15080;branch=z9hG4bK58c0bcad3902ad7c")
        );
    }

    #[test]
    fn a_stream_is_split_at_each_message_and_keep_alive() {
        let message = "OPTIONS sip:x SIP/2.0\r\nl: 4\r\n\r\nbody";
        assert_eq!(
            frame(message.as_bytes()),
            Ok(Framed::Message(message.len()))
        );
        let two = format!("{message}{message}");
        assert_eq!(frame(two.as_bytes()), Ok(Framed::Message(message.len())));
        assert_eq!(frame(&message.as_bytes()[..30]), Ok(Framed::Partial));
        assert_eq!(
            frame(b"OPTIONS sip:x SIP/2.0\r\n\r\n"),
            Ok(Framed::Message(25))
        );
        assert_eq!(frame(b"\r\n\r\nOPTIONS"), Ok(Framed::Ping(4)));
        assert_eq!(frame(b"\r\nOPTIONS"), Ok(Framed::Padding(2)));
        assert_eq!(
            frame(b"\r\n"),
            Ok(Framed::Partial),
            "the rest of a ping may follow"
        );
        let wraps = format!(
            "OPTIONS sip:x SIP/2.0\r\nContent-Length: {}\r\n\r\n",
            usize::MAX - 10
        );
        assert_eq!(frame(wraps.as_bytes()), Err(FrameError::TooBig));
        let bad = b"OPTIONS sip:x SIP/2.0\r\nContent-Length: lots\r\n\r\n";
        assert_eq!(frame(bad), Err(FrameError::BadLength));
        let huge = b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 99999\r\n\r\n";
        assert_eq!(frame(huge), Err(FrameError::TooBig));
        assert_eq!(
            frame(&[b'a'; MAX_MESSAGE_BYTES + 1]),
            Err(FrameError::TooBig)
        );
    }

    #[test]
    fn compact_and_folded_headers_are_read() {
        let text = "OPTIONS sip:x@h SIP/2.0\r\nv: SIP/2.0/UDP h;branch=z9hG4bK1\r\nf: <sip:a@h>;tag=1\r\n\
t: <sip:x@h>\r\ni: abc\r\nCSeq: 1\r\n OPTIONS\r\nl: 0\r\n\r\n";
        let request = Request::parse(text.as_bytes()).unwrap();
        assert_eq!(request.header("Call-ID"), Some("abc"));
        assert_eq!(request.header("cseq"), Some("1 OPTIONS"));
    }

    #[test]
    fn garbage_is_refused_with_the_reason() {
        let cases: [(&[u8], ParseError); 6] = [
            (b"\xff\xfe", ParseError::NotText),
            (b"", ParseError::NoRequestLine),
            (b"SIP/2.0 200 OK\r\n\r\n", ParseError::Response),
            (
                b"hello world\r\n\r\n",
                ParseError::BadRequestLine("hello world".into()),
            ),
            (
                b"BYE sip:x SIP/2.0\r\nVia: v\r\nFrom: f\r\nTo: t\r\nCSeq: 1 BYE\r\n\r\n",
                ParseError::Missing("Call-ID"),
            ),
            (
                b"BYE sip:x SIP/2.0\r\nVia: v\r\nFrom: f\r\nTo: t\r\nCall-ID: c\r\nCSeq: 1 BYE\r\nContent-Length: 99\r\n\r\nshort",
                ParseError::BodyLength {
                    declared: 99,
                    actual: 5,
                },
            ),
        ];
        for (datagram, expected) in cases {
            assert_eq!(Request::parse(datagram), Err(expected));
        }
    }

    #[test]
    fn header_params_skip_the_uri() {
        assert_eq!(header_param("<sip:a@h;tag=no>;tag=yes", "tag"), Some("yes"));
        assert_eq!(header_param("sip:a@h;tag=x", "tag"), Some("x"));
        assert_eq!(header_param("<sip:a@h>", "tag"), None);
        assert!(is_response(b"SIP/2.0 100 Trying\r\n"));
        let response = "SIP/2.0 200 OK\r\ni: abc\r\nm: <sip:a@h>;expires=9\r\n\r\nCall-ID: body";
        assert_eq!(text_header(response, "Call-ID"), Some("abc"));
        assert_eq!(
            text_header(response, "contact"),
            Some("<sip:a@h>;expires=9")
        );
        assert!(!is_response(b"INVITE sip:a@h SIP/2.0\r\n"));
    }

    #[test]
    fn a_list_header_splits_at_commas_outside_brackets_and_quotes() {
        assert_eq!(
            split_list("<sip:p2;lr>, \"A, B\" <sip:p1;lr;x=a,b>,<sip:p0>"),
            ["<sip:p2;lr>", "\"A, B\" <sip:p1;lr;x=a,b>", "<sip:p0>"]
        );
        assert_eq!(split_list("<sip:p1>"), ["<sip:p1>"]);
    }

    #[test]
    fn a_response_gives_its_status_tags_cseq_and_contact() {
        let text = "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\n\
To: \"Bob\" <sip:bob@pbx>;tag=b0b\r\nf: <sip:7000@pbx>;tag=a1\r\nCSeq: 2 INVITE\r\n\
m: <sip:bob@10.0.0.7:5062>\r\nRecord-Route: <sip:p1;lr>\r\nRecord-Route: <sip:p2;lr>\r\n\
Content-Length: 4\r\n\r\nv=0\n";
        let response = Response::parse(text).unwrap();
        assert_eq!(response.status_line(), "180 Ringing");
        assert_eq!(
            (response.tag("To"), response.tag("From")),
            (Some("b0b"), Some("a1"))
        );
        assert_eq!(response.cseq(), Some((2, "INVITE")));
        assert_eq!(response.contact_uri(), Some("sip:bob@10.0.0.7:5062"));
        assert_eq!(response.headers_named("Record-Route").len(), 2);
        assert_eq!(response.body, "v=0\n");
        for bad in [
            "SIP/2.0 99 Low\r\n\r\n",
            "SIP/2.0 abc\r\n\r\n",
            "INVITE x SIP/2.0\r\n",
        ] {
            assert_eq!(Response::parse(bad), None, "{bad}");
        }
    }
}

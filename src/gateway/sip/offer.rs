//! The SDP of a SIP call (RFC 3264; RTP, or SRTP keyed by SDES): which of our codecs the
//! caller offers (Opus, G.722, G.711), where its RTP goes, and the answer that names ours.

use super::srtp::Crypto;
use crate::audio::g711::Law;
use crate::gateway::wire::{Codec, WireFormat};
use rtc::sdp::description::common::Attribute;
use rtc::sdp::description::media::MediaDescription;
use rtc::sdp::description::session::SessionDescription;
use std::io::Cursor;
use std::net::{IpAddr, SocketAddr};

/// A codec a call can run in, named as SDP names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SipCodec {
    /// Opus (RFC 7587): wideband and more, at the model's own 24 kHz.
    Opus,
    /// G.722: 16 kHz wideband, what desk phones call HD voice.
    G722,
    /// G.711 µ-law and A-law: 8 kHz, every phone has them.
    Pcmu,
    Pcma,
}

impl SipCodec {
    /// Every codec, the widest band first: the default preference.
    pub const ALL: [Self; 4] = [Self::Opus, Self::G722, Self::Pcmu, Self::Pcma];

    /// The name `--sip-codecs` takes and the log shows.
    pub fn name(self) -> &'static str {
        match self {
            Self::Opus => "opus",
            Self::G722 => "G722",
            Self::Pcmu => "PCMU",
            Self::Pcma => "PCMA",
        }
    }

    /// The `rtpmap` encoding: name, RTP clock and, for Opus, channels (always 2, RFC 7587).
    fn rtpmap(self) -> &'static str {
        match self {
            Self::Opus => "opus/48000/2",
            Self::G722 => "G722/8000",
            Self::Pcmu => "PCMU/8000",
            Self::Pcma => "PCMA/8000",
        }
    }

    /// Its mapping as an offer wrote it (`name`, lowercase): only G.722's clock varies.
    fn rtpmap_as(self, name: &str) -> &'static str {
        match (self, name) {
            (Self::G722, "g722/16000") => "G722/16000",
            _ => self.rtpmap(),
        }
    }

    /// Whether an offered format (its `rtpmap`, lowercase) is this codec. G.722's clock is
    /// 8000 by a mistake kept for compatibility (RFC 3551 §4.5.2); some phones write 16000.
    fn matches(self, codec: &str) -> bool {
        match self {
            Self::Opus => codec == "opus/48000/2" || codec == "opus/48000",
            Self::G722 => codec == "g722/8000" || codec == "g722/16000",
            Self::Pcmu => codec == "pcmu/8000",
            Self::Pcma => codec == "pcma/8000",
        }
    }

    /// The payload type our own offers give it (RFC 3551's static ones where they exist).
    fn our_payload_type(self) -> u8 {
        match self {
            Self::Opus => 111,
            Self::G722 => 9,
            Self::Pcmu => 0,
            Self::Pcma => 8,
        }
    }

    /// The RTP clock rate, which key presses share.
    pub fn rtp_clock(self) -> u32 {
        match self {
            Self::Opus => 48_000,
            _ => 8000,
        }
    }

    /// RTP timestamp units in one 20 ms packet.
    pub fn timestamp_step(self) -> u32 {
        self.rtp_clock() / 50
    }

    /// How its audio is decoded and encoded.
    pub fn wire(self) -> WireFormat {
        match self {
            Self::Opus => WireFormat::OPUS,
            Self::G722 => WireFormat::G722,
            Self::Pcmu => WireFormat::MULAW_8K,
            Self::Pcma => WireFormat {
                codec: Codec::G711(Law::Alaw),
                rate: 8000,
            },
        }
    }

    /// Our `fmtp` for it: for Opus, that we take mono at up to 24 kHz, with in-band FEC
    /// welcome (a lost packet is rebuilt from the next one's).
    fn fmtp(self) -> Option<&'static str> {
        match self {
            Self::Opus => Some(
                "maxplaybackrate=24000;sprop-maxcapturerate=24000;stereo=0;sprop-stereo=0;\
useinbandfec=1",
            ),
            _ => None,
        }
    }
}

impl std::str::FromStr for SipCodec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        Self::ALL
            .into_iter()
            .find(|codec| codec.name().eq_ignore_ascii_case(text))
            .ok_or_else(|| format!("unknown codec {text:?}; known: opus, G722, PCMU, PCMA"))
    }
}

/// Which way the caller wants audio to flow (RFC 3264 §5.1): a call on hold is `SendOnly` or
/// `Inactive` from the caller's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    /// Whether the caller sends RTP (so its silence means it is gone).
    pub fn caller_sends(self) -> bool {
        matches!(self, Self::SendRecv | Self::SendOnly)
    }

    /// Whether the caller takes our RTP.
    pub fn caller_receives(self) -> bool {
        matches!(self, Self::SendRecv | Self::RecvOnly)
    }

    /// The attribute our answer carries: the mirror of the offer's.
    fn answer(self) -> &'static str {
        match self {
            Self::SendRecv => "sendrecv",
            Self::SendOnly => "recvonly",
            Self::RecvOnly => "sendonly",
            Self::Inactive => "inactive",
        }
    }
}

/// What an offer asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioOffer {
    /// Where the caller receives RTP.
    pub remote: SocketAddr,
    pub codec: SipCodec,
    pub payload_type: u8,
    /// The payload type's mapping as the offer wrote it (RFC 3264 §6.1: the answer keeps it).
    rtpmap: &'static str,
    /// RFC 4733 `telephone-event`, when offered: its payload type (key presses).
    pub telephone_event: Option<u8>,
    /// Its clock rate, as offered.
    events_clock: u32,
    pub direction: Direction,
    /// SDES keys when the offer carries `a=crypto` (SRTP), with its transport: `RTP/SAVP`, or
    /// `RTP/AVP` when SRTP is offered as a best effort.
    pub crypto: Option<Crypto>,
    profile: String,
    /// Every `m=` line of the offer, in order: the answer has as many (RFC 3264 §6), the
    /// ones not taken with port 0.
    lines: Vec<MediaLine>,
}

/// One `m=` line of the offer, as the answer repeats it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MediaLine {
    /// The audio stream answered.
    Taken,
    /// Refused: its media, protocol and first format, echoed with port 0.
    Refused(String),
}

/// Why an offer cannot be answered; `488 Not Acceptable Here` carries it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    #[error("no SDP where one was due")]
    Missing,
    #[error("the call's first offer (ours) has no answer yet")]
    Pending,
    #[error("malformed SDP: {0}")]
    Malformed(String),
    #[error("no audio stream offered")]
    NoAudio,
    #[error("none of our codecs ({ours}) among the offered {offered:?}")]
    NoCodec { ours: String, offered: Vec<String> },
    #[error("no connection address for the audio")]
    NoAddress,
    #[error("the audio is offered over {0}; RTP/AVP and RTP/SAVP (SDES keys) are answered")]
    Profile(String),
    #[error("SRTP offered without a key we take (AES_CM_128_HMAC_SHA1_80 or _32, inline, no MKI)")]
    NoCrypto,
    #[error("a new offer in the call must keep its codec ({0})")]
    CodecChanged(String),
    #[error("a new offer in the call must keep its encryption ({0})")]
    CryptoChanged(&'static str),
    #[error(
        "the answer takes plain RTP, or another SRTP key line than ours; our offer asked for SRTP (AES_CM_128_HMAC_SHA1_80)"
    )]
    SrtpRefused,
}

impl AudioOffer {
    /// Reads an offer (or the answer to ours), taking the first of `codecs` it carries.
    pub fn parse(sdp: &str, codecs: &[SipCodec]) -> Result<Self, OfferError> {
        if sdp.trim().is_empty() {
            return Err(OfferError::Missing);
        }
        let description = SessionDescription::unmarshal(&mut Cursor::new(sdp.as_bytes()))
            .map_err(|e| OfferError::Malformed(e.to_string()))?;
        // The first audio line we can answer (an offer may put DTLS-SRTP first and plain RTP
        // after it); if none, why the first could not be.
        let mut first_error = None;
        for (idx, line) in description.media_descriptions.iter().enumerate() {
            if line.media_name.media != "audio" || line.media_name.port.value == 0 {
                continue;
            }
            match Self::take_line(&description, idx, codecs) {
                Ok(offer) => return Ok(offer),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        Err(first_error.unwrap_or(OfferError::NoAudio))
    }

    /// The offer as answered on its `taken`-th media line.
    fn take_line(
        description: &SessionDescription,
        taken: usize,
        codecs: &[SipCodec],
    ) -> Result<Self, OfferError> {
        let media = &description.media_descriptions;
        let audio = &media[taken];
        let profile = audio.media_name.protos.join("/");
        let crypto_lines = audio.attributes.iter().filter(|a| a.key == "crypto");
        let crypto = Crypto::choose(crypto_lines.filter_map(|a| a.value.as_deref()));
        match (profile.as_str(), &crypto) {
            ("RTP/AVP", _) | ("RTP/SAVP", Some(_)) => {}
            ("RTP/SAVP", None) => return Err(OfferError::NoCrypto),
            _ => return Err(OfferError::Profile(profile)),
        }
        let (payload_type, codec, rtpmap) = choose_codec(audio, codecs)?;
        let (telephone_event, events_clock) = telephone_event(audio, codec.rtp_clock());
        let address = audio
            .connection_information
            .as_ref()
            .or(description.connection_information.as_ref())
            .and_then(|c| c.address.as_ref())
            .and_then(|a| a.address.parse::<IpAddr>().ok())
            .ok_or(OfferError::NoAddress)?;
        let port = u16::try_from(audio.media_name.port.value).map_err(|_| OfferError::NoAddress)?;
        let direction = direction_of(&audio.attributes)
            .or_else(|| direction_of(&description.attributes))
            .unwrap_or(Direction::SendRecv);
        let lines = media
            .iter()
            .enumerate()
            .map(|(idx, m)| match idx == taken {
                true => MediaLine::Taken,
                false => MediaLine::Refused(refused_line(m)),
            })
            .collect();
        Ok(Self {
            remote: SocketAddr::new(address, port),
            codec,
            payload_type,
            rtpmap,
            telephone_event,
            events_clock,
            direction,
            crypto,
            profile,
            lines,
        })
    }

    /// A new offer within the call: taken only when it still carries this call's codec (its
    /// payload type may change), since the media already runs with it.
    pub fn renegotiate(&self, sdp: &str) -> Result<Self, OfferError> {
        let mut offer = match Self::parse(sdp, &[self.codec]) {
            Err(OfferError::NoCodec { .. }) => {
                return Err(OfferError::CodecChanged(self.codec.rtpmap().to_owned()));
            }
            other => other?,
        };
        offer.crypto = match (offer.crypto.take(), &self.crypto) {
            (Some(new), Some(ours)) if new.suite != ours.suite => {
                return Err(OfferError::CryptoChanged("its SRTP suite"));
            }
            (Some(new), Some(ours)) => Some(new.keep_ours(ours)),
            (None, None) => None,
            (_, Some(_)) => return Err(OfferError::CryptoChanged("SRTP")),
            (Some(_), None) => return Err(OfferError::CryptoChanged("plain RTP")),
        };
        offer.telephone_event = offer
            .telephone_event
            .filter(|_| self.telephone_event.is_some());
        Ok(offer)
    }

    /// Our answer: the chosen codec (and `telephone-event`, if offered) at `local`, `version`
    /// counting up with each answer in the dialog, and every other `m=` line refused.
    pub fn answer(&self, local: SocketAddr, session_id: u64, version: u64) -> String {
        let ip = match local.ip() {
            IpAddr::V4(_) => "IP4",
            IpAddr::V6(_) => "IP6",
        };
        let address = local.ip();
        let mut sdp = format!(
            "v=0\r\no=duplex {session_id} {version} IN {ip} {address}\r\ns=duplex\r\n\
c=IN {ip} {address}\r\nt=0 0\r\n"
        );
        for line in &self.lines {
            match line {
                MediaLine::Taken => sdp.push_str(&self.audio_section(local.port())),
                MediaLine::Refused(echo) => sdp.push_str(echo),
            }
        }
        sdp
    }

    fn audio_section(&self, port: u16) -> String {
        let pt = self.payload_type;
        let mut formats = pt.to_string();
        let mut attributes = codec_attributes(self.codec, pt, self.rtpmap);
        if let Some(events) = self.telephone_event {
            formats.push_str(&format!(" {events}"));
            attributes.push_str(&events_attributes(events, self.events_clock));
        }
        if let Some(crypto) = &self.crypto {
            attributes.push_str(&crypto.answer_line());
        }
        format!(
            "m=audio {port} {} {formats}\r\n{attributes}a=ptime:20\r\na={}\r\n",
            self.profile,
            self.direction.answer()
        )
    }
}

/// A codec's `rtpmap` (and `fmtp`) lines for payload type `pt`.
fn codec_attributes(codec: SipCodec, pt: u8, rtpmap: &str) -> String {
    let mut lines = format!("a=rtpmap:{pt} {rtpmap}\r\n");
    if let Some(fmtp) = codec.fmtp() {
        lines.push_str(&format!("a=fmtp:{pt} {fmtp}\r\n"));
    }
    lines
}

/// Key presses' `rtpmap` and `fmtp` lines (the 16 DTMF events).
fn events_attributes(pt: u8, clock: u32) -> String {
    format!("a=rtpmap:{pt} telephone-event/{clock}\r\na=fmtp:{pt} 0-15\r\n")
}

/// Key presses' payload types in our own offers: at 8 kHz, and at Opus's 48 kHz clock.
const OUR_EVENTS: u8 = 101;
const OUR_EVENTS_48K: u8 = 110;

/// Our offer, for an INVITE that came without one (a late offer, RFC 3261 §13.2.1, answered
/// in the caller's ACK) or a call the agent places: `codecs` in order and key presses at
/// `local`, over SRTP (`RTP/SAVP`) when `crypto` gives our key.
pub fn late_offer(
    local: SocketAddr,
    session_id: u64,
    codecs: &[SipCodec],
    crypto: Option<&Crypto>,
) -> String {
    let (ip, address) = match local.ip() {
        IpAddr::V4(ip) => ("IP4", ip.to_string()),
        IpAddr::V6(ip) => ("IP6", ip.to_string()),
    };
    let mut formats = String::new();
    let mut attributes = String::new();
    for &codec in codecs {
        formats.push_str(&format!(" {}", codec.our_payload_type()));
        let pt = codec.our_payload_type();
        attributes.push_str(&codec_attributes(codec, pt, codec.rtpmap()));
    }
    let mut events = vec![(OUR_EVENTS, 8000)];
    if codecs.contains(&SipCodec::Opus) {
        events.push((OUR_EVENTS_48K, 48_000));
    }
    for (pt, clock) in events {
        formats.push_str(&format!(" {pt}"));
        attributes.push_str(&events_attributes(pt, clock));
    }
    let profile = match crypto {
        Some(crypto) => {
            attributes.push_str(&crypto.answer_line());
            "RTP/SAVP"
        }
        None => "RTP/AVP",
    };
    format!(
        "v=0\r\no=duplex {session_id} 1 IN {ip} {address}\r\ns=duplex\r\nc=IN {ip} {address}\r\n\
t=0 0\r\nm=audio {port} {profile}{formats}\r\n{attributes}a=ptime:20\r\na=sendrecv\r\n",
        port = local.port()
    )
}

/// The first of `codecs` the audio line offers, with its payload type and mapping.
fn choose_codec(
    audio: &MediaDescription,
    codecs: &[SipCodec],
) -> Result<(u8, SipCodec, &'static str), OfferError> {
    let formats = &audio.media_name.formats;
    let offered: Vec<(u8, String)> = formats
        .iter()
        .filter_map(|pt| Some((pt.parse().ok()?, codec_of(audio, pt))))
        .collect();
    codecs
        .iter()
        .find_map(|&codec| {
            let (pt, name) = offered.iter().find(|(_, name)| codec.matches(name))?;
            Some((*pt, codec, codec.rtpmap_as(name)))
        })
        .ok_or_else(|| OfferError::NoCodec {
            ours: codecs
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(", "),
            offered: formats.iter().map(|pt| codec_of(audio, pt)).collect(),
        })
}

/// The offered `telephone-event` format, preferring the one at the audio's clock, and its
/// clock; (None, 8000) when key presses are not offered.
fn telephone_event(audio: &MediaDescription, audio_clock: u32) -> (Option<u8>, u32) {
    let offered: Vec<(u8, u32)> = audio
        .media_name
        .formats
        .iter()
        .filter_map(|pt| {
            let codec = codec_of(audio, pt);
            let clock = codec.strip_prefix("telephone-event/")?.parse().ok()?;
            Some((pt.parse().ok()?, clock))
        })
        .collect();
    let chosen = offered
        .iter()
        .find(|(_, clock)| *clock == audio_clock)
        .or(offered.first());
    match chosen {
        Some(&(pt, clock)) => (Some(pt), clock),
        None => (None, 8000),
    }
}

/// A format's codec from its `rtpmap`, or RFC 3551's static assignment.
fn codec_of(audio: &MediaDescription, pt: &str) -> String {
    let mapped = audio
        .attributes
        .iter()
        .filter(|a| a.key == "rtpmap")
        .filter_map(|a| a.value.as_deref()?.split_once(' '))
        .find(|(id, _)| *id == pt)
        .map(|(_, codec)| codec.to_ascii_lowercase());
    match (pt, mapped) {
        (_, Some(codec)) => codec,
        ("0", None) => "pcmu/8000".into(),
        ("8", None) => "pcma/8000".into(),
        ("9", None) => "g722/8000".into(),
        (other, None) => other.to_owned(),
    }
}

fn direction_of(attributes: &[Attribute]) -> Option<Direction> {
    attributes.iter().find_map(|a| match a.key.as_str() {
        "sendrecv" => Some(Direction::SendRecv),
        "sendonly" => Some(Direction::SendOnly),
        "recvonly" => Some(Direction::RecvOnly),
        "inactive" => Some(Direction::Inactive),
        _ => None,
    })
}

/// An offered `m=` line refused in the answer: the same media, protocol and first format,
/// port 0.
fn refused_line(media: &MediaDescription) -> String {
    let name = &media.media_name;
    let format = name.formats.first().map_or("0", String::as_str);
    format!("m={} 0 {} {format}\r\n", name.media, name.protos.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(media: &str) -> String {
        format!("v=0\r\no=- 1 2 IN IP4 10.0.0.5\r\ns=-\r\nc=IN IP4 10.0.0.5\r\nt=0 0\r\n{media}")
    }

    const LOCAL: &str = "10.0.0.1:40000";

    #[test]
    fn our_preferred_codec_is_chosen_with_telephone_events() {
        let sdp = offer(
            "m=audio 4000 RTP/AVP 8 0 9 101\r\na=rtpmap:9 G722/8000\r\na=rtpmap:101 telephone-event/8000\r\n",
        );
        let offer = AudioOffer::parse(&sdp, &SipCodec::ALL).unwrap();
        assert_eq!(offer.remote, "10.0.0.5:4000".parse::<SocketAddr>().unwrap());
        assert_eq!((offer.codec, offer.payload_type), (SipCodec::G722, 9));
        assert_eq!(offer.telephone_event, Some(101));
        let answer = offer.answer(LOCAL.parse().unwrap(), 7, 1);
        assert!(
            answer.contains("m=audio 40000 RTP/AVP 9 101\r\n"),
            "{answer}"
        );
        assert!(answer.contains("a=rtpmap:9 G722/8000\r\n"));
        assert!(answer.contains("a=rtpmap:101 telephone-event/8000\r\n"));
        assert!(answer.contains("c=IN IP4 10.0.0.1\r\n"));
        let again = AudioOffer::parse(&answer, &SipCodec::ALL).unwrap();
        assert_eq!(again.remote, LOCAL.parse::<SocketAddr>().unwrap());
        // Our order, not the caller's, picks among what it offers.
        let narrow = AudioOffer::parse(&sdp, &[SipCodec::Pcmu, SipCodec::Pcma]).unwrap();
        assert_eq!((narrow.codec, narrow.payload_type), (SipCodec::Pcmu, 0));
    }

    #[test]
    fn opus_is_answered_with_our_limits_and_key_presses_at_its_clock() {
        let sdp = offer(
            "m=audio 4000 RTP/AVP 0 96 101 102\r\na=rtpmap:96 opus/48000/2\r\n\
a=fmtp:96 useinbandfec=1\r\na=rtpmap:101 telephone-event/8000\r\n\
a=rtpmap:102 telephone-event/48000\r\n",
        );
        let offer = AudioOffer::parse(&sdp, &SipCodec::ALL).unwrap();
        assert_eq!((offer.codec, offer.payload_type), (SipCodec::Opus, 96));
        assert_eq!(offer.telephone_event, Some(102));
        assert_eq!(offer.codec.timestamp_step(), 960);
        let answer = offer.answer(LOCAL.parse().unwrap(), 7, 1);
        assert!(
            answer.contains("m=audio 40000 RTP/AVP 96 102\r\n"),
            "{answer}"
        );
        assert!(answer.contains("a=rtpmap:96 opus/48000/2\r\n"));
        assert!(
            answer.contains("a=fmtp:96 maxplaybackrate=24000;"),
            "{answer}"
        );
        assert!(answer.contains("a=rtpmap:102 telephone-event/48000\r\n"));
    }

    #[test]
    fn srtp_is_answered_with_our_key_and_kept_through_the_call() {
        let key =
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz";
        let first = AudioOffer::parse(
            &offer(&format!("m=audio 4000 RTP/SAVP 0\r\n{key}\r\n")),
            &SipCodec::ALL,
        )
        .unwrap();
        let answer = first.answer(LOCAL.parse().unwrap(), 7, 1);
        assert!(answer.contains("m=audio 40000 RTP/SAVP 0\r\n"), "{answer}");
        let ours = answer
            .lines()
            .find(|l| l.starts_with("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:"))
            .unwrap();
        let moved = first
            .renegotiate(&offer(&format!("m=audio 4002 RTP/SAVP 0\r\n{key}\r\n")))
            .unwrap();
        let again = moved.answer(LOCAL.parse().unwrap(), 7, 2);
        assert!(
            again.contains(ours),
            "the same key of ours after a re-INVITE: {again}"
        );
        let plain = first
            .renegotiate(&offer("m=audio 4002 RTP/AVP 0\r\n"))
            .unwrap_err();
        assert_eq!(plain, OfferError::CryptoChanged("SRTP"));
        let other_suite = key.replace("_80", "_32");
        let suite = first
            .renegotiate(&offer(&format!(
                "m=audio 4002 RTP/SAVP 0\r\n{other_suite}\r\n"
            )))
            .unwrap_err();
        assert_eq!(suite, OfferError::CryptoChanged("its SRTP suite"));
        // Best-effort SRTP (crypto on an RTP/AVP line) is answered in kind.
        let best_effort = AudioOffer::parse(
            &offer(&format!("m=audio 4000 RTP/AVP 0\r\n{key}\r\n")),
            &SipCodec::ALL,
        )
        .unwrap();
        let answer = best_effort.answer(LOCAL.parse().unwrap(), 7, 1);
        assert!(
            answer.contains("m=audio 40000 RTP/AVP 0\r\n") && answer.contains("a=crypto:1 "),
            "{answer}"
        );
    }

    #[test]
    fn the_first_audio_line_we_can_answer_is_taken() {
        let sdp = offer(
            "m=audio 5000 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n\
m=audio 4000 RTP/AVP 9\r\na=rtpmap:9 G722/16000\r\n",
        );
        let offer = AudioOffer::parse(&sdp, &SipCodec::ALL).unwrap();
        assert_eq!((offer.remote.port(), offer.codec), (4000, SipCodec::G722));
        let answer = offer.answer(LOCAL.parse().unwrap(), 7, 1);
        let lines: Vec<&str> = answer.lines().filter(|l| l.starts_with("m=")).collect();
        assert_eq!(
            lines,
            ["m=audio 0 UDP/TLS/RTP/SAVPF 111", "m=audio 40000 RTP/AVP 9"]
        );
        assert!(
            answer.contains("a=rtpmap:9 G722/16000\r\n"),
            "the offer's mapping kept: {answer}"
        );
    }

    #[test]
    fn codec_names_are_read_in_any_case_and_unknown_ones_refused() {
        assert_eq!("g722".parse::<SipCodec>(), Ok(SipCodec::G722));
        assert_eq!(" OPUS".parse::<SipCodec>(), Ok(SipCodec::Opus));
        let err = "G729".parse::<SipCodec>().unwrap_err();
        assert!(err.contains("opus, G722, PCMU, PCMA"), "{err}");
    }

    #[test]
    fn every_offered_line_is_answered_and_hold_is_mirrored() {
        let sdp = offer(
            "m=video 5000 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\nm=audio 4000 RTP/AVP 0\r\na=sendonly\r\n",
        );
        let offer = AudioOffer::parse(&sdp, &SipCodec::ALL).unwrap();
        assert_eq!(offer.direction, Direction::SendOnly);
        let answer = offer.answer("10.0.0.1:40000".parse().unwrap(), 7, 2);
        let lines: Vec<&str> = answer.lines().filter(|l| l.starts_with("m=")).collect();
        assert_eq!(lines, ["m=video 0 RTP/AVP 96", "m=audio 40000 RTP/AVP 0"]);
        assert!(answer.contains("a=recvonly\r\n"), "{answer}");
        assert!(answer.contains(" 7 2 IN IP4 "), "{answer}");
    }

    #[test]
    fn our_late_offer_parses_as_the_caller_would_read_it() {
        let ours = late_offer(LOCAL.parse().unwrap(), 9, &SipCodec::ALL, None);
        assert!(
            ours.contains("m=audio 40000 RTP/AVP 111 9 0 8 101 110\r\n"),
            "{ours}"
        );
        let read = AudioOffer::parse(&ours, &SipCodec::ALL).unwrap();
        assert_eq!((read.codec, read.payload_type), (SipCodec::Opus, 111));
        assert_eq!(read.telephone_event, Some(110));
        assert_eq!(read.remote.port(), 40000);
        let narrow = late_offer(LOCAL.parse().unwrap(), 9, &[SipCodec::Pcma], None);
        assert!(
            narrow.contains("m=audio 40000 RTP/AVP 8 101\r\n"),
            "{narrow}"
        );
        let read = AudioOffer::parse(&narrow, &SipCodec::ALL).unwrap();
        assert_eq!(
            (read.codec, read.telephone_event),
            (SipCodec::Pcma, Some(101))
        );
    }

    #[test]
    fn a_new_offer_in_the_call_must_keep_the_codec() {
        let first =
            AudioOffer::parse(&offer("m=audio 4000 RTP/AVP 0\r\n"), &SipCodec::ALL).unwrap();
        let moved = first
            .renegotiate(&offer("m=audio 4002 RTP/AVP 9 0 8\r\na=inactive\r\n"))
            .unwrap();
        assert_eq!(moved.remote.port(), 4002);
        assert_eq!(moved.direction, Direction::Inactive);
        assert_eq!(
            moved.codec,
            SipCodec::Pcmu,
            "a wider codec now offered is not switched to"
        );
        let err = first
            .renegotiate(&offer("m=audio 4002 RTP/AVP 8\r\n"))
            .unwrap_err();
        assert_eq!(err, OfferError::CodecChanged("PCMU/8000".into()));
    }

    #[test]
    fn offers_without_our_codecs_or_plain_rtp_are_refused_naming_what_came() {
        let parse = |sdp: &str| AudioOffer::parse(sdp, &[SipCodec::G722, SipCodec::Pcmu]);
        let err = parse(&offer(
            "m=audio 4000 RTP/AVP 111 18\r\na=rtpmap:111 opus/48000/2\r\n",
        ))
        .unwrap_err();
        let offered = vec!["opus/48000/2".into(), "18".into()];
        assert_eq!(
            err,
            OfferError::NoCodec {
                ours: "G722, PCMU".into(),
                offered
            }
        );
        let err = parse(&offer("m=audio 4000 RTP/SAVP 0\r\n")).unwrap_err();
        assert_eq!(err, OfferError::NoCrypto);
        let err = parse(&offer("m=audio 4000 UDP/TLS/RTP/SAVPF 0\r\n")).unwrap_err();
        assert_eq!(err, OfferError::Profile("UDP/TLS/RTP/SAVPF".into()));
        let err = parse(&offer("m=video 4000 RTP/AVP 96\r\n")).unwrap_err();
        assert_eq!(err, OfferError::NoAudio);
        assert_eq!(parse("\r\n"), Err(OfferError::Missing));
        assert!(matches!(parse("garbage"), Err(OfferError::Malformed(_))));
    }
}

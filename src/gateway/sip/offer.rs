//! The SDP of a SIP call (RFC 3264, plain RTP): which G.711 law the caller offers and where its
//! RTP goes, and the answer that names ours.

use crate::audio::g711::Law;
use rtc::sdp::description::common::Attribute;
use rtc::sdp::description::media::MediaDescription;
use rtc::sdp::description::session::SessionDescription;
use std::io::Cursor;
use std::net::{IpAddr, SocketAddr};

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
    pub law: Law,
    pub payload_type: u8,
    /// RFC 4733 `telephone-event`, when offered: its payload type (key presses).
    pub telephone_event: Option<u8>,
    pub direction: Direction,
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
    #[error("no G.711 (PCMU or PCMA) among the offered codecs {0:?}")]
    NoG711(Vec<String>),
    #[error("no connection address for the audio")]
    NoAddress,
    #[error("the audio is offered over {0}, only RTP/AVP is answered (no SRTP)")]
    Profile(String),
    #[error("a new offer in the call must keep its codec ({0})")]
    CodecChanged(String),
}

impl AudioOffer {
    pub fn parse(sdp: &str) -> Result<Self, OfferError> {
        if sdp.trim().is_empty() {
            return Err(OfferError::Missing);
        }
        let description = SessionDescription::unmarshal(&mut Cursor::new(sdp.as_bytes()))
            .map_err(|e| OfferError::Malformed(e.to_string()))?;
        let media = &description.media_descriptions;
        let taken = media
            .iter()
            .position(|m| m.media_name.media == "audio" && m.media_name.port.value != 0)
            .ok_or(OfferError::NoAudio)?;
        let audio = &media[taken];
        let profile = audio.media_name.protos.join("/");
        if profile != "RTP/AVP" {
            return Err(OfferError::Profile(profile));
        }
        let (payload_type, law) = choose_g711(audio)?;
        let telephone_event = audio
            .media_name
            .formats
            .iter()
            .find(|pt| codec_of(audio, pt) == "telephone-event/8000")
            .and_then(|pt| pt.parse().ok());
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
            law,
            payload_type,
            telephone_event,
            direction,
            lines,
        })
    }

    /// A new offer within the call: taken only when it keeps this call's codec, since the
    /// media already runs with it.
    pub fn renegotiate(&self, sdp: &str) -> Result<Self, OfferError> {
        let mut offer = Self::parse(sdp)?;
        if (offer.law, offer.payload_type) != (self.law, self.payload_type) {
            let name = law_name(self.law);
            return Err(OfferError::CodecChanged(format!(
                "{name}/8000 as payload type {}",
                self.payload_type
            )));
        }
        offer.telephone_event = offer
            .telephone_event
            .filter(|_| self.telephone_event.is_some());
        Ok(offer)
    }

    /// Our answer: the chosen law (and `telephone-event`, if offered) at `local`, `version`
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
        let name = law_name(self.law);
        let pt = self.payload_type;
        let (events_pt, events_map) = match self.telephone_event {
            Some(events) => (
                format!(" {events}"),
                format!("a=rtpmap:{events} telephone-event/8000\r\na=fmtp:{events} 0-15\r\n"),
            ),
            None => (String::new(), String::new()),
        };
        format!(
            "m=audio {port} RTP/AVP {pt}{events_pt}\r\na=rtpmap:{pt} {name}/8000\r\n{events_map}\
a=ptime:20\r\na={}\r\n",
            self.direction.answer()
        )
    }
}

/// Our offer, for an INVITE that came without one (a late offer, RFC 3261 §13.2.1): both
/// G.711 laws and key presses at `local`, answered in the caller's ACK.
pub fn late_offer(local: SocketAddr, session_id: u64) -> String {
    let (ip, address) = match local.ip() {
        IpAddr::V4(ip) => ("IP4", ip.to_string()),
        IpAddr::V6(ip) => ("IP6", ip.to_string()),
    };
    format!(
        "v=0\r\no=duplex {session_id} 1 IN {ip} {address}\r\ns=duplex\r\nc=IN {ip} {address}\r\n\
t=0 0\r\nm=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n",
        port = local.port()
    )
}

/// The G.711 law's name in SDP.
pub fn law_name(law: Law) -> &'static str {
    match law {
        Law::Mulaw => "PCMU",
        Law::Alaw => "PCMA",
    }
}

/// The first G.711 format the audio line offers, and its law.
fn choose_g711(audio: &MediaDescription) -> Result<(u8, Law), OfferError> {
    let formats = &audio.media_name.formats;
    formats
        .iter()
        .find_map(|pt| {
            let id: u8 = pt.parse().ok()?;
            match codec_of(audio, pt).as_str() {
                "pcmu/8000" => Some((id, Law::Mulaw)),
                "pcma/8000" => Some((id, Law::Alaw)),
                _ => None,
            }
        })
        .ok_or_else(|| OfferError::NoG711(formats.iter().map(|pt| codec_of(audio, pt)).collect()))
}

/// A format's codec from its `rtpmap`, or RFC 3551's static assignment for G.711.
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

    #[test]
    fn the_first_g711_offered_is_chosen_with_telephone_events() {
        let sdp = offer(
            "m=audio 4000 RTP/AVP 9 8 0 101\r\na=rtpmap:9 G722/8000\r\na=rtpmap:101 telephone-event/8000\r\n",
        );
        let offer = AudioOffer::parse(&sdp).unwrap();
        assert_eq!(offer.remote, "10.0.0.5:4000".parse::<SocketAddr>().unwrap());
        assert_eq!((offer.law, offer.payload_type), (Law::Alaw, 8));
        assert_eq!(offer.telephone_event, Some(101));
        let answer = offer.answer("10.0.0.1:40000".parse().unwrap(), 7, 1);
        assert!(
            answer.contains("m=audio 40000 RTP/AVP 8 101\r\n"),
            "{answer}"
        );
        assert!(answer.contains("a=rtpmap:8 PCMA/8000\r\n"));
        assert!(answer.contains("c=IN IP4 10.0.0.1\r\n"));
        let again = AudioOffer::parse(&answer).unwrap();
        assert_eq!(
            again.remote,
            "10.0.0.1:40000".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn every_offered_line_is_answered_and_hold_is_mirrored() {
        let sdp = offer(
            "m=video 5000 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\nm=audio 4000 RTP/AVP 0\r\na=sendonly\r\n",
        );
        let offer = AudioOffer::parse(&sdp).unwrap();
        assert_eq!(offer.direction, Direction::SendOnly);
        let answer = offer.answer("10.0.0.1:40000".parse().unwrap(), 7, 2);
        let lines: Vec<&str> = answer.lines().filter(|l| l.starts_with("m=")).collect();
        assert_eq!(lines, ["m=video 0 RTP/AVP 96", "m=audio 40000 RTP/AVP 0"]);
        assert!(answer.contains("a=recvonly\r\n"), "{answer}");
        assert!(answer.contains(" 7 2 IN IP4 "), "{answer}");
    }

    #[test]
    fn our_late_offer_parses_as_the_caller_would_read_it() {
        let ours = late_offer("10.0.0.1:40000".parse().unwrap(), 9);
        let read = AudioOffer::parse(&ours).unwrap();
        assert_eq!((read.law, read.payload_type), (Law::Mulaw, 0));
        assert_eq!(read.telephone_event, Some(101));
        assert_eq!(read.remote.port(), 40000);
    }

    #[test]
    fn a_new_offer_in_the_call_must_keep_the_codec() {
        let first = AudioOffer::parse(&offer("m=audio 4000 RTP/AVP 0\r\n")).unwrap();
        let moved = first
            .renegotiate(&offer("m=audio 4002 RTP/AVP 0 8\r\na=inactive\r\n"))
            .unwrap();
        assert_eq!(moved.remote.port(), 4002);
        assert_eq!(moved.direction, Direction::Inactive);
        let err = first
            .renegotiate(&offer("m=audio 4002 RTP/AVP 8\r\n"))
            .unwrap_err();
        assert!(matches!(err, OfferError::CodecChanged(_)), "{err}");
    }

    #[test]
    fn offers_without_g711_or_plain_rtp_are_refused_naming_what_came() {
        let err = AudioOffer::parse(&offer(
            "m=audio 4000 RTP/AVP 111\r\na=rtpmap:111 opus/48000/2\r\n",
        ))
        .unwrap_err();
        assert_eq!(err, OfferError::NoG711(vec!["opus/48000/2".into()]));
        let err = AudioOffer::parse(&offer("m=audio 4000 RTP/SAVP 0\r\n")).unwrap_err();
        assert_eq!(err, OfferError::Profile("RTP/SAVP".into()));
        let err = AudioOffer::parse(&offer("m=video 4000 RTP/AVP 96\r\n")).unwrap_err();
        assert_eq!(err, OfferError::NoAudio);
        assert_eq!(AudioOffer::parse("\r\n"), Err(OfferError::Missing));
        assert!(matches!(
            AudioOffer::parse("garbage"),
            Err(OfferError::Malformed(_))
        ));
    }
}

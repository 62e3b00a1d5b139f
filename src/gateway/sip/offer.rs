//! The SDP of a SIP call (RFC 3264, plain RTP): which G.711 law the caller offers and where its
//! RTP goes, and the answer that names ours.

use crate::audio::g711::Law;
use rtc::sdp::description::session::SessionDescription;
use std::io::Cursor;
use std::net::{IpAddr, SocketAddr};

/// What an offer asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioOffer {
    /// Where the caller receives RTP.
    pub remote: SocketAddr,
    pub law: Law,
    pub payload_type: u8,
    /// RFC 4733 `telephone-event`, when offered: its payload type (key presses).
    pub telephone_event: Option<u8>,
}

/// Why an offer cannot be answered; `488 Not Acceptable Here` carries it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    #[error("the INVITE carries no SDP offer (a late offer is not answered): offer G.711 in it")]
    Missing,
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
}

impl AudioOffer {
    pub fn parse(sdp: &str) -> Result<Self, OfferError> {
        if sdp.trim().is_empty() {
            return Err(OfferError::Missing);
        }
        let description = SessionDescription::unmarshal(&mut Cursor::new(sdp.as_bytes()))
            .map_err(|e| OfferError::Malformed(e.to_string()))?;
        let audio = description
            .media_descriptions
            .iter()
            .find(|m| m.media_name.media == "audio" && m.media_name.port.value != 0)
            .ok_or(OfferError::NoAudio)?;
        let profile = audio.media_name.protos.join("/");
        if profile != "RTP/AVP" {
            return Err(OfferError::Profile(profile));
        }
        let rtpmap = |pt: &str| {
            audio
                .attributes
                .iter()
                .filter(|a| a.key == "rtpmap")
                .filter_map(|a| a.value.as_deref()?.split_once(' '))
                .find(|(id, _)| *id == pt)
                .map(|(_, codec)| codec.to_ascii_lowercase())
        };
        let codec_of = |pt: &str| match (pt, rtpmap(pt)) {
            (_, Some(codec)) => codec,
            ("0", None) => "pcmu/8000".into(),
            ("8", None) => "pcma/8000".into(),
            (other, None) => other.to_owned(),
        };
        let formats = &audio.media_name.formats;
        let (payload_type, law) = formats
            .iter()
            .find_map(|pt| {
                let id: u8 = pt.parse().ok()?;
                match codec_of(pt).as_str() {
                    "pcmu/8000" => Some((id, Law::Mulaw)),
                    "pcma/8000" => Some((id, Law::Alaw)),
                    _ => None,
                }
            })
            .ok_or_else(|| OfferError::NoG711(formats.iter().map(|pt| codec_of(pt)).collect()))?;
        let telephone_event = formats
            .iter()
            .find(|pt| codec_of(pt) == "telephone-event/8000")
            .and_then(|pt| pt.parse().ok());
        let address = audio
            .connection_information
            .as_ref()
            .or(description.connection_information.as_ref())
            .and_then(|c| c.address.as_ref())
            .and_then(|a| a.address.parse::<IpAddr>().ok())
            .ok_or(OfferError::NoAddress)?;
        let port = u16::try_from(audio.media_name.port.value).map_err(|_| OfferError::NoAddress)?;
        Ok(Self {
            remote: SocketAddr::new(address, port),
            law,
            payload_type,
            telephone_event,
        })
    }

    /// Our answer: the chosen law (and `telephone-event`, if offered) at `local`, `version`
    /// counting up with each answer in the dialog.
    pub fn answer(&self, local: SocketAddr, session_id: u64, version: u64) -> String {
        let ip = match local.ip() {
            IpAddr::V4(_) => "IP4",
            IpAddr::V6(_) => "IP6",
        };
        let address = local.ip();
        let name = match self.law {
            Law::Mulaw => "PCMU",
            Law::Alaw => "PCMA",
        };
        let pt = self.payload_type;
        let (events_pt, events_map) = match self.telephone_event {
            Some(events) => (
                format!(" {events}"),
                format!("a=rtpmap:{events} telephone-event/8000\r\na=fmtp:{events} 0-15\r\n"),
            ),
            None => (String::new(), String::new()),
        };
        format!(
            "v=0\r\no=duplex {session_id} {version} IN {ip} {address}\r\ns=duplex\r\n\
c=IN {ip} {address}\r\nt=0 0\r\nm=audio {port} RTP/AVP {pt}{events_pt}\r\n\
a=rtpmap:{pt} {name}/8000\r\n{events_map}a=ptime:20\r\na=sendrecv\r\n",
            port = local.port()
        )
    }
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

//! Twilio Media Streams (bidirectional, `<Connect><Stream>`): JSON text frames, base64 µ-law at
//! 8 kHz. In: `connected`, `start`, `media`, `mark`, `dtmf`, `stop`. Out: `media`, `mark`,
//! `clear`, each carrying the `streamSid`. Twilio echoes a mark once the audio sent before it
//! has played; this bridge answers a mark the same way.

use super::{
    CallEvent, Frame, ProtocolError, Provider, WireFormat, check_stream, dtmf_event,
    encode_payload, field, json, mark_event, media_event, params,
};
use crate::audio::g711::Law;
use serde_json::json;

#[derive(Debug, Default)]
pub struct Twilio {
    stream_sid: Option<String>,
}

impl Provider for Twilio {
    const NAME: &'static str = "twilio";

    fn new() -> Self {
        Self::default()
    }

    fn parse_text(&mut self, text: &str) -> Result<CallEvent, ProtocolError> {
        let message = json(text)?;
        let event = field(&message, &["event"]).ok_or(ProtocolError::Missing("event"))?;
        let sid = field(&message, &["streamSid"]);
        match event {
            "connected" => Ok(CallEvent::Connected),
            "start" => {
                let stream_sid = field(&message, &["start", "streamSid"])
                    .or(sid)
                    .ok_or(ProtocolError::Missing("start.streamSid"))?
                    .to_owned();
                let format = media_format(&message)?;
                self.stream_sid = Some(stream_sid.clone());
                Ok(CallEvent::Start {
                    stream_id: stream_sid,
                    params: params(message.get("start").and_then(|s| s.get("customParameters"))),
                    format,
                })
            }
            "media" => {
                check_stream(&self.stream_sid, sid, "media")?;
                media_event(&message)
            }
            "mark" => {
                check_stream(&self.stream_sid, sid, "mark")?;
                mark_event(&message)
            }
            "dtmf" => {
                check_stream(&self.stream_sid, sid, "dtmf")?;
                dtmf_event(&message)
            }
            "stop" => Ok(CallEvent::Stop),
            other => Ok(CallEvent::Ignored(other.to_owned())),
        }
    }

    fn media(&self, payload: &[u8], _format: WireFormat) -> Frame {
        Frame::Text(
            json!({
                "event": "media",
                "streamSid": self.sid(),
                "media": {"payload": encode_payload(payload)},
            })
            .to_string(),
        )
    }

    fn mark_played(&self, name: &str) -> Frame {
        Frame::Text(
            json!({"event": "mark", "streamSid": self.sid(), "mark": {"name": name}}).to_string(),
        )
    }

    fn clear(&self) -> Frame {
        Frame::Text(json!({"event": "clear", "streamSid": self.sid()}).to_string())
    }
}

impl Twilio {
    fn sid(&self) -> &str {
        self.stream_sid.as_deref().unwrap_or("")
    }
}

/// Twilio streams only µ-law at 8 kHz; anything else in `mediaFormat` is refused.
fn media_format(message: &serde_json::Value) -> Result<WireFormat, ProtocolError> {
    let format = message.get("start").and_then(|s| s.get("mediaFormat"));
    let encoding = format
        .and_then(|f| f.get("encoding"))
        .and_then(|e| e.as_str())
        .unwrap_or("audio/x-mulaw");
    let rate = format
        .and_then(|f| f.get("sampleRate"))
        .and_then(|r| r.as_u64())
        .unwrap_or(8000);
    if encoding != "audio/x-mulaw" || rate != 8000 {
        return Err(ProtocolError::Format(format!(
            "{encoding} at {rate} Hz (Twilio streams audio/x-mulaw at 8000 Hz)"
        )));
    }
    Ok(WireFormat {
        codec: super::Codec::G711(Law::Mulaw),
        rate: 8000,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str = r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],"customParameters":{"voice":"NATM1","prompt":"Be brief."},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},"streamSid":"MZ1"}"#;

    #[test]
    fn a_call_parses_in_order() {
        let mut twilio = Twilio::new();
        assert_eq!(
            twilio
                .parse_text(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#)
                .unwrap(),
            CallEvent::Connected
        );
        let CallEvent::Start {
            stream_id,
            params,
            format,
        } = twilio.parse_text(START).unwrap()
        else {
            panic!("not a start");
        };
        assert_eq!(stream_id, "MZ1");
        assert_eq!(params["voice"], "NATM1");
        assert_eq!(params["prompt"], "Be brief.");
        assert_eq!(format, WireFormat::MULAW_8K);
        let media = r#"{"event":"media","sequenceNumber":"2","media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"//7/"},"streamSid":"MZ1"}"#;
        assert_eq!(
            twilio.parse_text(media).unwrap(),
            CallEvent::Media(vec![0xff, 0xfe, 0xff])
        );
        let mark =
            r#"{"event":"mark","sequenceNumber":"3","streamSid":"MZ1","mark":{"name":"greeting"}}"#;
        assert_eq!(
            twilio.parse_text(mark).unwrap(),
            CallEvent::Mark("greeting".into())
        );
        let dtmf = r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"4","dtmf":{"track":"inbound_track","digit":"7"}}"#;
        assert_eq!(
            twilio.parse_text(dtmf).unwrap(),
            CallEvent::Dtmf("7".into())
        );
        let stop = r#"{"event":"stop","sequenceNumber":"5","streamSid":"MZ1","stop":{"accountSid":"AC1","callSid":"CA1"}}"#;
        assert_eq!(twilio.parse_text(stop).unwrap(), CallEvent::Stop);
    }

    #[test]
    fn outbound_messages_carry_the_stream_sid() {
        let mut twilio = Twilio::new();
        twilio.parse_text(START).unwrap();
        let Frame::Text(media) = twilio.media(&[0xff, 0x7f], WireFormat::MULAW_8K) else {
            panic!()
        };
        let media: serde_json::Value = serde_json::from_str(&media).unwrap();
        assert_eq!(media["event"], "media");
        assert_eq!(media["streamSid"], "MZ1");
        assert_eq!(media["media"]["payload"], "/38=");
        let Frame::Text(clear) = twilio.clear() else {
            panic!()
        };
        assert_eq!(clear, r#"{"event":"clear","streamSid":"MZ1"}"#);
        let Frame::Text(mark) = twilio.mark_played("m1") else {
            panic!()
        };
        let mark: serde_json::Value = serde_json::from_str(&mark).unwrap();
        assert_eq!(mark["mark"]["name"], "m1");
    }

    #[test]
    fn bad_input_is_refused_by_kind() {
        let mut twilio = Twilio::new();
        let media = r#"{"event":"media","media":{"payload":"//7/"},"streamSid":"MZ1"}"#;
        assert_eq!(
            twilio.parse_text(media),
            Err(ProtocolError::BeforeStart("media"))
        );
        assert!(matches!(
            twilio.parse_binary(b"\xff\xff"),
            Err(ProtocolError::BinaryNotAllowed(_))
        ));
        assert!(matches!(
            twilio.parse_text("{not json"),
            Err(ProtocolError::BadJson(_))
        ));
        assert!(matches!(
            twilio.parse_text("[1,2]"),
            Err(ProtocolError::BadJson(_))
        ));
        twilio.parse_text(START).unwrap();
        let wrong = r#"{"event":"media","media":{"payload":"//7/"},"streamSid":"MZ2"}"#;
        assert!(matches!(
            twilio.parse_text(wrong),
            Err(ProtocolError::WrongStream { .. })
        ));
        let bad = r#"{"event":"media","media":{"payload":"not*base64!"},"streamSid":"MZ1"}"#;
        assert_eq!(twilio.parse_text(bad), Err(ProtocolError::BadBase64));
        assert_eq!(
            twilio
                .parse_text(r#"{"event":"futureThing","streamSid":"MZ1"}"#)
                .unwrap(),
            CallEvent::Ignored("futureThing".into())
        );
        let alaw = START.replace("audio/x-mulaw", "audio/x-alaw");
        assert!(matches!(
            Twilio::new().parse_text(&alaw),
            Err(ProtocolError::Format(_))
        ));
    }
}

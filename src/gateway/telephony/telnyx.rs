//! Telnyx media streaming (TeXML `<Stream bidirectionalMode="rtp">` or Call Control
//! `stream_bidirectional_mode`): JSON text frames like Twilio's in snake_case, with the stream id
//! at the top level and the codec named in `start.media_format` (PCMU, PCMA or L16 at 8, 16 or
//! 24 kHz). Out: `media`, `mark`, `clear`.

use super::{
    CallEvent, Codec, Frame, ProtocolError, Provider, WireFormat, check_stream, dtmf_event,
    encode_payload, field, json, mark_event, media_event, params,
};
use crate::audio::g711::Law;
use serde_json::json;

#[derive(Debug, Default)]
pub struct Telnyx {
    stream_id: Option<String>,
}

impl Provider for Telnyx {
    const NAME: &'static str = "telnyx";

    fn new() -> Self {
        Self::default()
    }

    fn parse_text(&mut self, text: &str) -> Result<CallEvent, ProtocolError> {
        let message = json(text)?;
        let event = field(&message, &["event"]).ok_or(ProtocolError::Missing("event"))?;
        let id = field(&message, &["stream_id"]);
        match event {
            "connected" => Ok(CallEvent::Connected),
            "start" => {
                let stream_id = id.ok_or(ProtocolError::Missing("stream_id"))?.to_owned();
                let format =
                    media_format(message.get("start").and_then(|s| s.get("media_format")))?;
                self.stream_id = Some(stream_id.clone());
                Ok(CallEvent::Start {
                    stream_id,
                    params: params(
                        message
                            .get("start")
                            .and_then(|s| s.get("custom_parameters")),
                    ),
                    format,
                })
            }
            "media" => {
                check_stream(&self.stream_id, id, "media")?;
                media_event(&message)
            }
            "mark" => {
                check_stream(&self.stream_id, id, "mark")?;
                mark_event(&message)
            }
            "dtmf" => {
                check_stream(&self.stream_id, id, "dtmf")?;
                dtmf_event(&message)
            }
            "stop" => Ok(CallEvent::Stop),
            "error" => {
                tracing::warn!(error = %message, "telnyx reported an error");
                Ok(CallEvent::Ignored("error".into()))
            }
            other => Ok(CallEvent::Ignored(other.to_owned())),
        }
    }

    fn media(&self, payload: &[u8], _format: WireFormat) -> Frame {
        Frame::Text(
            json!({"event": "media", "media": {"payload": encode_payload(payload)}}).to_string(),
        )
    }

    fn mark_played(&self, name: &str) -> Frame {
        Frame::Text(json!({"event": "mark", "mark": {"name": name}}).to_string())
    }

    fn clear(&self) -> Frame {
        Frame::Text(json!({"event": "clear"}).to_string())
    }
}

fn media_format(format: Option<&serde_json::Value>) -> Result<WireFormat, ProtocolError> {
    let encoding = format
        .and_then(|f| f.get("encoding"))
        .and_then(|e| e.as_str())
        .unwrap_or("PCMU");
    let rate = format
        .and_then(|f| f.get("sample_rate"))
        .and_then(|r| r.as_u64())
        .unwrap_or(8000) as u32;
    let codec = match encoding.to_ascii_uppercase().as_str() {
        "PCMU" => Codec::G711(Law::Mulaw),
        "PCMA" => Codec::G711(Law::Alaw),
        "L16" => Codec::L16,
        _ => {
            return Err(ProtocolError::Format(format!(
                "{encoding}; this bridge takes PCMU, PCMA or L16"
            )));
        }
    };
    if !matches!(rate, 8000 | 16000 | 24000) || (matches!(codec, Codec::G711(_)) && rate != 8000) {
        return Err(ProtocolError::Format(format!("{encoding} at {rate} Hz")));
    }
    Ok(WireFormat { codec, rate })
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str = r#"{"event":"start","sequence_number":"1","start":{"user_id":"u1","call_control_id":"v3:abc","call_session_id":"cs1","from":"+15550001","to":"+15550002","media_format":{"encoding":"PCMA","sample_rate":8000,"channels":1},"custom_parameters":{"voice":"NATF1"}},"stream_id":"st-1"}"#;

    #[test]
    fn a_call_parses_in_order() {
        let mut telnyx = Telnyx::new();
        assert_eq!(
            telnyx
                .parse_text(r#"{"event":"connected","version":"1.0.0"}"#)
                .unwrap(),
            CallEvent::Connected
        );
        let CallEvent::Start {
            stream_id,
            params,
            format,
        } = telnyx.parse_text(START).unwrap()
        else {
            panic!()
        };
        assert_eq!(stream_id, "st-1");
        assert_eq!(params["voice"], "NATF1");
        assert_eq!(
            format,
            WireFormat {
                codec: Codec::G711(Law::Alaw),
                rate: 8000
            }
        );
        let media = r#"{"event":"media","sequence_number":"2","media":{"track":"inbound","chunk":"1","timestamp":"20","payload":"1dU="},"stream_id":"st-1"}"#;
        assert_eq!(
            telnyx.parse_text(media).unwrap(),
            CallEvent::Media(vec![0xd5, 0xd5])
        );
        let dtmf =
            r##"{"event":"dtmf","stream_id":"st-1","sequence_number":"3","dtmf":{"digit":"#"}}"##;
        assert_eq!(
            telnyx.parse_text(dtmf).unwrap(),
            CallEvent::Dtmf("#".into())
        );
        let error = r#"{"event":"error","payload":{"code":100002,"title":"unknown error"},"stream_id":"st-1"}"#;
        assert_eq!(
            telnyx.parse_text(error).unwrap(),
            CallEvent::Ignored("error".into())
        );
        let Frame::Text(clear) = telnyx.clear() else {
            panic!()
        };
        assert_eq!(clear, r#"{"event":"clear"}"#);
        assert_eq!(
            telnyx
                .parse_text(r#"{"event":"stop","stream_id":"st-1","stop":{}}"#)
                .unwrap(),
            CallEvent::Stop
        );
    }

    #[test]
    fn formats_and_stream_ids_are_checked() {
        let l16 = START.replace("PCMA", "L16").replace("8000", "16000");
        let CallEvent::Start { format, .. } = Telnyx::new().parse_text(&l16).unwrap() else {
            panic!()
        };
        assert_eq!(
            format,
            WireFormat {
                codec: Codec::L16,
                rate: 16000
            }
        );
        let opus = START.replace("PCMA", "OPUS");
        assert!(matches!(
            Telnyx::new().parse_text(&opus),
            Err(ProtocolError::Format(_))
        ));
        let mut telnyx = Telnyx::new();
        telnyx.parse_text(START).unwrap();
        let wrong = r#"{"event":"media","media":{"payload":"1dU="},"stream_id":"st-2"}"#;
        assert!(matches!(
            telnyx.parse_text(wrong),
            Err(ProtocolError::WrongStream { .. })
        ));
    }
}

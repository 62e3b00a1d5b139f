//! Vonage WebSockets (NCCO `connect` to a `websocket` endpoint): the first text frame is
//! `websocket:connected` with the `content-type` (`audio/l16;rate=8000|16000|24000`) and the
//! NCCO's `headers` at its top level; audio then flows as binary frames of raw 16-bit
//! little-endian PCM in both directions. Text: `websocket:dtmf` in; `{"action":"clear"}` out
//! (answered by `websocket:cleared`); a `{"action":"notify","payload":…}` from the peer is
//! answered with `websocket:notify` carrying the payload once the audio before it has gone out.

use super::{CallEvent, Codec, Frame, ProtocolError, Provider, WireFormat, field, json};
use serde_json::json;
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct Vonage {
    connected: bool,
}

impl Provider for Vonage {
    const NAME: &'static str = "vonage";

    fn new() -> Self {
        Self::default()
    }

    fn parse_text(&mut self, text: &str) -> Result<CallEvent, ProtocolError> {
        let message = json(text)?;
        if let Some(action) = field(&message, &["action"]) {
            return match action {
                "notify" => {
                    let payload = message.get("payload").cloned().unwrap_or(json!({}));
                    Ok(CallEvent::Mark(payload.to_string()))
                }
                other => Ok(CallEvent::Ignored(other.to_owned())),
            };
        }
        let event = field(&message, &["event"]).ok_or(ProtocolError::Missing("event"))?;
        match event {
            "websocket:connected" => {
                let content_type =
                    field(&message, &["content-type"]).unwrap_or("audio/l16;rate=16000");
                let format = media_format(content_type)?;
                let mut params = BTreeMap::new();
                for (key, value) in message.as_object().into_iter().flatten() {
                    if key == "event" || key == "content-type" {
                        continue;
                    }
                    if let Some(text) = value.as_str() {
                        params.insert(key.clone(), text.to_owned());
                    }
                }
                let stream_id = params
                    .get("uuid")
                    .or(params.get("call_uuid"))
                    .cloned()
                    .unwrap_or_else(|| "vonage".into());
                self.connected = true;
                Ok(CallEvent::Start {
                    stream_id,
                    params,
                    format,
                })
            }
            "websocket:dtmf" => {
                if !self.connected {
                    return Err(ProtocolError::BeforeStart("dtmf"));
                }
                let digit = field(&message, &["digit"])
                    .or(field(&message, &["dtmf", "digits"]))
                    .ok_or(ProtocolError::Missing("digit"))?;
                Ok(CallEvent::Dtmf(digit.to_owned()))
            }
            "websocket:notify" => Ok(CallEvent::Played(
                message
                    .get("payload")
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
            )),
            other => Ok(CallEvent::Ignored(other.to_owned())),
        }
    }

    fn parse_binary(&mut self, bytes: &[u8]) -> Result<CallEvent, ProtocolError> {
        if !self.connected {
            return Err(ProtocolError::BeforeStart("audio"));
        }
        Ok(CallEvent::Media(bytes.to_vec()))
    }

    fn media(&self, payload: &[u8], _format: WireFormat) -> Frame {
        Frame::Binary(payload.to_vec())
    }

    fn mark_played(&self, name: &str) -> Frame {
        let payload: serde_json::Value = serde_json::from_str(name).unwrap_or(json!(name));
        Frame::Text(json!({"event": "websocket:notify", "payload": payload}).to_string())
    }

    fn clear(&self) -> Frame {
        Frame::Text(json!({"action": "clear"}).to_string())
    }
}

fn media_format(content_type: &str) -> Result<WireFormat, ProtocolError> {
    let mut parts = content_type.split(';').map(str::trim);
    let kind = parts.next().unwrap_or("");
    let rate = parts
        .find_map(|p| p.strip_prefix("rate="))
        .and_then(|r| r.parse::<u32>().ok())
        .unwrap_or(16000);
    if !kind.eq_ignore_ascii_case("audio/l16") || !matches!(rate, 8000 | 16000 | 24000) {
        return Err(ProtocolError::Format(format!(
            "{content_type} (Vonage sends audio/l16 at 8000, 16000 or 24000 Hz)"
        )));
    }
    Ok(WireFormat {
        codec: Codec::L16,
        rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECTED: &str = r#"{"event":"websocket:connected","content-type":"audio/l16;rate=16000","uuid":"call-1","voice":"VARF0","prompt":"Speak slowly."}"#;

    #[test]
    fn a_call_parses_in_order() {
        let mut vonage = Vonage::new();
        assert_eq!(
            vonage.parse_binary(&[0, 0]),
            Err(ProtocolError::BeforeStart("audio"))
        );
        let CallEvent::Start {
            stream_id,
            params,
            format,
        } = vonage.parse_text(CONNECTED).unwrap()
        else {
            panic!()
        };
        assert_eq!(stream_id, "call-1");
        assert_eq!(params["voice"], "VARF0");
        assert_eq!(
            format,
            WireFormat {
                codec: Codec::L16,
                rate: 16000
            }
        );
        assert_eq!(format.packet_bytes(), Some(640));
        assert_eq!(
            vonage.parse_binary(&[1, 2, 3, 4]).unwrap(),
            CallEvent::Media(vec![1, 2, 3, 4])
        );
        let dtmf = r#"{"event":"websocket:dtmf","digit":"9","duration":250}"#;
        assert_eq!(
            vonage.parse_text(dtmf).unwrap(),
            CallEvent::Dtmf("9".into())
        );
        let notify = r#"{"action":"notify","payload":{"name":"m1"}}"#;
        let CallEvent::Mark(name) = vonage.parse_text(notify).unwrap() else {
            panic!()
        };
        let Frame::Text(ack) = vonage.mark_played(&name) else {
            panic!()
        };
        assert_eq!(
            ack,
            r#"{"event":"websocket:notify","payload":{"name":"m1"}}"#
        );
        let Frame::Text(clear) = vonage.clear() else {
            panic!()
        };
        assert_eq!(clear, r#"{"action":"clear"}"#);
        assert!(matches!(vonage.media(&[1, 2], format), Frame::Binary(b) if b == [1, 2]));
    }

    #[test]
    fn formats_are_checked() {
        let ulaw = CONNECTED.replace("audio/l16;rate=16000", "audio/x-mulaw;rate=8000");
        assert!(matches!(
            Vonage::new().parse_text(&ulaw),
            Err(ProtocolError::Format(_))
        ));
        let odd = CONNECTED.replace("16000", "11025");
        assert!(matches!(
            Vonage::new().parse_text(&odd),
            Err(ProtocolError::Format(_))
        ));
    }
}

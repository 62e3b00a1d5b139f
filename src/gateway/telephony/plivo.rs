//! Plivo audio streams (`<Stream bidirectional="true">`): JSON text frames. In: `start`
//! (`start.streamId`, `start.mediaFormat`), `media`, `dtmf`, `playedStream` (a checkpoint of ours
//! played), `clearedAudio`, `stop`; a `checkpoint` from the peer is answered with
//! `playedStream` once the audio sent before it has gone out. Out: `playAudio`, `playedStream`,
//! `clearAudio`. Audio is µ-law at 8 kHz or 16-bit PCM at 8 or 16 kHz. Custom parameters come
//! from `start.customParameters` or the `extra_headers` string (`key=value;…`).

use super::{
    CallEvent, Codec, Frame, ProtocolError, Provider, WireFormat, check_stream, dtmf_event,
    encode_payload, field, json, media_event, params,
};
use crate::audio::g711::Law;
use serde_json::json;
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct Plivo {
    stream_id: Option<String>,
}

impl Provider for Plivo {
    const NAME: &'static str = "plivo";

    fn new() -> Self {
        Self::default()
    }

    fn parse_text(&mut self, text: &str) -> Result<CallEvent, ProtocolError> {
        let message = json(text)?;
        let event = field(&message, &["event"]).ok_or(ProtocolError::Missing("event"))?;
        let id = field(&message, &["streamId"]);
        match event {
            "start" => {
                let stream_id = field(&message, &["start", "streamId"])
                    .or(id)
                    .ok_or(ProtocolError::Missing("start.streamId"))?
                    .to_owned();
                let start = message.get("start");
                let format = media_format(start.and_then(|s| s.get("mediaFormat")))?;
                let mut custom = params(start.and_then(|s| s.get("customParameters")));
                let headers = field(&message, &["extra_headers"])
                    .or(field(&message, &["start", "extraHeaders"]))
                    .unwrap_or("");
                custom.extend(extra_headers(headers));
                self.stream_id = Some(stream_id.clone());
                Ok(CallEvent::Start {
                    stream_id,
                    params: custom,
                    format,
                })
            }
            "media" => {
                check_stream(&self.stream_id, id, "media")?;
                media_event(&message)
            }
            "checkpoint" => {
                check_stream(&self.stream_id, id, "checkpoint")?;
                let name = field(&message, &["name"]).ok_or(ProtocolError::Missing("name"))?;
                Ok(CallEvent::Mark(name.to_owned()))
            }
            "playedStream" => {
                check_stream(&self.stream_id, id, "playedStream")?;
                let name = field(&message, &["name"]).unwrap_or("");
                Ok(CallEvent::Played(name.to_owned()))
            }
            "dtmf" => {
                check_stream(&self.stream_id, id, "dtmf")?;
                dtmf_event(&message)
            }
            "stop" => Ok(CallEvent::Stop),
            other => Ok(CallEvent::Ignored(other.to_owned())),
        }
    }

    fn media(&self, payload: &[u8], format: WireFormat) -> Frame {
        let content_type = match format.codec {
            Codec::G711(Law::Mulaw) => "audio/x-mulaw",
            Codec::G711(Law::Alaw) => "audio/x-alaw",
            Codec::L16 => "audio/x-l16",
            // `media_format` reads only the three above from Plivo's start message.
            other => unreachable!("a Plivo stream in {other:?}"),
        };
        Frame::Text(
            json!({
                "event": "playAudio",
                "media": {
                    "contentType": content_type,
                    "sampleRate": format.rate,
                    "payload": encode_payload(payload),
                },
            })
            .to_string(),
        )
    }

    fn mark_played(&self, name: &str) -> Frame {
        Frame::Text(
            json!({"event": "playedStream", "streamId": self.id(), "name": name}).to_string(),
        )
    }

    fn clear(&self) -> Frame {
        Frame::Text(json!({"event": "clearAudio", "streamId": self.id()}).to_string())
    }
}

impl Plivo {
    fn id(&self) -> &str {
        self.stream_id.as_deref().unwrap_or("")
    }
}

fn media_format(format: Option<&serde_json::Value>) -> Result<WireFormat, ProtocolError> {
    let encoding = format
        .and_then(|f| f.get("encoding"))
        .and_then(|e| e.as_str())
        .unwrap_or("audio/x-mulaw");
    let rate = format
        .and_then(|f| f.get("sampleRate"))
        .and_then(|r| r.as_u64())
        .unwrap_or(8000) as u32;
    match (encoding, rate) {
        ("audio/x-mulaw", 8000) => Ok(WireFormat::MULAW_8K),
        ("audio/x-l16", 8000 | 16000) => Ok(WireFormat {
            codec: Codec::L16,
            rate,
        }),
        _ => Err(ProtocolError::Format(format!(
            "{encoding} at {rate} Hz (Plivo streams audio/x-mulaw at 8000 Hz or audio/x-l16 at 8000/16000 Hz)"
        ))),
    }
}

/// `key=value` pairs separated by `;` or `,`.
fn extra_headers(text: &str) -> BTreeMap<String, String> {
    text.split([';', ','])
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key.trim().to_owned(), value.trim().to_owned()))
        })
        .filter(|(key, _)| !key.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str = r#"{"event":"start","sequenceNumber":1,"start":{"callId":"c-1","streamId":"s-1","accountId":"a1","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000}},"extra_headers":"voice=NATM0;prompt=Hello there"}"#;

    #[test]
    fn a_call_parses_in_order() {
        let mut plivo = Plivo::new();
        let CallEvent::Start {
            stream_id,
            params,
            format,
        } = plivo.parse_text(START).unwrap()
        else {
            panic!()
        };
        assert_eq!(stream_id, "s-1");
        assert_eq!(params["voice"], "NATM0");
        assert_eq!(params["prompt"], "Hello there");
        assert_eq!(format, WireFormat::MULAW_8K);
        let media = r#"{"event":"media","sequenceNumber":2,"streamId":"s-1","media":{"track":"inbound","timestamp":"1","chunk":1,"payload":"/w=="}}"#;
        assert_eq!(
            plivo.parse_text(media).unwrap(),
            CallEvent::Media(vec![0xff])
        );
        let checkpoint = r#"{"event":"checkpoint","streamId":"s-1","name":"cp1"}"#;
        assert_eq!(
            plivo.parse_text(checkpoint).unwrap(),
            CallEvent::Mark("cp1".into())
        );
        let played = r#"{"event":"playedStream","streamId":"s-1","name":"cp0"}"#;
        assert_eq!(
            plivo.parse_text(played).unwrap(),
            CallEvent::Played("cp0".into())
        );
        let dtmf = r#"{"event":"dtmf","streamId":"s-1","dtmf":{"digit":"3"}}"#;
        assert_eq!(plivo.parse_text(dtmf).unwrap(), CallEvent::Dtmf("3".into()));
        assert_eq!(
            plivo
                .parse_text(r#"{"event":"clearedAudio","streamId":"s-1"}"#)
                .unwrap(),
            CallEvent::Ignored("clearedAudio".into())
        );
        let Frame::Text(play) = plivo.media(&[0xff], WireFormat::MULAW_8K) else {
            panic!()
        };
        let play: serde_json::Value = serde_json::from_str(&play).unwrap();
        assert_eq!(play["event"], "playAudio");
        assert_eq!(play["media"]["contentType"], "audio/x-mulaw");
        assert_eq!(play["media"]["sampleRate"], 8000);
        let Frame::Text(clear) = plivo.clear() else {
            panic!()
        };
        assert_eq!(clear, r#"{"event":"clearAudio","streamId":"s-1"}"#);
        let Frame::Text(ack) = plivo.mark_played("cp1") else {
            panic!()
        };
        assert!(ack.contains("playedStream") && ack.contains("cp1"));
    }

    #[test]
    fn bad_input_is_refused_by_kind() {
        let mut plivo = Plivo::new();
        let media = r#"{"event":"media","streamId":"s-1","media":{"payload":"/w=="}}"#;
        assert_eq!(
            plivo.parse_text(media),
            Err(ProtocolError::BeforeStart("media"))
        );
        plivo.parse_text(START).unwrap();
        let bad = r#"{"event":"media","streamId":"s-1","media":{"payload":"%%%"}}"#;
        assert_eq!(plivo.parse_text(bad), Err(ProtocolError::BadBase64));
        let g722 = START.replace("audio/x-mulaw", "audio/G722");
        assert!(matches!(
            Plivo::new().parse_text(&g722),
            Err(ProtocolError::Format(_))
        ));
    }
}

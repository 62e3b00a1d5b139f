//! The text tokenizer: SentencePiece (`tokenizer_spm_32k_3.model`) for encoding prompts, and the
//! piece table (read from the model's protobuf) for turning generated ids back into text.

use super::Result;
use sentencepiece::SentencePieceProcessor;
use std::path::Path;

/// End-of-padding: the model marks where padding stops; never shown.
pub const END_OF_PADDING: u32 = 0;
/// Text padding while the agent is silent or between words; never shown.
pub const PADDING: u32 = 3;

pub struct TextTokenizer {
    processor: SentencePieceProcessor,
    pieces: Vec<String>,
}

impl TextTokenizer {
    pub fn open(path: &Path) -> Result<Self> {
        let processor = SentencePieceProcessor::open(path).map_err(|e| {
            candle_core::Error::msg(format!(
                "{}: not a SentencePiece model: {e}",
                path.display()
            ))
        })?;
        let pieces = read_pieces(&processor.to_serialized_proto())
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        Ok(Self { processor, pieces })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Plain SentencePiece ids of `text` (no BOS/EOS), as the reference encodes prompts.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let pieces = self
            .processor
            .encode(text)
            .map_err(|e| candle_core::Error::msg(format!("tokenizing {text:?}: {e}")))?;
        Ok(pieces.into_iter().map(|p| p.id).collect())
    }

    /// The piece of `id` as stored (`▁` marks a word start).
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// What `id` adds to the transcript: nothing for padding and end-of-padding, otherwise the
    /// piece with `▁` as a space (the reference server's rule).
    pub fn text_piece(&self, id: u32) -> Option<String> {
        if id == PADDING || id == END_OF_PADDING {
            return None;
        }
        self.piece(id).map(|p| p.replace('\u{2581}', " "))
    }
}

/// The role prompt as PersonaPlex feeds it: trimmed and wrapped in `<system>` tags unless it
/// already starts and ends with one.
pub fn wrap_system_prompt(prompt: &str) -> String {
    let trimmed = prompt.trim();
    if trimmed.starts_with("<system>") && trimmed.ends_with("<system>") {
        return trimmed.to_owned();
    }
    format!("<system> {trimmed} <system>")
}

/// The `piece` strings of a SentencePiece `ModelProto` (field 1, each a message whose field 1 is
/// the piece), in id order.
fn read_pieces(proto: &[u8]) -> std::result::Result<Vec<String>, String> {
    let mut pieces = Vec::new();
    for (field, value) in fields(proto)? {
        if let (1, Field::Bytes(message)) = (field, value) {
            let piece = fields(message)?
                .into_iter()
                .find_map(|(f, v)| match (f, v) {
                    (1, Field::Bytes(text)) => Some(String::from_utf8_lossy(text).into_owned()),
                    _ => None,
                })
                .ok_or("a vocabulary entry without a piece")?;
            pieces.push(piece);
        }
    }
    if pieces.is_empty() {
        return Err("no vocabulary in the model".into());
    }
    Ok(pieces)
}

enum Field<'a> {
    Varint,
    Bytes(&'a [u8]),
    Fixed,
}

/// The top-level fields of one protobuf message.
fn fields(mut bytes: &[u8]) -> std::result::Result<Vec<(u64, Field<'_>)>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let value = match key & 7 {
            0 => {
                varint(&mut bytes)?;
                Field::Varint
            }
            1 | 5 => {
                let width = if key & 7 == 1 { 8 } else { 4 };
                bytes = bytes.get(width..).ok_or("truncated fixed field")?;
                Field::Fixed
            }
            2 => {
                let len = varint(&mut bytes)? as usize;
                let (value, rest) = (bytes.get(..len).ok_or("truncated field")?, &bytes[len..]);
                bytes = rest;
                Field::Bytes(value)
            }
            wire => return Err(format!("unsupported protobuf wire type {wire}")),
        };
        out.push((key >> 3, value));
    }
    Ok(out)
}

fn varint(bytes: &mut &[u8]) -> std::result::Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first().ok_or("truncated varint")?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    fn tiny() -> TextTokenizer {
        TextTokenizer::open(&fixtures().join("tiny/tokenizer_spm_32k_3.model")).unwrap()
    }

    #[test]
    fn encoding_matches_python_sentencepiece() {
        let expected: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("spm_parity.json")).unwrap(),
        )
        .unwrap();
        let tokenizer = tiny();
        assert_eq!(
            tokenizer.vocab_size() as u64,
            expected["vocab_size"].as_u64().unwrap()
        );
        for case in expected["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ids: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tokenizer.encode(text).unwrap(), ids, "{text:?}");
        }
        for (id, piece) in expected["id_to_piece"].as_object().unwrap() {
            assert_eq!(
                tokenizer.piece(id.parse().unwrap()),
                piece.as_str(),
                "id {id}"
            );
        }
    }

    #[test]
    fn padding_is_silent_and_word_starts_become_spaces() {
        let tokenizer = tiny();
        assert_eq!(tokenizer.text_piece(PADDING), None);
        assert_eq!(tokenizer.text_piece(END_OF_PADDING), None);
        assert_eq!(tokenizer.text_piece(6).as_deref(), Some(" the"));
        assert_eq!(tokenizer.text_piece(100_000), None);
    }

    #[test]
    fn prompts_are_wrapped_once() {
        assert_eq!(
            wrap_system_prompt(" Be kind. "),
            "<system> Be kind. <system>"
        );
        assert_eq!(
            wrap_system_prompt("<system> Be kind. <system>"),
            "<system> Be kind. <system>"
        );
        assert_eq!(
            wrap_system_prompt("<system> Be kind."),
            "<system> <system> Be kind. <system>"
        );
    }

    #[test]
    fn a_broken_model_file_is_an_error() {
        let path = std::env::temp_dir().join(format!("duplex-spm-{}.model", std::process::id()));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(TextTokenizer::open(&path).is_err());
    }
}

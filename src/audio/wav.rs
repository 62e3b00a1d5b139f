//! WAV files: read any PCM/float WAV as mono f32, write 24 kHz mono or stereo 16-bit.

use super::SAMPLE_RATE;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum WavError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: hound::Error,
    },
    #[error(
        "{path}: sample rate {found} Hz, expected {expected} Hz (resample it, e.g. `sox in.wav -r {expected} out.wav`)"
    )]
    SampleRate {
        path: String,
        found: u32,
        expected: u32,
    },
}

fn io_error(path: &Path) -> impl FnOnce(hound::Error) -> WavError + '_ {
    move |source| WavError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a WAV file, downmixes to mono and converts to f32 in [-1, 1]; returns the samples and
/// the file's sample rate.
pub fn read_mono(path: &Path) -> Result<(Vec<f32>, u32), WavError> {
    let mut reader = hound::WavReader::open(path).map_err(io_error(path))?;
    let spec = reader.spec();
    let channels = spec.channels.max(1) as usize;
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(io_error(path))?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(io_error(path))?
        }
    };
    let mono = interleaved
        .chunks(channels)
        .map(|frame| frame.iter().sum::<f32>() / channels as f32)
        .collect();
    Ok((mono, spec.sample_rate))
}

/// Reads a WAV file that must already be at 24 kHz.
pub fn read_mono_24k(path: &Path) -> Result<Vec<f32>, WavError> {
    let (samples, rate) = read_mono(path)?;
    if rate != SAMPLE_RATE {
        return Err(WavError::SampleRate {
            path: path.display().to_string(),
            found: rate,
            expected: SAMPLE_RATE,
        });
    }
    Ok(samples)
}

/// Writes 16-bit PCM at `sample_rate` with one channel per slice in `channels` (all the same length).
pub fn write_pcm16(path: &Path, sample_rate: u32, channels: &[&[f32]]) -> Result<(), WavError> {
    let spec = hound::WavSpec {
        channels: channels.len() as u16,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let frames = channels.iter().map(|c| c.len()).max().unwrap_or(0);
    let mut writer = hound::WavWriter::create(path, spec).map_err(io_error(path))?;
    for idx in 0..frames {
        for channel in channels {
            let sample = channel.get(idx).copied().unwrap_or(0.0).clamp(-1.0, 1.0);
            writer
                .write_sample((sample * i16::MAX as f32) as i16)
                .map_err(io_error(path))?;
        }
    }
    writer.finalize().map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trips() {
        let dir = std::env::temp_dir().join(format!("duplex-wav-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.wav");
        let left = [0.5, -0.5, 0.25];
        let right = [0.0, 0.5, -0.25];
        write_pcm16(&path, SAMPLE_RATE, &[&left, &right]).unwrap();
        let (mono, rate) = read_mono(&path).unwrap();
        assert_eq!(rate, SAMPLE_RATE);
        assert_eq!(mono.len(), 3);
        assert!((mono[0] - 0.25).abs() < 1e-3);
        assert!(read_mono_24k(&path).is_ok());
        write_pcm16(&path, 16_000, &[&left]).unwrap();
        assert!(matches!(
            read_mono_24k(&path),
            Err(WavError::SampleRate { found: 16_000, .. })
        ));
    }
}

//! Streaming speed of the codec on a chirp, frame by frame as the step loop runs it. The one place
//! in the model that reads a clock; `duplex bench` reports it.

use super::Mimi;
use crate::model::Result;
use candle_core::Tensor;
use serde::Serialize;
use std::time::Instant;

/// Per-frame timings of streaming encode and decode, batch 1.
#[derive(Debug, Clone, Serialize)]
pub struct MimiBench {
    pub frames: usize,
    /// CPU threads candle's kernels use (`RAYON_NUM_THREADS`, else every core).
    pub threads: usize,
    /// Audio per frame (80).
    pub frame_ms: f64,
    pub encode_mean_ms: f64,
    pub encode_p50_ms: f64,
    pub decode_mean_ms: f64,
    pub decode_p50_ms: f64,
    /// Mean compute time over audio time (below 1 keeps up with real time).
    pub encode_rtf: f64,
    pub decode_rtf: f64,
    /// Encode plus decode.
    pub total_rtf: f64,
}

/// Encodes `seconds` of a 100 Hz → 4 kHz chirp (amplitude 0.5) one frame at a time and decodes
/// each frame's codes right after, timing both (after one untimed warm-up frame). Each step ends
/// with the result copied to the host, as the server does.
pub fn bench_streaming(mimi: &Mimi, seconds: f64) -> Result<MimiBench> {
    let cfg = mimi.config();
    let frame = mimi.frame_samples();
    let sample_rate = cfg.sample_rate as f64;
    let frames = ((seconds * sample_rate) as usize / frame).max(1);
    let pcm = chirp(frames * frame, sample_rate, 100.0, 4000.0);
    let frame_tensor = |i: usize| -> Result<Tensor> {
        Tensor::from_slice(
            &pcm[i * frame..(i + 1) * frame],
            (1, 1, frame),
            mimi.device(),
        )?
        .repeat((1, cfg.channels, 1))
    };

    let mut enc = mimi.encoder_state(1)?;
    let mut dec = mimi.decoder_state(1)?;
    let warm = mimi.encode_step(&frame_tensor(0)?, &mut enc, &[true])?;
    mimi.decode_step(&warm, &mut dec, &[true])?
        .flatten_all()?
        .to_vec1::<f32>()?;
    enc.reset_all()?;
    dec.reset_all()?;

    let mut enc_ms = Vec::with_capacity(frames);
    let mut dec_ms = Vec::with_capacity(frames);
    for i in 0..frames {
        let xs = frame_tensor(i)?;
        let start = Instant::now();
        let codes = mimi.encode_step(&xs, &mut enc, &[true])?;
        let host = codes.to_vec2::<u32>()?;
        enc_ms.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        let codes = Tensor::new(host, mimi.device())?;
        mimi.decode_step(&codes, &mut dec, &[true])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        dec_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let frame_ms = frame as f64 * 1e3 / sample_rate;
    let (encode_mean_ms, decode_mean_ms) = (mean(&enc_ms), mean(&dec_ms));
    Ok(MimiBench {
        frames,
        threads: candle_core::utils::get_num_threads(),
        frame_ms,
        encode_mean_ms,
        encode_p50_ms: median(&mut enc_ms),
        decode_mean_ms,
        decode_p50_ms: median(&mut dec_ms),
        encode_rtf: encode_mean_ms / frame_ms,
        decode_rtf: decode_mean_ms / frame_ms,
        total_rtf: (encode_mean_ms + decode_mean_ms) / frame_ms,
    })
}

/// A linear chirp from `f0` to `f1` Hz over `len` samples, amplitude 0.5.
pub(crate) fn chirp(len: usize, sample_rate: f64, f0: f64, f1: f64) -> Vec<f32> {
    let duration = len as f64 / sample_rate;
    (0..len)
        .map(|i| {
            let t = i as f64 / sample_rate;
            let phase =
                2.0 * std::f64::consts::PI * (f0 * t + (f1 - f0) * t * t / (2.0 * duration));
            (0.5 * phase.sin()) as f32
        })
        .collect()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => 0.0,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

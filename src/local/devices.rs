//! The microphone and the speaker through cpal, and the bridge thread between the sound card's
//! rate and the session's 24 kHz rings.
//!
//! The cpal callbacks do one thing each: the capture callback downmixes to mono into a scratch
//! buffer and pushes it into a device-rate ring; the playback callback pops from another ring,
//! fills any shortfall with silence and writes every channel. Nothing in them locks, allocates
//! or logs; they count in atomics. The bridge thread resamples, runs the echo canceller and
//! moves audio between those rings and the session's.

use super::LocalError;
use super::aec::{AEC_FRAME_SAMPLES, EchoCancel};
use crate::audio::SAMPLE_RATE;
use crate::audio::resample::StreamResampler;
use crate::audio::ring::{
    Inbound, InputProducer, Outbound, OutputConsumer, RingConsumer, RingProducer, ring,
};
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{FromSample, Sample, SampleFormat, SizedSample};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters the callbacks bump; another thread reads and logs them.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    pub captured_samples: AtomicU64,
    /// Microphone samples that did not fit in the capture ring (the bridge fell behind).
    pub capture_overflow_samples: AtomicU64,
    pub played_samples: AtomicU64,
    /// Speaker samples played as silence because nothing was ready.
    pub playback_underrun_samples: AtomicU64,
    /// Stream errors reported by the backend (xruns and the like).
    pub stream_errors: AtomicU64,
}

/// Most frames a callback converts per pass through its scratch buffer.
const SCRATCH_FRAMES: usize = 8192;

/// The microphone callback's body: downmix, push, count.
pub struct CaptureCallback {
    ring: RingProducer<Inbound>,
    channels: usize,
    mono: Vec<f32>,
    counters: Arc<DeviceCounters>,
}

impl CaptureCallback {
    pub fn new(
        ring: RingProducer<Inbound>,
        channels: usize,
        counters: Arc<DeviceCounters>,
    ) -> Self {
        Self {
            ring,
            channels: channels.max(1),
            mono: vec![0.0; SCRATCH_FRAMES],
            counters,
        }
    }

    /// Handles one buffer of interleaved samples from the device.
    pub fn process<T>(&mut self, data: &[T])
    where
        T: Sample,
        f32: FromSample<T>,
    {
        let scale = 1.0 / self.channels as f32;
        for block in data.chunks(SCRATCH_FRAMES * self.channels) {
            let frames = block.len() / self.channels;
            for (out, frame) in self.mono[..frames]
                .iter_mut()
                .zip(block.chunks_exact(self.channels))
            {
                *out = frame.iter().map(|s| s.to_sample::<f32>()).sum::<f32>() * scale;
            }
            let lost = self.ring.push(&self.mono[..frames]);
            self.counters
                .captured_samples
                .fetch_add(frames as u64, Ordering::Relaxed);
            self.counters
                .capture_overflow_samples
                .fetch_add(lost as u64, Ordering::Relaxed);
        }
    }
}

/// The speaker callback's body: pop, fill gaps with silence, write every channel, count.
pub struct PlaybackCallback {
    ring: RingConsumer<Outbound>,
    channels: usize,
    mono: Vec<f32>,
    counters: Arc<DeviceCounters>,
}

impl PlaybackCallback {
    pub fn new(
        ring: RingConsumer<Outbound>,
        channels: usize,
        counters: Arc<DeviceCounters>,
    ) -> Self {
        Self {
            ring,
            channels: channels.max(1),
            mono: vec![0.0; SCRATCH_FRAMES],
            counters,
        }
    }

    /// Fills one buffer of interleaved samples for the device.
    pub fn process<T>(&mut self, data: &mut [T])
    where
        T: Sample + FromSample<f32>,
    {
        for block in data.chunks_mut(SCRATCH_FRAMES * self.channels) {
            let frames = block.len() / self.channels;
            let got = self.ring.pop(&mut self.mono[..frames]);
            self.mono[got..frames].fill(0.0);
            for (frame, &sample) in block
                .chunks_exact_mut(self.channels)
                .zip(&self.mono[..frames])
            {
                frame.fill(T::from_sample(sample));
            }
            self.counters
                .played_samples
                .fetch_add(frames as u64, Ordering::Relaxed);
            self.counters
                .playback_underrun_samples
                .fetch_add((frames - got) as u64, Ordering::Relaxed);
        }
    }
}

/// Moves audio between the device-rate rings and the session, at the bridge thread's pace.
pub struct Bridge {
    capture: RingConsumer<Inbound>,
    playback: RingProducer<Outbound>,
    to_session: StreamResampler,
    to_device: StreamResampler,
    aec: Option<EchoCancel>,
    input: InputProducer,
    output: OutputConsumer,
    /// Device samples the playback ring is kept filled to (covers the 80 ms step).
    playback_target: usize,
    device: Vec<f32>,
    wide: Vec<f32>,
    staged: Vec<f32>,
    frame: Vec<f32>,
}

impl Bridge {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        capture: RingConsumer<Inbound>,
        playback: RingProducer<Outbound>,
        capture_rate: u32,
        playback_rate: u32,
        aec: Option<EchoCancel>,
        input: InputProducer,
        output: OutputConsumer,
    ) -> Result<Self, LocalError> {
        let resampler = |from, to| {
            StreamResampler::new(from, to).map_err(|e| LocalError::Device(e.to_string()))
        };
        Ok(Self {
            capture,
            playback,
            to_session: resampler(capture_rate, SAMPLE_RATE)?,
            to_device: resampler(SAMPLE_RATE, playback_rate)?,
            aec,
            input,
            output,
            playback_target: playback_rate as usize * 120 / 1000,
            device: vec![0.0; 4096],
            wide: vec![0.0; 8192],
            staged: Vec::with_capacity(16384),
            frame: vec![0.0; AEC_FRAME_SAMPLES],
        })
    }

    /// One pass: microphone → session, session → speaker. Returns samples moved each way.
    pub fn pump(&mut self) -> (usize, usize) {
        let mut captured = 0;
        loop {
            let got = self.capture.pop(&mut self.device);
            if got == 0 {
                break;
            }
            let max = self.to_session.max_output_len(got);
            if self.wide.len() < max {
                self.wide.resize(max, 0.0);
            }
            let wide = self
                .to_session
                .process(&self.device[..got], &mut self.wide)
                .expect("sized from max_output_len");
            self.staged.extend_from_slice(&self.wide[..wide]);
        }
        let mut used = 0;
        while self.staged.len() - used >= AEC_FRAME_SAMPLES {
            self.frame
                .copy_from_slice(&self.staged[used..used + AEC_FRAME_SAMPLES]);
            used += AEC_FRAME_SAMPLES;
            if let Some(aec) = self.aec.as_mut()
                && aec.capture(&mut self.frame).is_err()
            {
                continue;
            }
            self.input.push(&self.frame);
            captured += AEC_FRAME_SAMPLES;
        }
        self.staged.drain(..used);
        let mut played = 0;
        while self.playback.queued() < self.playback_target
            && self.output.pop_exact(&mut self.frame)
        {
            if let Some(aec) = self.aec.as_mut() {
                let _ = aec.render(&self.frame);
            }
            let max = self.to_device.max_output_len(self.frame.len());
            if self.device.len() < max {
                self.device.resize(max, 0.0);
            }
            let out = self
                .to_device
                .process(&self.frame, &mut self.device)
                .expect("sized from max_output_len");
            self.playback.push(&self.device[..out]);
            played += AEC_FRAME_SAMPLES;
        }
        (captured, played)
    }
}

/// The names of the input and output devices, one a line, default first.
pub fn list() -> Result<String, LocalError> {
    let host = cpal::default_host();
    let mut text = format!("host: {}\n", host.id().name());
    for (label, devices) in [
        ("input devices", input_names(&host)),
        ("output devices", output_names(&host)),
    ] {
        text.push_str(label);
        text.push_str(":\n");
        if devices.is_empty() {
            text.push_str("  (none)\n");
        }
        for name in devices {
            text.push_str(&format!("  {name}\n"));
        }
    }
    Ok(text)
}

fn input_names(host: &cpal::Host) -> Vec<String> {
    host.input_devices()
        .map(|d| d.map(|d| d.to_string()).collect())
        .unwrap_or_default()
}

fn output_names(host: &cpal::Host) -> Vec<String> {
    host.output_devices()
        .map(|d| d.map(|d| d.to_string()).collect())
        .unwrap_or_default()
}

/// Finds a device by exact name, then by case-insensitive substring; the default without a name.
fn pick(host: &cpal::Host, wanted: Option<&str>, input: bool) -> Result<cpal::Device, LocalError> {
    let kind = if input { "input" } else { "output" };
    let available = if input {
        input_names(host)
    } else {
        output_names(host)
    };
    let found = match wanted {
        None => {
            if input {
                host.default_input_device()
            } else {
                host.default_output_device()
            }
        }
        Some(name) => {
            let devices: Vec<cpal::Device> = if input {
                host.input_devices()
                    .map(|d| d.collect())
                    .unwrap_or_default()
            } else {
                host.output_devices()
                    .map(|d| d.collect())
                    .unwrap_or_default()
            };
            let lower = name.to_lowercase();
            let exact = devices.iter().position(|d| d.to_string() == name);
            let partial = || {
                devices
                    .iter()
                    .position(|d| d.to_string().to_lowercase().contains(&lower))
            };
            exact.or_else(partial).map(|idx| devices[idx].clone())
        }
    };
    found.ok_or_else(|| match wanted {
        Some(name) if !available.is_empty() => LocalError::UnknownDevice {
            kind,
            name: name.to_owned(),
            available,
        },
        _ => LocalError::NoSoundCard { kind },
    })
}

/// Open streams and the bridge; dropping it stops the sound.
pub struct Devices {
    _input: cpal::Stream,
    _output: cpal::Stream,
    pub bridge: Bridge,
    pub counters: Arc<DeviceCounters>,
    pub description: String,
}

/// Opens the microphone and the speaker and connects them to a session's rings.
pub fn open(
    input_device: Option<&str>,
    output_device: Option<&str>,
    aec: bool,
    input: InputProducer,
    output: OutputConsumer,
) -> Result<Devices, LocalError> {
    let host = cpal::default_host();
    let mic = pick(&host, input_device, true)?;
    let speaker = pick(&host, output_device, false)?;
    let device_error = |e: cpal::Error| LocalError::Device(e.to_string());
    // The default device of a machine without a sound card exists by name but cannot open.
    let config_error = |kind: &'static str, named: bool| {
        move |e: cpal::Error| match e.kind() {
            cpal::ErrorKind::DeviceNotAvailable | cpal::ErrorKind::HostUnavailable if !named => {
                LocalError::NoSoundCard { kind }
            }
            _ => LocalError::Device(format!("{kind} device: {e}")),
        }
    };
    let mic_config = mic
        .default_input_config()
        .map_err(config_error("input", input_device.is_some()))?;
    let speaker_config = speaker
        .default_output_config()
        .map_err(config_error("output", output_device.is_some()))?;
    let counters = Arc::new(DeviceCounters::default());
    let capture_rate = mic_config.sample_rate();
    let playback_rate = speaker_config.sample_rate();
    // Half a second each way: the bridge runs every few milliseconds.
    let (capture_prod, capture_cons) = ring::<Inbound>(capture_rate as usize / 2);
    let (playback_prod, playback_cons) = ring::<Outbound>(playback_rate as usize / 2);
    let capture = CaptureCallback::new(
        capture_prod,
        mic_config.channels() as usize,
        counters.clone(),
    );
    let playback = PlaybackCallback::new(
        playback_cons,
        speaker_config.channels() as usize,
        counters.clone(),
    );
    let input_stream = build_input(&mic, mic_config, capture, counters.clone())?;
    let output_stream = build_output(&speaker, speaker_config, playback, counters.clone())?;
    let aec = if aec {
        Some(EchoCancel::new(60).map_err(|e| LocalError::Device(e.to_string()))?)
    } else {
        None
    };
    let bridge = Bridge::new(
        capture_cons,
        playback_prod,
        capture_rate,
        playback_rate,
        aec,
        input,
        output,
    )?;
    input_stream.play().map_err(device_error)?;
    output_stream.play().map_err(device_error)?;
    let description = format!(
        "microphone: {mic} ({capture_rate} Hz, {} ch), speaker: {speaker} ({playback_rate} Hz, {} ch)",
        mic_config.channels(),
        speaker_config.channels()
    );
    Ok(Devices {
        _input: input_stream,
        _output: output_stream,
        bridge,
        counters,
        description,
    })
}

fn build_input(
    device: &cpal::Device,
    config: cpal::SupportedStreamConfig,
    callback: CaptureCallback,
    counters: Arc<DeviceCounters>,
) -> Result<cpal::Stream, LocalError> {
    fn build<T>(
        device: &cpal::Device,
        config: cpal::StreamConfig,
        mut callback: CaptureCallback,
        counters: Arc<DeviceCounters>,
    ) -> Result<cpal::Stream, cpal::Error>
    where
        T: SizedSample,
        f32: FromSample<T>,
    {
        device.build_input_stream::<T, _, _>(
            config,
            move |data: &[T], _| callback.process(data),
            move |_| {
                counters.stream_errors.fetch_add(1, Ordering::Relaxed);
            },
            None,
        )
    }
    let format = config.sample_format();
    let stream_config = config.config();
    match format {
        SampleFormat::F32 => build::<f32>(device, stream_config, callback, counters),
        SampleFormat::I16 => build::<i16>(device, stream_config, callback, counters),
        SampleFormat::I32 => build::<i32>(device, stream_config, callback, counters),
        other => {
            return Err(LocalError::Device(format!(
                "microphone sample format {other:?} is not supported"
            )));
        }
    }
    .map_err(|e| LocalError::Device(format!("opening the microphone: {e}")))
}

fn build_output(
    device: &cpal::Device,
    config: cpal::SupportedStreamConfig,
    callback: PlaybackCallback,
    counters: Arc<DeviceCounters>,
) -> Result<cpal::Stream, LocalError> {
    fn build<T>(
        device: &cpal::Device,
        config: cpal::StreamConfig,
        mut callback: PlaybackCallback,
        counters: Arc<DeviceCounters>,
    ) -> Result<cpal::Stream, cpal::Error>
    where
        T: SizedSample + FromSample<f32>,
    {
        device.build_output_stream::<T, _, _>(
            config,
            move |data: &mut [T], _| callback.process(data),
            move |_| {
                counters.stream_errors.fetch_add(1, Ordering::Relaxed);
            },
            None,
        )
    }
    let format = config.sample_format();
    let stream_config = config.config();
    match format {
        SampleFormat::F32 => build::<f32>(device, stream_config, callback, counters),
        SampleFormat::I16 => build::<i16>(device, stream_config, callback, counters),
        SampleFormat::I32 => build::<i32>(device, stream_config, callback, counters),
        other => {
            return Err(LocalError::Device(format!(
                "speaker sample format {other:?} is not supported"
            )));
        }
    }
    .map_err(|e| LocalError::Device(format!("opening the speaker: {e}")))
}

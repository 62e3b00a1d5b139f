//! Local mode: WAV files through the real step loop (faster than real time and in real time),
//! the cpal callback bodies with plain buffers under an allocation counter, and the error a
//! machine without a sound card gets.

mod common;

use common::{scratch_dir, speech};
use duplex::audio::ring::{Inbound, Outbound, ring};
use duplex::audio::{FRAME_SAMPLES, SAMPLE_RATE, signal, wav};
use duplex::engine::{EchoEngine, PersonaRequest};
use duplex::local::devices::{CaptureCallback, DeviceCounters, PlaybackCallback};
use duplex::local::{FileOptions, run_files};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Counts allocations made on a thread while it is being watched.
struct CountingAllocator;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCHING.with(Cell::get) {
            ALLOCATIONS.with(|a| a.set(a.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if WATCHING.with(Cell::get) {
            ALLOCATIONS.with(|a| a.set(a.get() + 1));
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `body` and returns how many allocations it made on this thread.
fn allocations_in(body: impl FnOnce()) -> usize {
    ALLOCATIONS.with(|a| a.set(0));
    WATCHING.with(|w| w.set(true));
    body();
    WATCHING.with(|w| w.set(false));
    ALLOCATIONS.with(Cell::get)
}

fn run(
    realtime: bool,
    seconds: f64,
    name: &str,
) -> (Vec<f32>, Vec<f32>, duplex::local::FileReport) {
    let dir = scratch_dir(name);
    let input = dir.join("in.wav");
    let output = dir.join("out.wav");
    let sent = speech(
        "Testing the local mode of the duplex agent, one two three.",
        seconds,
    );
    // Write at 16 kHz to exercise the resampling on the way in.
    let at_16k = duplex::audio::resample::resample(&sent, SAMPLE_RATE, 16_000).unwrap();
    wav::write_pcm16(&input, 16_000, &[&at_16k]).unwrap();
    let options = FileOptions {
        input,
        output: output.clone(),
        realtime,
        persona: PersonaRequest::default(),
    };
    let report = run_files(EchoEngine::new(1, 1), &options).unwrap();
    let received = wav::read_mono_24k(&output).unwrap();
    (sent, received, report)
}

#[test]
fn a_file_runs_through_the_step_loop_faster_than_real_time() {
    let (sent, received, report) = run(false, 5.0, "local-fast");
    assert_eq!(received.len(), report.frames * FRAME_SAMPLES);
    assert!(
        received.len() >= sent.len() + FRAME_SAMPLES,
        "the echo's tail is in the file"
    );
    let (lag, corr) = signal::best_lag(&sent, &received, 2 * FRAME_SAMPLES);
    eprintln!(
        "fast: {} frames in {:?}, correlation {corr:.3} at lag {lag}",
        report.frames, report.elapsed
    );
    assert!(corr > 0.95, "correlation {corr}");
    // The echo engine returns each frame one tick later; the resampler adds a few samples.
    assert!(lag.abs_diff(FRAME_SAMPLES) < 100, "lag {lag}");
    assert!(
        report.elapsed < Duration::from_secs(2),
        "took {:?}",
        report.elapsed
    );
    assert_eq!(report.stats.input_underruns, 0);
    assert!(report.text.concat().contains("echo"), "{:?}", report.text);
}

#[test]
fn a_file_runs_through_the_step_loop_thread_in_real_time() {
    let (sent, received, report) = run(true, 1.5, "local-realtime");
    let (lag, corr) = signal::best_lag(&sent, &received, 4 * FRAME_SAMPLES);
    eprintln!(
        "real time: {} frames in {:?}, correlation {corr:.3} at lag {lag}",
        report.frames, report.elapsed
    );
    assert!(corr > 0.9, "correlation {corr}");
    assert!(
        report.elapsed >= Duration::from_millis(1400),
        "paced: {:?}",
        report.elapsed
    );
}

#[test]
fn callback_bodies_move_samples_without_allocating() {
    let counters = Arc::new(DeviceCounters::default());
    let (capture_prod, mut capture_cons) = ring::<Inbound>(4096);
    let mut capture = CaptureCallback::new(capture_prod, 2, counters.clone());
    let stereo: Vec<f32> = (0..1024).flat_map(|i| [i as f32 / 1024.0, 0.0]).collect();
    let stereo_i16: Vec<i16> = (0..1024).flat_map(|_| [1000i16, 3000]).collect();
    let allocations = allocations_in(|| {
        capture.process(&stereo);
        capture.process(&stereo_i16);
        // More than the ring holds: the rest is counted, not an error.
        capture.process(&stereo);
        capture.process(&stereo);
        capture.process(&stereo);
    });
    assert_eq!(allocations, 0, "the capture callback allocated");
    let mut mono = vec![0.0; 4096];
    assert_eq!(capture_cons.pop(&mut mono), 4096);
    assert!((mono[512] - 0.25).abs() < 1e-6, "downmixed: {}", mono[512]);
    assert!(
        (mono[1024] - 2000.0 / 32768.0).abs() < 1e-4,
        "i16 converted: {}",
        mono[1024]
    );
    assert_eq!(counters.captured_samples.load(Ordering::Relaxed), 5 * 1024);
    assert_eq!(
        counters.capture_overflow_samples.load(Ordering::Relaxed),
        1024
    );

    let (mut playback_prod, playback_cons) = ring::<Outbound>(4096);
    playback_prod.push(&[0.5; 300]);
    let mut playback = PlaybackCallback::new(playback_cons, 2, counters.clone());
    let mut out = vec![1.0f32; 2 * 512];
    let mut out_i16 = vec![7i16; 2 * 64];
    let allocations = allocations_in(|| {
        playback.process(&mut out);
        playback.process(&mut out_i16);
    });
    assert_eq!(allocations, 0, "the playback callback allocated");
    assert_eq!((out[0], out[1], out[599]), (0.5, 0.5, 0.5));
    assert_eq!((out[600], out[1023]), (0.0, 0.0), "silence on shortfall");
    assert_eq!(out_i16, vec![0i16; 128]);
    assert_eq!(counters.played_samples.load(Ordering::Relaxed), 512 + 64);
    assert_eq!(
        counters.playback_underrun_samples.load(Ordering::Relaxed),
        (512 - 300) + 64
    );
}

#[test]
fn without_a_sound_card_the_error_says_so_and_suggests_files() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["local", "--engine", "echo"])
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("this machine has a sound card: local mode is running; nothing to check");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("sound device"), "{stderr}");
    assert!(
        stderr.contains("--input in.wav --output out.wav"),
        "{stderr}"
    );
}

//! Audio primitives: the frame clock's units, the Opus codec and its Ogg pages, G.711, resampling,
//! the session rings, WAV files and test signals. Nothing here knows about sessions, transports or tensors.

pub mod g711;
pub mod g722;
pub mod loudness;
pub mod ogg_opus;
pub mod opus;
pub mod resample;
pub mod ring;
pub mod signal;
pub mod wav;

/// Sample rate of every PCM buffer inside the server (Mimi's rate; libopus encodes from and
/// decodes to it directly, so WebRTC needs no resampler).
pub const SAMPLE_RATE: u32 = 24_000;
/// One model frame: 80 ms.
pub const FRAME_MS: u64 = 80;
/// Samples in one model frame (80 ms at 24 kHz).
pub const FRAME_SAMPLES: usize = 1920;
/// One Opus packet on the wire: 20 ms.
pub const PACKET_MS: u64 = 20;
/// Samples in one 20 ms packet at 24 kHz.
pub const PACKET_SAMPLES: usize = 480;
/// Packets that make one model frame.
pub const PACKETS_PER_FRAME: usize = FRAME_SAMPLES / PACKET_SAMPLES;

/// The frame period as a `Duration`.
pub const FRAME_PERIOD: std::time::Duration = std::time::Duration::from_millis(FRAME_MS);
/// The packet period as a `Duration`.
pub const PACKET_PERIOD: std::time::Duration = std::time::Duration::from_millis(PACKET_MS);

/// Converts a sample count at [`SAMPLE_RATE`] to milliseconds.
pub fn samples_to_ms(samples: u64) -> f64 {
    samples as f64 * 1000.0 / SAMPLE_RATE as f64
}

/// The samples at [`SAMPLE_RATE`] that play in `duration` (rounded down).
pub fn duration_to_samples(duration: std::time::Duration) -> usize {
    (duration.as_nanos() * u128::from(SAMPLE_RATE) / 1_000_000_000) as usize
}

const _: () = assert!(FRAME_SAMPLES as u64 * 1000 == FRAME_MS * SAMPLE_RATE as u64);
const _: () = assert!(PACKET_SAMPLES as u64 * 1000 == PACKET_MS * SAMPLE_RATE as u64);

/// Instants on a fixed grid (`origin + k * period`), shared by everything that paces audio so
/// all pacing follows one clock.
pub mod clock_grid {
    use std::time::{Duration, Instant};

    /// The first grid point at or after `now`.
    pub fn next_after(origin: Instant, period: Duration, now: Instant) -> Instant {
        if now <= origin {
            return origin;
        }
        let elapsed = now.duration_since(origin).as_nanos();
        let steps = elapsed.div_ceil(period.as_nanos());
        origin + period * steps as u32
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn next_after_lands_on_the_grid() {
            let origin = Instant::now();
            let period = Duration::from_millis(20);
            assert_eq!(
                next_after(origin, period, origin - Duration::from_secs(1)),
                origin
            );
            assert_eq!(
                next_after(origin, period, origin + Duration::from_millis(1)),
                origin + period
            );
            assert_eq!(
                next_after(origin, period, origin + Duration::from_millis(40)),
                origin + period * 2
            );
        }
    }
}

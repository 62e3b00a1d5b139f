//! The per-session audio rings: lock-free SPSC queues of 24 kHz f32 samples.
//!
//! Each session has two: the transport produces into its input ring and the step loop consumes
//! one frame per tick; the step loop produces into its output ring and the transport consumes
//! 20 ms at a time. The ends are typed (`InputProducer`, `OutputConsumer`, …) so the wrong end
//! cannot be handed to the wrong side. Nothing here blocks or allocates after construction: a
//! producer pushes what fits and reports the rest, and latency is bounded by the consumer, which
//! drops the oldest samples with [`RingConsumer::skip`] (a producer cannot drop from the front).

use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// Marker for the user's audio on its way into the model.
pub enum Inbound {}
/// Marker for the agent's audio on its way out to the user.
pub enum Outbound {}

/// The writing end of a session ring.
pub struct RingProducer<Dir> {
    inner: HeapProd<f32>,
    last_push: Arc<PushTime>,
    _dir: PhantomData<Dir>,
}

/// The reading end of a session ring.
pub struct RingConsumer<Dir> {
    inner: HeapCons<f32>,
    last_push: Arc<PushTime>,
    _dir: PhantomData<Dir>,
}

/// When a ring was last pushed to, shared by its two ends without a lock.
struct PushTime {
    /// Signed nanoseconds from [`EPOCH`]; `NEVER` until the first push.
    nanos: AtomicI64,
}

const NEVER: i64 = i64::MIN;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

impl PushTime {
    fn new() -> Self {
        Self {
            nanos: AtomicI64::new(NEVER),
        }
    }

    fn record(&self, at: Instant) {
        let nanos = match at.checked_duration_since(*EPOCH) {
            Some(after) => after.as_nanos() as i64,
            None => -(EPOCH.duration_since(at).as_nanos() as i64),
        };
        self.nanos.store(nanos, Ordering::Release);
    }

    fn get(&self) -> Option<Instant> {
        let nanos = self.nanos.load(Ordering::Acquire);
        let offset = Duration::from_nanos(nanos.unsigned_abs());
        match nanos {
            NEVER => None,
            0.. => Some(*EPOCH + offset),
            _ => Some(*EPOCH - offset),
        }
    }
}

pub type InputProducer = RingProducer<Inbound>;
pub type InputConsumer = RingConsumer<Inbound>;
pub type OutputProducer = RingProducer<Outbound>;
pub type OutputConsumer = RingConsumer<Outbound>;

/// Creates a ring holding up to `capacity_samples` samples and returns its two ends.
pub fn ring<Dir>(capacity_samples: usize) -> (RingProducer<Dir>, RingConsumer<Dir>) {
    let (inner_prod, inner_cons) = HeapRb::<f32>::new(capacity_samples).split();
    let last_push = Arc::new(PushTime::new());
    (
        RingProducer {
            inner: inner_prod,
            last_push: last_push.clone(),
            _dir: PhantomData,
        },
        RingConsumer {
            inner: inner_cons,
            last_push,
            _dir: PhantomData,
        },
    )
}

impl<Dir> RingProducer<Dir> {
    /// Pushes as many samples as fit; returns how many did not fit (the caller counts them).
    pub fn push(&mut self, samples: &[f32]) -> usize {
        self.push_at(samples, Instant::now())
    }

    /// [`push`](Self::push) with the time the samples arrived given (tests replay time).
    pub fn push_at(&mut self, samples: &[f32], at: Instant) -> usize {
        let pushed = self.inner.push_slice(samples);
        self.last_push.record(at);
        samples.len() - pushed
    }

    /// Samples currently queued.
    pub fn queued(&self) -> usize {
        self.inner.occupied_len()
    }

    pub fn capacity(&self) -> usize {
        self.inner.capacity().get()
    }
}

impl<Dir> RingConsumer<Dir> {
    /// Samples currently queued.
    pub fn queued(&self) -> usize {
        self.inner.occupied_len()
    }

    /// When the producer last pushed (`None` before its first push).
    pub fn last_push(&self) -> Option<Instant> {
        self.last_push.get()
    }

    /// Pops exactly `out.len()` samples if that many are queued; otherwise pops nothing.
    pub fn pop_exact(&mut self, out: &mut [f32]) -> bool {
        if self.inner.occupied_len() < out.len() {
            return false;
        }
        self.inner.pop_slice(out) == out.len()
    }

    /// Pops up to `out.len()` samples; returns how many were written.
    pub fn pop(&mut self, out: &mut [f32]) -> usize {
        self.inner.pop_slice(out)
    }

    /// Drops the `count` oldest samples; returns how many were dropped.
    pub fn skip(&mut self, count: usize) -> usize {
        self.inner.skip(count)
    }

    /// Drops everything queued; returns how many samples were dropped.
    pub fn clear(&mut self) -> usize {
        let queued = self.inner.occupied_len();
        self.inner.skip(queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_reports_what_did_not_fit() {
        let (mut prod, mut cons) = ring::<Inbound>(10);
        assert_eq!(prod.push(&[1.0; 8]), 0);
        assert_eq!(prod.push(&[2.0; 5]), 3);
        assert_eq!(cons.queued(), 10);
        let mut out = [0.0; 10];
        assert!(cons.pop_exact(&mut out));
        assert_eq!(out[7], 1.0);
        assert_eq!(out[8], 2.0);
    }

    #[test]
    fn pop_exact_takes_nothing_when_short() {
        let (mut prod, mut cons) = ring::<Outbound>(16);
        prod.push(&[1.0; 3]);
        let mut out = [0.0; 4];
        assert!(!cons.pop_exact(&mut out));
        assert_eq!(cons.queued(), 3);
        assert_eq!(cons.pop(&mut out), 3);
    }

    #[test]
    fn the_consumer_sees_when_the_producer_last_pushed() {
        let (mut prod, cons) = ring::<Inbound>(16);
        assert_eq!(cons.last_push(), None);
        // Tests replay time, so a push may be dated before the ring existed.
        let now = Instant::now();
        for at in [
            now + Duration::from_millis(30),
            now - Duration::from_millis(30),
        ] {
            prod.push_at(&[1.0; 4], at);
            assert_eq!(cons.last_push(), Some(at));
        }
    }

    #[test]
    fn skip_drops_the_oldest() {
        let (mut prod, mut cons) = ring::<Inbound>(16);
        prod.push(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(cons.skip(2), 2);
        let mut out = [0.0; 2];
        assert!(cons.pop_exact(&mut out));
        assert_eq!(out, [3.0, 4.0]);
        prod.push(&[5.0; 3]);
        assert_eq!(cons.clear(), 3);
        assert_eq!(cons.queued(), 0);
    }
}

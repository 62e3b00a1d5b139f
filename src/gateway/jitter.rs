//! The receive side of a media stream: a small reorder buffer keyed on the RTP sequence
//! number, loss detection, and Opus decoding (with FEC recovery or concealment for lost
//! packets) into the session's input ring.

use crate::audio::PACKET_SAMPLES;
use crate::audio::opus::{MAX_PACKET_SAMPLES, OpusDecoder};
use crate::audio::ring::InputProducer;
use crate::engine::SessionStats;
use crate::metrics::Metrics;
use bytes::Bytes;
use std::collections::BTreeMap;

/// Later packets to wait for before declaring the missing one lost (each is 20 ms).
pub const REORDER_DEPTH: usize = 2;
/// A jump in sequence numbers this large is a restarted stream, not loss.
const MAX_GAP: u16 = 500;

/// What the reorder buffer releases, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// The next packet's payload.
    Packet(Bytes),
    /// The next packet never arrived; `following` is the one after it, if already here (its
    /// FEC data can rebuild the lost one).
    Lost { following: Option<Bytes> },
}

/// Reorders packets by sequence number and detects loss. Sequence numbers are unwrapped to
/// 64 bits around the next expected one, so the window never has to be re-keyed.
#[derive(Debug, Default)]
pub struct ReorderBuffer {
    expected: Option<u64>,
    pending: BTreeMap<u64, Bytes>,
    /// Packets that arrived after their turn, or twice.
    pub late: u64,
}

impl ReorderBuffer {
    /// Takes one packet and appends to `out` whatever can now be released, in order.
    pub fn push(&mut self, seq: u16, payload: Bytes, out: &mut Vec<Released>) {
        // Start one wrap in, so packets from before the first one still unwrap without underflow.
        let expected = *self.expected.get_or_insert(u64::from(seq) + (1 << 16));
        let ahead = seq.wrapping_sub(expected as u16) as i16;
        if ahead < 0 {
            self.late += 1;
            return;
        }
        let unwrapped = expected + ahead as u64;
        if ahead as u16 > MAX_GAP {
            self.pending.clear();
            self.expected = Some(unwrapped);
        }
        if self.pending.insert(unwrapped, payload).is_some() {
            self.late += 1;
        }
        self.release(out);
    }

    fn release(&mut self, out: &mut Vec<Released>) {
        while let Some(expected) = self.expected {
            if let Some(payload) = self.pending.remove(&expected) {
                out.push(Released::Packet(payload));
            } else if self.pending.len() >= REORDER_DEPTH {
                out.push(Released::Lost {
                    following: self.pending.get(&(expected + 1)).cloned(),
                });
            } else {
                return;
            }
            self.expected = Some(expected + 1);
        }
    }
}

/// Decodes released packets into the input ring and keeps the session's packet counters.
pub struct InboundAudio {
    reorder: ReorderBuffer,
    decoder: OpusDecoder,
    released: Vec<Released>,
    pcm: Vec<f32>,
    last_packet_samples: usize,
    input: InputProducer,
}

impl InboundAudio {
    pub fn new(input: InputProducer) -> Result<Self, crate::audio::opus::OpusError> {
        Ok(Self {
            reorder: ReorderBuffer::default(),
            decoder: OpusDecoder::new()?,
            released: Vec::with_capacity(REORDER_DEPTH + 2),
            pcm: vec![0.0; MAX_PACKET_SAMPLES],
            last_packet_samples: PACKET_SAMPLES,
            input,
        })
    }

    /// Handles one RTP packet's sequence number and payload.
    pub fn on_packet(&mut self, seq: u16, payload: Bytes, stats: &SessionStats, metrics: &Metrics) {
        stats.add(&stats.packets_received, 1);
        metrics.packets_received.inc();
        let late_before = self.reorder.late;
        self.reorder.push(seq, payload, &mut self.released);
        stats.add(&stats.packets_late, self.reorder.late - late_before);
        let mut released = std::mem::take(&mut self.released);
        for item in released.drain(..) {
            self.decode(item, stats, metrics);
        }
        self.released = released;
    }

    fn decode(&mut self, item: Released, stats: &SessionStats, metrics: &Metrics) {
        let samples = match item {
            Released::Packet(payload) => match self.decoder.decode(&payload, &mut self.pcm) {
                Ok(samples) => {
                    self.last_packet_samples = samples;
                    samples
                }
                Err(_) => {
                    stats.add(&stats.packets_bad, 1);
                    metrics.packets_bad.inc();
                    self.conceal()
                }
            },
            Released::Lost { following } => {
                stats.add(&stats.packets_lost, 1);
                metrics.packets_lost.inc();
                let recovered = following.and_then(|next| self.recover(&next));
                if recovered.is_some() {
                    stats.add(&stats.packets_recovered, 1);
                    metrics.packets_recovered.inc();
                }
                recovered.unwrap_or_else(|| self.conceal())
            }
        };
        let overflow = self.input.push(&self.pcm[..samples]) as u64;
        stats.add(&stats.input_overflow_samples, overflow);
    }

    fn recover(&mut self, next: &[u8]) -> Option<usize> {
        let lost_samples = self
            .decoder
            .packet_samples(next)
            .ok()?
            .min(MAX_PACKET_SAMPLES);
        self.decoder
            .recover(next, &mut self.pcm[..lost_samples])
            .ok()
    }

    fn conceal(&mut self) -> usize {
        let samples = self.last_packet_samples;
        self.decoder
            .conceal(&mut self.pcm[..samples])
            .unwrap_or_else(|_| {
                self.pcm[..samples].fill(0.0);
                samples
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::opus::{EncoderConfig, OpusEncoder};
    use crate::audio::ring::ring;
    use crate::audio::signal;

    fn payload(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    fn push_all(buffer: &mut ReorderBuffer, seqs: &[u16]) -> Vec<Released> {
        let mut out = Vec::new();
        for &seq in seqs {
            buffer.push(seq, payload(seq as u8), &mut out);
        }
        out
    }

    fn numbers(released: &[Released]) -> Vec<i32> {
        released
            .iter()
            .map(|r| match r {
                Released::Packet(p) => p[0] as i32,
                Released::Lost { .. } => -1,
            })
            .collect()
    }

    #[test]
    fn in_order_packets_pass_straight_through() {
        let mut buffer = ReorderBuffer::default();
        assert_eq!(
            numbers(&push_all(&mut buffer, &[10, 11, 12])),
            vec![10, 11, 12]
        );
    }

    #[test]
    fn a_swapped_pair_is_put_back_in_order() {
        let mut buffer = ReorderBuffer::default();
        assert_eq!(
            numbers(&push_all(&mut buffer, &[1, 3, 2, 4])),
            vec![1, 2, 3, 4]
        );
        assert_eq!(buffer.late, 0);
    }

    #[test]
    fn a_missing_packet_is_declared_lost_with_its_successor() {
        let mut buffer = ReorderBuffer::default();
        let out = push_all(&mut buffer, &[1, 3, 4, 5]);
        assert_eq!(numbers(&out), vec![1, -1, 3, 4, 5]);
        assert_eq!(
            out[1],
            Released::Lost {
                following: Some(payload(3))
            }
        );
        // The lost packet turning up afterwards is late, not replayed.
        assert!(push_all(&mut buffer, &[2]).is_empty());
        assert_eq!(buffer.late, 1);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut buffer = ReorderBuffer::default();
        assert_eq!(
            numbers(&push_all(&mut buffer, &[65534, 65535, 0, 1])),
            vec![254, 255, 0, 1]
        );
    }

    #[test]
    fn a_restarted_stream_does_not_count_thousands_of_losses() {
        let mut buffer = ReorderBuffer::default();
        let out = push_all(&mut buffer, &[100, 101, 30_000, 30_001]);
        assert_eq!(numbers(&out), vec![100, 101, 48, 49]);
    }

    #[test]
    fn duplicates_are_counted_late() {
        let mut buffer = ReorderBuffer::default();
        push_all(&mut buffer, &[5, 5]);
        assert_eq!(buffer.late, 1);
    }

    #[test]
    fn decoding_fills_the_ring_through_loss_and_garbage() {
        let pcm = signal::speech_like(PACKET_SAMPLES * 10, 2);
        let mut encoder = OpusEncoder::new(EncoderConfig::default()).unwrap();
        let packets: Vec<Bytes> = pcm
            .chunks_exact(PACKET_SAMPLES)
            .map(|c| Bytes::copy_from_slice(encoder.encode(c).unwrap()))
            .collect();
        let (producer, consumer) = ring(20 * PACKET_SAMPLES);
        let mut inbound = InboundAudio::new(producer).unwrap();
        let stats = SessionStats::default();
        let metrics = Metrics::new();
        for (idx, packet) in packets.iter().enumerate() {
            match idx {
                3 => continue,
                5 => inbound.on_packet(
                    idx as u16,
                    Bytes::from_static(&[0x03, 0x00]),
                    &stats,
                    &metrics,
                ),
                _ => inbound.on_packet(idx as u16, packet.clone(), &stats, &metrics),
            }
        }
        let snap = stats.snapshot();
        assert_eq!(
            (
                snap.packets_received,
                snap.packets_lost,
                snap.packets_recovered,
                snap.packets_bad
            ),
            (9, 1, 1, 1)
        );
        // Everything up to the reorder window's tail is decoded: 10 packets' worth of time
        // minus the 2 still waiting... none wait here because the stream ends in order.
        assert_eq!(consumer.queued(), 10 * PACKET_SAMPLES);
    }
}

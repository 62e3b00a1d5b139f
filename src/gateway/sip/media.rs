//! One SIP call's media: Opus, G.722 or G.711 over RTP (or SRTP, `srtp.rs`) on its own UDP
//! port. The caller's packets go into the session's input ring in sequence order (a gap
//! counted as loss, and filled in for Opus); the agent's audio goes out one packet per 20 ms
//! tick of the engine's output grid, to the address the caller's packets come from
//! (symmetric RTP, so a caller behind NAT is reached without its SDP being right). Only a
//! packet from the caller's SIP address or its SDP's may teach that address; other sources
//! are refused.

use super::offer::{AudioOffer, Direction};
use super::srtp::SrtpSession;
use crate::audio::ring::InputProducer;
use crate::engine::session::SessionCloser;
use crate::engine::{SessionEvent, SessionId, SessionStats};
use crate::gateway::outbound::{PacketSource, packet_ticker};
use crate::gateway::wire::{InboundAudio, OutboundAudio};
use crate::metrics::Metrics;
use crossbeam_channel::TryRecvError;
use rtc::rtp::header::Header;
use rtc::shared::marshal::{Marshal, MarshalSize, Unmarshal};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A caller whose RTP stops for this long is gone (its BYE was lost, or its network).
pub const RTP_TIMEOUT: Duration = Duration::from_secs(10);
/// A call on hold sends no RTP; one that stays so this long is ended (its caller may have
/// crashed, with no BYE).
pub const HOLD_TIMEOUT: Duration = Duration::from_secs(600);
/// The metrics label of SIP events.
pub const TRANSPORT: &str = "sip";
/// An RTP datagram larger than this is no packet a phone sends (Ethernet's MTU and more).
const MAX_RTP_BYTES: usize = 2048;
/// A jump in sequence numbers this large (10 s of packets) is a restarted stream, not loss.
const RESTART_GAP: u64 = 500;

/// The most of the agent's text a call keeps (about 20 minutes of the model's words).
const MAX_AGENT_TEXT_BYTES: usize = 64 * 1024;

/// The agent's words in a call, kept for its report (a placed call's), up to a bound.
#[derive(Debug, Clone, Default)]
pub struct AgentText(Arc<Mutex<String>>);

impl AgentText {
    fn push(&self, piece: &str) {
        let mut text = self.0.lock().expect("agent text lock");
        if text.len() + piece.len() <= MAX_AGENT_TEXT_BYTES {
            text.push_str(piece);
        }
    }

    pub fn text(&self) -> String {
        self.0
            .lock()
            .expect("agent text lock")
            .trim_start()
            .to_owned()
    }
}

/// How a call's media ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaEnding {
    /// The caller hung up (BYE) or the server is shutting down.
    Cancelled,
    /// No RTP from the caller for [`RTP_TIMEOUT`].
    Silent,
    /// The engine dropped the session.
    Engine(String),
}

/// What the media loop needs.
pub struct MediaCall {
    pub id: SessionId,
    pub socket: UdpSocket,
    /// The offer in force: where RTP goes (until the caller's packets say otherwise) and
    /// which way it flows; a re-INVITE replaces it. None until an ACK answers our late offer.
    pub offer: watch::Receiver<Option<AudioOffer>>,
    /// The address the call's SIP came from.
    pub caller_ip: IpAddr,
    pub input: InputProducer,
    pub output: PacketSource,
    pub events: crossbeam_channel::Receiver<SessionEvent>,
    pub stats: Arc<SessionStats>,
    pub closer: SessionCloser,
    pub schedule: (Instant, Duration),
    pub metrics: Arc<Metrics>,
    pub cancel: CancellationToken,
    /// Where the agent's text goes, if anywhere.
    pub agent_text: Option<AgentText>,
}

/// Runs the call's media until it ends.
pub async fn run(call: MediaCall) -> MediaEnding {
    let MediaCall {
        id,
        socket,
        mut offer,
        caller_ip,
        mut input,
        output,
        events,
        stats,
        closer,
        schedule,
        metrics,
        cancel,
        agent_text,
    } = call;
    let Some(mut current) = agreed_offer(&mut offer, &cancel).await else {
        drop(closer);
        return MediaEnding::Cancelled;
    };
    let format = current.codec.wire();
    let (mut inbound, mut outbound) = match (
        InboundAudio::new(format),
        OutboundAudio::new(output, format),
    ) {
        (Ok(inbound), Ok(outbound)) => (inbound, outbound),
        (Err(why), _) | (_, Err(why)) => return MediaEnding::Engine(why),
    };
    let mut srtp = match current.crypto.as_ref().map(SrtpSession::new).transpose() {
        Ok(srtp) => srtp,
        Err(why) => return MediaEnding::Engine(why.to_string()),
    };
    let mut sender = RtpSender::new(current.payload_type, current.codec.timestamp_step());
    let mut receiver = RtpReceiver::new(&current);
    let mut ticker = packet_ticker(schedule);
    let mut buf = vec![0u8; MAX_RTP_BYTES];
    let mut heard_at = tokio::time::Instant::now();
    let mut destination = current.remote;
    // Where the caller's audio comes from, learned from its first packet from a trusted
    // address: packets from anywhere else are refused.
    let mut source: Option<SocketAddr> = None;
    let ending = loop {
        tokio::select! {
            _ = ticker.tick() => {
                if let Err(ending) = drain_events(&events, agent_text.as_ref()) {
                    break ending;
                }
                outbound.source.wait_for_late_output().await;
                let (payload, _) = outbound.next(&stats, &metrics);
                if current.direction.caller_receives() && !payload.is_empty() {
                    let packet = sender.packet(payload);
                    match &mut srtp {
                        None => {
                            let _ = socket.send_to(packet, destination).await;
                        }
                        Some(session) => {
                            if let Some(sealed) = session.encrypt(packet) {
                                let _ = socket.send_to(&sealed, destination).await;
                            }
                        }
                    }
                } else {
                    sender.skip();
                }
            }
            received = socket.recv_from(&mut buf) => {
                let Ok((len, from)) = received else { continue };
                let ip = from.ip().to_canonical();
                let trusted = ip == caller_ip || ip == current.remote.ip().to_canonical();
                let decrypted;
                let verdict = match (source, &mut srtp) {
                    (Some(known), _) if known != from => Received::Garbage,
                    (None, _) if !trusted => Received::Garbage,
                    (_, None) => receiver.accept(&buf[..len]),
                    (_, Some(session)) => match session.decrypt(&buf[..len]) {
                        Some(plain) => {
                            decrypted = plain;
                            receiver.accept(&decrypted)
                        }
                        None => Received::Garbage,
                    },
                };
                if verdict != Received::Garbage {
                    heard_at = tokio::time::Instant::now();
                }
                match verdict {
                    Received::Audio { payload, lost } => {
                        if lost > 0 {
                            inbound.lost(lost, payload, &mut input, &stats, &metrics);
                        }
                        inbound.push(payload, &mut input, &stats, &metrics);
                        if source.is_none() {
                            source = Some(from);
                            destination = from;
                        }
                    }
                    Received::Late => stats.add(&stats.packets_late, 1),
                    Received::Digit(digit) => {
                        tracing::info!(session = %id, digit = %digit, "dtmf");
                        metrics.transport_event(TRANSPORT, "dtmf");
                    }
                    Received::Other => {}
                    Received::Garbage => {
                        stats.add(&stats.packets_bad, 1);
                        metrics.packets_bad.inc();
                    }
                }
            }
            changed = offer.changed() => {
                // The dialog is gone: the call with it.
                if changed.is_err() {
                    break MediaEnding::Cancelled;
                }
                // A re-INVITE: the media may have moved, to a new stream; learn it again.
                let Some(next) = offer.borrow_and_update().clone() else { continue };
                current = next;
                destination = current.remote;
                source = None;
                receiver = RtpReceiver::new(&current);
                sender.header.payload_type = current.payload_type;
                if let (Some(session), Some(crypto)) = (&mut srtp, &current.crypto)
                    && let Err(why) = session.update(crypto)
                {
                    break MediaEnding::Engine(why.to_string());
                }
                heard_at = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep_until(heard_at + silence_limit(current.direction)) => {
                break MediaEnding::Silent;
            }
            _ = cancel.cancelled() => break MediaEnding::Cancelled,
        }
    };
    if ending == MediaEnding::Silent {
        metrics.sessions_vanished.inc();
    }
    drop(closer);
    tracing::info!(session = %id, ?ending, stats = ?stats.snapshot(), "call media ended");
    ending
}

/// The offer once there is one (at once, or when the ACK answers our late offer); None when
/// the call ends first.
async fn agreed_offer(
    offer: &mut watch::Receiver<Option<AudioOffer>>,
    cancel: &CancellationToken,
) -> Option<AudioOffer> {
    loop {
        if let Some(agreed) = offer.borrow_and_update().clone() {
            return Some(agreed);
        }
        tokio::select! {
            changed = offer.changed() => changed.ok()?,
            _ = cancel.cancelled() => return None,
        }
    }
}

/// How long the caller may send nothing before the call counts as gone.
fn silence_limit(direction: Direction) -> Duration {
    match direction.caller_sends() {
        true => RTP_TIMEOUT,
        false => HOLD_TIMEOUT,
    }
}

/// Keeps (or logs) the agent's text; an engine error or a stopped engine ends the call.
fn drain_events(
    events: &crossbeam_channel::Receiver<SessionEvent>,
    agent_text: Option<&AgentText>,
) -> Result<(), MediaEnding> {
    loop {
        match events.try_recv() {
            Ok(SessionEvent::Error(reason)) => return Err(MediaEnding::Engine(reason)),
            Ok(SessionEvent::Text(piece)) => match agent_text {
                Some(text) => text.push(&piece),
                None => tracing::trace!(piece, "agent text"),
            },
            Ok(SessionEvent::Ready) => {}
            Err(TryRecvError::Empty) => return Ok(()),
            Err(TryRecvError::Disconnected) => {
                return Err(MediaEnding::Engine("the engine stopped".into()));
            }
        }
    }
}

/// The agent's RTP stream: one SSRC, sequence numbers and timestamps from random starts;
/// each packet written into one buffer, kept for the call.
struct RtpSender {
    header: Header,
    /// The timestamp's step per 20 ms packet (the codec's RTP clock / 50).
    timestamp_step: u32,
    packet: Vec<u8>,
}

impl RtpSender {
    fn new(payload_type: u8, timestamp_step: u32) -> Self {
        Self {
            header: Header {
                version: 2,
                payload_type,
                sequence_number: rand::random(),
                timestamp: rand::random(),
                ssrc: rand::random(),
                marker: true,
                ..Default::default()
            },
            timestamp_step,
            packet: Vec::with_capacity(MAX_RTP_BYTES),
        }
    }

    /// A tick with nothing sent (on hold): time moves on, and the next packet starts a new
    /// talkspurt (marker bit), so the caller's jitter buffer takes the jump.
    fn skip(&mut self) {
        self.header.timestamp = self.header.timestamp.wrapping_add(self.timestamp_step);
        self.header.marker = true;
    }

    fn packet(&mut self, payload: &[u8]) -> &[u8] {
        let header_len = self.header.marshal_size();
        self.packet.resize(header_len, 0);
        self.header
            .marshal_to(&mut self.packet)
            .expect("the buffer holds the header");
        self.packet.extend_from_slice(payload);
        self.header.marker = false;
        self.header.sequence_number = self.header.sequence_number.wrapping_add(1);
        self.header.timestamp = self.header.timestamp.wrapping_add(self.timestamp_step);
        &self.packet
    }
}

/// What one datagram from the caller was.
#[derive(Debug, PartialEq, Eq)]
enum Received<'a> {
    /// Audio to play into the session, after `lost` packets that never came.
    Audio { payload: &'a [u8], lost: u64 },
    /// Audio older than what has been played (reordered or duplicated): dropped.
    Late,
    /// The end of a key press (RFC 4733).
    Digit(char),
    /// A packet of a known kind this call does not use (comfort noise, a key press's repeats).
    Other,
    /// Not RTP, or RTP of a payload type that was not negotiated.
    Garbage,
}

/// The caller's RTP stream: sequence order checked, key presses read.
struct RtpReceiver {
    /// The audio's payload type and the key presses', as negotiated.
    payload_type: u8,
    telephone_event: Option<u8>,
    /// The stream's SSRC: a new one (a transfer, a bridge change) starts its numbers afresh.
    ssrc: Option<u32>,
    /// The highest sequence number played, extended past wrap-arounds.
    last_sequence: Option<u64>,
    /// The timestamp of the last key press reported (its end is sent three times).
    last_digit_timestamp: Option<u32>,
    /// Packets found missing before a non-audio packet, reported with the next audio one.
    unreported_lost: u64,
}

/// A packet's payload: what follows its header, less any padding (RFC 3550 §5.1); None
/// when the padding claims more than there is.
fn without_padding<'a>(header: &Header, rest: &'a [u8]) -> Option<&'a [u8]> {
    if !header.padding {
        return Some(rest);
    }
    let padding = usize::from(*rest.last()?);
    (padding > 0 && padding <= rest.len()).then(|| &rest[..rest.len() - padding])
}

/// RFC 3389 comfort noise, which some phones send in silences.
const COMFORT_NOISE: u8 = 13;

impl RtpReceiver {
    fn new(offer: &AudioOffer) -> Self {
        Self {
            payload_type: offer.payload_type,
            telephone_event: offer.telephone_event,
            ssrc: None,
            last_sequence: None,
            last_digit_timestamp: None,
            unreported_lost: 0,
        }
    }

    fn accept<'a>(&mut self, datagram: &'a [u8]) -> Received<'a> {
        let mut rest = datagram;
        let Ok(header) = Header::unmarshal(&mut rest) else {
            return Received::Garbage;
        };
        let Some(payload) = without_padding(&header, rest) else {
            return Received::Garbage;
        };
        if header.version != 2 {
            return Received::Garbage;
        }
        if self.ssrc != Some(header.ssrc) {
            self.ssrc = Some(header.ssrc);
            self.last_sequence = None;
        }
        let audio = header.payload_type == self.payload_type;
        let digit = Some(header.payload_type) == self.telephone_event;
        if !audio && !digit && header.payload_type != COMFORT_NOISE {
            return Received::Garbage;
        }
        // Key presses and comfort noise share the audio's numbering: every packet moves it.
        let Some(gap) = self.advance(header.sequence_number) else {
            return match audio {
                true => Received::Late,
                false => Received::Other,
            };
        };
        self.unreported_lost += gap;
        if audio {
            let lost = std::mem::take(&mut self.unreported_lost);
            return Received::Audio { payload, lost };
        }
        if digit {
            return self.digit(header.timestamp, payload);
        }
        Received::Other
    }

    /// Takes `sequence` as the stream's newest: the packets skipped since the last (0 after a
    /// restart of the numbering, a jump of [`RESTART_GAP`] or more either way), or None for
    /// a packet older than the newest (late, or repeated).
    fn advance(&mut self, sequence: u16) -> Option<u64> {
        let Some(last) = self.last_sequence else {
            self.last_sequence = Some(u64::from(sequence) + (1 << 16));
            return Some(0);
        };
        let delta = i64::from(sequence.wrapping_sub(last as u16) as i16);
        let restart = delta.unsigned_abs() >= RESTART_GAP;
        if delta <= 0 && !restart {
            return None;
        }
        // The extended number with `sequence`'s low bits, past the last.
        let next = match restart && delta < 0 {
            true => (last & !0xffff) + (1 << 16) + u64::from(sequence),
            false => last.wrapping_add_signed(delta),
        };
        self.last_sequence = Some(next);
        Some(if restart { 0 } else { (delta - 1) as u64 })
    }

    fn digit(&mut self, timestamp: u32, payload: &[u8]) -> Received<'static> {
        let (Some(&event), Some(&flags)) = (payload.first(), payload.get(1)) else {
            return Received::Garbage;
        };
        let ended = flags & 0x80 != 0;
        if !ended || self.last_digit_timestamp == Some(timestamp) {
            return Received::Other;
        }
        self.last_digit_timestamp = Some(timestamp);
        match event {
            0..=9 => Received::Digit(char::from(b'0' + event)),
            10 => Received::Digit('*'),
            11 => Received::Digit('#'),
            12..=15 => Received::Digit(char::from(b'A' + event - 12)),
            _ => Received::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::sip::offer::SipCodec;
    use bytes::Bytes;
    use rtc::rtp::packet::Packet;

    fn offer() -> AudioOffer {
        let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio 4000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n";
        AudioOffer::parse(sdp, &SipCodec::ALL).unwrap()
    }

    fn rtp(payload_type: u8, sequence_number: u16, timestamp: u32, payload: &[u8]) -> Vec<u8> {
        let packet = Packet {
            header: Header {
                version: 2,
                payload_type,
                sequence_number,
                timestamp,
                ssrc: 1,
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(payload),
        };
        packet.marshal().unwrap().to_vec()
    }

    #[test]
    fn audio_in_order_across_the_wrap_is_played_and_late_packets_dropped() {
        let mut receiver = RtpReceiver::new(&offer());
        let audio = |r: &mut RtpReceiver, seq| {
            let packet = rtp(0, seq, 0, &[0xff; 160]);
            matches!(r.accept(&packet), Received::Audio { payload, .. } if payload == [0xff; 160])
        };
        let late =
            |r: &mut RtpReceiver, seq| r.accept(&rtp(0, seq, 0, &[0xff; 160])) == Received::Late;
        assert!(audio(&mut receiver, 65534));
        assert!(audio(&mut receiver, 65535));
        assert!(audio(&mut receiver, 1));
        assert!(late(&mut receiver, 0));
        assert!(late(&mut receiver, 1));
        assert!(audio(&mut receiver, 2));
    }

    #[test]
    fn a_gap_in_the_sequence_is_counted_as_loss_unless_the_stream_restarted() {
        let mut receiver = RtpReceiver::new(&offer());
        let mut lost = |seq| match receiver.accept(&rtp(0, seq, 0, &[0xff; 160])) {
            Received::Audio { lost, .. } => lost,
            other => panic!("{other:?}"),
        };
        assert_eq!(lost(65534), 0);
        assert_eq!(lost(65535), 0);
        assert_eq!(lost(2), 2);
        assert_eq!(lost(3), 0);
        assert_eq!(lost(3 + 2000), 0);
        // A numbering restarted far behind is taken, not dropped as late for minutes.
        assert_eq!(lost(100), 0);
        assert_eq!(lost(101), 0);
    }

    #[test]
    fn key_presses_and_comfort_noise_are_not_gaps_in_the_audio() {
        let mut receiver = RtpReceiver::new(&offer());
        let seen =
            |r: &mut RtpReceiver, pt, seq| format!("{:?}", r.accept(&rtp(pt, seq, 0, &[0xff; 4])));
        assert!(seen(&mut receiver, 0, 10).contains("lost: 0"));
        assert_eq!(seen(&mut receiver, 13, 11), "Other");
        assert_eq!(seen(&mut receiver, 101, 12), "Other");
        assert!(seen(&mut receiver, 0, 13).contains("lost: 0"));
        // A gap before a key press is reported with the next audio.
        assert_eq!(seen(&mut receiver, 101, 15), "Other");
        assert!(seen(&mut receiver, 0, 16).contains("lost: 1"));
    }

    #[test]
    fn a_new_ssrc_starts_its_sequence_afresh() {
        let mut receiver = RtpReceiver::new(&offer());
        assert!(matches!(
            receiver.accept(&rtp(0, 40000, 0, &[0xff; 160])),
            Received::Audio { .. }
        ));
        let mut restarted = rtp(0, 100, 0, &[0xff; 160]);
        restarted[8..12].copy_from_slice(&2u32.to_be_bytes());
        assert!(matches!(
            receiver.accept(&restarted),
            Received::Audio { lost: 0, .. }
        ));
    }

    #[test]
    fn padding_is_left_out_of_the_payload_and_bad_padding_refused() {
        let mut receiver = RtpReceiver::new(&offer());
        let mut padded = rtp(0, 1, 0, &[0x7f; 160]);
        padded[0] |= 0x20;
        padded.extend_from_slice(&[0, 0, 3]);
        assert!(
            matches!(receiver.accept(&padded), Received::Audio { payload, .. } if payload == [0x7f; 160])
        );
        let mut overlong = rtp(0, 2, 0, &[0x7f; 4]);
        overlong[0] |= 0x20;
        overlong.push(200);
        assert_eq!(receiver.accept(&overlong), Received::Garbage);
    }

    #[test]
    fn a_key_press_is_reported_once_at_its_end() {
        let mut receiver = RtpReceiver::new(&offer());
        // One key press: its packets share a timestamp, each with its own sequence number.
        let event = |r: &mut RtpReceiver, seq, flags| {
            let packet = rtp(101, seq, 800, &[11, flags, 0, 160]);
            format!("{:?}", r.accept(&packet))
        };
        assert_eq!(event(&mut receiver, 9, 0x0a), "Other");
        assert_eq!(event(&mut receiver, 10, 0x8a), "Digit('#')");
        assert_eq!(event(&mut receiver, 11, 0x8a), "Other");
    }

    #[test]
    fn garbage_and_unnegotiated_payloads_are_counted_as_such() {
        let mut receiver = RtpReceiver::new(&offer());
        assert_eq!(receiver.accept(b"\x00\x01"), Received::Garbage);
        assert_eq!(receiver.accept(&rtp(8, 1, 0, &[0; 160])), Received::Garbage);
        assert_eq!(receiver.accept(&rtp(13, 1, 0, &[40])), Received::Other);
        assert_eq!(receiver.accept(&rtp(101, 2, 0, &[])), Received::Garbage);
    }

    #[test]
    fn sent_packets_step_by_one_packet_of_samples() {
        let mut sender = RtpSender::new(8, 160);
        let first = Packet::unmarshal(&mut sender.packet(&[1; 160]).to_vec().as_slice()).unwrap();
        let second = Packet::unmarshal(&mut sender.packet(&[2; 160]).to_vec().as_slice()).unwrap();
        assert!(first.header.marker && !second.header.marker);
        assert_eq!(second.header.payload_type, 8);
        assert_eq!(
            second.header.sequence_number,
            first.header.sequence_number.wrapping_add(1)
        );
        assert_eq!(
            second.header.timestamp,
            first.header.timestamp.wrapping_add(160)
        );
        assert_eq!(&second.payload[..], &[2; 160]);
        sender.skip();
        let third = Packet::unmarshal(&mut sender.packet(&[3; 160]).to_vec().as_slice()).unwrap();
        assert!(third.header.marker, "a talkspurt after a pause");
        assert_eq!(
            third.header.sequence_number,
            second.header.sequence_number.wrapping_add(1)
        );
        assert_eq!(
            third.header.timestamp,
            second.header.timestamp.wrapping_add(320)
        );
    }
}

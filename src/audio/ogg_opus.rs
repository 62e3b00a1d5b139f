//! Ogg pages carrying Opus (RFC 7845), as the PersonaPlex/Moshi WebSocket protocol sends them in
//! both directions: 24 kHz mono, an `OpusHead` and an `OpusTags` header page, then audio pages
//! whose granule position counts 48 kHz samples including the pre-skip. Pages are built and
//! parsed by the `ogg` crate; this module adds the Opus headers and a bounded, incremental
//! reader that takes bytes in whatever pieces a socket delivers.

use super::SAMPLE_RATE;
use ogg::reading::{BasePacketReader, PageParser};
use ogg::{PacketWriteEndInfo, PacketWriter};
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Opus granule positions always count at 48 kHz (RFC 7845 §4).
const GRANULE_RATE: u32 = 48_000;
/// Bytes of an Ogg page header before its segment table.
const PAGE_HEADER_BYTES: usize = 27;
/// The largest Ogg page: header, 255 lacing values, 255 × 255 body bytes.
pub const MAX_PAGE_BYTES: usize = PAGE_HEADER_BYTES + 255 + 255 * 255;
/// The largest Opus packet we accept (RFC 6716 allows 1275 bytes a frame, 48 frames a packet;
/// real 20 ms packets are well under 1 KiB).
pub const MAX_PACKET_BYTES: usize = 16 * 1024;
/// Audio packets kept for the caller before the reader refuses more.
const MAX_QUEUED_PACKETS: usize = 256;
const VENDOR: &str = concat!("duplex ", env!("CARGO_PKG_VERSION"));

/// Why a stream of pages was refused; the message names the problem for a close reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OggOpusError {
    #[error("not an Ogg page (no \"OggS\" capture pattern)")]
    NoCapture,
    #[error("malformed Ogg page: {0}")]
    BadPage(String),
    #[error("not an Ogg Opus stream: {0}")]
    NotOpus(String),
    #[error("an Opus packet spans more than {MAX_PACKET_BYTES} bytes")]
    PacketTooLarge,
    #[error("more than {MAX_QUEUED_PACKETS} audio packets queued unread")]
    TooManyPackets,
}

/// Writes Opus packets as Ogg pages, one page per packet so each can go out at once.
pub struct OggOpusWriter {
    writer: PacketWriter<'static, Vec<u8>>,
    serial: u32,
    /// 48 kHz samples up to the end of the last packet written, pre-skip included.
    granule: u64,
    pre_skip_48k: u16,
    headers_written: bool,
}

impl OggOpusWriter {
    /// `pre_skip_24k` is the encoder's lookahead at 24 kHz (RFC 7845 §4.2: samples the decoder
    /// drops from the start).
    pub fn new(serial: u32, pre_skip_24k: usize) -> Self {
        let pre_skip_48k = (pre_skip_24k * (GRANULE_RATE / SAMPLE_RATE) as usize) as u16;
        Self {
            writer: PacketWriter::new(Vec::new()),
            serial,
            granule: pre_skip_48k as u64,
            pre_skip_48k,
            headers_written: false,
        }
    }

    /// The two header pages (`OpusHead`, then `OpusTags`), each on its own page as RFC 7845
    /// requires. Call once before the first packet.
    pub fn headers(&mut self) -> Vec<u8> {
        self.headers_written = true;
        let head = opus_head(self.pre_skip_48k, 1);
        let mut tags = b"OpusTags".to_vec();
        tags.extend_from_slice(&(VENDOR.len() as u32).to_le_bytes());
        tags.extend_from_slice(VENDOR.as_bytes());
        tags.extend_from_slice(&0u32.to_le_bytes());
        self.write(head, PacketWriteEndInfo::EndPage, 0);
        self.write(tags, PacketWriteEndInfo::EndPage, 0);
        self.take()
    }

    /// One page holding `packet`, which decodes to `samples_24k` samples.
    pub fn page(&mut self, packet: &[u8], samples_24k: usize) -> Vec<u8> {
        debug_assert!(self.headers_written, "headers() comes first");
        self.granule += (samples_24k * (GRANULE_RATE / SAMPLE_RATE) as usize) as u64;
        self.write(packet.to_vec(), PacketWriteEndInfo::EndPage, self.granule);
        self.take()
    }

    /// The last page of the stream (end-of-stream flag) holding `packet`.
    pub fn last_page(&mut self, packet: &[u8], samples_24k: usize) -> Vec<u8> {
        self.granule += (samples_24k * (GRANULE_RATE / SAMPLE_RATE) as usize) as u64;
        self.write(packet.to_vec(), PacketWriteEndInfo::EndStream, self.granule);
        self.take()
    }

    fn write(&mut self, data: Vec<u8>, end: PacketWriteEndInfo, granule: u64) {
        // Writing into a Vec cannot fail.
        self.writer
            .write_packet(data, self.serial, end, granule)
            .expect("writing Ogg pages into memory");
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(self.writer.inner_mut())
    }
}

fn opus_head(pre_skip_48k: u16, channels: u8) -> Vec<u8> {
    let mut head = b"OpusHead".to_vec();
    head.push(1); // version
    head.push(channels);
    head.extend_from_slice(&pre_skip_48k.to_le_bytes());
    head.extend_from_slice(&SAMPLE_RATE.to_le_bytes()); // the input's rate, informational
    head.extend_from_slice(&0i16.to_le_bytes()); // output gain
    head.push(0); // channel mapping family 0: mono or stereo, no table
    head
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Head,
    Tags,
    Audio,
}

/// Reads Ogg Opus from bytes arriving in any pieces; audio packets come out of `pop_packet`.
/// Buffers at most one page of partial input and a bounded number of packets.
pub struct OggOpusReader {
    buffer: Vec<u8>,
    packets: BasePacketReader,
    serial: Option<u32>,
    expect: Expect,
    pre_skip_48k: u16,
    channels: u8,
    /// Bytes of a packet still being continued across pages.
    continued_bytes: usize,
    queue: VecDeque<Vec<u8>>,
}

impl Default for OggOpusReader {
    fn default() -> Self {
        Self::new()
    }
}

impl OggOpusReader {
    pub fn new() -> Self {
        Self {
            buffer: Vec::with_capacity(8192),
            packets: BasePacketReader::new(),
            serial: None,
            expect: Expect::Head,
            pre_skip_48k: 0,
            channels: 0,
            continued_bytes: 0,
            queue: VecDeque::new(),
        }
    }

    /// The pre-skip announced in the stream's `OpusHead` (48 kHz samples), once seen.
    pub fn pre_skip_48k(&self) -> u16 {
        self.pre_skip_48k
    }

    /// Channels announced in the `OpusHead` (0 until seen).
    pub fn channels(&self) -> u8 {
        self.channels
    }

    /// Takes the next audio packet, oldest first.
    pub fn pop_packet(&mut self) -> Option<Vec<u8>> {
        self.queue.pop_front()
    }

    /// Appends `bytes` and parses every complete page in the buffer.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), OggOpusError> {
        self.buffer.extend_from_slice(bytes);
        let mut start = 0;
        let result = loop {
            match page_len(&self.buffer[start..]) {
                Ok(Some(len)) => {
                    let page = self.buffer[start..start + len].to_vec();
                    start += len;
                    if let Err(err) = self.page(page) {
                        break Err(err);
                    }
                }
                Ok(None) => break Ok(()),
                Err(err) => break Err(err),
            }
        };
        self.buffer.drain(..start);
        if result.is_err() {
            self.buffer.clear();
        }
        result
    }

    fn page(&mut self, page: Vec<u8>) -> Result<(), OggOpusError> {
        let header: [u8; PAGE_HEADER_BYTES] = page[..PAGE_HEADER_BYTES]
            .try_into()
            .expect("page_len checked the header's length");
        let flags = header[5];
        let serial = u32::from_le_bytes(header[14..18].try_into().expect("4 bytes"));
        let segments = header[26] as usize;
        let lacing = page[PAGE_HEADER_BYTES..PAGE_HEADER_BYTES + segments].to_vec();
        let body = page[PAGE_HEADER_BYTES + segments..].to_vec();
        let begins_stream = flags & 0x02 != 0;
        match self.serial {
            _ if begins_stream => {
                // A new (or chained) stream: start over with its headers.
                self.packets = BasePacketReader::new();
                self.serial = Some(serial);
                self.expect = Expect::Head;
                self.continued_bytes = 0;
            }
            None => {
                return Err(OggOpusError::BadPage(
                    "the first page does not begin a stream".into(),
                ));
            }
            Some(current) if current != serial => {
                return Err(OggOpusError::BadPage(format!(
                    "page of stream {serial:#x} inside stream {current:#x}"
                )));
            }
            Some(_) => {}
        }
        if lacing.last() == Some(&255) {
            self.continued_bytes += body.len();
            if self.continued_bytes > MAX_PACKET_BYTES {
                return Err(OggOpusError::PacketTooLarge);
            }
        } else {
            self.continued_bytes = 0;
        }
        // The ogg crate is a parser of untrusted bytes; a panic in it must not take the
        // session down with it, so it is turned into an error like any other bad page.
        let packets = &mut self.packets;
        let parsed = catch_unwind(AssertUnwindSafe(move || {
            let (mut parser, _) =
                PageParser::new(header).map_err(|e| OggOpusError::BadPage(e.to_string()))?;
            parser.parse_segments(lacing);
            let page = parser
                .parse_packet_data(body)
                .map_err(|e| OggOpusError::BadPage(e.to_string()))?;
            packets
                .push_page(page)
                .map_err(|e| OggOpusError::BadPage(e.to_string()))?;
            let mut out = Vec::new();
            while let Some(packet) = packets.read_packet() {
                out.push(packet.data);
            }
            Ok(out)
        }))
        .unwrap_or_else(|_| Err(OggOpusError::BadPage("the Ogg parser failed".into())))?;
        for packet in parsed {
            self.packet(packet)?;
        }
        Ok(())
    }

    fn packet(&mut self, packet: Vec<u8>) -> Result<(), OggOpusError> {
        match self.expect {
            Expect::Head => {
                let head = packet.as_slice();
                if head.len() < 19 || &head[..8] != b"OpusHead" {
                    return Err(OggOpusError::NotOpus(
                        "the first packet is not an OpusHead".into(),
                    ));
                }
                if head[8] >> 4 != 0 {
                    return Err(OggOpusError::NotOpus(format!(
                        "OpusHead version {} is not supported",
                        head[8]
                    )));
                }
                let (channels, family) = (head[9], head[18]);
                if family != 0 || !(1..=2).contains(&channels) {
                    return Err(OggOpusError::NotOpus(format!(
                        "{channels} channels with mapping family {family}; duplex takes mono or stereo (family 0)"
                    )));
                }
                self.channels = channels;
                self.pre_skip_48k = u16::from_le_bytes([head[10], head[11]]);
                self.expect = Expect::Tags;
            }
            Expect::Tags => {
                if !packet.starts_with(b"OpusTags") {
                    return Err(OggOpusError::NotOpus(
                        "the second packet is not OpusTags".into(),
                    ));
                }
                self.expect = Expect::Audio;
            }
            Expect::Audio => {
                if packet.len() > MAX_PACKET_BYTES {
                    return Err(OggOpusError::PacketTooLarge);
                }
                if self.queue.len() == MAX_QUEUED_PACKETS {
                    return Err(OggOpusError::TooManyPackets);
                }
                self.queue.push_back(packet);
            }
        }
        Ok(())
    }
}

/// The length of the complete page at the front of `bytes`, `None` if more bytes are needed.
fn page_len(bytes: &[u8]) -> Result<Option<usize>, OggOpusError> {
    let capture_len = bytes.len().min(4);
    if bytes[..capture_len] != b"OggS"[..capture_len] {
        return Err(OggOpusError::NoCapture);
    }
    if bytes.len() < PAGE_HEADER_BYTES {
        return Ok(None);
    }
    if bytes[4] != 0 {
        return Err(OggOpusError::BadPage(format!(
            "stream structure version {}",
            bytes[4]
        )));
    }
    let segments = bytes[26] as usize;
    let Some(lacing) = bytes.get(PAGE_HEADER_BYTES..PAGE_HEADER_BYTES + segments) else {
        return Ok(None);
    };
    let body: usize = lacing.iter().map(|&l| l as usize).sum();
    let len = PAGE_HEADER_BYTES + segments + body;
    Ok((bytes.len() >= len).then_some(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::opus::{EncoderConfig, MAX_PACKET_SAMPLES, OpusDecoder, OpusEncoder};
    use crate::audio::{PACKET_SAMPLES, signal};

    fn stream(pcm: &[f32]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut encoder = OpusEncoder::new(EncoderConfig::default()).unwrap();
        let lookahead = encoder.lookahead_samples().unwrap();
        let mut writer = OggOpusWriter::new(0x1234, lookahead);
        let mut bytes = writer.headers();
        let mut packets = Vec::new();
        for chunk in pcm.chunks_exact(PACKET_SAMPLES) {
            let packet = encoder.encode(chunk).unwrap().to_vec();
            bytes.extend(writer.page(&packet, PACKET_SAMPLES));
            packets.push(packet);
        }
        (bytes, packets)
    }

    #[test]
    fn pages_read_back_into_the_same_packets_in_any_pieces() {
        let pcm = signal::speech_like(PACKET_SAMPLES * 20, 2);
        let (bytes, packets) = stream(&pcm);
        for piece in [1, 5, 27, 100, 4096] {
            let mut reader = OggOpusReader::new();
            let mut got = Vec::new();
            for chunk in bytes.chunks(piece) {
                reader.push(chunk).unwrap();
                while let Some(p) = reader.pop_packet() {
                    got.push(p);
                }
            }
            assert_eq!(got, packets, "pieces of {piece} bytes");
            assert_eq!(reader.channels(), 1);
            assert!(reader.pre_skip_48k() > 0);
        }
    }

    #[test]
    fn headers_and_granules_follow_rfc_7845() {
        let mut writer = OggOpusWriter::new(7, 156);
        let headers = writer.headers();
        // Two pages, the first flagged beginning-of-stream.
        assert_eq!(&headers[..4], b"OggS");
        assert_eq!(headers[5], 0x02);
        let head_len = page_len(&headers).unwrap().unwrap();
        let head_body = &headers[head_len - 19..head_len];
        assert_eq!(&head_body[..8], b"OpusHead");
        assert_eq!(head_body[9], 1, "mono");
        assert_eq!(u16::from_le_bytes([head_body[10], head_body[11]]), 312);
        assert_eq!(
            u32::from_le_bytes(head_body[12..16].try_into().unwrap()),
            24_000
        );
        let tags = &headers[head_len..];
        assert_eq!(u64::from_le_bytes(tags[6..14].try_into().unwrap()), 0);
        let page = writer.page(&[0xf8, 0xff, 0xfe], PACKET_SAMPLES);
        // Granule: pre-skip plus 960 samples at 48 kHz.
        assert_eq!(
            u64::from_le_bytes(page[6..14].try_into().unwrap()),
            312 + 960
        );
        let page = writer.last_page(&[0xf8, 0xff, 0xfe], PACKET_SAMPLES);
        assert_eq!(
            u64::from_le_bytes(page[6..14].try_into().unwrap()),
            312 + 1920
        );
        assert_eq!(page[5] & 0x04, 0x04, "end of stream");
    }

    #[test]
    fn audio_round_trips_through_pages_and_libopus() {
        let pcm = signal::speech_like(PACKET_SAMPLES * 50, 4);
        let (bytes, _) = stream(&pcm);
        let mut reader = OggOpusReader::new();
        reader.push(&bytes).unwrap();
        let mut decoder = OpusDecoder::new().unwrap();
        let mut out = vec![0.0; MAX_PACKET_SAMPLES];
        let mut decoded = Vec::new();
        while let Some(packet) = reader.pop_packet() {
            let n = decoder.decode(&packet, &mut out).unwrap();
            decoded.extend_from_slice(&out[..n]);
        }
        let skip = reader.pre_skip_48k() as usize / 2;
        let (lag, corr) = signal::best_lag(&pcm, &decoded[skip..], 100);
        assert!(corr > 0.9 && lag < 10, "corr {corr} lag {lag}");
    }

    #[test]
    fn malformed_streams_are_errors_never_panics() {
        let (bytes, _) = stream(&signal::speech_like(PACKET_SAMPLES * 4, 1));
        let mut bad_crc = bytes.clone();
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 0xff;
        let mut no_head = bytes.clone();
        no_head[28..36].copy_from_slice(b"OpusXXXX");
        let mut second_page_first = bytes.clone();
        let head_len = page_len(&bytes).unwrap().unwrap();
        second_page_first.drain(..head_len);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("garbage", b"hello world, this is not ogg at all".to_vec()),
            ("bad crc", bad_crc),
            ("not opus", no_head),
            ("no beginning", second_page_first),
            ("version", {
                let mut v = bytes.clone();
                v[4] = 1;
                v
            }),
        ];
        for (name, case) in cases {
            let mut reader = OggOpusReader::new();
            assert!(reader.push(&case).is_err(), "{name} was accepted");
        }
        // Seeded random pages with a valid capture pattern and lengths.
        let mut state = 0x2545_f491_u32;
        let mut rand = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for _ in 0..500 {
            let mut reader = OggOpusReader::new();
            let mut page = bytes[..head_len].to_vec();
            let flips = 1 + rand() as usize % 4;
            for _ in 0..flips {
                let idx = 4 + rand() as usize % (page.len() - 4);
                page[idx] = rand() as u8;
            }
            let _ = reader.push(&page);
            let _ = reader.push(&bytes[head_len..]);
        }
    }

    #[test]
    fn a_packet_continued_without_end_is_refused() {
        let mut writer = OggOpusWriter::new(1, 0);
        let mut bytes = writer.headers();
        // A page whose only segment is 255 bytes continues into the next; repeat it forever.
        let mut reader = OggOpusReader::new();
        reader.push(&bytes).unwrap();
        bytes.clear();
        let mut result = Ok(());
        for seq in 2..200u32 {
            let mut page = Vec::new();
            page.extend_from_slice(b"OggS");
            page.push(0);
            page.push(if seq == 2 { 0 } else { 1 });
            page.extend_from_slice(&0u64.to_le_bytes());
            page.extend_from_slice(&1u32.to_le_bytes());
            page.extend_from_slice(&seq.to_le_bytes());
            page.extend_from_slice(&0u32.to_le_bytes());
            page.push(1);
            page.push(255);
            page.extend_from_slice(&[0u8; 255]);
            let crc = crc32(&page);
            page[22..26].copy_from_slice(&crc.to_le_bytes());
            result = reader.push(&page);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(OggOpusError::PacketTooLarge));
    }

    /// The Ogg CRC (polynomial 0x04c11db7, no reflection), for hand-made pages.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0u32;
        for &byte in data {
            crc ^= (byte as u32) << 24;
            for _ in 0..8 {
                crc = if crc & 0x8000_0000 != 0 {
                    (crc << 1) ^ 0x04c1_1db7
                } else {
                    crc << 1
                };
            }
        }
        crc
    }
}

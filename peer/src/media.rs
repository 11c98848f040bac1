//! The synthetic test stream and what receivers measure about it.
//!
//! The broadcaster sends VP8-shaped RTP: frames at a fixed rate, each split into packets of
//! at most [`MAX_PAYLOAD`] bytes, the last one with the marker bit, a 90 kHz timestamp. Every
//! payload starts with a one-byte VP8 payload descriptor, then a treecast probe: a magic
//! `TC`, a 64-bit sequence number and the send time in microseconds since the Unix epoch.
//! Relays forward packets untouched apart from SSRC and payload type, so every receiver in
//! the tree can measure its delay behind the broadcaster and the packets it lost. All peers
//! of a test run in one process (or on one machine), so their clocks agree.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use rtc::rtp;

/// Largest RTP payload the broadcaster sends.
pub const MAX_PAYLOAD: usize = 1100;
/// Bytes of the probe header (VP8 descriptor, magic, sequence, send time).
pub const PROBE_LEN: usize = 1 + 2 + 8 + 8;
/// Latency samples kept per receiver (the oldest are overwritten).
const MAX_SAMPLES: usize = 20_000;

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A probe read back from a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Broadcaster's packet sequence number (64-bit, never wraps).
    pub seq: u64,
    /// Send time, microseconds since the Unix epoch.
    pub sent_us: u64,
}

/// Builds one payload: VP8 descriptor, probe, zero padding up to `len`.
pub fn payload(first_of_frame: bool, probe: Probe, len: usize) -> Bytes {
    let len = len.max(PROBE_LEN);
    let mut b = BytesMut::with_capacity(len);
    // VP8 payload descriptor: X=0, N=0, S=start of partition, PID=0.
    b.put_u8(if first_of_frame { 0x10 } else { 0x00 });
    b.put_slice(b"TC");
    b.put_u64(probe.seq);
    b.put_u64(probe.sent_us);
    b.resize(len, 0);
    b.freeze()
}

/// Reads the probe from a payload built by [`payload`].
pub fn read_probe(payload: &[u8]) -> Option<Probe> {
    if payload.len() < PROBE_LEN || &payload[1..3] != b"TC" {
        return None;
    }
    let seq = u64::from_be_bytes(payload[3..11].try_into().ok()?);
    let sent_us = u64::from_be_bytes(payload[11..19].try_into().ok()?);
    Some(Probe { seq, sent_us })
}

/// Generates the broadcaster's packets frame by frame.
#[derive(Debug)]
pub struct Source {
    ssrc: u32,
    payload_type: u8,
    rtp_seq: u16,
    seq: u64,
    frame: u32,
    fps: u32,
    bytes_per_frame: usize,
}

impl Source {
    /// A source at `kbps` (payload bits) and `fps` frames per second.
    pub fn new(kbps: u32, fps: u32, ssrc: u32, payload_type: u8) -> Self {
        let fps = fps.max(1);
        let bytes_per_frame = (kbps as usize * 1000 / 8 / fps as usize).max(PROBE_LEN);
        Self {
            ssrc,
            payload_type,
            rtp_seq: 0,
            seq: 0,
            frame: 0,
            fps,
            bytes_per_frame,
        }
    }

    /// Frames per second.
    pub fn fps(&self) -> u32 {
        self.fps
    }

    /// The packets of the next frame, stamped with the current time.
    pub fn next_frame(&mut self) -> Vec<rtp::Packet> {
        let timestamp = self.frame.wrapping_mul(90_000 / self.fps);
        self.frame = self.frame.wrapping_add(1);
        let count = self.bytes_per_frame.div_ceil(MAX_PAYLOAD);
        let sent_us = now_us();
        (0..count)
            .map(|i| {
                let len = if i + 1 == count {
                    self.bytes_per_frame - MAX_PAYLOAD * (count - 1)
                } else {
                    MAX_PAYLOAD
                };
                let probe = Probe {
                    seq: self.seq,
                    sent_us,
                };
                self.seq += 1;
                let header = rtp::header::Header {
                    version: 2,
                    marker: i + 1 == count,
                    payload_type: self.payload_type,
                    sequence_number: self.rtp_seq,
                    timestamp,
                    ssrc: self.ssrc,
                    ..Default::default()
                };
                self.rtp_seq = self.rtp_seq.wrapping_add(1);
                rtp::Packet {
                    header,
                    payload: payload(i == 0, probe, len),
                }
            })
            .collect()
    }
}

/// Counters of one peer, shared with its tasks. All fields only grow.
#[derive(Debug, Default)]
pub struct Stats {
    /// RTP packets received from parents (all parents of this peer's life).
    pub packets_received: AtomicU64,
    /// RTP payload bytes received from parents.
    pub bytes_received: AtomicU64,
    /// Highest probe sequence number received, plus one (0: none yet).
    pub next_seq: AtomicU64,
    /// Newest probe send time received (µs since the epoch; 0: none yet).
    pub newest_sent_us: AtomicU64,
    /// Packets generated by this peer (broadcaster).
    pub packets_sent: AtomicU64,
    /// Packets handed to child queues.
    pub packets_forwarded: AtomicU64,
    /// Payload bytes handed to child queues.
    pub bytes_forwarded: AtomicU64,
    /// Packets dropped because a child's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Packets dropped because a child's leg was not negotiated yet.
    pub dropped_not_ready: AtomicU64,
    /// `write_rtp` errors.
    pub write_errors: AtomicU64,
    /// Packets received with a probe sequence number not above one seen before.
    pub reordered_or_duplicate: AtomicU64,
    /// WebSocket text bytes received from the signaller.
    pub signalling_bytes_received: AtomicU64,
    /// WebSocket text bytes sent to the signaller.
    pub signalling_bytes_sent: AtomicU64,
    latency_us: Mutex<Vec<u32>>,
}

impl Stats {
    /// Records a packet received from the parent.
    pub fn on_received(&self, packet: &rtp::Packet) {
        self.packets_received.fetch_add(1, Ordering::Relaxed);
        self.bytes_received
            .fetch_add(packet.payload.len() as u64, Ordering::Relaxed);
        let Some(probe) = read_probe(&packet.payload) else {
            return;
        };
        let before = self.next_seq.fetch_max(probe.seq + 1, Ordering::Relaxed);
        if before > probe.seq {
            self.reordered_or_duplicate.fetch_add(1, Ordering::Relaxed);
        }
        self.newest_sent_us
            .fetch_max(probe.sent_us, Ordering::Relaxed);
        let latency = now_us().saturating_sub(probe.sent_us).min(u32::MAX as u64) as u32;
        if let Ok(mut samples) = self.latency_us.lock() {
            if samples.len() >= MAX_SAMPLES {
                let i = probe.seq as usize % MAX_SAMPLES;
                samples[i] = latency;
            } else {
                samples.push(latency);
            }
        }
    }

    /// Latency samples (µs behind the broadcaster), unsorted.
    pub fn latency_samples(&self) -> Vec<u32> {
        self.latency_us
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The `q` quantile (0.0..=1.0) of the latency samples, in µs.
    pub fn latency_quantile(&self, q: f64) -> Option<u32> {
        let mut s = self.latency_samples();
        if s.is_empty() {
            return None;
        }
        s.sort_unstable();
        let i = ((s.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(s[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_round_trips_and_frames_add_up() {
        let p = Probe {
            seq: 42,
            sent_us: 123_456_789,
        };
        assert_eq!(read_probe(&payload(true, p, 500)), Some(p));
        assert_eq!(read_probe(&[0u8; 5]), None);
        let mut src = Source::new(2000, 25, 7, 96);
        let frame = src.next_frame();
        let total: usize = frame.iter().map(|p| p.payload.len()).sum();
        assert_eq!(total, 2_000_000 / 8 / 25);
        assert!(frame.last().unwrap().header.marker);
        assert!(frame.iter().rev().skip(1).all(|p| !p.header.marker));
        assert_eq!(read_probe(&frame[1].payload).unwrap().seq, 1);
    }
}

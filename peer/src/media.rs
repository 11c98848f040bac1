//! The synthetic test stream and what receivers measure about it.
//!
//! The broadcaster sends VP8-shaped RTP: frames at a fixed rate, each split into packets of
//! at most [`MAX_PAYLOAD`] bytes, the last one with the marker bit, a 90 kHz timestamp. Every
//! payload starts with a one-byte VP8 payload descriptor (S bit on a frame's first packet),
//! then one byte that, on a frame's first packet, is the VP8 frame tag's first byte: its
//! low bit (P) is 0 for a keyframe, as in real VP8, so a receiver can tell keyframes the
//! usual way. Then a treecast probe: a magic `TC`, a 64-bit sequence number and the send
//! time in microseconds since the Unix epoch.
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
/// Bytes of the probe header (VP8 descriptor, frame tag byte, magic, sequence, send time).
pub const PROBE_LEN: usize = 1 + 1 + 2 + 8 + 8;
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

/// Builds one payload: VP8 descriptor, frame tag byte, probe, zero padding up to `len`.
/// `keyframe` only matters on a frame's first packet.
pub fn payload(first_of_frame: bool, keyframe: bool, probe: Probe, len: usize) -> Bytes {
    let len = len.max(PROBE_LEN);
    let mut b = BytesMut::with_capacity(len);
    // VP8 payload descriptor: X=0, N=0, S=start of partition, PID=0.
    b.put_u8(if first_of_frame { 0x10 } else { 0x00 });
    // VP8 frame tag, first byte: show_frame (0x10) set, P (0x01) clear for a keyframe.
    b.put_u8(if keyframe { 0x10 } else { 0x11 });
    b.put_slice(b"TC");
    b.put_u64(probe.seq);
    b.put_u64(probe.sent_us);
    b.resize(len, 0);
    b.freeze()
}

/// Reads the probe from a payload built by [`payload`].
pub fn read_probe(payload: &[u8]) -> Option<Probe> {
    if payload.len() < PROBE_LEN || &payload[2..4] != b"TC" {
        return None;
    }
    let seq = u64::from_be_bytes(payload[4..12].try_into().ok()?);
    let sent_us = u64::from_be_bytes(payload[12..20].try_into().ok()?);
    Some(Probe { seq, sent_us })
}

/// Whether a VP8 payload starts a keyframe: the descriptor's S bit with partition 0, then a
/// frame tag whose P bit is 0.
pub fn starts_keyframe(payload: &[u8]) -> bool {
    match payload {
        [descriptor, tag, ..] => {
            descriptor & 0x80 == 0 && descriptor & 0x1F == 0x10 && tag & 0x01 == 0
        }
        _ => false,
    }
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

    /// The packets of the next frame, stamped with the current time; `keyframe` marks it as
    /// a keyframe (the broadcaster does that for its first frame and when asked).
    pub fn next_frame(&mut self, keyframe: bool) -> Vec<rtp::Packet> {
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
                    payload: payload(i == 0, keyframe, probe, len),
                }
            })
            .collect()
    }
}

/// A bounded set of latency samples in µs; once full, new samples overwrite old ones.
#[derive(Debug, Default)]
pub struct Samples {
    inner: Mutex<(Vec<u32>, usize)>,
}

impl Samples {
    /// Adds one sample.
    pub fn push(&self, us: u64) {
        let us = us.min(u32::MAX as u64) as u32;
        if let Ok(mut guard) = self.inner.lock() {
            let (samples, next) = &mut *guard;
            if samples.len() < MAX_SAMPLES {
                samples.push(us);
            } else {
                samples[*next % MAX_SAMPLES] = us;
                *next = (*next + 1) % MAX_SAMPLES;
            }
        }
    }

    /// The samples, unsorted.
    pub fn snapshot(&self) -> Vec<u32> {
        self.inner.lock().map(|g| g.0.clone()).unwrap_or_default()
    }

    /// Forgets every sample (a measurement window starts).
    pub fn clear(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.0.clear();
            g.1 = 0;
        }
    }

    /// The `q` quantile (0.0..=1.0), in µs.
    pub fn quantile(&self, q: f64) -> Option<u32> {
        let mut s = self.snapshot();
        if s.is_empty() {
            return None;
        }
        s.sort_unstable();
        let i = ((s.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(s[i])
    }
}

/// Counters of one peer, shared with its tasks. Counters only grow; the `*_us` timestamps
/// (µs since the Unix epoch, 0 = never) hold the latest occurrence.
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
    /// Payload bytes `write_rtp` accepted for children.
    pub bytes_written: AtomicU64,
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
    /// Frames that started with a keyframe, received from parents.
    pub keyframes_received: AtomicU64,
    /// Keyframes generated (broadcaster).
    pub keyframes_sent: AtomicU64,
    /// Keyframe requests (PLI or FIR) received from children.
    pub keyframe_requests_received: AtomicU64,
    /// Keyframe requests (PLI) sent to the parent.
    pub keyframe_requests_sent: AtomicU64,
    /// When the peer was started.
    pub started_us: AtomicU64,
    /// When the first RTP packet of this peer's life arrived.
    pub first_packet_us: AtomicU64,
    /// When the latest RTP packet arrived.
    pub last_packet_us: AtomicU64,
    /// The longest time between two consecutive RTP packets so far, µs: how long the
    /// worst interruption (a parent's death, a move) lasted, to the packet.
    pub longest_gap_us: AtomicU64,
    /// Times the agent reported its parent stalled.
    pub stalls: AtomicU64,
    /// Times the agent got a new parent (the first one included).
    pub parent_changes: AtomicU64,
    /// When the agent last reported its parent stalled.
    pub stalled_us: AtomicU64,
    /// When the agent last got a new parent.
    pub parent_assigned_us: AtomicU64,
    /// When the connection to the current parent last became connected (ICE + DTLS done).
    pub parent_connected_us: AtomicU64,
    /// When the first RTP packet on the current parent connection arrived.
    pub parent_first_packet_us: AtomicU64,
    /// Recovery probe: packets sent after this time (µs; 0 = off) count as recovery.
    recovery_mark_us: AtomicU64,
    /// When the first packet sent after the recovery mark arrived (0: not yet).
    pub recovered_us: AtomicU64,
    /// The `delivered` list of the last periodic report that had one.
    pub last_delivered: Mutex<Vec<treecast_core::protocol::Delivery>>,
    /// Links to a parent whose ICE failed (each reported to the room as `link_failed`).
    pub links_failed: AtomicU64,
    /// Standby links held now (prepared at the room's request, idle), by the other end's
    /// id: whether the connection is up (ICE and DTLS done).
    pub standby: Mutex<std::collections::BTreeMap<u64, bool>>,
    /// Standby links that became a parent or child link while connected: media flowed
    /// with no connection set-up.
    pub standby_warm: AtomicU64,
    /// Standby links used while still connecting (the set-up already under way goes on).
    pub standby_connecting: AtomicU64,
    /// Standby links whose connection was missing or failed when used: opened afresh.
    pub standby_cold: AtomicU64,
    /// What the NAT probe against the signaller's STUN server found, once it ran.
    pub nat_probe: Mutex<Option<crate::nat::ProbeResult>>,
    /// The candidate-pair type ICE selected on each open connection (parent and children),
    /// by neighbour id; a connection is absent until it has one.
    pub links: Mutex<std::collections::BTreeMap<u64, treecast_core::protocol::LinkKind>>,
    /// Delay behind the broadcaster of each received packet (µs).
    pub latency: Samples,
    /// Time a relay holds a packet: from reading it off the parent's track to `write_rtp`
    /// accepting it for a child (µs, one sample per child and packet).
    pub hop: Samples,
}

impl Stats {
    /// Records a packet received from the parent.
    pub fn on_received(&self, packet: &rtp::Packet) {
        let now = now_us();
        self.packets_received.fetch_add(1, Ordering::Relaxed);
        self.bytes_received
            .fetch_add(packet.payload.len() as u64, Ordering::Relaxed);
        let _ = self
            .first_packet_us
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        let previous = self.last_packet_us.swap(now, Ordering::Relaxed);
        if previous != 0 {
            self.longest_gap_us
                .fetch_max(now.saturating_sub(previous), Ordering::Relaxed);
        }
        if starts_keyframe(&packet.payload) {
            self.keyframes_received.fetch_add(1, Ordering::Relaxed);
        }
        let Some(probe) = read_probe(&packet.payload) else {
            return;
        };
        let before = self.next_seq.fetch_max(probe.seq + 1, Ordering::Relaxed);
        if before > probe.seq {
            self.reordered_or_duplicate.fetch_add(1, Ordering::Relaxed);
        }
        self.newest_sent_us
            .fetch_max(probe.sent_us, Ordering::Relaxed);
        let mark = self.recovery_mark_us.load(Ordering::Relaxed);
        if mark != 0 && probe.sent_us > mark {
            let _ =
                self.recovered_us
                    .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.latency.push(now.saturating_sub(probe.sent_us));
    }

    /// Starts a recovery probe: [`Stats::recovered_us`] will hold the arrival time of the
    /// first packet the broadcaster sent after `mark_us`.
    pub fn arm_recovery(&self, mark_us: u64) {
        self.recovered_us.store(0, Ordering::Relaxed);
        self.recovery_mark_us.store(mark_us, Ordering::Relaxed);
    }

    /// Latency samples (µs behind the broadcaster), unsorted.
    pub fn latency_samples(&self) -> Vec<u32> {
        self.latency.snapshot()
    }

    /// The `q` quantile (0.0..=1.0) of the latency samples, in µs.
    pub fn latency_quantile(&self, q: f64) -> Option<u32> {
        self.latency.quantile(q)
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
        assert_eq!(read_probe(&payload(true, false, p, 500)), Some(p));
        assert_eq!(read_probe(&[0u8; 5]), None);
        let mut src = Source::new(2000, 25, 7, 96);
        let frame = src.next_frame(false);
        let total: usize = frame.iter().map(|p| p.payload.len()).sum();
        assert_eq!(total, 2_000_000 / 8 / 25);
        assert!(frame.last().unwrap().header.marker);
        assert!(frame.iter().rev().skip(1).all(|p| !p.header.marker));
        assert_eq!(read_probe(&frame[1].payload).unwrap().seq, 1);
        assert!(frame.iter().all(|p| !starts_keyframe(&p.payload)));
    }

    #[test]
    fn keyframes_are_marked_on_their_first_packet_only() {
        let mut src = Source::new(2000, 25, 7, 96);
        let frame = src.next_frame(true);
        assert!(starts_keyframe(&frame[0].payload));
        assert!(frame.iter().skip(1).all(|p| !starts_keyframe(&p.payload)));
        let stats = Stats::default();
        for p in &frame {
            stats.on_received(p);
        }
        for p in &src.next_frame(false) {
            stats.on_received(p);
        }
        assert_eq!(stats.keyframes_received.load(Ordering::Relaxed), 1);
        assert!(!starts_keyframe(&[]));
        assert!(!starts_keyframe(&[0x10]));
    }

    #[test]
    fn recovery_counts_only_packets_sent_after_the_mark() {
        let mut src = Source::new(200, 25, 7, 96);
        let stats = Stats::default();
        let old = src.next_frame(false);
        stats.arm_recovery(now_us() + 1);
        std::thread::sleep(std::time::Duration::from_millis(2));
        for p in &old {
            stats.on_received(p);
        }
        assert_eq!(stats.recovered_us.load(Ordering::Relaxed), 0);
        for p in &src.next_frame(false) {
            stats.on_received(p);
        }
        assert!(stats.recovered_us.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn the_longest_gap_between_packets_is_kept() {
        let mut src = Source::new(200, 25, 7, 96);
        let stats = Stats::default();
        for p in &src.next_frame(false) {
            stats.on_received(p);
        }
        assert!(stats.longest_gap_us.load(Ordering::Relaxed) < 20_000);
        std::thread::sleep(std::time::Duration::from_millis(30));
        for p in &src.next_frame(false) {
            stats.on_received(p);
        }
        let gap = stats.longest_gap_us.load(Ordering::Relaxed);
        assert!(gap >= 30_000, "{gap} µs");
        for p in &src.next_frame(false) {
            stats.on_received(p);
        }
        assert_eq!(stats.longest_gap_us.load(Ordering::Relaxed), gap);
    }

    #[test]
    fn samples_keep_a_bounded_window() {
        let s = Samples::default();
        for i in 0..(MAX_SAMPLES as u64 + 10) {
            s.push(i);
        }
        assert_eq!(s.snapshot().len(), MAX_SAMPLES);
        assert_eq!(s.quantile(1.0), Some(MAX_SAMPLES as u32 + 9));
        s.clear();
        assert_eq!(s.quantile(0.5), None);
    }
}

//! When the browser's own bandwidth estimate may change the uplink the server knows.
//!
//! Before joining, the page times an upload to the signaller (`POST /api/uplink`) and gives
//! the result in `hello`. While it relays, each sending `RTCPeerConnection` also has the
//! congestion controller's estimate (`availableOutgoingBitrate` of its candidate pair). That
//! estimate only means "the network could take this much" when the sender is actually using
//! the connection; a sender that has little to send (the encoder is capped by `maxBitrate`,
//! or the picture is static) is *application-limited*, and its estimate then stays close to
//! what it sends. So:
//!
//! - Only children that are being sent media count, and only after a warm-up (the
//!   controller starts low and ramps up); the estimate of the uplink is the sum over them,
//!   smoothed (EWMA), and restarted when the set of children counted changes.
//! - **Raising**: the estimate is a lower bound of the uplink, so it may raise the reported
//!   uplink above the probe (or the server's default) whenever it exceeds what was last
//!   reported by more than 10 %.
//! - **Lowering** needs evidence of congestion: the estimate is below what the children are
//!   meant to get (`target_kbps` each) *and* the sender fills what the estimate allows (it
//!   sends at least 75 % of it), in two samples in a row. An application-limited sender
//!   never lowers the uplink, however low its estimate.
//!
//! The page feeds [`UplinkEstimator::sample`] every measurement interval; a returned value
//! goes out once in the next `report` as `uplink_kbps`.

use std::collections::BTreeMap;
use std::time::Duration;

/// What the server assumes when `hello` gives no uplink (docs/protocol.md, section 5.4).
pub const DEFAULT_UPLINK_KBPS: u32 = 2000;
/// A child's estimate counts only after media has been sent to it this long.
pub const WARMUP: Duration = Duration::from_secs(10);
/// Below this a child is not "being sent media" (audio alone is ~40 kbit/s).
const MIN_SENDING_KBPS: u32 = 20;
/// Weight of a new sample in the smoothed sum.
const ALPHA: f64 = 0.3;
/// Fraction of the estimate a congested sender fills.
const FILLED: f64 = 0.75;
/// Fraction of the target below which the estimate says "the children get less than meant".
const SHORT: f64 = 0.9;
/// Congested samples in a row before the uplink is lowered.
const LIMITED_RUNS: u32 = 2;
/// Smallest relative change worth a report (the server recomputes capacity on each).
const CHANGE: f64 = 0.1;

/// One sending connection's numbers over the last interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChildSample {
    /// The child.
    pub peer: u64,
    /// `availableOutgoingBitrate` of its selected candidate pair, kbit/s, when present.
    pub available_kbps: Option<u32>,
    /// What was sent to it (payload and RTP headers), kbit/s.
    pub sending_kbps: u32,
}

/// The rule in the module docs, with its state.
#[derive(Debug, Clone)]
pub struct UplinkEstimator {
    /// The uplink the server currently knows for this peer.
    reported: u32,
    smoothed: Option<f64>,
    counted: Vec<u64>,
    limited_runs: u32,
    sending_since: BTreeMap<u64, Duration>,
}

impl UplinkEstimator {
    /// `probe`: the uplink given in `hello` (none: the server's default applies).
    pub fn new(probe: Option<u32>) -> Self {
        Self {
            reported: probe.unwrap_or(DEFAULT_UPLINK_KBPS),
            smoothed: None,
            counted: Vec::new(),
            limited_runs: 0,
            sending_since: BTreeMap::new(),
        }
    }

    /// The uplink the server knows (the probe, or the last value returned).
    pub fn reported(&self) -> u32 {
        self.reported
    }

    /// The smoothed sum of the counted children's estimates, if any count.
    pub fn smoothed(&self) -> Option<u32> {
        self.smoothed.map(|s| s.round() as u32)
    }

    /// Feeds one interval's samples of every child connection; `target_kbps` is what each
    /// child is meant to get. Returns a new uplink to report, if the rule says so.
    pub fn sample(
        &mut self,
        now: Duration,
        children: &[ChildSample],
        target_kbps: u32,
    ) -> Option<u32> {
        // Children that stopped being sent to (or left) start their warm-up afresh.
        self.sending_since.retain(|peer, _| {
            children
                .iter()
                .any(|c| c.peer == *peer && c.sending_kbps >= MIN_SENDING_KBPS)
        });
        for c in children {
            if c.sending_kbps >= MIN_SENDING_KBPS {
                self.sending_since.entry(c.peer).or_insert(now);
            }
        }
        let counted: Vec<&ChildSample> = children
            .iter()
            .filter(|c| {
                c.available_kbps.is_some_and(|a| a > 0)
                    && self
                        .sending_since
                        .get(&c.peer)
                        .is_some_and(|since| now.saturating_sub(*since) >= WARMUP)
            })
            .collect();
        let mut ids: Vec<u64> = counted.iter().map(|c| c.peer).collect();
        ids.sort_unstable();
        if ids != self.counted {
            self.counted = ids;
            self.smoothed = None;
            self.limited_runs = 0;
        }
        if counted.is_empty() {
            return None;
        }
        let available: f64 = counted
            .iter()
            .map(|c| f64::from(c.available_kbps.unwrap_or(0)))
            .sum();
        let sending: f64 = counted.iter().map(|c| f64::from(c.sending_kbps)).sum();
        let smoothed = match self.smoothed {
            Some(s) => s + ALPHA * (available - s),
            None => available,
        };
        self.smoothed = Some(smoothed);

        let wanted = f64::from(target_kbps) * counted.len() as f64;
        let congested = available < SHORT * wanted && sending >= FILLED * available;
        self.limited_runs = if congested { self.limited_runs + 1 } else { 0 };

        let reported = f64::from(self.reported);
        let new = if self.limited_runs >= LIMITED_RUNS {
            (smoothed < reported * (1.0 - CHANGE)).then_some(smoothed)
        } else if !congested {
            (smoothed > reported * (1.0 + CHANGE)).then_some(smoothed)
        } else {
            None
        };
        let kbps = new?.round().max(1.0) as u32;
        self.reported = kbps;
        Some(kbps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn child(peer: u64, available: u32, sending: u32) -> ChildSample {
        ChildSample {
            peer,
            available_kbps: Some(available),
            sending_kbps: sending,
        }
    }

    /// Feeds the same samples every 2 s from `from` to `to` (inclusive); all results.
    fn run(
        e: &mut UplinkEstimator,
        from: u64,
        to: u64,
        children: &[ChildSample],
        target: u32,
    ) -> Vec<(u64, u32)> {
        (from..=to)
            .step_by(2)
            .filter_map(|t| e.sample(s(t), children, target).map(|k| (t, k)))
            .collect()
    }

    #[test]
    fn an_application_limited_sender_never_lowers_the_probe() {
        // A fast probe, and children that get less than the target because the encoder has
        // little to send: the estimate tracks the send rate but the pipe is not full.
        let mut e = UplinkEstimator::new(Some(20_000));
        let kids = [child(7, 380, 200), child(9, 390, 210)];
        assert_eq!(run(&mut e, 0, 120, &kids, 450), vec![]);
        assert_eq!(e.reported(), 20_000);
        assert_eq!(e.smoothed(), Some(770));
    }

    #[test]
    fn a_higher_estimate_raises_the_uplink_once_after_the_warm_up() {
        // No probe: the server assumes 2000 kbit/s; four children with room to spare.
        let mut e = UplinkEstimator::new(None);
        let kids = [
            child(1, 900, 480),
            child(2, 950, 470),
            child(3, 880, 460),
            child(4, 920, 490),
        ];
        let out = run(&mut e, 0, 60, &kids, 450);
        assert_eq!(
            out,
            vec![(10, 3650)],
            "first sample after the warm-up, then quiet"
        );
        assert_eq!(e.reported(), 3650);
    }

    #[test]
    fn sustained_congestion_lowers_the_uplink() {
        let mut e = UplinkEstimator::new(Some(5000));
        run(
            &mut e,
            0,
            20,
            &[child(1, 700, 470), child(2, 700, 470)],
            450,
        );
        assert_eq!(
            e.reported(),
            5000,
            "headroom above the target: nothing to lower"
        );
        // The pipe fills: each child gets ~300 of the 450 kbit/s meant for it.
        let jammed = [child(1, 310, 290), child(2, 300, 280)];
        assert_eq!(
            e.sample(s(22), &jammed, 450),
            None,
            "one sample is not enough"
        );
        let lowered = e.sample(s(24), &jammed, 450).expect("lowered");
        // Smoothed: 1400 → 1400 + 0.3 (610 − 1400) = 1163 → 1163 + 0.3 (610 − 1163) = 997.
        assert_eq!(lowered, 997);
        // It keeps following the congestion down, in steps of more than 10 %.
        let later = run(&mut e, 26, 40, &jammed, 450);
        assert!(later.windows(2).all(|w| w[1].1 < w[0].1), "{later:?}");
        assert!(later.last().unwrap().1 < 700, "{later:?}");
    }

    #[test]
    fn a_congested_blip_or_a_single_low_sample_changes_nothing() {
        let mut e = UplinkEstimator::new(Some(5000));
        let ok = [child(1, 700, 470)];
        let jammed = [child(1, 300, 290)];
        run(&mut e, 0, 20, &ok, 450);
        for t in (22..=60).step_by(4) {
            assert_eq!(e.sample(s(t), &jammed, 450), None);
            assert_eq!(e.sample(s(t + 2), &ok, 450), None);
        }
        assert_eq!(e.reported(), 5000);
    }

    #[test]
    fn only_children_being_sent_media_with_an_estimate_count() {
        let mut e = UplinkEstimator::new(None);
        let mut kids = vec![
            child(1, 3000, 470),
            // Not being sent anything (its track is not flowing yet): ignored.
            child(2, 9000, 0),
            // No estimate in this browser's stats: ignored.
            ChildSample {
                peer: 3,
                available_kbps: None,
                sending_kbps: 470,
            },
        ];
        assert_eq!(run(&mut e, 0, 8, &kids, 450), vec![]);
        assert_eq!(e.sample(s(10), &kids, 450), Some(3000));
        // Child 2 starts receiving: it counts only after its own warm-up, and then the
        // smoothing restarts from the new sum.
        kids[1].sending_kbps = 470;
        assert_eq!(run(&mut e, 12, 20, &kids, 450), vec![]);
        assert_eq!(e.sample(s(22), &kids, 450), Some(12_000));
    }

    #[test]
    fn a_child_that_stops_and_restarts_warms_up_again() {
        let mut e = UplinkEstimator::new(Some(1000));
        let on = [child(1, 3000, 470)];
        let off = [child(1, 3000, 0)];
        assert_eq!(run(&mut e, 0, 6, &on, 450), vec![]);
        assert_eq!(e.sample(s(8), &off, 450), None);
        assert_eq!(
            run(&mut e, 10, 18, &on, 450),
            vec![],
            "warm-up restarted at 10 s"
        );
        assert_eq!(e.sample(s(20), &on, 450), Some(3000));
    }
}

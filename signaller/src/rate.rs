//! Per-connection message rate limits.
//!
//! A [`TokenBucket`] allows `rate` messages per second with bursts up to `burst`: the first
//! message over the limit is answered with `rate_limited`, further ones are dropped silently
//! until the bucket has refilled. A [`FloodWindow`] catches clients that keep hammering far
//! above the rate anyway (more than [`FLOOD_FACTOR`] times it over [`FLOOD_WINDOW`]); those
//! are disconnected.

use std::time::Duration;

use tokio::time::Instant;

/// Window over which a flood is measured.
pub(crate) const FLOOD_WINDOW: Duration = Duration::from_secs(2);

/// A client sending more than this many times its allowed rate over [`FLOOD_WINDOW`] is
/// disconnected.
pub(crate) const FLOOD_FACTOR: u64 = 10;

/// What to do with one incoming message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Within the limit: process it.
    Pass,
    /// The first message over the limit: answer `rate_limited`, drop the message.
    Warn,
    /// Over the limit and already warned: drop it silently.
    Drop,
}

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// The client was told it is over the limit and has not let the bucket refill since.
    warned: bool,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate.max(1)),
            burst,
            tokens: burst,
            last: now,
            warned: false,
        }
    }

    /// A full bucket refilled at `per_minute` tokens a minute (for slow, rare actions).
    pub(crate) fn per_minute(per_minute: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(per_minute.max(1)) / 60.0,
            ..Self::new(1, burst, now)
        }
    }

    /// Whether the bucket is full again (its owner has been quiet long enough to forget).
    pub(crate) fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Takes a token for one message at `now`.
    pub(crate) fn admit(&mut self, now: Instant) -> Admission {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= self.burst {
            self.warned = false;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Admission::Pass
        } else if self.warned {
            Admission::Drop
        } else {
            self.warned = true;
            Admission::Warn
        }
    }
}

/// Counts frames in fixed windows of [`FLOOD_WINDOW`].
#[derive(Debug, Clone)]
pub(crate) struct FloodWindow {
    limit: u64,
    start: Option<Instant>,
    count: u64,
}

impl FloodWindow {
    /// A window for a connection allowed `rate` messages per second.
    pub(crate) fn new(rate: u32) -> Self {
        let limit = u64::from(rate.max(1)) * FLOOD_WINDOW.as_secs() * FLOOD_FACTOR;
        Self {
            limit,
            start: None,
            count: 0,
        }
    }

    /// Records one frame; `true` when the client is flooding.
    pub(crate) fn record(&mut self, now: Instant) -> bool {
        match self.start {
            Some(start) if now.saturating_duration_since(start) < FLOOD_WINDOW => {}
            _ => {
                self.start = Some(now);
                self.count = 0;
            }
        }
        self.count += 1;
        self.count > self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_warns_once_then_drops_until_refilled() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        for _ in 0..3 {
            assert_eq!(b.admit(t0), Admission::Pass);
        }
        assert_eq!(b.admit(t0), Admission::Warn);
        assert_eq!(b.admit(t0), Admission::Drop);
        // One token back after 100 ms: it passes, but the warning stands.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.admit(t1), Admission::Pass);
        assert_eq!(b.admit(t1), Admission::Drop);
        // Fully refilled: a new episode gets a new warning.
        let t2 = t1 + Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(b.admit(t2), Admission::Pass);
        }
        assert_eq!(b.admit(t2), Admission::Warn);
    }

    #[test]
    fn flood_is_far_above_the_rate() {
        let t0 = Instant::now();
        let mut f = FloodWindow::new(5);
        let limit = 5 * FLOOD_WINDOW.as_secs() * FLOOD_FACTOR;
        for _ in 0..limit {
            assert!(!f.record(t0));
        }
        assert!(f.record(t0));
        // A new window starts afresh.
        assert!(!f.record(t0 + FLOOD_WINDOW));
    }
}

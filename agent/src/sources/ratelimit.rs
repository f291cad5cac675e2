//! A tiny log rate limiter: lets one event through per interval and counts
//! the ones it held back, so the next log line can say how many there were.
//! The clock is passed in (tokio's `Instant`, so paused-time tests work).

use std::time::Duration;

use tokio::time::Instant;

/// At most one event per `interval`; see the module documentation.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimiter {
    /// A limiter letting one event through per `interval`.
    pub fn new(interval: Duration) -> Self {
        RateLimiter {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Records `n` events at `now`. Returns `Some(held_back)` when these
    /// may be logged, with the number of events held back (not logged)
    /// since the last ones that were; `None` when they must stay quiet.
    pub fn check_n(&mut self, now: Instant, n: u64) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                self.suppressed = self.suppressed.saturating_add(n);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_interval_with_the_count_held_back() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut r = RateLimiter::new(Duration::from_secs(10));
        assert_eq!(r.check_n(t0, 1), Some(0));
        assert_eq!(r.check_n(t0 + s, 1), None);
        assert_eq!(r.check_n(t0 + 2 * s, 3), None);
        assert_eq!(r.check_n(t0 + 10 * s, 1), Some(4));
        assert_eq!(r.check_n(t0 + 11 * s, 1), None);
        assert_eq!(r.check_n(t0 + 25 * s, 2), Some(1));
        assert_eq!(r.check_n(t0 + 40 * s, 1), Some(0));
    }
}

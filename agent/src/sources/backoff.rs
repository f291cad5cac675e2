//! Jittered exponential backoff for re-opening a device.
//!
//! The n-th delay (from 0) is drawn from `[step/2, step]` where
//! `step = min(initial * 2^n, max)` ("equal jitter"): never longer than
//! `max`, so a replugged adapter is picked up within `max` plus the open
//! time, and never shorter than half the step, so a missing device costs
//! little CPU. Sources on one gateway that lost their devices together do
//! not retry in lockstep.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Duration;

/// First retry step of a source: 100 ms.
pub const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest retry delay of a source: 2 s, so a device that comes back is
/// used again within a few seconds.
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// Exponential backoff with jitter; see the module documentation.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    /// Random keys of the std hasher: our source of jitter (no `rand`).
    rng: RandomState,
    draws: u64,
}

impl Backoff {
    /// Steps `initial`, `2 * initial`, ... capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
            rng: RandomState::new(),
            draws: 0,
        }
    }

    /// Starts again from the initial step.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt).unwrap_or(u32::MAX);
        let step = self.initial.saturating_mul(factor).min(self.max);
        // 2^20 steps saturate any sane max long before this cap.
        self.attempt = (self.attempt + 1).min(20);
        let half = step / 2;
        half + half.mul_f64(self.unit_random())
    }

    /// A number in [0, 1).
    fn unit_random(&mut self) -> f64 {
        self.draws = self.draws.wrapping_add(1);
        let bits = self.rng.hash_one(self.draws) >> 11; // 53 bits
        bits as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let mut b = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        let steps = [100u64, 200, 400, 800, 1600, 2000, 2000];
        for (d, step) in delays.iter().zip(steps) {
            let step = Duration::from_millis(step);
            assert!(
                *d >= step / 2 && *d <= step,
                "{d:?} not in [{:?}, {step:?}]",
                step / 2
            );
        }
        assert!(delays.iter().all(|d| *d <= RETRY_MAX));
        b.reset();
        assert!(b.next_delay() <= RETRY_INITIAL);
    }

    #[test]
    fn delays_are_jittered() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let delays: std::collections::HashSet<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 1, "all delays equal: {delays:?}");
    }
}

//! The publisher's delivery logic as a pure state machine (no IO, clock
//! passed in), so every rule below is unit tested without a broker.
//!
//! # Invariants
//! * `acked <= sent`: `acked` is the highest sequence number the aggregator
//!   acknowledged; `sent` the highest one published in this connection.
//!   Rows are deleted from the buffer only up to `acked`.
//! * A broker PUBACK proves nothing (rumqttd acks before any subscriber has
//!   the message; a clean-session reconnect forgets in-flight messages), so
//!   only the aggregator's ack moves `acked`.
//! * After a (re)connect, and whenever `acked` has not advanced for
//!   `ack_timeout` while batches are in flight, `sent` falls back to `acked`:
//!   everything unacknowledged is published again from the buffer. The
//!   aggregator drops what it already processed, so a resend can cost
//!   bandwidth but never doubles a reading.
//! * At most `window` batches are in flight.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Connection state as the state machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Not connected: nothing is published.
    Down,
    /// Connected: batches flow within the window.
    Up,
}

/// A published batch not yet covered by an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    /// First sequence number in the batch.
    pub first: u64,
    /// Last sequence number in the batch.
    pub last: u64,
}

/// What the IO loop should do after an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// Not newer than what was acknowledged already: ignore.
    Stale,
    /// Delete buffered rows up to and including this sequence number.
    Delete(u64),
}

/// The publisher's delivery state.
#[derive(Debug, Clone)]
pub struct PublisherCore {
    link: Link,
    acked: u64,
    sent: u64,
    inflight: VecDeque<InFlight>,
    window: usize,
    ack_timeout: Duration,
    /// When `acked` last advanced, or the pipeline last started from empty.
    last_progress: Instant,
    resends: u64,
}

impl PublisherCore {
    /// Starts disconnected; `acked` is what the buffer says was acknowledged.
    pub fn new(acked: u64, window: usize, ack_timeout: Duration, now: Instant) -> Self {
        PublisherCore {
            link: Link::Down,
            acked,
            sent: acked,
            inflight: VecDeque::new(),
            window: window.max(1),
            ack_timeout,
            last_progress: now,
            resends: 0,
        }
    }

    /// Highest acknowledged sequence number.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Highest sequence number published in this connection.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Batches in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Link state.
    pub fn link(&self) -> Link {
        self.link
    }

    /// Times the state machine fell back to resend from `acked`.
    pub fn resends(&self) -> u64 {
        self.resends
    }

    /// A connection (first or re-) was established: resend everything not
    /// acknowledged, whatever the broker or client may still hold.
    pub fn on_connected(&mut self, now: Instant) {
        self.link = Link::Up;
        if self.sent > self.acked {
            self.resends += 1;
        }
        self.sent = self.acked;
        self.inflight.clear();
        self.last_progress = now;
    }

    /// The connection was lost.
    pub fn on_disconnected(&mut self) {
        self.link = Link::Down;
        self.inflight.clear();
    }

    /// The aggregator acknowledged everything up to `seq`.
    pub fn on_ack(&mut self, seq: u64, now: Instant) -> AckOutcome {
        if seq <= self.acked {
            return AckOutcome::Stale;
        }
        self.acked = seq;
        // An ack can cover more than this connection sent (a batch from an
        // earlier connection processed late): never resend what it covers.
        self.sent = self.sent.max(seq);
        while self.inflight.front().is_some_and(|b| b.last <= seq) {
            self.inflight.pop_front();
        }
        self.last_progress = now;
        AckOutcome::Delete(seq)
    }

    /// If a batch may be published now, the sequence number after which
    /// the next batch starts.
    pub fn next_after(&self) -> Option<u64> {
        (self.link == Link::Up && self.inflight.len() < self.window).then_some(self.sent)
    }

    /// A batch `first..=last` was handed to the MQTT client.
    pub fn on_published(&mut self, first: u64, last: u64, now: Instant) {
        if self.inflight.is_empty() {
            // The ack timeout measures silence while something is in flight,
            // not the idle time before it.
            self.last_progress = now;
        }
        self.inflight.push_back(InFlight { first, last });
        self.sent = self.sent.max(last);
    }

    /// Periodic check: true when the ack timeout expired and everything
    /// unacknowledged is to be resent.
    pub fn on_tick(&mut self, now: Instant) -> bool {
        if self.link == Link::Up
            && !self.inflight.is_empty()
            && now.saturating_duration_since(self.last_progress) >= self.ack_timeout
        {
            self.sent = self.acked;
            self.inflight.clear();
            self.last_progress = now;
            self.resends += 1;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(30);

    #[test]
    fn nothing_is_sent_while_down() {
        let now = Instant::now();
        let mut c = PublisherCore::new(0, 2, T, now);
        assert_eq!(c.next_after(), None);
        c.on_connected(now);
        assert_eq!(c.next_after(), Some(0));
        c.on_disconnected();
        assert_eq!(c.next_after(), None);
    }

    #[test]
    fn window_limits_batches_in_flight_and_acks_open_it() {
        let now = Instant::now();
        let mut c = PublisherCore::new(10, 2, T, now);
        c.on_connected(now);
        c.on_published(11, 20, now);
        assert_eq!(c.next_after(), Some(20));
        c.on_published(21, 30, now);
        assert_eq!(c.next_after(), None, "window full");
        assert_eq!(c.on_ack(20, now), AckOutcome::Delete(20));
        assert_eq!(c.inflight(), 1);
        assert_eq!(c.next_after(), Some(30));
        assert_eq!(
            c.on_ack(15, now),
            AckOutcome::Stale,
            "acks never go backwards"
        );
        assert_eq!(c.acked(), 20);
    }

    #[test]
    fn reconnect_resends_from_the_last_ack() {
        let now = Instant::now();
        let mut c = PublisherCore::new(0, 4, T, now);
        c.on_connected(now);
        c.on_published(1, 10, now);
        c.on_published(11, 20, now);
        c.on_ack(10, now);
        c.on_disconnected();
        c.on_connected(now);
        assert_eq!(
            c.next_after(),
            Some(10),
            "11..=20 was never acked: resend it"
        );
        assert_eq!(c.resends(), 1);
    }

    #[test]
    fn silent_aggregator_triggers_resend_after_timeout_only() {
        let t0 = Instant::now();
        let mut c = PublisherCore::new(0, 4, T, t0);
        c.on_connected(t0);
        // Idle for a long time, then publish: the timeout starts now.
        let t1 = t0 + Duration::from_secs(600);
        c.on_published(1, 10, t1);
        assert!(!c.on_tick(t1 + T - Duration::from_millis(1)));
        assert!(c.on_tick(t1 + T));
        assert_eq!(c.next_after(), Some(0));
        assert_eq!(c.inflight(), 0);
    }

    #[test]
    fn ack_progress_postpones_the_timeout() {
        let t0 = Instant::now();
        let mut c = PublisherCore::new(0, 4, T, t0);
        c.on_connected(t0);
        c.on_published(1, 10, t0);
        c.on_published(11, 20, t0);
        c.on_ack(10, t0 + Duration::from_secs(20));
        assert!(!c.on_tick(t0 + Duration::from_secs(40)));
        assert!(c.on_tick(t0 + Duration::from_secs(50)));
    }

    #[test]
    fn ack_beyond_sent_skips_covered_readings() {
        let now = Instant::now();
        let mut c = PublisherCore::new(0, 4, T, now);
        c.on_connected(now);
        c.on_published(1, 10, now);
        assert_eq!(c.on_ack(25, now), AckOutcome::Delete(25));
        assert_eq!(c.next_after(), Some(25));
        assert_eq!(c.inflight(), 0);
    }
}

//! Sampling digital inputs and reporting their changes.
//!
//! [`Debouncer`] is the pure state machine: feed it the level read at each
//! poll and the tick of that poll, and it says which level to report, if
//! any. [`DigitalInput`] puts it behind an [`InputPin`]; its
//! [`DigitalInput::poll_and_send`] also writes the reading as a
//! `Value::Bool` frame through a [`FrameWriter`].
//!
//! # Rules
//! * Debounce: a level is reported only after it has been read at every
//!   poll for at least `debounce_ms` (measured from the first poll that read
//!   it). A bounce shorter than that is never reported. This holds for the
//!   very first level after start-up too. Debouncing is only as fine as the
//!   polling: poll at least a few times per `debounce_ms`.
//! * Heartbeat: when `heartbeat_ms` is not 0, the reported level is sent
//!   again once `heartbeat_ms` has passed since the last report, even
//!   without a change (also while a change is still being debounced), so a
//!   reader can tell a quiet input from a dead device.
//! * The clock is a `u32` millisecond tick passed in by the caller; it may
//!   wrap (every ~49.7 days): all intervals are computed with
//!   `wrapping_sub`, so they are right as long as they are below 2^31 ms.

use core::fmt;

use embedded_hal::digital::InputPin;
use embedded_io::Write;
use outpost_proto::frame::Value;

use crate::link::{FrameWriter, LinkError};

/// Debounce time of a [`DigitalInput`] unless set: 20 ms, longer than the
/// bounce of common switches and reed contacts.
pub const DEFAULT_DEBOUNCE_MS: u32 = 20;
/// Heartbeat interval of a [`DigitalInput`] unless set: one minute.
pub const DEFAULT_HEARTBEAT_MS: u32 = 60_000;

/// Where a [`Debouncer`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing read yet.
    Empty,
    /// Nothing reported yet; `level` has been read since `since`.
    Starting { level: bool, since: u32 },
    /// `level` is reported and is what the input reads.
    Stable { level: bool },
    /// `level` is reported, but the other level has been read since `since`.
    Settling { level: bool, since: u32 },
}

/// Debounce and heartbeat logic for one binary input: pure, clock passed in.
/// See the module documentation for the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Debouncer {
    debounce_ms: u32,
    heartbeat_ms: u32,
    state: State,
    /// Tick of the last report (meaningful once something was reported).
    last_report: u32,
}

impl Debouncer {
    /// A debouncer that needs `debounce_ms` of stable input before reporting
    /// a level and repeats the reported level every `heartbeat_ms` (0: never).
    pub const fn new(debounce_ms: u32, heartbeat_ms: u32) -> Self {
        Debouncer {
            debounce_ms,
            heartbeat_ms,
            state: State::Empty,
            last_report: 0,
        }
    }

    /// The level last reported, if any.
    pub fn reported(&self) -> Option<bool> {
        match self.state {
            State::Empty | State::Starting { .. } => None,
            State::Stable { level } | State::Settling { level, .. } => Some(level),
        }
    }

    /// Takes the level read at `tick_ms`; returns the level to report now,
    /// if any.
    pub fn update(&mut self, level: bool, tick_ms: u32) -> Option<bool> {
        let (next, report) = match self.state {
            State::Empty => self.on_empty(level, tick_ms),
            State::Starting { level: seen, since } => self.on_starting(seen, since, level, tick_ms),
            State::Stable { level: reported } => self.on_stable(reported, level, tick_ms),
            State::Settling {
                level: reported,
                since,
            } => self.on_settling(reported, since, level, tick_ms),
        };
        self.state = next;
        let report = report.or_else(|| self.heartbeat_due(tick_ms));
        if report.is_some() {
            self.last_report = tick_ms;
        }
        report
    }

    fn stable_since(&self, since: u32, now: u32) -> bool {
        now.wrapping_sub(since) >= self.debounce_ms
    }

    fn on_empty(&self, level: bool, now: u32) -> (State, Option<bool>) {
        self.on_starting(level, now, level, now)
    }

    fn on_starting(&self, seen: bool, since: u32, level: bool, now: u32) -> (State, Option<bool>) {
        if level != seen {
            return self.on_empty_restart(level, now);
        }
        if self.stable_since(since, now) {
            (State::Stable { level }, Some(level))
        } else {
            (State::Starting { level, since }, None)
        }
    }

    /// The level changed before the first report: start timing it afresh.
    fn on_empty_restart(&self, level: bool, now: u32) -> (State, Option<bool>) {
        if self.debounce_ms == 0 {
            (State::Stable { level }, Some(level))
        } else {
            (State::Starting { level, since: now }, None)
        }
    }

    fn on_stable(&self, reported: bool, level: bool, now: u32) -> (State, Option<bool>) {
        if level == reported {
            (State::Stable { level }, None)
        } else {
            self.on_settling(reported, now, level, now)
        }
    }

    fn on_settling(
        &self,
        reported: bool,
        since: u32,
        level: bool,
        now: u32,
    ) -> (State, Option<bool>) {
        if level == reported {
            // A bounce shorter than the debounce time: forget it.
            (State::Stable { level }, None)
        } else if self.stable_since(since, now) {
            (State::Stable { level }, Some(level))
        } else {
            (
                State::Settling {
                    level: reported,
                    since,
                },
                None,
            )
        }
    }

    fn heartbeat_due(&self, now: u32) -> Option<bool> {
        let level = self.reported()?;
        (self.heartbeat_ms != 0 && now.wrapping_sub(self.last_report) >= self.heartbeat_ms)
            .then_some(level)
    }
}

/// Why [`DigitalInput::poll_and_send`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollError<P, W> {
    /// Reading the pin failed.
    Pin(P),
    /// Sending the reading failed.
    Link(LinkError<W>),
}

impl<P: fmt::Debug, W: fmt::Debug> fmt::Display for PollError<P, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PollError::Pin(e) => write!(f, "reading input pin failed: {e:?}"),
            PollError::Link(e) => write!(f, "sending reading failed: {e}"),
        }
    }
}

impl<P: fmt::Debug, W: fmt::Debug> core::error::Error for PollError<P, W> {}

/// A binary input (door contact, float switch, alarm output) on a GPIO pin,
/// reported as `Value::Bool` readings of one channel.
///
/// ```
/// # use outpost_firmware_shim::{DigitalInput, FrameWriter};
/// # fn demo<P: embedded_hal::digital::InputPin, U: embedded_io::Write>(pin: P, uart: U, now_ms: impl Fn() -> u32) {
/// let mut door = DigitalInput::new(pin, 3).active_low(true).debounce_ms(50).heartbeat_ms(30_000);
/// let mut link = FrameWriter::new(uart);
/// // In the main loop, every few milliseconds (real firmware counts errors;
/// // a failed poll is simply retried at the next one):
/// let _ = door.poll_and_send(now_ms(), &mut link);
/// # }
/// ```
#[derive(Debug)]
pub struct DigitalInput<P> {
    pin: P,
    channel: u16,
    active_low: bool,
    debouncer: Debouncer,
}

impl<P: InputPin> DigitalInput<P> {
    /// Input `pin` reported as `channel`: active high,
    /// [`DEFAULT_DEBOUNCE_MS`], [`DEFAULT_HEARTBEAT_MS`].
    pub fn new(pin: P, channel: u16) -> Self {
        DigitalInput {
            pin,
            channel,
            active_low: false,
            debouncer: Debouncer::new(DEFAULT_DEBOUNCE_MS, DEFAULT_HEARTBEAT_MS),
        }
    }

    /// Reports `true` when the pin is low (a contact to ground with a
    /// pull-up).
    pub fn active_low(mut self, active_low: bool) -> Self {
        self.active_low = active_low;
        self
    }

    /// How long a new level must be read before it is reported.
    pub fn debounce_ms(mut self, ms: u32) -> Self {
        self.debouncer = Debouncer::new(ms, self.debouncer.heartbeat_ms);
        self
    }

    /// How often the current level is repeated without a change (0: never).
    pub fn heartbeat_ms(mut self, ms: u32) -> Self {
        self.debouncer = Debouncer::new(self.debouncer.debounce_ms, ms);
        self
    }

    /// The channel id readings are reported as.
    pub fn channel(&self) -> u16 {
        self.channel
    }

    /// The level last reported, if any.
    pub fn reported(&self) -> Option<bool> {
        self.debouncer.reported()
    }

    /// Reads the pin at `tick_ms`; returns the (logical, i.e. active-low
    /// inverted) level to report now, if any.
    pub fn poll(&mut self, tick_ms: u32) -> Result<Option<bool>, P::Error> {
        let level = self.pin.is_high()? != self.active_low;
        Ok(self.debouncer.update(level, tick_ms))
    }

    /// [`poll`](Self::poll)s and, if there is a level to report, sends it as a
    /// `Value::Bool` reading of this input's channel stamped `tick_ms`.
    pub fn poll_and_send<W: Write>(
        &mut self,
        tick_ms: u32,
        link: &mut FrameWriter<W>,
    ) -> Result<Option<bool>, PollError<P::Error, W::Error>> {
        let report = self.poll(tick_ms).map_err(PollError::Pin)?;
        if let Some(level) = report {
            link.reading(self.channel, tick_ms, Value::Bool(level))
                .map_err(PollError::Link)?;
        }
        Ok(report)
    }

    /// Gives the pin back.
    pub fn into_inner(self) -> P {
        self.pin
    }
}

#[cfg(all(test, feature = "std"))]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::digital::{Mock, State as Pin, Transaction};
    use outpost_proto::frame::{DecodedBody, FrameDecoder};

    /// A mock pin that reads the given levels in turn.
    fn pin(levels: &[Pin]) -> Mock {
        let t: Vec<Transaction> = levels.iter().map(|&s| Transaction::get(s)).collect();
        Mock::new(&t)
    }

    /// Polls `input` at each tick; returns the reports.
    fn run(input: &mut DigitalInput<Mock>, ticks: &[u32]) -> Vec<Option<bool>> {
        ticks.iter().map(|&t| input.poll(t).unwrap()).collect()
    }

    use Pin::{High as H, Low as L};

    #[test]
    fn bounce_shorter_than_debounce_is_not_reported() {
        let mut input = DigitalInput::new(pin(&[L, L, H, L, H, L, L]), 0)
            .debounce_ms(20)
            .heartbeat_ms(0);
        let got = run(&mut input, &[0, 20, 30, 35, 40, 45, 100]);
        assert_eq!(got, [None, Some(false), None, None, None, None, None]);
        input.into_inner().done();
    }

    #[test]
    fn stable_edge_is_reported_once() {
        let mut input = DigitalInput::new(pin(&[L, L, H, H, H, H, H]), 0)
            .debounce_ms(20)
            .heartbeat_ms(0);
        let got = run(&mut input, &[0, 25, 30, 40, 50, 60, 1000]);
        assert_eq!(got, [None, Some(false), None, None, Some(true), None, None]);
        assert_eq!(input.reported(), Some(true));
        input.into_inner().done();
    }

    #[test]
    fn heartbeat_repeats_the_current_level() {
        let mut input = DigitalInput::new(pin(&[H, H, H, H, H, H]), 0)
            .debounce_ms(0)
            .heartbeat_ms(100);
        let got = run(&mut input, &[0, 50, 99, 100, 150, 200]);
        assert_eq!(got, [Some(true), None, None, Some(true), None, Some(true)]);
        input.into_inner().done();
    }

    #[test]
    fn heartbeat_sends_the_reported_level_while_a_change_settles() {
        let mut input = DigitalInput::new(pin(&[H, L, L]), 0)
            .debounce_ms(50)
            .heartbeat_ms(100);
        input.debouncer = Debouncer {
            state: State::Stable { level: true },
            ..input.debouncer
        };
        let got = run(&mut input, &[60, 100, 150]);
        assert_eq!(got, [None, Some(true), Some(false)]);
        input.into_inner().done();
    }

    #[test]
    fn active_low_inverts() {
        let mut input = DigitalInput::new(pin(&[L, H, H]), 0)
            .active_low(true)
            .debounce_ms(0)
            .heartbeat_ms(0);
        let got = run(&mut input, &[0, 10, 20]);
        assert_eq!(got, [Some(true), Some(false), None]);
        input.into_inner().done();
    }

    #[test]
    fn tick_wrap_around_is_handled() {
        let start = u32::MAX - 10;
        let mut input = DigitalInput::new(pin(&[H, H, L, L, L]), 0)
            .debounce_ms(20)
            .heartbeat_ms(1000);
        let got = run(&mut input, &[start, start.wrapping_add(20), 15, 25, 35]);
        // High stable across the wrap (tick MAX-10 to 9); low from 15 to 35.
        assert_eq!(got, [None, Some(true), None, None, Some(false)]);
        input.into_inner().done();
    }

    #[test]
    fn pin_error_is_returned() {
        let err = embedded_hal_mock::eh1::MockError::Io(std::io::ErrorKind::NotConnected);
        let mut m = Mock::new(&[Transaction::get(H).with_error(err)]);
        let mut input = DigitalInput::new(m.clone(), 0);
        assert!(input.poll(0).is_err());
        m.done();
    }

    #[test]
    fn poll_and_send_writes_bool_readings() {
        let mut buf = [0u8; 256];
        let mut link = FrameWriter::new(&mut buf[..]);
        let mut input = DigitalInput::new(pin(&[H, H, L]), 9)
            .debounce_ms(0)
            .heartbeat_ms(0);
        let reports: Vec<_> = [100, 200, 300]
            .iter()
            .map(|&t| input.poll_and_send(t, &mut link).unwrap())
            .collect();
        assert_eq!(reports, [Some(true), None, Some(false)]);
        input.into_inner().done();
        let left = link.into_inner().len();
        let used = buf.len() - left;
        let mut d = FrameDecoder::new();
        let bodies: Vec<DecodedBody> = d.feed(&buf[..used]).map(|f| f.unwrap().body).collect();
        assert_eq!(
            bodies,
            [
                DecodedBody::Reading {
                    channel: 9,
                    tick_ms: 100,
                    value: Value::Bool(true)
                },
                DecodedBody::Reading {
                    channel: 9,
                    tick_ms: 300,
                    value: Value::Bool(false)
                },
            ]
        );
    }

    #[test]
    fn debouncer_first_level_waits_for_debounce() {
        let mut d = Debouncer::new(10, 0);
        assert_eq!(d.update(true, 0), None);
        assert_eq!(
            d.update(false, 5),
            None,
            "changed before stable: restart timing"
        );
        assert_eq!(d.update(false, 14), None);
        assert_eq!(d.update(false, 15), Some(false));
        assert_eq!(d.reported(), Some(false));
    }
}

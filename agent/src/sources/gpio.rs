//! `gpio`: a digital input (door contact, float switch, alarm relay) on a
//! Linux GPIO line, reported as Bool readings.
//!
//! * The core, [`run_pin`], is generic over any
//!   `embedded_hal::digital::InputPin` and takes its clock as a
//!   [`PollClock`] (the real one, [`IntervalClock`], is a tokio interval of
//!   `poll-interval`; tests pass a scripted clock). At every poll it feeds
//!   firmware-shim's `DigitalInput` (the same debounce and heartbeat state
//!   machine sensor firmware uses) with the poll's millisecond tick. A level is reported once it has been read for
//!   `debounce`; the reported level is repeated every `heartbeat` (0: never)
//!   so a quiet input can be told from a dead agent. `active-low` inverts
//!   the level (a contact to ground with a pull-up reads `true` when
//!   closed). Readings carry the wall-clock time of the poll that reported.
//! * The real pin is requested through the GPIO character device, uAPI v2
//!   (`gpiocdev` + `gpiocdev-embedded-hal`), as an input with consumer
//!   label [`CONSUMER`]. A chip or line that cannot be requested (missing,
//!   busy, no permission) is handled like a missing serial port: `retrying`
//!   with backoff. A failed read releases the line and requests it again.
//! * Polling rather than edge events keeps one code path for real pins and
//!   mocks and makes debouncing exact to the poll interval; at the default
//!   10 ms a poll is one `ioctl`, about 100 per second per input.

use std::future::Future;
use std::time::Duration;

use embedded_hal::digital::InputPin;
use outpost_firmware_shim::sampler::{DEFAULT_DEBOUNCE_MS, DEFAULT_HEARTBEAT_MS};
use outpost_firmware_shim::DigitalInput;
use serde::Deserialize;
use tokio::time::{Instant, MissedTickBehavior};

use super::{check_sensor_name, Device, Emitter, SourceError, Stop};
use crate::reading::{now_ms, Reading, Value};

/// Consumer label of the requested line (shown by `gpioinfo`).
pub const CONSUMER: &str = "outpost-agent";
/// Default GPIO chip.
pub const DEFAULT_CHIP: &str = "/dev/gpiochip0";
/// Default debounce time (firmware-shim's default: 20 ms).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(DEFAULT_DEBOUNCE_MS as u64);
/// Default heartbeat (firmware-shim's default: 60 s).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(DEFAULT_HEARTBEAT_MS as u64);
/// Default poll interval: 10 ms, two polls per default debounce time.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Shortest poll interval accepted.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// Longest debounce or heartbeat: the debouncer's u32 ms tick wraps, so
/// intervals must stay below 2^31 ms (about 24.8 days).
pub const MAX_PIN_INTERVAL: Duration = Duration::from_millis(i32::MAX as u64);

fn default_chip() -> String {
    DEFAULT_CHIP.to_owned()
}
fn default_debounce() -> Duration {
    DEFAULT_DEBOUNCE
}
fn default_heartbeat() -> Duration {
    DEFAULT_HEARTBEAT
}
fn default_poll_interval() -> Duration {
    DEFAULT_POLL_INTERVAL
}

/// `type = "gpio"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GpioConfig {
    /// Unique source name.
    pub name: String,
    /// Sensor name of the readings.
    pub sensor: String,
    /// GPIO chip device (default `/dev/gpiochip0`).
    #[serde(default = "default_chip")]
    pub chip: String,
    /// Line offset on the chip.
    pub line: u32,
    /// Report `true` when the line is low (default false).
    #[serde(default)]
    pub active_low: bool,
    /// How long a new level must hold before it is reported (default 20 ms).
    #[serde(default = "default_debounce", with = "humantime_serde")]
    pub debounce: Duration,
    /// Repeat the reported level this often without a change (default 60 s;
    /// "0s": never).
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// How often the line is read (default 10 ms).
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl GpioConfig {
    pub(crate) fn validate(&self, key: &str, errors: &mut Vec<String>) {
        check_sensor_name(key, "sensor", &self.sensor, errors);
        if self.chip.trim().is_empty() {
            errors.push(format!(
                "{key}.chip: must not be empty (e.g. {DEFAULT_CHIP:?})"
            ));
        }
        if self.poll_interval < MIN_POLL_INTERVAL {
            errors.push(format!(
                "{key}.poll-interval: must be at least {MIN_POLL_INTERVAL:?}"
            ));
        }
        if !self.debounce.is_zero() && self.poll_interval > self.debounce {
            errors.push(format!(
                "{key}.poll-interval: must not be longer than debounce ({:?}): poll a few times per debounce time",
                self.debounce
            ));
        }
        if self.debounce > MAX_PIN_INTERVAL {
            errors.push(format!("{key}.debounce: must be below 24 days"));
        }
        if self.heartbeat > MAX_PIN_INTERVAL {
            errors.push(format!("{key}.heartbeat: must be below 24 days"));
        }
    }

    /// The pin settings of this source.
    pub fn pin_settings(&self) -> PinSettings {
        PinSettings {
            sensor: self.sensor.clone(),
            active_low: self.active_low,
            debounce: self.debounce,
            heartbeat: self.heartbeat,
            poll_interval: self.poll_interval,
        }
    }
}

/// How [`run_pin`] samples a pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinSettings {
    /// Sensor name of the readings.
    pub sensor: String,
    /// Report `true` when the pin is low.
    pub active_low: bool,
    /// Debounce time.
    pub debounce: Duration,
    /// Heartbeat (zero: none).
    pub heartbeat: Duration,
    /// Poll interval of the real source's [`IntervalClock`].
    pub poll_interval: Duration,
}

/// Milliseconds as the debouncer's u32, saturating at [`MAX_PIN_INTERVAL`].
fn ms_u32(d: Duration) -> u32 {
    d.min(MAX_PIN_INTERVAL).as_millis() as u32
}

/// The clock [`run_pin`] polls by: it waits for the next poll and says
/// its time as a millisecond tick (which may wrap at 2^32).
pub trait PollClock: Send {
    /// Waits until the next poll is due; returns its tick in ms.
    fn next_poll(&mut self) -> impl Future<Output = u32> + Send;
}

/// The real [`PollClock`]: a tokio interval (so it follows tokio's paused
/// clock in tests); ticks count from its creation. A late poll is not
/// caught up in a burst: the next one is a full interval later.
#[derive(Debug)]
pub struct IntervalClock {
    interval: tokio::time::Interval,
    start: Instant,
}

impl IntervalClock {
    /// Polls every `period` (raised to [`MIN_POLL_INTERVAL`] if shorter),
    /// the first one at once.
    pub fn new(period: Duration) -> Self {
        let mut interval = tokio::time::interval(period.max(MIN_POLL_INTERVAL));
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        IntervalClock {
            interval,
            start: Instant::now(),
        }
    }
}

impl PollClock for IntervalClock {
    async fn next_poll(&mut self) -> u32 {
        self.interval.tick().await;
        // Truncation is the intended wrap every ~49.7 days; the debouncer
        // computes intervals with wrapping arithmetic.
        self.start.elapsed().as_millis() as u32
    }
}

/// Polls `pin` at the times `clock` gives and sends a Bool reading for
/// every debounced level and every heartbeat, until cancelled (`Ok`) or the
/// pin fails (`Err`). `settings.poll_interval` is not used here: the clock
/// decides when to poll.
pub async fn run_pin<P: InputPin, C: PollClock>(
    pin: P,
    clock: &mut C,
    settings: &PinSettings,
    out: &mut Emitter,
) -> Result<Stop, SourceError> {
    let mut input = DigitalInput::new(pin, 0)
        .active_low(settings.active_low)
        .debounce_ms(ms_u32(settings.debounce))
        .heartbeat_ms(ms_u32(settings.heartbeat));
    loop {
        let tick = tokio::select! {
            biased;
            _ = out.cancelled() => return Ok(Stop::Cancelled),
            tick = clock.next_poll() => tick,
        };
        let report = input.poll(tick).map_err(|e| SourceError::ReadPin {
            detail: format!("{e:?}"),
        })?;
        if let Some(level) = report {
            let reading = Reading::new(settings.sensor.as_str(), now_ms(), Value::Bool(level));
            if let Err(stop) = out.send(reading).await {
                return Ok(stop);
            }
        }
    }
}

/// A GPIO line requested through the character device.
#[derive(Debug)]
pub(crate) struct GpioDevice {
    chip: String,
    line: u32,
    settings: PinSettings,
}

/// The running source's device.
pub(crate) fn device(config: GpioConfig) -> GpioDevice {
    GpioDevice {
        settings: config.pin_settings(),
        chip: config.chip,
        line: config.line,
    }
}

impl Device for GpioDevice {
    type Conn = gpiocdev_embedded_hal::InputPin;

    fn describe(&self) -> String {
        format!("{} line {}", self.chip, self.line)
    }

    fn open(&mut self) -> Result<Self::Conn, SourceError> {
        let open_err = |source| SourceError::OpenGpio {
            chip: self.chip.clone(),
            line: self.line,
            source,
        };
        let request = gpiocdev::Request::builder()
            .on_chip(self.chip.as_str())
            .with_consumer(CONSUMER)
            .with_line(self.line)
            .as_input()
            .request()
            .map_err(|e| open_err(e.into()))?;
        gpiocdev_embedded_hal::InputPin::try_from(request).map_err(open_err)
    }

    async fn run(&mut self, pin: Self::Conn, out: &mut Emitter) -> Result<Stop, SourceError> {
        let mut clock = IntervalClock::new(self.settings.poll_interval);
        run_pin(pin, &mut clock, &self.settings, out).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c: GpioConfig =
            toml::from_str("name = \"door\"\nsensor = \"door_open\"\nline = 17\n").unwrap();
        assert_eq!(c.chip, DEFAULT_CHIP);
        assert_eq!(c.debounce, Duration::from_millis(20));
        assert_eq!(c.heartbeat, Duration::from_secs(60));
        assert_eq!(c.poll_interval, Duration::from_millis(10));
        let mut e = Vec::new();
        c.validate("s", &mut e);
        assert!(e.is_empty(), "{e:?}");
        let c: GpioConfig = toml::from_str(
            "name = \"d\"\nsensor = \"\"\nline = 1\nchip = \"\"\ndebounce = \"5ms\"\npoll-interval = \"0s\"\n",
        )
        .unwrap();
        let mut e = Vec::new();
        c.validate("s", &mut e);
        for key in ["s.sensor:", "s.chip:", "s.poll-interval: must be at least"] {
            assert!(
                e.iter().any(|m| m.starts_with(key)),
                "{key} missing in {e:?}"
            );
        }
    }
}

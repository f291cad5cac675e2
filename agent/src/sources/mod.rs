//! Sources: where readings come from (serial frames, serial text lines,
//! GPIO inputs).
//!
//! # Shape
//! Every source is one tokio task ([`SourceConfig::spawn`]) running
//! `supervise` around a `Device`: open the device, run a session until
//! it fails, wait a jittered exponential backoff ([`backoff`], 100 ms
//! doubling up to [`backoff::RETRY_MAX`] = 2 s), open again. The parsing is
//! done by sans-IO cores (`serial::FramesCore`, `lines::LinesCore`,
//! firmware-shim's `Debouncer` for GPIO) that take bytes or levels plus a
//! clock and return readings and counted problems; the IO loops around them
//! are thin.
//!
//! # Failure rules
//! * A device that is missing at start, unplugged, or fails a read is never
//!   fatal: the source reports `retrying` on the [`StatusBoard`], sets
//!   `source_up` to 0 and retries with backoff; when it opens again it counts
//!   `source_reconnects` and reports `running`. Other sources are not
//!   affected. Cancellation interrupts the backoff sleep at once.
//! * Bad input (a corrupt frame, a malformed line) is counted per kind in
//!   `source_errors` and on the status board, logged at WARN at most once
//!   per [`BAD_INPUT_LOG_INTERVAL`] per source (with the number of events
//!   suppressed since), and skipped.
//! * Readings go to the bounded channel with `send().await`: a full channel
//!   is backpressure (the device's kernel buffer fills; frame counters show
//!   any loss). If the receiver is gone the source stops quietly. A reading
//!   in hand when shutdown starts while the channel is full is dropped.
//! * On cancellation the source reports `stopped` and its task returns.
//!   Nothing here panics.

pub mod backoff;
pub mod deadband;
pub mod gpio;
pub mod lines;
pub mod ratelimit;
pub mod serial;
mod serial_port;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use outpost_proto::batch::MAX_SENSOR_NAME_LEN;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::{Metrics, SourceLabels};
use crate::reading::Reading;
use crate::status::StatusBoard;

pub use gpio::GpioConfig;
pub use lines::SerialLinesConfig;
pub use serial::SerialFramesConfig;
pub use serial_port::Parity;

use backoff::Backoff;
use ratelimit::RateLimiter;

/// Longest source name (it is a metric label and a status-board key).
pub const MAX_SOURCE_NAME_LEN: usize = 64;
/// At most one WARN per source per this interval about bad input (corrupt
/// frames, malformed lines); the rest are counted and summarised.
pub const BAD_INPUT_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// At most one WARN about a device failing (and one INFO about it coming
/// back) per this interval per source: a missing or flapping device does not
/// flood the journal; `source_errors` and `source_reconnects` count them all.
pub const RETRY_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// A session that lasted at least this long resets the backoff, so a device
/// that fails again much later is retried quickly; one that fails at once
/// after opening keeps backing off.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(5);

/// What every source task gets from the agent.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// Where readings go: bounded; full = backpressure (`send().await`).
    pub tx: mpsc::Sender<Reading>,
    /// Stops the source.
    pub cancel: CancellationToken,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// Shared source status board.
    pub status: StatusBoard,
}

/// One `[[sources]]` table of the configuration.
///
/// Internally tagged by `type`; unknown keys are rejected by each variant's
/// struct (serde cannot do it on an internally tagged enum itself).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SourceConfig {
    /// `type = "serial-frames"`: firmware speaking the Outpost frame protocol.
    SerialFrames(SerialFramesConfig),
    /// `type = "serial-lines"`: a device printing text lines (kv, csv, json).
    SerialLines(SerialLinesConfig),
    /// `type = "gpio"`: a digital input on a Linux GPIO line.
    Gpio(GpioConfig),
}

impl SourceConfig {
    /// The source's name (unique; the metric label and status-board key).
    pub fn name(&self) -> &str {
        match self {
            SourceConfig::SerialFrames(c) => &c.name,
            SourceConfig::SerialLines(c) => &c.name,
            SourceConfig::Gpio(c) => &c.name,
        }
    }

    /// Appends every problem with this source's settings to `errors`, each
    /// prefixed with `key` (e.g. `sources[0].baud: must be > 0`).
    pub fn validate(&self, key: &str, errors: &mut Vec<String>) {
        check_source_name(key, self.name(), errors);
        match self {
            SourceConfig::SerialFrames(c) => c.validate(key, errors),
            SourceConfig::SerialLines(c) => c.validate(key, errors),
            SourceConfig::Gpio(c) => c.validate(key, errors),
        }
    }

    /// Starts the source. The task runs until `ctx.cancel` fires (or the
    /// receiver is dropped); device errors never end it.
    pub fn spawn(self, ctx: SourceContext) -> tokio::task::JoinHandle<()> {
        let out = Emitter::new(self.name(), ctx);
        match self {
            SourceConfig::SerialFrames(c) => tokio::spawn(supervise(serial::device(c), out)),
            SourceConfig::SerialLines(c) => tokio::spawn(supervise(lines::device(c), out)),
            SourceConfig::Gpio(c) => tokio::spawn(supervise(gpio::device(c), out)),
        }
    }
}

/// Why a source could not open or keep reading its device. Every variant is
/// retried; [`SourceError::kind`] is the `source_errors` label.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The serial port could not be opened or configured (missing, busy,
    /// no permission).
    #[error("cannot open serial port {path}: {source}")]
    OpenSerial {
        /// Configured path.
        path: String,
        /// Cause.
        source: tokio_serial::Error,
    },
    /// A serial setting the port cannot take (config validation reports it
    /// first; this only guards the invariant).
    #[error("invalid serial setting for {path}: {reason}")]
    Settings {
        /// Configured path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A read failed (adapter unplugged, I/O error).
    #[error("reading serial port {path} failed: {source}")]
    ReadSerial {
        /// Configured path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The port reported end of file (hang-up: adapter unplugged, pty closed).
    #[error("serial port {path} closed (device unplugged?)")]
    Closed {
        /// Configured path.
        path: String,
    },
    /// The GPIO line could not be requested (no chip, no such line, line
    /// busy, no permission).
    #[error("cannot request GPIO line {line} on {chip}: {source}")]
    OpenGpio {
        /// Chip path.
        chip: String,
        /// Line offset.
        line: u32,
        /// Cause.
        source: gpiocdev_embedded_hal::Error,
    },
    /// Reading an input pin failed.
    #[error("reading input pin failed: {detail}")]
    ReadPin {
        /// The pin driver's error, formatted.
        detail: String,
    },
}

impl SourceError {
    /// Metric label of this error: `open` (device could not be opened) or
    /// `io` (it failed while in use).
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::OpenSerial { .. }
            | SourceError::Settings { .. }
            | SourceError::OpenGpio { .. } => "open",
            SourceError::ReadSerial { .. }
            | SourceError::Closed { .. }
            | SourceError::ReadPin { .. } => "io",
        }
    }
}

/// Why a source session ended without a device error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The cancellation token fired.
    Cancelled,
    /// The reading channel's receiver is gone.
    ReceiverGone,
}

/// How a source hands on readings and reports problems: the channel, the
/// cancellation token, the metrics and the status board, bound to the
/// source's name.
#[derive(Debug)]
pub struct Emitter {
    name: String,
    ctx: SourceContext,
    readings: Counter,
}

impl Emitter {
    /// An emitter for the source `name`.
    pub fn new(name: &str, ctx: SourceContext) -> Self {
        let readings = ctx.metrics.source_readings(name);
        Emitter {
            name: name.to_owned(),
            ctx,
            readings,
        }
    }

    /// The source name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Resolves when the source is told to stop.
    pub async fn cancelled(&self) {
        self.ctx.cancel.cancelled().await
    }

    /// True once the source is told to stop.
    pub fn is_cancelled(&self) -> bool {
        self.ctx.cancel.is_cancelled()
    }

    /// Sends one reading, waiting while the channel is full.
    pub async fn send(&mut self, reading: Reading) -> Result<(), Stop> {
        self.send_one(reading).await?;
        self.ctx.status.add_readings(&self.name, 1);
        Ok(())
    }

    /// Sends every reading in `readings` (draining it), in order, waiting
    /// while the channel is full; updates the status board once. On `Err`
    /// the readings not yet sent are dropped (the source is stopping).
    pub async fn send_all(&mut self, readings: &mut Vec<Reading>) -> Result<(), Stop> {
        let mut sent = 0u64;
        let mut result = Ok(());
        for r in readings.drain(..) {
            if let Err(stop) = self.send_one(r).await {
                result = Err(stop);
                break;
            }
            sent += 1;
        }
        if sent > 0 {
            self.ctx.status.add_readings(&self.name, sent);
        }
        result
    }

    async fn send_one(&mut self, reading: Reading) -> Result<(), Stop> {
        tokio::select! {
            biased;
            sent = self.ctx.tx.send(reading) => sent.map_err(|_| Stop::ReceiverGone)?,
            _ = self.ctx.cancel.cancelled() => return Err(Stop::Cancelled),
        }
        self.readings.inc();
        Ok(())
    }

    /// Counts `n` errors of `kind` (metric and status board).
    pub fn error(&self, kind: &str, n: u64, last: &str) {
        self.ctx.metrics.source_error(&self.name, kind, n);
        self.ctx.status.add_errors(&self.name, n, last);
    }
}

/// Problems a sans-IO core found in the input it was fed, by kind, waiting
/// to be counted and logged by [`BadInputLog`].
#[derive(Debug, Default)]
pub(crate) struct Problems {
    counts: Vec<(&'static str, u64)>,
    last: Option<String>,
}

impl Problems {
    /// Records `n` problems of `kind` (a `source_errors` label); `message`
    /// describes the latest one.
    pub fn add(&mut self, kind: &'static str, n: u64, message: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        match self.counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, c)) => *c += n,
            None => self.counts.push((kind, n)),
        }
        self.last = Some(message());
    }

    /// Nothing recorded.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Count recorded for `kind`.
    #[cfg(test)]
    pub fn count(&self, kind: &str) -> u64 {
        self.counts
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, c)| *c)
    }

    /// Total of every kind.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|(_, c)| c).sum()
    }

    /// Forgets everything recorded.
    pub fn clear(&mut self) {
        self.counts.clear();
        self.last = None;
    }
}

/// Counts [`Problems`] in the metrics and status board and logs them at
/// WARN at most once per [`BAD_INPUT_LOG_INTERVAL`].
#[derive(Debug)]
pub(crate) struct BadInputLog {
    limiter: RateLimiter,
    what: &'static str,
}

impl BadInputLog {
    /// A log whose WARN lines say `what` (e.g. "bad frames skipped").
    pub fn new(what: &'static str) -> Self {
        BadInputLog {
            limiter: RateLimiter::new(BAD_INPUT_LOG_INTERVAL),
            what,
        }
    }

    /// Counts and (rate-limited) logs `problems`, then clears them.
    pub fn report(&mut self, out: &Emitter, problems: &mut Problems) {
        if problems.is_empty() {
            return;
        }
        let last = problems.last.take().unwrap_or_default();
        let total = problems.total();
        for (kind, n) in &problems.counts {
            out.ctx.metrics.source_error(&out.name, kind, *n);
        }
        out.ctx.status.add_errors(&out.name, total, &last);
        let kinds: Vec<String> = problems
            .counts
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        match self.limiter.check_n(tokio::time::Instant::now(), total) {
            Some(suppressed) => warn!(
                source = %out.name,
                error = %last,
                counts = %kinds.join(","),
                suppressed,
                "{}", self.what
            ),
            None => debug!(source = %out.name, error = %last, "{}", self.what),
        }
        problems.clear();
    }
}

/// A device a source reads: opened by [`supervise`], read in a session until
/// it fails or the source stops.
pub(crate) trait Device: Send {
    /// What an open device is (a serial stream, a requested GPIO line).
    type Conn: Send;

    /// The device for logs (`/dev/serial/by-id/...`, `/dev/gpiochip0 line 17`).
    fn describe(&self) -> String;

    /// Opens the device. Must not block for long (serial and GPIO opens are
    /// quick system calls).
    fn open(&mut self) -> Result<Self::Conn, SourceError>;

    /// Reads the open device, sending readings through `out`, until the
    /// source must stop (`Ok`) or the device fails (`Err`, retried).
    fn run(
        &mut self,
        conn: Self::Conn,
        out: &mut Emitter,
    ) -> impl Future<Output = Result<Stop, SourceError>> + Send;
}

/// Runs a source: open, run, back off, open again, until cancelled or the
/// receiver is gone. Keeps the status board and the `source_up`,
/// `source_reconnects` and `source_errors` metrics current.
pub(crate) async fn supervise<D: Device>(mut device: D, mut out: Emitter) {
    let name = out.name.clone();
    let metrics = out.ctx.metrics.clone();
    let status = out.ctx.status.clone();
    let what = device.describe();
    let mut backoff = Backoff::new(backoff::RETRY_INITIAL, backoff::RETRY_MAX);
    let mut retry_log = RateLimiter::new(RETRY_LOG_INTERVAL);
    let mut back_log = RateLimiter::new(RETRY_LOG_INTERVAL);
    // Failed attempts since the device was last open (None: never failed).
    let mut failures: Option<u64> = None;
    metrics.set_source_up(&name, false);
    loop {
        if out.is_cancelled() {
            break;
        }
        let error = match device.open() {
            Ok(conn) => {
                match failures.take() {
                    Some(attempts) => {
                        metrics
                            .source_reconnects
                            .get_or_create(&SourceLabels {
                                source: name.clone(),
                            })
                            .inc();
                        if back_log.check_n(tokio::time::Instant::now(), 1).is_some() {
                            info!(source = %name, device = %what, attempts, "device is back");
                        } else {
                            debug!(source = %name, device = %what, attempts, "device is back");
                        }
                    }
                    None => info!(source = %name, device = %what, "device open"),
                }
                metrics.set_source_up(&name, true);
                status.running(&name);
                let opened = tokio::time::Instant::now();
                match device.run(conn, &mut out).await {
                    Ok(_) => break,
                    Err(e) => {
                        if opened.elapsed() >= BACKOFF_RESET_AFTER {
                            backoff.reset();
                        }
                        e
                    }
                }
            }
            Err(e) => e,
        };
        let message = error.to_string();
        metrics.set_source_up(&name, false);
        out.error(error.kind(), 1, &message);
        status.retrying(&name, &message);
        let attempts = failures.unwrap_or(0) + 1;
        failures = Some(attempts);
        let delay = backoff.next_delay();
        // The first failure after a quiet spell is a WARN; a device that
        // stays missing (or flaps) gets one WARN per RETRY_LOG_INTERVAL.
        match retry_log.check_n(tokio::time::Instant::now(), 1) {
            Some(suppressed) => warn!(
                source = %name, device = %what, error = %message, attempts, suppressed,
                "device unavailable; retrying"
            ),
            None => {
                debug!(source = %name, device = %what, error = %message, attempts, ?delay, "retrying")
            }
        }
        tokio::select! {
            _ = out.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    metrics.set_source_up(&name, false);
    status.stopped(&name);
    info!(source = %name, "source stopped");
}

/// Checks a source name.
fn check_source_name(key: &str, name: &str, errors: &mut Vec<String>) {
    if name.trim().is_empty() {
        errors.push(format!("{key}.name: must not be empty"));
    } else if name.len() > MAX_SOURCE_NAME_LEN {
        errors.push(format!(
            "{key}.name: must be at most {MAX_SOURCE_NAME_LEN} bytes"
        ));
    }
}

/// Checks a sensor name produced by configuration (`field` is the key path
/// below `key`, e.g. `channels[0].name`).
pub(crate) fn check_sensor_name(key: &str, field: &str, name: &str, errors: &mut Vec<String>) {
    if name.trim().is_empty() {
        errors.push(format!("{key}.{field}: sensor name must not be empty"));
    } else if name.len() > MAX_SENSOR_NAME_LEN {
        errors.push(format!(
            "{key}.{field}: sensor name must be at most {MAX_SENSOR_NAME_LEN} bytes"
        ));
    }
}

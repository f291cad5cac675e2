//! `outpost-agent monitor PORT`: decode the frames a sensor sends on a serial
//! port and print them, one line each, with a running count of line errors.
//! For installers checking a sensor's wiring; it does not buffer or publish.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use outpost_proto::frame::{frames_lost, DecodedBody, FrameDecoder};

/// How often the monitor prints the decoder's error counters.
pub const STATS_INTERVAL: Duration = Duration::from_secs(5);

/// What to monitor.
#[derive(Debug, Clone)]
pub struct MonitorOptions {
    /// Serial device path (`/dev/serial/by-id/...`, `/dev/ttyUSB0`, a pty).
    pub port: String,
    /// Line speed.
    pub baud: u32,
    /// Stop after this many frames (None: run until the port closes).
    pub max_frames: Option<u64>,
}

/// Why monitoring stopped early.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The port could not be opened.
    #[error("cannot open serial port {port}: {source}")]
    Open {
        /// Port path.
        port: String,
        /// Cause.
        source: serialport::Error,
    },
    /// Reading failed (adapter unplugged, pty closed).
    #[error("reading {port} failed: {source}")]
    Read {
        /// Port path.
        port: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Writing the output failed (e.g. a closed pipe).
    #[error("writing output failed: {0}")]
    Output(std::io::Error),
}

/// Reads frames from the port and prints them to `out` until `max_frames`
/// is reached or the port fails.
pub fn run(opts: &MonitorOptions, out: &mut impl Write) -> Result<(), MonitorError> {
    let mut port = serialport::new(&opts.port, opts.baud)
        .timeout(Duration::from_millis(250))
        .open_native()
        .map_err(|source| MonitorError::Open {
            port: opts.port.clone(),
            source,
        })?;
    let mut dec = FrameDecoder::new();
    let mut names: HashMap<u16, (String, String)> = HashMap::new();
    let mut last_counter: Option<u16> = None;
    let mut lost: u64 = 0;
    let mut frames: u64 = 0;
    let mut last_stats = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let n = match port.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => 0,
            Err(source) => {
                return Err(MonitorError::Read {
                    port: opts.port.clone(),
                    source,
                })
            }
        };
        for item in dec.feed(&buf[..n]) {
            let frame = match item {
                Ok(f) => f,
                Err(e) => {
                    writeln!(out, "line error: {e}").map_err(MonitorError::Output)?;
                    continue;
                }
            };
            if let Some(prev) = last_counter {
                if !matches!(frame.body, DecodedBody::Hello { .. }) {
                    lost += u64::from(frames_lost(prev, frame.counter));
                }
            }
            last_counter = Some(frame.counter);
            frames += 1;
            let line = match &frame.body {
                DecodedBody::Reading {
                    channel,
                    tick_ms,
                    value,
                } => {
                    let (name, unit) = names
                        .get(channel)
                        .map(|(n, u)| (n.as_str(), u.as_str()))
                        .unwrap_or(("?", ""));
                    format!(
                        "#{:<5} ch{channel} {name} = {value:?} {unit} (tick {tick_ms} ms)",
                        frame.counter
                    )
                }
                DecodedBody::Descriptor {
                    channel,
                    name,
                    unit,
                } => {
                    names.insert(*channel, (name.clone(), unit.clone()));
                    format!("#{:<5} ch{channel} is {name:?} [{unit}]", frame.counter)
                }
                DecodedBody::Hello { firmware, tick_ms } => {
                    format!(
                        "#{:<5} hello from {firmware} (tick {tick_ms} ms)",
                        frame.counter
                    )
                }
            };
            writeln!(out, "{line}").map_err(MonitorError::Output)?;
            if opts.max_frames.is_some_and(|m| frames >= m) {
                return print_stats(out, &dec, lost);
            }
        }
        if last_stats.elapsed() >= STATS_INTERVAL {
            last_stats = Instant::now();
            print_stats(out, &dec, lost)?;
        }
    }
}

fn print_stats(out: &mut impl Write, dec: &FrameDecoder, lost: u64) -> Result<(), MonitorError> {
    let s = dec.stats();
    writeln!(
        out,
        "-- frames {} | lost {lost} | crc errors {} | framing errors {} | oversize {} | body errors {}",
        s.frames, s.crc_errors, s.framing_errors, s.oversize, s.body_errors
    )
    .and_then(|_| out.flush())
    .map_err(MonitorError::Output)
}

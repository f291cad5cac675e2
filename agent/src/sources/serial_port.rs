//! What both serial sources share: the port settings, opening the port with
//! tokio-serial, and the read loop that feeds a sans-IO [`ByteCore`].
//!
//! * The port is opened exclusive, raw, no flow control. Input already
//!   waiting when the port opens is read, not flushed: real UART and
//!   USB-serial drivers receive nothing while the port is closed, so only a
//!   pty holds such bytes (the simulator's start-up hello and descriptor
//!   frames, which are worth having).
//! * The read loop reads up to [`READ_CHUNK`] bytes at a time, stamps them
//!   with the wall clock, lets the core turn them into readings and
//!   problems, counts the problems, then sends the readings (waiting while
//!   the channel is full: backpressure). End of file (hang-up) and read
//!   errors end the session; the supervisor reopens the port.

use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio_serial::{DataBits, FlowControl, SerialPortBuilderExt, SerialStream, StopBits};

use super::{BadInputLog, Device, Emitter, Problems, SourceError, Stop};
use crate::reading::{now_ms, Reading};

/// Default line speed of both serial sources.
pub const DEFAULT_BAUD: u32 = 115_200;
/// Default data bits.
pub const DEFAULT_DATA_BITS: u8 = 8;
/// Default stop bits.
pub const DEFAULT_STOP_BITS: u8 = 1;
/// Bytes read from the port at once at most.
pub const READ_CHUNK: usize = 1024;

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Parity {
    /// No parity bit (default).
    #[default]
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

pub(crate) fn default_baud() -> u32 {
    DEFAULT_BAUD
}
pub(crate) fn default_data_bits() -> u8 {
    DEFAULT_DATA_BITS
}
pub(crate) fn default_stop_bits() -> u8 {
    DEFAULT_STOP_BITS
}

/// Serial line settings, as both serial source configs carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortSettings {
    pub path: String,
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
}

impl PortSettings {
    /// Appends problems with the settings, prefixed by `key`.
    pub fn validate(&self, key: &str, errors: &mut Vec<String>) {
        if self.path.trim().is_empty() {
            errors.push(format!(
                "{key}.path: must not be empty (use a /dev/serial/by-id/... name)"
            ));
        }
        if self.baud == 0 {
            errors.push(format!("{key}.baud: must be > 0"));
        }
        if data_bits(self.data_bits).is_none() {
            errors.push(format!("{key}.data-bits: must be 5, 6, 7 or 8"));
        }
        if stop_bits(self.stop_bits).is_none() {
            errors.push(format!("{key}.stop-bits: must be 1 or 2"));
        }
    }

    /// Opens and configures the port.
    pub fn open(&self) -> Result<SerialStream, SourceError> {
        let settings = |reason: &str| SourceError::Settings {
            path: self.path.clone(),
            reason: reason.to_owned(),
        };
        let data_bits = data_bits(self.data_bits).ok_or_else(|| settings("data-bits"))?;
        let stop_bits = stop_bits(self.stop_bits).ok_or_else(|| settings("stop-bits"))?;
        let parity = match self.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        };
        tokio_serial::new(self.path.as_str(), self.baud)
            .data_bits(data_bits)
            .parity(parity)
            .stop_bits(stop_bits)
            .flow_control(FlowControl::None)
            .open_native_async()
            .map_err(|source| SourceError::OpenSerial {
                path: self.path.clone(),
                source,
            })
    }
}

fn data_bits(n: u8) -> Option<DataBits> {
    match n {
        5 => Some(DataBits::Five),
        6 => Some(DataBits::Six),
        7 => Some(DataBits::Seven),
        8 => Some(DataBits::Eight),
        _ => None,
    }
}

fn stop_bits(n: u8) -> Option<StopBits> {
    match n {
        1 => Some(StopBits::One),
        2 => Some(StopBits::Two),
        _ => None,
    }
}

/// A sans-IO decoder of a serial byte stream.
pub(crate) trait ByteCore: Send {
    /// The port was (re)opened: forget state tied to the old connection
    /// (partial input, frame counters, tick anchors).
    fn reset(&mut self);

    /// Takes bytes read at `now_ms` (Unix ms); appends the readings they
    /// complete to `out` and what was wrong with them to `problems`.
    fn feed(&mut self, bytes: &[u8], now_ms: i64, out: &mut Vec<Reading>, problems: &mut Problems);
}

/// A serial port read through a [`ByteCore`].
#[derive(Debug)]
pub(crate) struct SerialDevice<C> {
    port: PortSettings,
    core: C,
    log: BadInputLog,
}

impl<C: ByteCore> SerialDevice<C> {
    /// `core` reading the port `port`; bad input is logged as `what`.
    pub fn new(port: PortSettings, core: C, what: &'static str) -> Self {
        SerialDevice {
            port,
            core,
            log: BadInputLog::new(what),
        }
    }
}

impl<C: ByteCore> Device for SerialDevice<C> {
    type Conn = SerialStream;

    fn describe(&self) -> String {
        self.port.path.clone()
    }

    fn open(&mut self) -> Result<SerialStream, SourceError> {
        let port = self.port.open()?;
        self.core.reset();
        Ok(port)
    }

    async fn run(
        &mut self,
        mut port: SerialStream,
        out: &mut Emitter,
    ) -> Result<Stop, SourceError> {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut readings = Vec::new();
        let mut problems = Problems::default();
        loop {
            let read = tokio::select! {
                _ = out.cancelled() => return Ok(Stop::Cancelled),
                read = port.read(&mut buf) => read,
            };
            let n = match read {
                Ok(0) => {
                    return Err(SourceError::Closed {
                        path: self.port.path.clone(),
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(SourceError::ReadSerial {
                        path: self.port.path.clone(),
                        source,
                    })
                }
            };
            self.core
                .feed(&buf[..n], now_ms(), &mut readings, &mut problems);
            self.log.report(out, &mut problems);
            if let Err(stop) = out.send_all(&mut readings).await {
                return Ok(stop);
            }
        }
    }
}

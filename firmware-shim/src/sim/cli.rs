//! The `outpost-sim` command line and its validation.
//!
//! clap checks the syntax (and exits with code 2 on a usage error);
//! [`Args::validate`] checks the values and their combinations and reports
//! every problem at once, for the binary to print and exit with code 2.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use outpost_proto::frame::{MAX_NAME_LEN, MAX_UNIT_LEN};

use super::{ChannelSpec, Config, Format, Scenario, ScenarioParams};

/// Seed used unless `--seed` is given, so runs are reproducible.
pub const DEFAULT_SEED: u64 = 42;
/// Baud rate for `--port` unless `--baud` is given.
pub const DEFAULT_BAUD: u32 = 115_200;
/// Default number of channels.
pub const DEFAULT_CHANNELS: usize = 3;
/// Most channels (their ids must fit the frames' u16).
pub const MAX_CHANNELS: usize = 1024;
/// Highest `--rate`.
pub const MAX_RATE_HZ: f64 = 100_000.0;

const AFTER_HELP: &str = "\
Every tick reads every channel; timestamps (frame tick_ms) are milliseconds
since the simulator started, on the wall clock.

Like a real UART the simulator never waits for its reader: when nobody reads
the port and its buffer is full, frames are dropped and counted
(dropped_no_reader); the frame counter keeps running, so a reader sees the gap.
A write that times out may leave half a frame on the line (one framing error).

On exit (count or duration reached, SIGINT or SIGTERM) a one-line summary goes
to stderr: ticks, readings, frames, written, garbage events, dropped frames.
Exit status: 0 done, 1 runtime failure, 2 bad arguments (including a --port or
--link path that cannot be used).

Examples:
  outpost-sim --pty --link /tmp/outpost-tty --scenario ramp --ramp-period 30
  outpost-sim --port /dev/ttyUSB0 --baud 115200 --format lines --rate 10
  outpost-sim --pty --rate 2000 --channels 5 --duration 10 --garbage 0.01";

/// outpost-sim: a simulated Outpost sensor device.
///
/// Writes readings of a few simulated sensors to a pseudo-terminal or a
/// serial port, as Outpost serial frames or as text lines, optionally with
/// line noise. Used as the sensor by the demo, the end-to-end tests and the
/// benchmarks.
#[derive(Debug, Clone, Parser)]
#[command(name = "outpost-sim", version, after_help = AFTER_HELP)]
#[command(group(ArgGroup::new("output").required(true).args(["pty", "port"])))]
pub struct Args {
    /// Create a pseudo-terminal pair and write to its master. The slave's
    /// path (/dev/pts/N) is printed as the first line of stdout; a reader
    /// opens that path. Both ends stay open until the simulator exits.
    #[arg(long, help_heading = "Output")]
    pub pty: bool,

    /// With --pty: also create a symlink PATH -> the slave's path (an
    /// existing symlink at PATH is replaced); removed on exit.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "port",
        help_heading = "Output"
    )]
    pub link: Option<PathBuf>,

    /// Write to this existing serial device (e.g. /dev/ttyUSB0) instead of a
    /// pseudo-terminal.
    #[arg(long, value_name = "PATH", help_heading = "Output")]
    pub port: Option<String>,

    /// Baud rate of --port.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BAUD, conflicts_with = "pty", help_heading = "Output")]
    pub baud: u32,

    /// What to write: Outpost frames (hello, descriptors, F32 readings) or
    /// text lines for the agent's serial-lines source.
    #[arg(long, value_enum, default_value_t = Format::Frames, help_heading = "Output")]
    pub format: Format,

    /// Seconds between repeated descriptor frames (frames format), so a
    /// reader that starts late learns the channel names; 0: only at start.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 5.0,
        help_heading = "Output"
    )]
    pub describe_every: f64,

    /// After the last tick, keep the port open this many seconds so a
    /// reader can drain it (SIGINT/SIGTERM cut it short).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 0.0,
        help_heading = "Output"
    )]
    pub linger: f64,

    /// Number of channels [default: 3, or the number of --names].
    #[arg(long, value_name = "N", help_heading = "Channels and timing")]
    pub channels: Option<usize>,

    /// Channel names, comma-separated, each optionally with a unit after a
    /// colon: temperature:degC,door. Names: 1-32 of [A-Za-z0-9_.-], unique;
    /// units at most 16 bytes. Default: temperature (degC), humidity (%),
    /// pressure (hPa), then ch3, ch4, ... (no unit).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        help_heading = "Channels and timing"
    )]
    pub names: Vec<String>,

    /// Sample ticks per second; each tick emits one reading per channel
    /// (e.g. --rate 2000 --channels 5 = 10,000 readings/s).
    #[arg(
        long,
        value_name = "HZ",
        default_value_t = 1.0,
        help_heading = "Channels and timing"
    )]
    pub rate: f64,

    /// Stop after N ticks [default: run until --duration or a signal].
    #[arg(long, value_name = "N", help_heading = "Channels and timing")]
    pub count: Option<u64>,

    /// Stop after SECS seconds [default: run until --count or a signal].
    #[arg(long, value_name = "SECS", help_heading = "Channels and timing")]
    pub duration: Option<f64>,

    /// How the values behave: steady = base value plus small noise on every
    /// channel; ramp = channel 0 follows a triangle wave between --ramp-low
    /// and --ramp-high; spikes = steady plus a spike on channel 0 every
    /// --spike-every; silent = steady, but channel 0 stops reporting after
    /// --silent-after.
    #[arg(long, value_enum, default_value_t = Scenario::Steady, help_heading = "Scenario")]
    pub scenario: Scenario,

    /// Seed of the pseudo-random noise and garbage: the same seed gives the
    /// same values and the same corruption.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SEED, help_heading = "Scenario")]
    pub seed: u64,

    /// Ramp: lowest value of channel 0.
    #[arg(
        long,
        value_name = "VALUE",
        default_value_t = 20.0,
        allow_negative_numbers = true,
        help_heading = "Scenario"
    )]
    pub ramp_low: f64,

    /// Ramp: highest value of channel 0.
    #[arg(
        long,
        value_name = "VALUE",
        default_value_t = 90.0,
        allow_negative_numbers = true,
        help_heading = "Scenario"
    )]
    pub ramp_high: f64,

    /// Ramp: seconds from low to high and back to low.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60.0,
        help_heading = "Scenario"
    )]
    pub ramp_period: f64,

    /// Spikes: value added to channel 0 for one tick.
    #[arg(
        long,
        value_name = "VALUE",
        default_value_t = 50.0,
        allow_negative_numbers = true,
        help_heading = "Scenario"
    )]
    pub spike_height: f64,

    /// Spikes: seconds between spikes.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10.0,
        help_heading = "Scenario"
    )]
    pub spike_every: f64,

    /// Silent: seconds after which channel 0 stops reporting.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10.0,
        help_heading = "Scenario"
    )]
    pub silent_after: f64,

    /// Probability (0.0-1.0) per frame or line of a corruption event: half
    /// insert a burst of 1-40 random bytes before it, half flip one random
    /// bit inside it (a CRC or framing error for the reader).
    #[arg(
        long,
        value_name = "RATE",
        default_value_t = 0.0,
        help_heading = "Faults"
    )]
    pub garbage: f64,

    /// Log every sample to stderr.
    #[arg(long, short)]
    pub verbose: bool,
}

/// Where the bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputChoice {
    /// A new pseudo-terminal pair, with an optional symlink to the slave.
    Pty {
        /// Symlink to create.
        link: Option<PathBuf>,
    },
    /// An existing serial device.
    Port {
        /// Device path.
        path: String,
        /// Baud rate.
        baud: u32,
    },
}

/// Everything the binary needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Where to write.
    pub output: OutputChoice,
    /// What to simulate.
    pub config: Config,
    /// How long to keep the port open after the last tick.
    pub linger: Duration,
    /// Log every sample to stderr.
    pub verbose: bool,
}

/// Every problem found in the arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n       "))]
pub struct ArgsError(pub Vec<String>);

impl Args {
    /// Checks the values and their combinations; reports every problem.
    pub fn validate(&self) -> Result<Settings, ArgsError> {
        let mut problems = Vec::new();
        let mut secs = |flag: &str, value: f64, allow_zero: bool| -> Duration {
            match Duration::try_from_secs_f64(value) {
                Ok(d) if allow_zero || !d.is_zero() => d,
                _ => {
                    let what = if allow_zero {
                        "a number of seconds >= 0"
                    } else {
                        "a number of seconds > 0"
                    };
                    problems.push(format!("--{flag} {value}: must be {what}"));
                    Duration::ZERO
                }
            }
        };
        let describe_every = secs("describe-every", self.describe_every, true);
        let linger = secs("linger", self.linger, true);
        let ramp_period = secs("ramp-period", self.ramp_period, false);
        let spike_every = secs("spike-every", self.spike_every, false);
        let silent_after = secs("silent-after", self.silent_after, true);
        let duration = self.duration.map(|d| secs("duration", d, false));

        let channels = self.channel_specs(&mut problems);
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= MAX_RATE_HZ) {
            problems.push(format!(
                "--rate {}: must be > 0 and at most {MAX_RATE_HZ}",
                self.rate
            ));
        }
        if !(0.0..=1.0).contains(&self.garbage) {
            problems.push(format!(
                "--garbage {}: must be between 0.0 and 1.0",
                self.garbage
            ));
        }
        for (flag, v) in [
            ("ramp-low", self.ramp_low),
            ("ramp-high", self.ramp_high),
            ("spike-height", self.spike_height),
        ] {
            if !v.is_finite() {
                problems.push(format!("--{flag} {v}: must be a finite number"));
            }
        }
        if self.ramp_low >= self.ramp_high {
            problems.push(format!(
                "--ramp-low {} must be below --ramp-high {}",
                self.ramp_low, self.ramp_high
            ));
        }
        if self.baud == 0 {
            problems.push("--baud 0: must be a positive baud rate".to_owned());
        }
        if !problems.is_empty() {
            return Err(ArgsError(problems));
        }

        let output = match &self.port {
            Some(path) => OutputChoice::Port {
                path: path.clone(),
                baud: self.baud,
            },
            None => OutputChoice::Pty {
                link: self.link.clone(),
            },
        };
        let params = ScenarioParams {
            scenario: self.scenario,
            ramp_low: self.ramp_low,
            ramp_high: self.ramp_high,
            ramp_period_ms: millis(ramp_period).max(1),
            spike_height: self.spike_height,
            spike_every_ms: millis(spike_every).max(1),
            silent_after_ms: millis(silent_after),
        };
        let config = Config {
            channels,
            format: self.format,
            params,
            seed: self.seed,
            garbage_rate: self.garbage,
            describe_every_ms: millis(describe_every),
            rate_hz: self.rate,
            count: self.count,
            duration,
        };
        Ok(Settings {
            output,
            config,
            linger,
            verbose: self.verbose,
        })
    }

    fn channel_specs(&self, problems: &mut Vec<String>) -> Vec<ChannelSpec> {
        let n = match (self.channels, self.names.len()) {
            (Some(n), 0) => n,
            (None, 0) => DEFAULT_CHANNELS,
            (None, names) => names,
            (Some(n), names) => {
                if n != names {
                    problems.push(format!("--channels {n} but --names lists {names} names"));
                }
                names
            }
        };
        if n == 0 || n > MAX_CHANNELS {
            problems.push(format!("--channels {n}: must be 1 to {MAX_CHANNELS}"));
        }
        if self.names.is_empty() {
            return (0..n.min(MAX_CHANNELS))
                .map(ChannelSpec::default_for)
                .collect();
        }
        let mut specs: Vec<ChannelSpec> = Vec::with_capacity(self.names.len());
        for (i, entry) in self.names.iter().enumerate() {
            let (name, unit) = entry.split_once(':').unwrap_or((entry.as_str(), ""));
            let name_ok = (1..=MAX_NAME_LEN).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !name_ok {
                problems.push(format!(
                    "--names: `{name}`: a name must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . -"
                ));
            }
            if unit.len() > MAX_UNIT_LEN
                || unit.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                problems.push(format!(
                    "--names: unit `{unit}` of `{name}`: at most {MAX_UNIT_LEN} bytes, no spaces"
                ));
            }
            if specs.iter().any(|s| s.name == name) {
                problems.push(format!("--names: `{name}` appears twice"));
            }
            specs.push(ChannelSpec::named(i, name, unit));
        }
        specs
    }
}

/// Whole milliseconds of `d`, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("outpost-sim").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let s = parse(&["--pty"]).unwrap().validate().unwrap();
        assert_eq!(s.output, OutputChoice::Pty { link: None });
        assert_eq!(s.config, Config::default());
        assert_eq!(s.linger, Duration::ZERO);
    }

    #[test]
    fn exactly_one_of_pty_and_port() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--pty", "--port", "/dev/ttyS0"]).is_err());
        assert!(
            parse(&["--port", "/dev/ttyS0", "--link", "/tmp/x"]).is_err(),
            "--link needs --pty"
        );
        assert!(
            parse(&["--pty", "--baud", "9600"]).is_err(),
            "--baud needs --port"
        );
        let s = parse(&["--port", "/dev/ttyS0", "--baud", "9600"])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(
            s.output,
            OutputChoice::Port {
                path: "/dev/ttyS0".into(),
                baud: 9600
            }
        );
    }

    #[test]
    fn names_and_channels() {
        let s = parse(&["--pty", "--names", "temp:degC,door"])
            .unwrap()
            .validate()
            .unwrap();
        let names: Vec<(&str, &str)> = s
            .config
            .channels
            .iter()
            .map(|c| (c.name.as_str(), c.unit.as_str()))
            .collect();
        assert_eq!(names, [("temp", "degC"), ("door", "")]);
        let s = parse(&["--pty", "--channels", "5"])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(s.config.channels[4].name, "ch4");
        let e = parse(&["--pty", "--channels", "3", "--names", "a,b"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
    }

    #[test]
    fn every_problem_is_reported() {
        let args = parse(&[
            "--pty",
            "--rate",
            "0",
            "--garbage",
            "1.5",
            "--names",
            "bad name,x:way-too-long-unit-string,x",
            "--ramp-low",
            "90",
            "--ramp-high",
            "20",
            "--duration=-1",
        ])
        .unwrap();
        let e = args.validate().unwrap_err();
        assert_eq!(e.0.len(), 7, "{e}");
    }

    #[test]
    fn seconds_become_milliseconds() {
        let s = parse(&[
            "--pty",
            "--scenario",
            "ramp",
            "--ramp-period",
            "0.5",
            "--describe-every",
            "0",
            "--duration",
            "2",
        ])
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(s.config.params.scenario, Scenario::Ramp);
        assert_eq!(s.config.params.ramp_period_ms, 500);
        assert_eq!(s.config.describe_every_ms, 0);
        assert_eq!(s.config.duration, Some(Duration::from_secs(2)));
    }
}

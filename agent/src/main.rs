//! Command line of `outpost-agent`. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use outpost_agent::config::Config;
use outpost_agent::monitor::{self, MonitorOptions};
use tokio_util::sync::CancellationToken;

/// Outpost field-gateway agent: reads sensors over serial and GPIO, buffers
/// every reading in SQLite and publishes them to the aggregator over MQTT.
#[derive(Debug, Parser)]
#[command(name = "outpost-agent", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML); see deploy/agent.toml.
    #[arg(
        long,
        short,
        default_value = "/etc/outpost/agent.toml",
        env = "OUTPOST_AGENT_CONFIG"
    )]
    config: PathBuf,
    /// Only parse and validate this configuration file, report every problem, and exit
    /// (0 valid, 2 invalid).
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines (journald adds its own timestamps).
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Decode and print the frames a sensor sends on a serial port (wiring check).
    Monitor {
        /// Serial port path; prefer the stable /dev/serial/by-id/... names.
        port: String,
        /// Line speed in baud.
        #[arg(long, default_value_t = 115_200)]
        baud: u32,
        /// Stop after this many frames.
        #[arg(long)]
        count: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Monitor { port, baud, count }) = cli.command {
        let opts = MonitorOptions {
            port,
            baud,
            max_frames: count,
        };
        return match monitor::run(&opts, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("outpost-agent: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(path) = cli.check_config {
        return match Config::load(&path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        };
    }
    outpost_agent::process::init_logging(matches!(cli.log_format, LogFormat::Json), "info");
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        outpost_agent::process::cancel_on_signals(cancel.clone());
        outpost_agent::run(config, cancel, None).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

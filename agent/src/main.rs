//! Command line of `outpost-agent`. Everything else lives in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outpost_agent::monitor::{self, MonitorOptions};

/// Outpost field-gateway agent: reads sensors over serial and GPIO, buffers
/// every reading in SQLite and publishes them to the aggregator over MQTT.
#[derive(Debug, Parser)]
#[command(name = "outpost-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    match cli.command {
        Command::Monitor { port, baud, count } => {
            let opts = MonitorOptions {
                port,
                baud,
                max_frames: count,
            };
            match monitor::run(&opts, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("outpost-agent: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

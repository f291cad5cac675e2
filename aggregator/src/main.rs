//! Command line of `outpost-aggregator`. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Outpost aggregator: embedded MQTT broker, ingest with dedup and acks,
/// complex-event-processing rules and alert delivery.
#[derive(Debug, Parser)]
#[command(name = "outpost-aggregator", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let _cli = Cli::parse();
    eprintln!("outpost-aggregator: ingest, rules and alert delivery are not built yet; see the open issues");
    ExitCode::from(1)
}

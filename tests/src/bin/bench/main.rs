//! `outpost-bench`: reproducible figures for Outpost against its targets
//! (docs/benchmarks.md). Benchmarks report; they never fail on speed.
//!
//! ```text
//! cargo run --release -p outpost-tests --bin outpost-bench -- <scenario> [options]
//! ```
//!
//! Scenarios (see `--help` of each):
//! * `ingest`  aggregator ingest + rules: highest sustained readings/s with
//!   zero loss, CPU and RSS (embedded broker, or `--mosquitto`);
//! * `latency` reading timestamp -> rule evaluation and -> webhook, p50/p95/p99;
//! * `agent`   sim -> pty -> agent -> broker -> acks: highest sustained rate,
//!   RSS/CPU at 1,000 readings/s, disk bytes and fsyncs per reading;
//! * `drain`   an hour of backlog (3.6 M readings) in the agent's buffer:
//!   time until it is empty once the broker is up;
//! * `wire`    bytes per reading for batches of 1/10/100/500 against JSON and
//!   InfluxDB line protocol;
//! * `size`    release binary sizes and start-up time to the first publish.
//!
//! The machine is shared and noisy: every figure is the median of several
//! runs with its spread, and comparisons are ratios inside one run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent;
mod ingest;
mod size;
mod stats;
mod wire;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "outpost-bench",
    about = "Outpost benchmarks (docs/benchmarks.md)"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Aggregator ingest + rules: highest sustained readings/s with zero loss.
    Ingest(ingest::IngestArgs),
    /// Reading timestamp -> rule evaluation / webhook latency.
    Latency(ingest::LatencyArgs),
    /// sim -> pty -> agent -> broker -> acks.
    Agent(agent::AgentArgs),
    /// Backlog drain of the agent's buffer.
    Drain(agent::DrainArgs),
    /// Bytes per reading on the wire.
    Wire(wire::WireArgs),
    /// Binary sizes and start-up time.
    Size(size::SizeArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    stats::print_machine();
    match cli.scenario {
        Scenario::Ingest(a) => ingest::run_ingest(a),
        Scenario::Latency(a) => ingest::run_latency(a),
        Scenario::Agent(a) => agent::run_agent(a),
        Scenario::Drain(a) => agent::run_drain(a),
        Scenario::Wire(a) => wire::run(a),
        Scenario::Size(a) => size::run(a),
    }
}

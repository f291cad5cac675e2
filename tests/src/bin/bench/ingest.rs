//! Scenarios `ingest` and `latency` (being written).

/// `ingest` options.
#[derive(Debug, clap::Args)]
pub struct IngestArgs {}

/// `latency` options.
#[derive(Debug, clap::Args)]
pub struct LatencyArgs {}

pub fn run_ingest(_a: IngestArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}

pub fn run_latency(_a: LatencyArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}

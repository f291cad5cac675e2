//! Scenarios `agent` and `drain` (being written).

/// `agent` options.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {}

/// `drain` options.
#[derive(Debug, clap::Args)]
pub struct DrainArgs {}

pub fn run_agent(_a: AgentArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}

pub fn run_drain(_a: DrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}

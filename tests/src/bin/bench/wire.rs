//! Scenario `wire` (being written).

/// `wire` options.
#[derive(Debug, clap::Args)]
pub struct WireArgs {}

pub fn run(_a: WireArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}

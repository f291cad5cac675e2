//! Scenario `size` (being written).

/// `size` options.
#[derive(Debug, clap::Args)]
pub struct SizeArgs {}

pub fn run(_a: SizeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}

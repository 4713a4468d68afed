//! `tessera launch` (owned by the parallel-runtime work).

#[derive(clap::Args, Debug)]
pub struct LaunchArgs {}

pub fn run(_a: LaunchArgs) -> anyhow::Result<()> {
    anyhow::bail!("tessera launch is not built yet")
}

//! `tessera data` (owned by the training work).

#[derive(clap::Args, Debug)]
pub struct DataArgs {}

pub fn run(_a: DataArgs) -> anyhow::Result<()> {
    anyhow::bail!("tessera data is not built yet")
}

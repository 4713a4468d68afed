//! `tessera export` (owned by the training work).

#[derive(clap::Args, Debug)]
pub struct ExportArgs {}

pub fn run(_a: ExportArgs) -> anyhow::Result<()> {
    anyhow::bail!("tessera export is not built yet")
}

//! `tessera bench comm` (owned by the parallel-runtime work).

#[derive(clap::Args, Debug)]
pub struct CommArgs {}

pub fn run(_a: CommArgs) -> anyhow::Result<()> {
    anyhow::bail!("tessera bench comm is not built yet")
}

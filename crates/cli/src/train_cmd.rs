//! `tessera train` (owned by the training work).

#[derive(clap::Args, Debug)]
pub struct TrainArgs {}

pub fn run(_a: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("tessera train is not built yet")
}

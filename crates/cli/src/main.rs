//! `tessera`: split large language models across devices to serve and train them.

mod bench;
mod data_cmd;
mod export_cmd;
mod generate_cmd;
mod launch_cmd;
mod model_args;
mod plan_cmd;
mod score_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Split large language models across devices"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Per-token log-probabilities of a text or token sequence.
    Score(score_cmd::ScoreArgs),
    /// Continue a prompt (greedy, or sampled with temperature / top-p).
    Generate(generate_cmd::GenerateArgs),
    /// Memory, communication and time for a parallel layout, and the best layouts for a job.
    Plan(plan_cmd::PlanArgs),
    /// Train a model (ZeRO 0-3 over data-parallel ranks) from a DeepSpeed-style JSON config.
    Train(train_cmd::TrainArgs),
    /// Prepare training data: `tessera data prepare` tokenizes text into binary token shards.
    Data(data_cmd::DataArgs),
    /// Export a training checkpoint as an HF model directory (safetensors + config.json).
    Export(export_cmd::ExportArgs),
    /// Start and supervise the ranks of a multi-process job: `tessera launch --nproc-per-node N -- tessera ...`.
    Launch(launch_cmd::LaunchArgs),
    /// Benchmarks against measured ceilings.
    Bench(bench::BenchArgs),
}

fn main() {
    // While this process has one thread: NCCL reads its settings from the environment, and
    // setting a variable while another thread reads one is a data race in libc.
    #[cfg(feature = "cuda")]
    tessera_tensor::cuda::nccl::connect_at_init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line, as for every other user mistake; `--help` has the rest.
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments").trim();
            eprintln!("{first} (see --help)");
            std::process::exit(2);
        }
    };
    let result = match cli.cmd {
        Cmd::Score(a) => score_cmd::run(a),
        Cmd::Generate(a) => generate_cmd::run(a),
        Cmd::Plan(a) => plan_cmd::run(a),
        Cmd::Train(a) => train_cmd::run(a),
        Cmd::Data(a) => data_cmd::run(a),
        Cmd::Export(a) => export_cmd::run(a),
        Cmd::Launch(a) => launch_cmd::run(a),
        Cmd::Bench(a) => bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

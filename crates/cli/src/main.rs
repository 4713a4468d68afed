//! `tessera`: split large language models across devices to serve and train them.

/// `println!` that ends the process with a one-line error (exit 1) where standard output cannot
/// be written (a full disk, `> /dev/full`), instead of `println!`'s panic. Every command prints
/// through it.
macro_rules! outln {
    () => {
        $crate::write_stdout(format_args!("\n"))
    };
    ($($t:tt)*) => {
        $crate::write_stdout(format_args!("{}\n", format_args!($($t)*)))
    };
}

/// `print!` likewise.
macro_rules! out {
    ($($t:tt)*) => {
        $crate::write_stdout(format_args!($($t)*))
    };
}

/// `eprintln!` that does not panic where standard error cannot be written (its reader gone: a
/// launcher killed, `2>&1 | head`): progress and messages are dropped, the work goes on.
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// `eprint!` likewise.
macro_rules! err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut e = std::io::stderr();
        let _ = write!(e, $($t)*).and_then(|_| e.flush());
    }};
}

mod bench;
mod data_cmd;
mod export_cmd;
mod generate_cmd;
mod launch_cmd;
mod model_args;
mod out_paths;
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
    // SIGPIPE stays ignored (Rust's default): a write to a closed pipe or socket is an error to
    // handle, not death. Output into a closed pipe (`tessera plan ... | head -1`) ends the process
    // quietly (`write_stdout`), a rank whose peer died says so instead of being killed mid-abort
    // by its write to the dead peer's socket, and a launcher whose stderr reader is gone goes on
    // supervising its ranks. Children started by `tessera launch` get the default back (std
    // resets it before exec).
    // While this process has one thread: NCCL reads its settings from the environment, and
    // setting a variable while another thread reads one is a data race in libc.
    #[cfg(feature = "cuda")]
    tessera_tensor::cuda::nccl::connect_at_init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(e.kind(), DisplayHelp | DisplayVersion) {
                // Asked for, on standard output: a failed write is said, as for any output.
                let printed = e
                    .print()
                    .and_then(|_| std::io::Write::flush(&mut std::io::stdout()));
                if let Err(err) = printed {
                    stdout_failed(&err);
                }
                std::process::exit(0);
            }
            if e.kind() == DisplayHelpOnMissingArgumentOrSubcommand {
                e.exit();
            }
            // One line, as for every other user mistake; `--help` has the rest.
            errln!("{} (see --help)", clap_one_line(&e.to_string()));
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
        errln!("error: {e:#}");
        // A launched job's failure: the failed rank's status (at least 1).
        let status = e
            .downcast_ref::<launch_cmd::JobFailed>()
            .map_or(1, |f| f.status.max(1));
        std::process::exit(status);
    }
    // What is still buffered (a last `out!` without a newline) is written now, and its error
    // said, not dropped at exit.
    if let Err(e) = std::io::Write::flush(&mut std::io::stdout()) {
        stdout_failed(&e);
    }
}

/// Writes to standard output; an error there ends the process (see `outln!`).
pub(crate) fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        stdout_failed(&e);
    }
}

/// One line and exit 1: what was asked for cannot be handed over. Where the reader has gone (a
/// closed pipe), quietly, with the status a shell reports for a process SIGPIPE ended (141), as
/// other command-line tools end.
fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(128 + 13);
    }
    errln!("error: cannot write to standard output: {e}");
    std::process::exit(1);
}

/// clap's message as one line: its first line and, where that line ends with a colon (the
/// arguments missing, the values possible), the indented lines under it.
fn clap_one_line(msg: &str) -> String {
    let mut lines = msg.lines();
    let mut out = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim()
        .to_string();
    if out.ends_with(':') {
        let items: Vec<&str> = lines
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect();
        if !items.is_empty() {
            out = format!("{} {}", out, items.join(", "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::clap_one_line;

    #[test]
    fn clap_errors_name_what_is_missing_on_one_line() {
        let msg = "error: the following required arguments were not provided:\n  --model <MODEL>\n  --out <OUT>\n\nUsage: tessera export --model <MODEL> --out <OUT>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            clap_one_line(msg),
            "error: the following required arguments were not provided: --model <MODEL>, --out <OUT>"
        );
        let msg = "error: invalid value 'x' for '--tp <TP>': invalid digit found in string\n\nFor more information, try '--help'.\n";
        assert_eq!(
            clap_one_line(msg),
            "error: invalid value 'x' for '--tp <TP>': invalid digit found in string"
        );
        assert_eq!(clap_one_line(""), "invalid arguments");
    }
}

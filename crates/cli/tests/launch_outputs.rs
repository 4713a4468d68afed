//! `tessera score` and `tessera generate` print the same bytes under `tessera launch` (one process
//! per rank, TCP) as in one process (one thread per rank), and only rank 0 prints.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hf")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn tessera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("TESSERA_COMM_TIMEOUT_S", "60")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `args` (a tessera subcommand with `--tp tp`) in-process and launched, and checks both
/// print the same thing.
fn same_under_launch(tp: usize, args: &[&str]) -> String {
    let tp_s = tp.to_string();
    let mut inproc: Vec<&str> = args.to_vec();
    inproc.extend(["--tp", &tp_s]);
    let (code, want, err) = tessera(&inproc);
    assert_eq!(code, 0, "in-process {inproc:?}: {err}");
    let mut launched = vec!["launch", "--nproc-per-node", &tp_s, "--", "tessera"];
    launched.extend(&inproc);
    let (code, got, err) = tessera(&launched);
    assert_eq!(code, 0, "launched {launched:?}: {err}");
    assert_eq!(got, want, "{args:?} at tp {tp}");
    assert!(!want.is_empty());
    want
}

#[test]
fn score_is_identical_under_launch() {
    let llama = fixture("llama");
    // 4 ranks: the ring reduces in an order that differs per segment; the bits still agree.
    same_under_launch(
        4,
        &[
            "score",
            "--model",
            &llama,
            "--tokens",
            "185,26,44,307,303,21,291,87,317",
            "--json",
        ],
    );
    let mistral = fixture("mistral");
    same_under_launch(
        2,
        &[
            "score",
            "--model",
            &mistral,
            "--text",
            "The quick brown fox",
            "--dtype",
            "bf16",
        ],
    );
}

#[test]
fn generate_is_identical_under_launch() {
    let qwen = fixture("qwen2");
    same_under_launch(
        2,
        &[
            "generate",
            "--model",
            &qwen,
            "--prompt",
            "Hello there",
            "--max-tokens",
            "12",
            "--json",
        ],
    );
    let llama = fixture("llama");
    same_under_launch(
        2,
        &[
            "generate",
            "--model",
            &llama,
            "--prompt-tokens",
            "1,5,9",
            "--max-tokens",
            "10",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "7",
            "--ignore-eos",
        ],
    );
    // Penalties with a top-k: each rank's candidates and the penalised tokens' logits it holds,
    // gathered over TCP between launched ranks, over threads in-process.
    let penalised = [
        "generate",
        "--model",
        &llama,
        "--prompt-tokens",
        "1,5,9,5,77,5",
        "--max-tokens",
        "16",
        "--temperature",
        "1.1",
        "--top-k",
        "30",
        "--top-p",
        "0.95",
        "--repetition-penalty",
        "1.3",
        "--presence-penalty",
        "0.5",
        "--frequency-penalty",
        "0.2",
        "--seed",
        "11",
        "--ignore-eos",
        "--json",
    ];
    same_under_launch(2, &penalised);
}

#[test]
fn a_tp_that_does_not_match_the_ranks_is_one_clear_error() {
    let llama = fixture("llama");
    let (code, _, err) = tessera(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        "tessera",
        "score",
        "--model",
        &llama,
        "--tokens",
        "1,2,3",
        "--tp",
        "4",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("rank 0 of a 2-process job but tp is 4"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `bench decode` under `tessera launch` times the tp group of the job's processes and prints
/// its report once (rank 0); a --tp list with another size is refused before anything prints.
#[test]
fn bench_decode_under_launch_prints_once() {
    let shape = [
        "--steps",
        "2",
        "--layers",
        "1",
        "--hidden",
        "128",
        "--intermediate",
        "256",
        "--vocab",
        "500",
        "--heads",
        "4",
        "--kv-heads",
        "2",
    ];
    let mut args = vec![
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        "tessera",
        "bench",
        "decode",
        "--tp",
        "2",
    ];
    args.extend(shape);
    let (code, out, err) = tessera(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("model:").count(), 1, "{out}");
    assert_eq!(out.matches("ceiling:").count(), 1, "{out}");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("2 "))
        .collect();
    assert_eq!(rows.len(), 1, "{out}");
    args[8] = "1,2";
    let (code, out, err) = tessera(&args);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("2-process job but --tp lists 1"), "{err}");
}

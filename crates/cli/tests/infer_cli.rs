//! The `tessera` binary end to end: score and generate print what HF computes, and every bad input
//! ends with one clear line on stderr and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn tessera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A command that succeeds and prints one JSON document: that document.
fn tessera_json(args: &[&str]) -> serde_json::Value {
    tessera_json_err(args).0
}

/// As [`tessera_json`], with what the command wrote on stderr.
fn tessera_json_err(args: &[&str]) -> (serde_json::Value, String) {
    let (code, out, err) = tessera(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    (serde_json::from_str(out.trim()).unwrap(), err)
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hf")
        .join(name)
}

fn reference(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap())
        .unwrap()
}

fn join(v: &serde_json::Value) -> String {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A failing command: non-zero exit, one line on stderr, naming `needle`.
fn fails_with(args: &[&str], needle: &str) {
    let (code, _, err) = tessera(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(
        err.contains(needle),
        "{args:?}: {err:?} does not name {needle:?}"
    );
}

#[test]
fn score_json_matches_hf_at_tp_2() {
    let r = reference("qwen2");
    let case = &r["score"][1];
    let dir = fixture("qwen2");
    let v = tessera_json(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &join(&case["tokens"]),
        "--tp",
        "2",
        "--json",
    ]);
    let got = v["token_logprobs"].as_array().unwrap();
    let want = case["token_logprobs"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-4);
    }
    let sum: f64 = want.iter().map(|w| w.as_f64().unwrap()).sum();
    assert!((v["sum_logprob"].as_f64().unwrap() - sum).abs() < 1e-3);
}

#[test]
fn generate_json_matches_hf_greedy_and_text_prompts_work() {
    let r = reference("mistral");
    let case = &r["greedy"][0];
    let dir = fixture("mistral");
    let v = tessera_json(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-tokens",
        &join(&case["prompt_tokens"]),
        "--max-tokens",
        "12",
        "--tp",
        "4",
        "--json",
    ]);
    assert_eq!(v["tokens"], case["tokens"]);
    assert!(v["text"].is_string());
    // A model directory without a tokenizer: the same tokens, and no text (null, not "").
    let bare = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join(f), bare.path().join(f)).unwrap();
    }
    let v = tessera_json(&[
        "generate",
        "--model",
        bare.path().to_str().unwrap(),
        "--prompt-tokens",
        &join(&case["prompt_tokens"]),
        "--max-tokens",
        "12",
        "--json",
    ]);
    assert_eq!(v["tokens"], case["tokens"]);
    assert!(v["text"].is_null(), "{v}");
    // The built-in model, sampled, is reproducible from its seed.
    let args = [
        "generate",
        "--prompt",
        "To be",
        "--max-tokens",
        "8",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "5",
        "--json",
    ];
    let (c1, o1, _) = tessera(&args);
    let (c2, o2, _) = tessera(&args);
    assert_eq!((c1, c2), (0, 0));
    assert_eq!(o1, o2);
}

fn copy_model(from: &Path, to: &Path) {
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
    }
}

#[test]
fn bad_input_is_one_line_and_non_zero() {
    let llama = fixture("llama");
    let m = llama.to_str().unwrap();
    fails_with(
        &["score", "--model", m, "--tokens", "1,2", "--tp", "3"],
        "tp 3 does not divide num_attention_heads 8",
    );
    fails_with(
        &["score", "--model", m, "--tokens", "1,2", "--tp", "0"],
        "tp must be at least 1",
    );
    fails_with(&["score", "--bogus"], "--bogus");
    fails_with(
        &["score", "--model", m, "--tokens", "1,x"],
        "\"x\" is not a token id",
    );
    // An empty entry is a typo, not a separator to skip.
    fails_with(
        &["generate", "--model", m, "--prompt-tokens", "1,,2"],
        "--prompt-tokens: an empty entry between commas",
    );
    fails_with(
        &["score", "--model", m, "--tokens", "1,5000"],
        "token id 5000 is outside the vocabulary of 320",
    );
    fails_with(
        &["score", "--model", m, "--tokens", "1", "--dtype", "f8"],
        "unknown dtype \"f8\"",
    );
    fails_with(
        &["score", "--model", "/no/such/dir", "--tokens", "1"],
        "does not exist",
    );
    fails_with(
        &["generate", "--model", m, "--prompt", "hi", "--top-p", "0"],
        "--top-p must be in (0, 1]",
    );
    // Past the model's context (and sizes that would overflow): refused before any allocation.
    for n in ["1000", "18446744073709551615"] {
        fails_with(
            &[
                "generate",
                "--model",
                m,
                "--prompt-tokens",
                "1,2",
                "--max-tokens",
                n,
            ],
            "exceed the model's context of 256 positions",
        );
    }
    // Benchmark sizes that measure nothing or cannot be allocated, before anything is printed.
    for (args, needle) in [
        (
            vec!["bench", "matmul", "--sizes", "0"],
            "--sizes and --gemv take 1 to 32768",
        ),
        (
            vec!["bench", "matmul", "--sizes", "100000000"],
            "--sizes and --gemv take 1 to 32768",
        ),
        (
            vec!["bench", "decode", "--steps", "0"],
            "--steps and --batch",
        ),
        (
            vec![
                "bench",
                "decode",
                "--hidden",
                "500000",
                "--intermediate",
                "500000",
            ],
            "more than this host's",
        ),
        (
            vec![
                "bench",
                "decode",
                "--preset",
                "llama-3-8b",
                "--hidden",
                "512",
            ],
            "cannot be used with '--hidden <HIDDEN>'",
        ),
        (
            vec![
                "launch",
                "--nproc-per-node",
                "1",
                "--job-token",
                "",
                "--",
                "true",
            ],
            "must not be empty",
        ),
    ] {
        fails_with(&args, needle);
    }
    // A missing argument is named.
    fails_with(&["export", "--out", "x"], "--checkpoint <CHECKPOINT>");
    fails_with(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "hi",
            "--temperature",
            "-1",
        ],
        "--temperature",
    );
    fails_with(
        &[
            "generate", "--model", m, "--prompt", "hi", "--device", "cuda:0",
        ],
        "cuda:0",
    );
    fails_with(
        &["bench", "comm", "--backend", "gloo"],
        "--backend must be local, tcp or nccl",
    );
    fails_with(
        &["bench", "comm", "--fresh-comm", "--sizes", "4K"],
        "--fresh-comm needs --backend nccl",
    );
    if !cfg!(feature = "cuda") {
        fails_with(
            &["bench", "comm", "--backend", "nccl"],
            "--backend nccl needs a build with the cuda feature",
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    copy_model(&llama, dir.path());
    // Truncated weights.
    let w = std::fs::read(llama.join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    fails_with(&["score", "--model", d, "--tokens", "1,2"], "truncated");
    // Missing weights.
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    fails_with(
        &["score", "--model", d, "--tokens", "1,2"],
        "neither model.safetensors",
    );
    std::fs::write(dir.path().join("model.safetensors"), &w).unwrap();
    // A config whose shapes disagree with the weights.
    let cfg = std::fs::read_to_string(llama.join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"intermediate_size\": 160", "\"intermediate_size\": 128"),
    )
    .unwrap();
    fails_with(
        &["score", "--model", d, "--tokens", "1,2"],
        "the config implies [128, 64]",
    );
    // Unknown architecture (model_type decides, as in transformers' Auto classes).
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("LlamaForCausalLM", "GPTNeoXForCausalLM")
            .replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\""),
    )
    .unwrap();
    fails_with(
        &["score", "--model", d, "--tokens", "1,2"],
        "unsupported model_type \"gpt_neox\"",
    );
    // An activation other than the SiLU every supported architecture computes.
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\""),
    )
    .unwrap();
    fails_with(&["score", "--model", d, "--tokens", "1,2"], "hidden_act");
    // Missing config.
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    fails_with(&["score", "--model", d, "--tokens", "1,2"], "config.json");
    // A tensor of the wrong name: rename one in the safetensors header (same length).
    std::fs::write(dir.path().join("config.json"), &cfg).unwrap();
    let mut renamed = w.clone();
    let pat = b"model.norm.weight";
    let at = renamed.windows(pat.len()).position(|x| x == pat).unwrap();
    renamed[at..at + pat.len()].copy_from_slice(b"model.norx.weight");
    std::fs::write(dir.path().join("model.safetensors"), &renamed).unwrap();
    fails_with(
        &["score", "--model", d, "--tokens", "1,2"],
        "tensor model.norm.weight is missing",
    );
    // Text without a tokenizer.
    std::fs::write(dir.path().join("model.safetensors"), &w).unwrap();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    fails_with(
        &["score", "--model", d, "--text", "hello"],
        "no tokenizer.json",
    );
    // The GEMV benchmark measures CUDA kernels only, at a tp that divides its shapes.
    fails_with(&["bench", "gemv", "--device", "cpu"], "--device cuda");
    fails_with(&["bench", "gemv", "--tp", "3"], "--tp 3");
    fails_with(&["bench", "gemv", "--tp", "0"], "--tp must be at least 1");
    #[cfg(not(feature = "cuda"))]
    fails_with(&["bench", "gemv"], "without CUDA");
    // The prefill attention benchmark: prompts of 1 to 131,072 tokens.
    fails_with(
        &["bench", "attention", "--prefill", "2048,0"],
        "--prefill take sizes of at least 1",
    );
    fails_with(
        &["bench", "attention", "--prefill", "1000000"],
        "at most 131072 tokens",
    );
    // Head dims of 8 to 256 in steps of 8, splitting --hidden into whole groups of KV heads.
    fails_with(
        &["bench", "attention", "--head-dim", "12", "--prefill", "64"],
        "--head-dim takes a multiple of 8 from 8 to 256, not 12",
    );
    fails_with(
        &[
            "bench",
            "attention",
            "--head-dim",
            "64",
            "--kv-heads",
            "7",
            "--prefill",
            "64",
        ],
        "does not split into whole query heads a rank",
    );
    #[cfg(not(feature = "cuda"))]
    fails_with(&["bench", "attention", "--prefill", "2048"], "without CUDA");
    // The persistent-step probe: one GPU, or two at tp 2; sizes of at least 1.
    fails_with(
        &["bench", "persistent", "--gpus", "2"],
        "--gpus is 1, or 2 with --tp 2",
    );
    fails_with(
        &["bench", "persistent", "--gpus", "3", "--tp", "2"],
        "--gpus is 1",
    );
    fails_with(
        &["bench", "persistent", "--layers", "0"],
        "--layers takes 1 to 65,536",
    );
    fails_with(
        &["bench", "persistent", "--layers", "1000000000000"],
        "--layers takes 1 to 65,536",
    );
    fails_with(
        &["bench", "persistent", "--hidden", "1099511627776"],
        "at most 16,384",
    );
    #[cfg(not(feature = "cuda"))]
    fails_with(&["bench", "persistent"], "without CUDA");
    // One rank's share of a tp group: a tp that does not divide the heads is refused.
    fails_with(
        &["bench", "decode", "--one-rank-of", "3", "--steps", "1"],
        "tp 3 does not divide num_attention_heads 16",
    );
    // The held exchange stands in for NVLink on one GPU: only with --one-rank-of on cuda.
    fails_with(
        &["bench", "decode", "--hold-us", "5", "--steps", "1"],
        "--hold-us needs --one-rank-of and --device cuda",
    );
    fails_with(
        &["bench", "decode", "--one-rank-of", "2", "--hold-us", "5"],
        "--hold-us needs --one-rank-of and --device cuda",
    );
}

/// Sizes far past what a machine holds (a config's, a flag's) and weights that compute NaN: one
/// line and a non-zero exit, never an overflow panic, an aborted allocation or `null` scores.
#[test]
fn absurd_sizes_and_broken_weights_are_refused_in_one_line() {
    for (args, needle) in [
        (
            vec!["bench", "decode", "--steps", "1000000000"],
            "positions, more than the shape's context of 8192",
        ),
        (
            vec![
                "bench",
                "decode",
                "--prompt-len",
                "100000000",
                "--steps",
                "1",
            ],
            "positions, more than the shape's context of 8192",
        ),
        (
            vec!["bench", "decode", "--batch", "100000000", "--steps", "1"],
            "--batch takes at most 4096",
        ),
        (
            vec!["bench", "comm", "--sizes", "4K", "--nproc", "100000"],
            "--nproc must be between 1 and 1024",
        ),
        (
            vec!["bench", "comm", "--sizes", "16G", "--nproc", "1024"],
            "more than this host's",
        ),
        (
            vec!["launch", "--nproc-per-node", "100000", "--", "true"],
            "--nproc-per-node must be between 1 and 1024",
        ),
    ] {
        fails_with(&args, needle);
    }
    let llama = fixture("llama");
    let m = llama.to_str().unwrap();
    // Nothing to score, or more than the model's context (as generate refuses it).
    fails_with(
        &["score", "--model", m, "--tokens", "5"],
        "at least two tokens",
    );
    fails_with(
        &["score", "--model", m, "--text", ""],
        "at least two tokens",
    );
    let long = vec!["7"; 300].join(",");
    fails_with(
        &["score", "--model", m, "--tokens", &long],
        "300 tokens exceed the model's context of 256 positions",
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    copy_model(&llama, dir.path());
    let cfg = std::fs::read_to_string(llama.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["num_hidden_layers"] = serde_json::json!(1u64 << 32);
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    fails_with(
        &["score", "--model", d, "--tokens", "1,2"],
        "num_hidden_layers 4294967296 is larger than 65536",
    );
    // A context of 2^32 positions and a request for nearly all of them over 8 ranks (4.4 TB of
    // cache, more than any host): refused as larger than the host's memory, not an aborted
    // allocation (or a run for ever).
    v["num_hidden_layers"] = serde_json::json!(2);
    v["max_position_embeddings"] = serde_json::json!(1u64 << 32);
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    fails_with(
        &[
            "generate",
            "--model",
            d,
            "--prompt-tokens",
            "1,2",
            "--max-tokens",
            "4294967000",
            "--tp",
            "8",
        ],
        "more than this host's",
    );
    // NaN in the final norm's weight: score says the weights are broken.
    std::fs::write(dir.path().join("config.json"), &cfg).unwrap();
    let mut w = std::fs::read(llama.join("model.safetensors")).unwrap();
    let (n, header) = safetensors::SafeTensors::read_metadata(&w).unwrap();
    let t = header.info("model.norm.weight").unwrap();
    let (start, end) = t.data_offsets;
    let nan: &[u8] = match t.dtype {
        safetensors::Dtype::F32 => &[0x00, 0x00, 0xc0, 0x7f],
        _ => &[0xc0, 0x7f],
    };
    for c in w[8 + n + start..8 + n + end].chunks_mut(nan.len()) {
        c.copy_from_slice(nan);
    }
    std::fs::write(dir.path().join("model.safetensors"), &w).unwrap();
    fails_with(
        &["score", "--model", d, "--tokens", "1,2,3", "--json"],
        "are not finite",
    );
    // Greedy decoding takes no token from broken logits either (it once printed tokens and exited
    // 0): +inf in one element of the final norm (an overflow's logits), and NaN in one element of
    // one row of the head, a vocab id far from the first (an argmax skipping NaN took another).
    let original = std::fs::read(llama.join("model.safetensors")).unwrap();
    let poke = |tensor: &str, elem: usize, value: f32| {
        let mut w = original.clone();
        let t = header.info(tensor).unwrap();
        assert_eq!(t.dtype, safetensors::Dtype::F32);
        let at = 8 + n + t.data_offsets.0 + 4 * elem;
        w[at..at + 4].copy_from_slice(&value.to_le_bytes());
        std::fs::write(dir.path().join("model.safetensors"), &w).unwrap();
    };
    let greedy = |tp: &'static str| {
        [
            "generate",
            "--model",
            d,
            "--prompt-tokens",
            "5,6",
            "--max-tokens",
            "3",
            "--tp",
            tp,
        ]
    };
    // A weight beyond f16's range, loaded as f16: refused at load, not inf in every logit.
    poke("model.norm.weight", 0, 1e6);
    fails_with(
        &[&greedy("1")[..], &["--dtype", "f16"]].concat(),
        "model.norm.weight holds 1000000 at element 0, beyond the range of f16",
    );
    poke("model.norm.weight", 0, f32::INFINITY);
    fails_with(&greedy("1"), "are not finite");
    poke("lm_head.weight", 200 * 64 + 3, f32::NAN);
    for tp in ["1", "2"] {
        fails_with(&greedy(tp), "are not finite");
    }
}

/// `bench decode --one-rank-of 2` times rank 0's half of every layer alone, collectives skipped:
/// its rows are labelled 1/2 and count half the weights of tp 1.
#[test]
fn bench_decode_times_one_rank_of_a_tp_group_alone() {
    // The default shape (0.18 GB of weights at tp 1: two decimals of GB say the ratio).
    let args = ["bench", "decode", "--steps", "2", "--prompt-len", "2"];
    let (code, out, err) = tessera(&[&args[..], &["--one-rank-of", "2"]].concat());
    assert_eq!(code, 0, "{err}");
    let (code1, out1, err1) = tessera(&[&args[..], &["--tp", "1"]].concat());
    assert_eq!(code1, 0, "{err1}");
    // The GB/rank column: rank 0 of 2 holds about half of tp 1's bytes (the norms are whole).
    let gb = |out: &str, label: &str| -> f64 {
        let row = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(label))
            .unwrap_or_else(|| panic!("no {label} row in {out}"));
        row.split_whitespace().nth(4).unwrap().parse().unwrap()
    };
    let (half, whole) = (gb(&out, "1/2"), gb(&out1, "1"));
    assert!(
        (half / whole - 0.5).abs() < 0.06,
        "rank 0 of 2 holds {half} GB, tp 1 {whole} GB"
    );
    // A zero names its own flag.
    fails_with(
        &[&args[..], &["--one-rank-of", "0"]].concat(),
        "--one-rank-of must be at least 1",
    );
    fails_with(
        &[&args[..], &["--tp", "2,0"]].concat(),
        "--tp must be at least 1",
    );
}

/// `bench sample` times the sampler beside a full sort of the same logits (and checks both keep
/// the same tokens); `bench decode --sample` samples every step as `generate` does, at tp 1 and 2.
#[test]
fn bench_sample_and_sampled_decode_run() {
    let (code, out, err) = tessera(&["bench", "sample", "--vocab", "3000", "--runs", "2"]);
    assert_eq!(code, 0, "{err}");
    // logits, the setting's words, kept, ms, full sort ms, faster ("..x"), from top-k ms.
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() > 6 && w[w.len() - 2].ends_with('x'))
        .collect();
    assert_eq!(rows.len(), 10, "{out}");
    // The top-k 50 rows keep 50 tokens and time a draw from their candidates; temperature alone
    // keeps the whole vocabulary and has no candidates.
    let of = |setting: &str| -> Vec<(usize, &str)> {
        rows.iter()
            .filter(|w| w[1..w.len() - 5].join(" ") == setting)
            .map(|w| (w[w.len() - 5].parse().unwrap(), w[w.len() - 1]))
            .collect()
    };
    let top_k = of("top-k 50");
    assert_eq!(
        top_k.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![50, 50],
        "{out}"
    );
    assert!(top_k.iter().all(|r| r.1.parse::<f64>().is_ok()), "{out}");
    assert_eq!(of("temperature 1"), vec![(3000, "-"), (3000, "-")], "{out}");
    fails_with(&["bench", "sample", "--vocab", "1"], "--vocab takes 2 to");
    fails_with(
        &["bench", "sample", "--runs", "0"],
        "--runs takes 1 to 10000",
    );
    let args = ["bench", "decode", "--steps", "2", "--prompt-len", "2"];
    let (code, out, err) =
        tessera(&[&args[..], &["--sample", "--tp", "1,2", "--batch", "1,3"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tokens sampled on the host"), "{out}");
    let rows = out
        .lines()
        .filter(|l| matches!(l.split_whitespace().next(), Some("1" | "2")))
        .count();
    assert_eq!(rows, 4, "{out}");
    // With a repetition penalty over the prompt and output (candidates and the penalised
    // tokens' logits, at tp 2 gathered from both ranks); a penalty that is not a positive
    // number is refused.
    let (code, out, err) = tessera(
        &[
            &args[..],
            &[
                "--sample",
                "--tp",
                "2",
                "--batch",
                "2",
                "--repetition-penalty",
                "1.05",
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("repetition penalty 1.05"), "{out}");
    for bad in ["0", "-1", "nan", "inf"] {
        let flag = format!("--repetition-penalty={bad}");
        fails_with(
            &[&args[..], &["--sample", &flag]].concat(),
            "--repetition-penalty must be a positive number",
        );
    }
    // A long prompt's cache filled at random instead of fed: the same rows.
    let (code, out, err) = tessera(&[
        "bench",
        "decode",
        "--steps",
        "2",
        "--prompt-len",
        "300",
        "--fill-cache",
        "--tp",
        "1,2",
    ]);
    assert_eq!(code, 0, "{err}");
    let rows = out
        .lines()
        .filter(|l| matches!(l.split_whitespace().next(), Some("1" | "2")))
        .count();
    assert_eq!(rows, 2, "{out}");
    // Sampled steps replay a graph on GPUs only.
    fails_with(
        &[&args[..], &["--sample", "--graph"]].concat(),
        "--graph needs --device cuda",
    );
}

/// `bench score` times the vocab-parallel log-probs beside the logits gathered to the host, and
/// the two agree (the last column) at tp 1 and 2.
#[test]
fn bench_score_agrees_with_the_gathered_logits() {
    let (code, out, err) = tessera(&[
        "bench", "score", "--tokens", "24", "--tp", "1,2", "--runs", "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let diffs: Vec<f64> = out
        .lines()
        .filter(|l| matches!(l.split_whitespace().next(), Some("1" | "2")))
        .map(|l| l.split_whitespace().last().unwrap().parse().unwrap())
        .collect();
    assert_eq!(diffs.len(), 2, "{out}");
    assert!(diffs.iter().all(|&d| d < 1e-9), "{out}");
    fails_with(&["bench", "score", "--tokens", "1"], "--tokens takes 2 to");
    fails_with(&["bench", "score", "--tp", "3"], "tp 3 does not divide");
    // One rank of a tp-2 group alone: a row of its own, its layers timed apart.
    let (code, out, err) = tessera(&[
        "bench",
        "score",
        "--tokens",
        "24",
        "--one-rank-of",
        "2",
        "--runs",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l.starts_with("1/2 ")), "{out}");
    assert!(out.contains("layers alone"), "{out}");
    fails_with(
        &["bench", "score", "--one-rank-of", "0"],
        "--tp and --one-rank-of must be at least 1",
    );
    // A batch whose logits alone pass the host's memory (4,096 rows of an 8M vocabulary): one
    // line, not an aborted allocation.
    fails_with(
        &[
            "bench",
            "decode",
            "--tp",
            "1",
            "--vocab",
            "8000000",
            "--hidden",
            "64",
            "--heads",
            "1",
            "--kv-heads",
            "1",
            "--intermediate",
            "64",
            "--layers",
            "1",
            "--batch",
            "4096",
            "--steps",
            "1",
            "--prompt-len",
            "1",
        ],
        "a step's logits (196.6 GB)",
    );
    // --one-rank-of replaces --tp: both given is one clear error, not --tp ignored.
    fails_with(
        &["bench", "score", "--one-rank-of", "2", "--tp", "2"],
        "'--one-rank-of <ONE_RANK_OF>' cannot be used with '--tp <TP>'",
    );
}

#[test]
fn generation_config_eos_stops_generation_as_hf_does() {
    let r = reference("llama");
    let case = &r["greedy"][0];
    let first = case["tokens"][0].as_u64().unwrap();
    let dir = tempfile::tempdir().unwrap();
    copy_model(&fixture("llama"), dir.path());
    std::fs::write(
        dir.path().join("generation_config.json"),
        format!(r#"{{"eos_token_id": [999, {first}]}}"#),
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let args = [
        "generate",
        "--model",
        d,
        "--prompt-tokens",
        &join(&case["prompt_tokens"]),
        "--max-tokens",
        "12",
        "--json",
    ];
    let v = tessera_json(&args);
    assert_eq!(v["tokens"], serde_json::json!([first]));
    std::fs::write(dir.path().join("generation_config.json"), "{oops").unwrap();
    fails_with(&args, "generation_config.json");
}

/// A SentencePiece-style `tokenizer.json` (as Llama 2 and Mistral ship: "▁" for a space, a
/// decoder that strips the first space of what it decodes) for the llama fixture's 320 ids:
/// 0-2 special, every other id the word piece "▁w<id>".
fn sentencepiece_tokenizer() -> String {
    let special = |id: u32, s: &str| {
        format!(
            r#"{{"id": {id}, "content": "{s}", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}}"#
        )
    };
    let mut vocab = vec![
        r#""<s>": 0"#.to_string(),
        r#""</s>": 1"#.into(),
        r#""<pad>": 2"#.into(),
    ];
    vocab.extend((3..320).map(|i| format!("\"▁w{i}\": {i}")));
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{}, {}, {}],
        "normalizer": {{"type": "Sequence", "normalizers": [
            {{"type": "Prepend", "prepend": "▁"}},
            {{"type": "Replace", "pattern": {{"String": " "}}, "content": "▁"}}]}},
        "pre_tokenizer": null, "post_processor": null,
        "decoder": {{"type": "Sequence", "decoders": [
            {{"type": "Replace", "pattern": {{"String": "▁"}}, "content": " "}},
            {{"type": "Fuse"}},
            {{"type": "Strip", "content": " ", "start": 1, "stop": 0}}]}},
        "model": {{"type": "BPE", "dropout": null, "unk_token": "<pad>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": false, "vocab": {{{}}}, "merges": []}}}}"#,
        special(0, "<s>"),
        special(1, "</s>"),
        special(2, "<pad>"),
        vocab.join(", ")
    )
}

/// With a SentencePiece-style tokenizer the generated text keeps the space before its first
/// word (HF's `decode(prompt + new)` and vLLM's output text do; decoding the new ids alone drops
/// it: "hello" + "world"), and the plain output is the prompt's text then that text.
#[test]
fn generated_text_keeps_the_space_before_its_first_word() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(&fixture("llama"), dir.path());
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).ok();
    std::fs::write(dir.path().join("tokenizer.json"), sentencepiece_tokenizer()).unwrap();
    let model = dir.path().to_str().unwrap();
    let args = |json: bool| {
        let mut v = vec![
            "generate",
            "--model",
            model,
            "--prompt-tokens",
            "0,10,11",
            "--max-tokens",
            "6",
            "--ignore-eos",
        ];
        if json {
            v.push("--json");
        }
        v
    };
    let v = tessera_json(&args(true));
    let want: String = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .filter(|&t| t >= 3)
        .map(|t| format!(" w{t}"))
        .collect();
    assert!(!want.is_empty(), "{v}");
    assert_eq!(v["text"].as_str().unwrap(), want, "{v}");
    let (code, out, err) = tessera(&args(false));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim_end_matches('\n'), format!("w10 w11{want}"));
    // A prompt that starts with a hyphen is a prompt, not a flag.
    let (code, out, err) = tessera(&["generate", "--prompt", "- item", "--max-tokens", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("- item"), "{out}");
    let v = tessera_json(&["score", "--text", "--- ACT I ---", "--json"]);
    assert!(v["sum_logprob"].as_f64().unwrap() < 0.0, "{v}");
}

/// `--text-file` / `--prompt-file` (a file, or `-` for standard input) read what `--text` /
/// `--prompt` take, for inputs longer than a command line holds; a file that is not UTF-8 is one
/// line naming it.
#[test]
fn text_and_prompt_files_read_what_the_flags_take() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.txt");
    std::fs::write(&f, "ROMEO: But soft").unwrap();
    let f = f.to_str().unwrap();
    let want = tessera_json(&["score", "--text", "ROMEO: But soft", "--json"]);
    assert_eq!(tessera_json(&["score", "--text-file", f, "--json"]), want);
    // (In a launcher's environment of one rank, which is a single process: stdin is its own.)
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["score", "--text-file", "-", "--json"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"ROMEO: But soft")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got, want);
    let gen =
        |flag: &str, v: &str| tessera_json(&["generate", flag, v, "--max-tokens", "4", "--json"]);
    assert_eq!(gen("--prompt-file", f), gen("--prompt", "ROMEO: But soft"));
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"ok \xff\xfe").unwrap();
    fails_with(
        &["score", "--text-file", bad.to_str().unwrap()],
        "not UTF-8 text (invalid byte at offset 3)",
    );
    fails_with(
        &["generate", "--prompt-file", "/nonexistent/p.txt"],
        "--prompt-file: cannot read /nonexistent/p.txt",
    );
}

/// Output into a pipe whose reader has gone (`tessera ... | head -1`) ends the command quietly,
/// with the status a shell reports for a process SIGPIPE ended, and no panic.
#[test]
fn a_closed_standard_output_ends_the_command_quietly() {
    let out = common::with_stdout_closed(Command::new(env!("CARGO_BIN_EXE_tessera")).args([
        "generate",
        "--prompt",
        "ROMEO:",
        "--max-tokens",
        "4",
    ]));
    assert_eq!(out.status.code(), Some(141));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A generation_config.json that samples (`do_sample: true`) gives `generate` each sampling
/// setting no flag gives (transformers' reading: top_k 50 where it leaves it out); a flag
/// overrides its own setting only, `--temperature 0` is greedy; `--top-p` / `--top-k` alone sample
/// at temperature 1; a bad value there stops `generate` in one line, not `score`.
#[test]
fn generation_config_sampling_is_the_default_of_generate() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(&fixture("llama"), dir.path());
    let d = dir.path().to_str().unwrap();
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            d,
            "--prompt",
            "hello",
            "--max-tokens",
            "12",
            "--ignore-eos",
            "--seed",
            "3",
            "--json",
        ];
        args.extend(extra);
        let (v, err) = tessera_json_err(&args);
        (v["tokens"].clone(), err)
    };
    let (greedy, _) = gen(&[]);
    let (filters_alone, err) = gen(&["--top-k", "40"]);
    assert!(err.contains("sampling at temperature 1"), "{err}");
    assert_eq!(
        filters_alone,
        gen(&["--temperature", "1", "--top-k", "40"]).0
    );
    let config = |json: &str| {
        std::fs::write(dir.path().join("generation_config.json"), json).unwrap();
    };
    config(r#"{"do_sample": true, "temperature": 1.5, "top_p": 0.95, "eos_token_id": 1}"#);
    let (sampled, err) = gen(&[]);
    assert!(
        err.contains(
            "sampling at temperature 1.5, top_p 0.95, top_k 50: generation_config.json's settings"
        ),
        "{err}"
    );
    let explicit = ["--temperature", "1.5", "--top-p", "0.95", "--top-k", "50"];
    assert_eq!(sampled, gen(&explicit).0);
    assert_ne!(
        sampled, greedy,
        "a temperature of 1.5 over 12 tokens sampled the greedy ones"
    );
    // One flag overrides its own setting only: the others still come from the config, and say so.
    let (one_flag, err) = gen(&["--temperature", "0.7"]);
    assert!(
        err.contains("sampling at temperature 0.7, top_p 0.95, top_k 50"),
        "{err}"
    );
    assert_eq!(
        one_flag,
        gen(&["--temperature", "0.7", "--top-p", "0.95", "--top-k", "50"]).0
    );
    assert_eq!(
        gen(&["--top-k", "7"]).0,
        gen(&["--temperature", "1.5", "--top-p", "0.95", "--top-k", "7"]).0
    );
    let (zero, err) = gen(&["--temperature", "0"]);
    assert_eq!(zero, greedy);
    assert!(!err.contains("generation_config"), "{err}");
    // do_sample false (transformers' default): greedy whatever else it says.
    config(r#"{"do_sample": false, "temperature": 1.5, "eos_token_id": 1}"#);
    assert_eq!(gen(&[]).0, greedy);
    // Settings that transformers' generate would apply and tessera does not are named on stderr
    // (at their defaults they do nothing and are not); those of sampling only where it samples.
    config(
        r#"{"do_sample": true, "typical_p": 0.9, "no_repeat_ngram_size": 3, "num_beams": 1,
            "penalty_alpha": 0.6, "bad_words_ids": null, "suppress_tokens": [],
            "eos_token_id": 1}"#,
    );
    let (_, err) = gen(&[]);
    let warning = "warning: generation_config.json sets typical_p 0.9, no_repeat_ngram_size 3, \
        which tessera does not apply (transformers' generate may)";
    assert_eq!(err.matches("warning:").count(), 1, "{err}");
    assert!(err.contains(warning), "{err}");
    // Greedy: contrastive search's penalty_alpha acts, typical_p does not.
    let (_, err) = gen(&["--temperature", "0"]);
    assert!(
        err.contains("sets penalty_alpha 0.6, no_repeat_ngram_size 3, which tessera"),
        "{err}"
    );
    config(r#"{"do_sample": false, "typical_p": 0.9, "eos_token_id": 1}"#);
    let (tokens, err) = gen(&[]);
    assert_eq!(tokens, greedy);
    assert!(!err.contains("warning"), "{err}");
    // A value out of range, or not a number, stops generate where it is used, and nothing else.
    config(r#"{"do_sample": true, "top_p": 1.5}"#);
    fails_with(
        &["generate", "--model", d, "--prompt", "hello"],
        "generation_config.json: `top_p` 1.5 is out of range",
    );
    config(r#"{"do_sample": true, "top_k": "40", "top_p": 1.5}"#);
    fails_with(
        &[
            "generate", "--model", d, "--prompt", "hello", "--top-p", "0.9",
        ],
        "generation_config.json: `top_k` \"40\" is out of range",
    );
    config(r#"{"do_sample": true, "top_p": 1.5}"#);
    assert!(!gen(&["--top-p", "0.9"]).1.contains("out of range"));
    let (code, _, err) = tessera(&["score", "--model", d, "--text", "hello world"]);
    assert_eq!(code, 0, "{err}");
    // A `do_sample` transformers would read as true ("yes", 1) is not greedy here: refused, as
    // is a file that is not an object.
    for (json, says) in [
        (
            r#"{"do_sample": "yes"}"#,
            "`do_sample` must be true or false, got \"yes\"",
        ),
        (
            r#"{"do_sample": 1}"#,
            "`do_sample` must be true or false, got 1",
        ),
        ("[1]", "generation_config.json: must be a JSON object"),
    ] {
        config(json);
        fails_with(&["generate", "--model", d, "--prompt", "hello"], says);
    }
}

/// The repetition penalty and min-p, from their flags or generation_config.json: the penalty
/// applies greedy too (as transformers' processors), from the config whether or not it samples,
/// and gives HF's own tokens (`greedy_repetition_penalty` in the llama fixture's reference);
/// min-p 1 keeps only the likeliest token, so sampling with it is greedy. A generation_config.json
/// that is not JSON (a Python-written NaN) stops `generate` in one line and leaves `score` alone.
#[test]
fn repetition_penalty_and_min_p_as_transformers_applies_them() {
    let r = reference("llama");
    let dir = tempfile::tempdir().unwrap();
    copy_model(&fixture("llama"), dir.path());
    let d = dir.path().to_str().unwrap();
    let config = |json: &str| {
        std::fs::write(dir.path().join("generation_config.json"), json).unwrap();
    };
    let gen = |prompt: &str, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            d,
            "--prompt-tokens",
            prompt,
            "--max-tokens",
            "12",
            "--json",
        ];
        args.extend(extra);
        let (v, err) = tessera_json_err(&args);
        (v["tokens"].clone(), err)
    };
    let cases = r["greedy_repetition_penalty"].as_array().unwrap();
    let plains = r["greedy"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    // HF's penalty changed the first case's tokens (its 10th repeated the 2nd).
    assert_ne!(cases[0]["tokens"], plains[0]["tokens"]);
    // The third's prompt (BOS, a greedy prompt, 3 tokens of its plain continuation) decides its
    // tokens: a penalty over the output alone gives others.
    assert_ne!(cases[2]["tokens"], cases[2]["output_only_tokens"]);
    let (got, _) = gen(
        &join(&cases[2]["prompt_tokens"]),
        &["--repetition-penalty", "1.3"],
    );
    assert_eq!(
        got, cases[2]["tokens"],
        "penalty over the prompt and output"
    );
    for (case, plain) in cases.iter().zip(plains) {
        let prompt = join(&case["prompt_tokens"]);
        assert_eq!(case["repetition_penalty"], 1.3);
        let (got, _) = gen(&prompt, &["--repetition-penalty", "1.3"]);
        assert_eq!(got, case["tokens"], "greedy with --repetition-penalty 1.3");
        // From generation_config.json, which does not sample: still applied, and said.
        config(r#"{"repetition_penalty": 1.3, "eos_token_id": 1}"#);
        let (got, err) = gen(&prompt, &[]);
        assert_eq!(got, case["tokens"]);
        assert!(
            err.contains("repetition penalty 1.3: generation_config.json's"),
            "{err}"
        );
        let (got, _) = gen(&prompt, &["--repetition-penalty", "1"]);
        assert_eq!(got, plain["tokens"]);
        std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();
        // min-p 1: sampling that keeps the likeliest token only.
        let (got, err) = gen(&prompt, &["--min-p", "1", "--seed", "5"]);
        assert_eq!(got, plain["tokens"]);
        assert!(err.contains("sampling at temperature 1"), "{err}");
        config(r#"{"do_sample": true, "temperature": 1.0, "min_p": 1.0, "eos_token_id": 1}"#);
        let (got, err) = gen(&prompt, &["--seed", "5"]);
        assert_eq!(got, plain["tokens"]);
        assert!(err.contains("top_k 50, min_p 1:"), "{err}");
        std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();
    }
    let prompt = join(&cases[0]["prompt_tokens"]);
    // vLLM's presence / frequency penalties count the output: plain greedy repeats its 2nd token
    // (100) as its 10th; a presence penalty of 2 makes the 10th another, the 9 before unchanged.
    let plain: Vec<u64> = plains[0]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!((plain[1], plain[9]), (100, 100));
    let off = gen(
        &prompt,
        &["--presence-penalty", "0", "--frequency-penalty", "0"],
    )
    .0;
    assert_eq!(off, plains[0]["tokens"]);
    for flag in ["--presence-penalty", "--frequency-penalty"] {
        let got = gen(&prompt, &[flag, "2"]).0;
        let got: Vec<u64> = got
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        assert_eq!(got[..9], plain[..9], "{flag}");
        assert_ne!(got[9], 100, "{flag}: the output's token was not penalised");
    }
    let base = ["generate", "--model", d, "--prompt-tokens", &prompt];
    fails_with(
        &[&base[..], &["--presence-penalty", "2.5"]].concat(),
        "--presence-penalty must be in [-2, 2], got 2.5",
    );
    fails_with(
        &[&base[..], &["--min-p", "1.5"]].concat(),
        "--min-p must be in [0, 1], got 1.5",
    );
    fails_with(
        &[&base[..], &["--repetition-penalty", "0"]].concat(),
        "--repetition-penalty must be a number > 0, got 0",
    );
    // An id past the vocabulary is the request's error, before any rank's sampler sizes itself
    // by it.
    fails_with(
        &[
            "generate",
            "--model",
            d,
            "--prompt-tokens",
            "0,5,4294967295",
            "--repetition-penalty",
            "1.3",
            "--tp",
            "2",
        ],
        "token id 4294967295 is outside the vocabulary of 320",
    );
    config(r#"{"repetition_penalty": "high"}"#);
    fails_with(
        &base,
        "generation_config.json: `repetition_penalty` \"high\" is out of range",
    );
    config(r#"{"do_sample": true, "min_p": 2}"#);
    fails_with(&base, "generation_config.json: `min_p` 2 is out of range");
    config(r#"{"do_sample": true, "temperature": NaN}"#);
    fails_with(&base, "generation_config.json: not valid JSON");
    let (code, _, err) = tessera(&["score", "--model", d, "--text", "hello world"]);
    assert_eq!(code, 0, "{err}");
}

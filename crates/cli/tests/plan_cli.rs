//! `tessera plan` end to end: published figures and hand-derived cases read back through `--json`,
//! the table and the SVG, and bad input answered with one line and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("plan")
        .args(args)
        .output()
        .expect("run tessera")
}

fn plan_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = tessera(&all);
    assert!(
        out.status.success(),
        "tessera plan {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

/// The report of a job no layout holds: printed all the same, then one error line and exit 1.
fn plan_json_unfit(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = tessera(&all);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "tessera plan {args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: no layout fits: "), "{err}");
    assert!(err.contains("the closest"), "{err}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("--json prints one JSON object");
    // The layouts that do not fit come smallest footprint first, and the error line names the
    // first as the closest.
    let totals: Vec<f64> = v["layouts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["fits"] == false)
        .map(|l| mem(l, "total"))
        .collect();
    assert!(!totals.is_empty());
    assert!(
        totals.windows(2).all(|w| w[0] <= w[1]),
        "not smallest first: {totals:?}"
    );
    v
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plan/tests/fixtures")
        .join(name)
}

fn mem(layout: &Value, key: &str) -> f64 {
    layout["memory_bytes"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("memory_bytes.{key} in {layout}"))
}

fn assert_close(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got / want - 1.0).abs() <= rel,
        "{what}: got {got}, want {want} (±{rel})"
    );
}

/// ZeRO paper, Figure 1: Ψ = 7.5B, N_d = 64, K = 12.
#[test]
fn zero_paper_figure_1() {
    for (zero, gb) in [("0", 120.0), ("1", 31.4), ("2", 16.6), ("3", 1.9)] {
        let v = plan_json(&[
            "train",
            "--params",
            "7.5e9",
            "--gpus",
            "64",
            "--dp",
            "64",
            "--tp",
            "1",
            "--pp",
            "1",
            "--zero",
            zero,
            "--offload",
            "none",
        ]);
        let layouts = v["layouts"].as_array().unwrap();
        assert_eq!(layouts.len(), 1);
        let l = &layouts[0];
        assert_eq!(l["zero"].as_u64().unwrap().to_string(), zero);
        let states = mem(l, "weights") + mem(l, "gradients") + mem(l, "optimizer");
        assert!(
            (states / 1e9 - gb).abs() < 0.05,
            "ZeRO-{zero}: {} GB, paper {gb}",
            states / 1e9
        );
        let total = mem(l, "total");
        let parts: f64 = [
            "weights",
            "gradients",
            "optimizer",
            "activations",
            "buffers",
            "kv_cache",
        ]
        .iter()
        .map(|k| mem(l, k))
        .sum();
        assert_eq!(total, parts);
    }
}

#[test]
fn preset_parameter_counts_match_published_sizes() {
    for (model, billions) in [
        ("llama-3-8b", 8.03),
        ("llama-3-70b", 70.6),
        ("llama-3.1-405b", 405.9),
        ("gpt-3-175b", 174.6),
        ("deepseek-v3", 671.0),
    ] {
        let v = plan_json(&[
            "infer", "--model", model, "--gpus", "8", "--tp", "8", "--pp", "1",
        ]);
        let p = v["model"]["params"].as_f64().unwrap() / 1e9;
        let digits = if billions < 10.0 { 100.0 } else { 10.0 };
        assert_eq!((p * digits).round() / digits, billions, "{model}: {p}B");
    }
    let v = plan_json(&[
        "infer",
        "--model",
        "deepseek-v3",
        "--gpus",
        "8",
        "--tp",
        "8",
    ]);
    let active = v["model"]["active_params"].as_f64().unwrap() / 1e9;
    assert!(
        (37.0..38.0).contains(&active),
        "DeepSeek-V3 activates 37B per token, got {active}"
    );
}

/// Korthikanti et al. 2205.05198, Table 2, for GPT-3 175B (a = 96, h = 12288, L = 96) at s = 2048.
#[test]
fn megatron_activation_memory() {
    let (s, h, a, l, t) = (2048.0, 12288.0, 96.0, 96.0, 8.0);
    let sbh = s * h;
    let cases: [(&str, bool, f64); 5] = [
        (
            "none",
            false,
            sbh * (10.0 + 24.0 / t + 5.0 * a * s / (h * t)),
        ),
        ("none", true, sbh / t * (34.0 + 5.0 * a * s / h)),
        ("selective", true, sbh / t * 34.0),
        ("selective", false, sbh * (10.0 + 24.0 / t)),
        ("full", true, 2.0 * sbh / t),
    ];
    for (recompute, sp, per_layer) in cases {
        let mut args = vec![
            "train",
            "--model",
            "gpt-3-175b",
            "--gpus",
            "8",
            "--tp",
            "8",
            "--pp",
            "1",
            "--dp",
            "1",
            "--zero",
            "0",
            "--offload",
            "none",
            "--seq",
            "2048",
            "--micro-batch",
            "1",
            "--global-batch",
            "8",
            "--recompute",
            recompute,
        ];
        if !sp {
            args.push("--no-sequence-parallel");
        }
        let v = plan_json(&args);
        let d = &v["layouts"][0]["activation_detail"];
        let layers = d["layers_bytes_per_micro_batch"].as_f64().unwrap();
        assert_close(layers, l * per_layer, 1e-9, &format!("{recompute} sp={sp}"));
        assert_eq!(d["in_flight"].as_f64(), Some(1.0));
        // Output layer extra: 4sbh/t (1 + v/h) with SP (final norm, LM head input, fp32 logits).
        let total = mem(&v["layouts"][0], "activations");
        assert!(
            total >= layers && total < layers * 1.2 + 1e9,
            "{total} vs {layers}"
        );
    }
}

#[test]
fn pipeline_first_stage_holds_p_micro_batches_and_the_bubble_is_p_minus_1_over_m() {
    let v = plan_json(&[
        "train",
        "--model",
        "gpt-3-175b",
        "--nodes",
        "4",
        "--tp",
        "8",
        "--pp",
        "4",
        "--dp",
        "1",
        "--zero",
        "1",
        "--offload",
        "none",
        "--seq",
        "2048",
        "--global-batch",
        "32",
    ]);
    let l = &v["layouts"][0];
    assert_eq!(l["stage"].as_u64(), Some(0));
    assert_eq!(l["activation_detail"]["in_flight"].as_f64(), Some(4.0));
    assert_close(
        l["bubble_fraction"].as_f64().unwrap(),
        3.0 / 32.0,
        1e-12,
        "bubble",
    );
    let v = plan_json(&[
        "train",
        "--model",
        "gpt-3-175b",
        "--nodes",
        "4",
        "--tp",
        "8",
        "--pp",
        "4",
        "--dp",
        "1",
        "--zero",
        "1",
        "--offload",
        "none",
        "--seq",
        "2048",
        "--global-batch",
        "32",
        "--interleave",
        "2",
    ]);
    let b = v["layouts"][0]["bubble_fraction"].as_f64().unwrap();
    assert_close(b, 3.0 / 64.0, 1e-12, "interleaved bubble (p-1)/(m·v)");
}

/// Llama-3-70B at tp 8, pp 2: what one GPU of the first stage holds, counted by hand.
#[test]
fn llama_70b_tp8_pp2_weights_by_hand() {
    let v = plan_json(&[
        "train",
        "--model",
        "llama-3-70b",
        "--nodes",
        "2",
        "--tp",
        "8",
        "--pp",
        "2",
        "--dp",
        "1",
        "--zero",
        "0",
        "--offload",
        "none",
    ]);
    let l = &v["layouts"][0];
    let h = 8192u64;
    // q and o (h×h), k and v (h×1024), gate/up/down (h×28672): split 8 ways; two RMSNorms whole.
    let layer = (2 * h * h + 2 * h * 1024 + 3 * h * 28672) / 8 + 2 * h;
    // The vocabulary is padded to a multiple of 128 · tp = 1024: 128256 → 129024.
    let embedding = 129_024 * h / 8;
    let stage0 = 40 * layer + embedding;
    assert_eq!(l["stage"].as_u64(), Some(0));
    // The busiest GPU's parameters (DP traffic, optimizer time) are the last stage's: the same
    // layers, the LM head the size of the embedding, and the final norm.
    assert_eq!(l["params_per_gpu"].as_u64(), Some(stage0 + h));
    assert_eq!(mem(l, "weights"), (2 * stage0) as f64);
    assert_eq!(mem(l, "gradients"), (2 * stage0) as f64);
    assert_eq!(mem(l, "optimizer"), (12 * stage0) as f64);
    // TP all-reduce: 4 per layer per micro-batch of s·b·h bf16, ring 2(t-1)/t, m = 512 micro-batches.
    let tp = l["comm_bytes_per_step"]["tp"].as_f64().unwrap();
    assert_close(
        tp,
        4.0 * 40.0 * 512.0 * 2.0 * 7.0 / 8.0 * (4096.0 * 8192.0 * 2.0),
        1e-12,
        "tp bytes",
    );
    // PP: an activation forward and a gradient back per micro-batch, split over TP.
    let pp = l["comm_bytes_per_step"]["pp"].as_f64().unwrap();
    assert_close(
        pp,
        2.0 * 512.0 * 4096.0 * 8192.0 * 2.0 / 8.0,
        1e-12,
        "pp bytes",
    );
}

#[test]
fn zero_traffic_is_2_psi_then_3_psi() {
    let dp_bytes = |zero: &str| {
        let v = plan_json(&[
            "train",
            "--params",
            "7.5e9",
            "--gpus",
            "64",
            "--dp",
            "64",
            "--zero",
            zero,
            "--offload",
            "none",
            "--global-batch",
            "64",
        ]);
        v["layouts"][0]["comm_bytes_per_step"]["dp"]
            .as_f64()
            .unwrap()
    };
    let ddp = 2.0 * 63.0 / 64.0 * 2.0 * 7.5e9;
    for z in ["0", "1", "2"] {
        assert_close(dp_bytes(z), ddp, 1e-12, "2Ψ");
    }
    assert_close(dp_bytes("3"), 1.5 * ddp, 1e-12, "3Ψ");
}

/// Llama-3-8B served on one GPU, counted by hand.
#[test]
fn llama_8b_inference_by_hand() {
    let v = plan_json(&[
        "infer",
        "--model",
        "llama-3-8b",
        "--gpus",
        "1",
        "--context",
        "8192",
        "--seqs",
        "10",
    ]);
    let l = &v["layouts"][0];
    assert_eq!(mem(l, "weights"), 2.0 * 8_030_261_248.0);
    assert_eq!(mem(l, "kv_cache"), 10.0 * 8192.0 * 131_072.0);
    assert_eq!(mem(l, "gradients") + mem(l, "optimizer"), 0.0);
    assert_eq!(l["fits"].as_bool(), Some(true));
    let usable = v["usable_bytes_per_gpu"].as_f64().unwrap();
    let free = l["kv_free_bytes"].as_f64().unwrap();
    let fixed = mem(l, "weights") + mem(l, "activations") + mem(l, "buffers");
    assert_eq!(free, usable - fixed);
    let blocks = (free / (16.0 * 131_072.0)).floor();
    assert_eq!(l["kv_blocks"].as_f64(), Some(blocks));
    assert_eq!(l["max_concurrent_tokens"].as_f64(), Some(blocks * 16.0));
    // One sequence decodes at the speed of reading the weights (all but the embedding) and its
    // KV cache from HBM once per token.
    let v = plan_json(&[
        "infer",
        "--model",
        "llama-3-8b",
        "--gpus",
        "1",
        "--context",
        "4096",
        "--seqs",
        "1",
    ]);
    let read = 2.0 * (8_030_261_248.0 - 128_256.0 * 4096.0 - 4096.0) + 4096.0 * 131_072.0;
    let tps = v["layouts"][0]["decode_tokens_per_s"].as_f64().unwrap();
    assert_close(tps, 3.35e12 / read, 1e-9, "decode tokens/s");
    // GQA with tp = 8 = KV heads: one KV head per GPU.
    let v = plan_json(&["infer", "--model", "llama-3-8b", "--gpus", "8", "--tp", "8"]);
    assert_eq!(
        v["layouts"][0]["kv_bytes_per_token_per_gpu"].as_u64(),
        Some(131_072 / 8)
    );
}

#[test]
fn seventy_b_in_fp16_does_not_fit_one_80g_card() {
    let v = plan_json_unfit(&[
        "infer",
        "--model",
        "llama-3-70b",
        "--gpus",
        "1",
        "--cluster",
        "a100-80g",
    ]);
    let l = &v["layouts"][0];
    assert_eq!(l["fits"].as_bool(), Some(false));
    assert!(mem(l, "weights") > 140e9);
    assert!(l["why_not"].as_str().unwrap().contains("weights"));
    assert!(v["recommended"].is_null());
}

#[test]
fn search_ranks_fitting_layouts_and_says_why_the_rest_do_not() {
    let v = plan_json(&["train", "--model", "llama-3-70b", "--nodes", "4"]);
    let usable = v["usable_bytes_per_gpu"].as_f64().unwrap();
    let layouts = v["layouts"].as_array().unwrap();
    let mut expect_rank = 1;
    let mut seen_unfit = false;
    for l in layouts {
        if l["fits"].as_bool().unwrap() {
            assert!(!seen_unfit, "fitting layouts come first");
            assert_eq!(l["rank"].as_u64(), Some(expect_rank));
            expect_rank += 1;
            assert!(mem(l, "total") <= usable);
            assert!(l["why_not"].is_null());
        } else {
            seen_unfit = true;
            assert!(l["rank"].is_null());
            assert!(!l["why_not"].as_str().unwrap().is_empty());
        }
        for k in ["dp", "tp", "pp", "zero", "offload"] {
            assert!(!l[k].is_null(), "{k}");
        }
        // TP inside a node.
        assert!(l["tp"].as_u64().unwrap() <= 8);
    }
    assert!(expect_rank > 1, "some layout fits");
    assert!(v["recommended"].is_string());
    let rejected = v["rejected"].as_array().unwrap();
    assert!(rejected
        .iter()
        .all(|r| !r["reason"].as_str().unwrap().is_empty()));
    assert!(!v["why_not"].as_array().unwrap().is_empty());
}

#[test]
fn offload_reports_host_memory() {
    let v = plan_json(&[
        "train",
        "--model",
        "llama-3-8b",
        "--gpus",
        "8",
        "--dp",
        "8",
        "--zero",
        "2",
        "--offload",
        "cpu",
    ]);
    let l = &v["layouts"][0];
    assert_eq!(mem(l, "optimizer"), 0.0);
    let shard = 8_030_261_248u64.div_ceil(8) as f64;
    // fp32 master, momentum, variance and fp32 gradients for 8 GPUs of the node.
    assert_eq!(
        l["host_bytes"]["cpu_per_node"].as_f64(),
        Some(8.0 * 16.0 * shard)
    );
    let v = plan_json(&[
        "train",
        "--model",
        "llama-3-8b",
        "--gpus",
        "8",
        "--dp",
        "8",
        "--zero",
        "3",
        "--offload",
        "nvme",
    ]);
    assert_eq!(
        v["layouts"][0]["host_bytes"]["nvme_per_node"].as_f64(),
        Some(8.0 * 12.0 * shard)
    );
}

#[test]
fn reads_an_hf_config() {
    let dir = fixture("llama-3-8b");
    let v = plan_json(&["infer", "--model", dir.to_str().unwrap(), "--gpus", "1"]);
    assert_eq!(v["model"]["params"].as_u64(), Some(8_030_261_248));
    let file = fixture("qwen2.5-0.5b").join("config.json");
    let v = plan_json(&["train", "--model", file.to_str().unwrap(), "--gpus", "2"]);
    assert_eq!(v["model"]["params"].as_u64(), Some(494_032_768));
    assert_eq!(v["model"]["tied_embeddings"].as_bool(), Some(true));
}

#[test]
fn table_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("plan.svg");
    let out = tessera(&[
        "train",
        "--model",
        "llama-3-70b",
        "--nodes",
        "2",
        "--top",
        "4",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("rank") && table.contains("MFU"), "{table}");
    assert!(table.contains("Why the others do not fit"), "{table}");
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("capacity") && svg.contains("optimizer"));
    assert!(svg.matches("<text").count() >= 4 * 3);
    // One layout: the breakdown follows the table.
    let out = tessera(&["infer", "--model", "llama-3-8b", "--gpus", "1"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("left for KV blocks"), "{table}");
}

#[cfg(unix)]
#[test]
fn an_svg_that_cannot_be_written_leaves_the_earlier_one_whole() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("plan.svg");
    std::fs::write(&svg, "<svg>earlier</svg>").unwrap();
    let args = [
        "plan",
        "train",
        "--model",
        "llama-3-70b",
        "--nodes",
        "2",
        "--svg",
    ];
    // A disk that fills after 1 KiB of the new image.
    let out = common::cap_file_size(Command::new(env!("CARGO_BIN_EXE_tessera")).args(args), 1024)
        .arg(&svg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: cannot write the --svg image: "),
        "{err}"
    );
    assert!(err.contains("File too large"), "{err}");
    assert_eq!(std::fs::read_to_string(&svg).unwrap(), "<svg>earlier</svg>");
    assert_eq!(
        common::entries(dir.path()),
        ["plan.svg"],
        "no temporary left"
    );
    // A fifo (or device) is refused, not replaced by a file.
    let fifo = dir.path().join("fifo");
    common::mkfifo(&fifo);
    let mut with_fifo = args[1..].to_vec();
    with_fifo.push(fifo.to_str().unwrap());
    let out = tessera(&with_fifo);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is a fifo, not a regular file"), "{err}");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
}

#[test]
fn bad_input_is_one_line_and_a_non_zero_exit() {
    let bad_config = fixture("gpt2");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--model", "llama-4"], "unknown model"),
        (vec!["train"], "no model"),
        (vec!["fly", "--model", "llama-3-8b"], "unknown job"),
        (
            vec![
                "train",
                "--model",
                "llama-3-8b",
                "--dp",
                "2",
                "--tp",
                "8",
                "--pp",
                "1",
            ],
            "but the cluster has 8 GPUs",
        ),
        (vec!["train", "--model", "llama-3-8b", "--tp", "3"], "tp=3"),
        // A guessed width of 128 × 64Ki layers: no overflow in the check of its size.
        (
            vec!["train", "--params", "1e9", "--layers", "65536"],
            "is too small for 65536 layers",
        ),
        // More layers than the planner walks in a second or so: refused at once, given or
        // guessed from --params and --hidden (these once ran for a minute and more).
        (
            vec!["train", "--params", "1e9", "--layers", "16000000"],
            "--layers must be at most 65536, got 16000000",
        ),
        (
            vec!["infer", "--params", "1e15", "--hidden", "64", "--seqs", "7"],
            "--params 1000000000000000 with --hidden 64 means 20345052083 layers, more than the 65536",
        ),
        (
            vec!["train", "--params", "1e11", "--hidden", "7", "--seq", "7"],
            "with --hidden 7 means 170068027 layers",
        ),
        (
            vec!["infer", "--params", "1e13", "--hidden", "64"],
            "give a wider --hidden or --layers",
        ),
        // KV blocks of absurd size: refused with the range, not an overflow panic.
        (
            vec!["infer", "--model", "llama-3-8b", "--block-size", "1e18"],
            "--block-size must be from 1 to 65536 tokens",
        ),
        (
            vec!["infer", "--model", "llama-3-70b", "--block-size", "1e15"],
            "--block-size must be from 1 to 65536 tokens",
        ),
        (
            vec![
                "infer",
                "--model",
                "gpt-3-175b",
                "--gpus",
                "1",
                "--block-size",
                "1e12",
            ],
            "got 1000000000000",
        ),
        (
            vec!["infer", "--model", "llama-3-8b", "--block-size", "65537"],
            "--block-size must be from 1 to 65536 tokens",
        ),
        // The largest block, the smallest context and a context near the bound: rounding the
        // context up to a whole block is counted, not wrapped.
        (
            vec![
                "infer",
                "--model",
                "llama-3-8b",
                "--block-size",
                "65536",
                "--context",
                "1e18",
            ],
            "beyond what the planner counts",
        ),
        // Calls and bytes a step that a 64-bit count cannot hold: refused, not wrapped.
        (
            vec![
                "train",
                "--model",
                "llama-3-70b",
                "--global-batch",
                "1e18",
                "--dp",
                "1",
                "--tp",
                "8",
                "--pp",
                "1",
            ],
            "beyond what the planner counts",
        ),
        (
            vec![
                "train",
                "--model",
                "gpt-3-175b",
                "--gpus",
                "64",
                "--tp",
                "64",
                "--pp",
                "1",
            ],
            "does not divide the 96 attention heads",
        ),
        (
            vec!["train", "--model", "llama-3-8b", "--seq", "-5"],
            "--seq",
        ),
        (vec!["train", "--params", "-7e9"], "--params"),
        (
            vec!["train", "--params", "1e19"],
            "--params must be at most 1e18, got \"1e19\"",
        ),
        (
            vec!["train", "--model", "llama-3-8b", "--gpu-mem", "-80"],
            "--gpu-mem",
        ),
        // Sizes past what a u64 of bytes holds, or under a byte: refused, not clamped.
        (
            vec!["train", "--model", "llama-3-8b", "--gpu-mem", "1e300"],
            "--gpu-mem must be a size from 1 byte to 1e18 bytes, got \"1e300\"",
        ),
        (
            vec!["train", "--model", "llama-3-8b", "--cpu-mem", "1e-300"],
            "--cpu-mem must be a size from 1 byte to 1e18 bytes",
        ),
        (
            vec!["train", "--model", "llama-3-8b", "--zero", "4"],
            "--zero",
        ),
        (
            vec!["train", "--model", "llama-3-8b", "--offload", "disk"],
            "offload",
        ),
        (
            vec!["train", "--model", "llama-3-8b", "--cluster", "tpu-v5"],
            "unknown cluster",
        ),
        (
            vec!["train", "--model", "llama-3-8b", "--context", "100"],
            "does not apply",
        ),
        (
            vec!["infer", "--model", "llama-3-8b", "--zero", "1"],
            "does not apply",
        ),
        (
            vec![
                "train",
                "--model",
                "llama-3-8b",
                "--global-batch",
                "6",
                "--dp",
                "4",
                "--tp",
                "2",
            ],
            "global batch 6",
        ),
        (
            vec![
                "train",
                "--model",
                "llama-3-8b",
                "--dp",
                "8",
                "--zero",
                "0",
                "--offload",
                "cpu",
            ],
            "offload needs ZeRO",
        ),
        (
            vec!["train", "--model", "llama-3-8b", "--mem-util", "0"],
            "--mem-util",
        ),
        (
            vec!["train", "--model", bad_config.to_str().unwrap()],
            "GPT2LMHeadModel",
        ),
        (
            vec![
                "train",
                "--model",
                "llama-3-8b",
                "--pp",
                "64",
                "--gpus",
                "64",
            ],
            "more stages than the 32 layers",
        ),
    ];
    // A job no layout holds: the table still printed, one line on stderr.
    let out = tessera(&["train", "--model", "llama-3-8b", "--gpu-mem", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("No layout fits"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: no layout fits: "), "{err}");
    assert!(err.contains("0.9 GiB usable"), "{err}");
    // Output that cannot be written (a full disk): one line and exit 1, not a panic.
    if Path::new("/dev/full").exists() {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        // The help asked for too (it once exited 0 with nothing written).
        for args in [
            &["plan", "infer", "--model", "llama-3-8b", "--gpus", "1"][..],
            &[
                "plan",
                "infer",
                "--model",
                "llama-3-8b",
                "--gpus",
                "1",
                "--json",
            ],
            &["--help"],
            &["plan", "--help"],
        ] {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
            cmd.args(args);
            let out = cmd.stdout(full.try_clone().unwrap()).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert_eq!(
                err.trim_end(),
                "error: cannot write to standard output: No space left on device (os error 28)"
            );
        }
    }
    for (args, needle) in cases {
        let out = tessera(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert_ne!(out.status.code(), Some(101), "{args:?} panicked: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line, got {err}"
        );
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} should mention {needle:?}"
        );
    }
}

/// 405B on 8 GPUs: no layout fits; the closest named is the smallest footprint (a ZeRO-3 or
/// offloading layout, not the plain one that needs the most), the others after it in order.
#[test]
fn the_closest_layout_that_does_not_fit_is_the_smallest() {
    let v = plan_json_unfit(&["train", "--model", "llama-3.1-405b", "--gpus", "8"]);
    let first = v["layouts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["fits"] == false)
        .unwrap();
    let all_min = v["layouts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| mem(l, "total"))
        .fold(f64::INFINITY, f64::min);
    assert_eq!(mem(first, "total"), all_min);
    assert!(mem(first, "total") < 300.0 * (1u64 << 30) as f64, "{first}");
}

/// One sequence of DeepSeek-V3 (top-8 of 256 routed experts, one shared) reads at least its
/// active parameters a token: attention, router and shared expert every step, 8 routed experts.
/// Only routed experts may go unread (the attention projections were once counted as experts).
#[test]
fn moe_decode_reads_at_least_the_active_parameters() {
    let v = plan_json(&[
        "infer",
        "--model",
        "deepseek-v3",
        "--cluster",
        "h200",
        "--nodes",
        "2",
        "--seqs",
        "1",
        "--dp",
        "1",
        "--tp",
        "8",
        "--pp",
        "2",
    ]);
    let l = &v["layouts"][0];
    let comm: f64 = l["comm"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seconds"].as_f64().unwrap())
        .sum();
    // A step is pp ticks, each the slowest stage's read plus the exchanges.
    let read_s = l["inter_token_s"].as_f64().unwrap() - 2.0 * comm;
    let active = v["model"]["active_params"].as_f64().unwrap();
    let bw = v["cluster"]["hbm_bw"].as_f64().unwrap();
    let floor = active * 2.0 / 8.0 / bw;
    assert!(
        read_s >= floor,
        "{read_s} s of reads < {floor} s for the active parameters"
    );
    assert!(read_s < 1.5 * floor, "{read_s} s against {floor}");
}

/// `--params N` guesses a width of whole groups of 8 heads, so the search may use tp 2, 4 and 8
/// (a guessed 70 heads once ruled out every tp but 1 and 2 for its own guess); a model too small
/// for a 1,024 width keeps its guess (5e7 once became too small for its own embedding).
#[test]
fn a_guessed_shape_has_heads_that_tp_8_divides() {
    for p in ["5e7", "6e7", "1e8"] {
        let v = plan_json(&["train", "--params", p, "--gpus", "1"]);
        let (l, h) = (
            v["model"]["layers"].as_u64().unwrap(),
            v["model"]["hidden"].as_u64().unwrap(),
        );
        assert_eq!(h, 128 * l, "--params {p}");
    }
    for (p, nodes) in [("7.5e9", "2"), ("70e9", "2"), ("1e12", "64"), ("3e8", "2")] {
        let v = plan_json(&["train", "--params", p, "--nodes", nodes]);
        let heads = v["model"]["heads"].as_u64().unwrap();
        assert_eq!(heads % 8, 0, "--params {p}: {heads} heads");
        assert_eq!(v["model"]["params"].as_f64(), p.parse::<f64>().ok());
        let rejected = v["rejected"].as_array().unwrap();
        assert!(
            !rejected.iter().any(|r| r["tp"].as_u64().unwrap() <= 8
                && r["reason"].as_str().unwrap().contains("attention heads")),
            "--params {p}: {rejected:?}"
        );
    }
}

//! `tessera data prepare`, `train`, `export` end to end on a slice of Shakespeare: JSON lines on
//! stdout, a killed save that leaves the previous checkpoint resumable at another layout with the
//! same losses, an export that `score` and `generate` load, and one clear line for bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn tessera_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tessera(args: &[&str]) -> (i32, String, String) {
    tessera_env(args, &[])
}

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `data prepare` of `input` into `out` with the llama fixture's tokenizer, `extra` flags added.
fn prepare_args(input: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let tok = repo("tests/fixtures/hf/llama/tokenizer.json");
    let mut args = vec![
        "data",
        "prepare",
        "--input",
        s(input),
        "--tokenizer",
        s(&tok),
    ];
    args.extend(extra);
    args.extend(["--out", s(out)]);
    args.into_iter().map(str::to_string).collect()
}

/// Borrowed views of owned arguments.
fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A dataset from the first 60 KB of the Shakespeare slice, a tiny model and a config.
fn setup(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let text = std::fs::read_to_string(repo("data/shakespeare/slice.txt")).unwrap();
    let cut = text.char_indices().nth(60_000).unwrap().0;
    let input = dir.join("in.txt");
    std::fs::write(&input, &text[..cut]).unwrap();
    let data = dir.join("data");
    let (code, _, err) = tessera(&strs(&prepare_args(&input, &data, &[])));
    assert_eq!(code, 0, "{err}");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":300,
        "hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,
        "max_position_embeddings":128,"tie_word_embeddings":true,"bos_token_id":0,"eos_token_id":1}"#,
    )
    .unwrap();
    let cfg = dir.join("ds.json");
    std::fs::write(
        &cfg,
        r#"{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.0}},
        "zero_optimization": {"stage": 2}, "wall_clock_breakdown": false, "mystery": 1}"#,
    )
    .unwrap();
    (data, model, cfg)
}

/// `tessera train` on `setup`'s data, model and config: `steps` steps of 16 tokens, JSON lines on
/// stdout, the loss curve to `curve`, then `extra`.
fn train_args(
    (data, model, cfg): &(PathBuf, PathBuf, PathBuf),
    steps: usize,
    curve: &Path,
    extra: &[&str],
) -> Vec<String> {
    let steps = steps.to_string();
    let mut v: Vec<String> = [
        "train",
        "--config",
        s(cfg),
        "--model-config",
        s(model),
        "--data",
        s(data),
        "--seq-len",
        "16",
        "--steps",
        &steps,
        "--json",
        "--curve",
        s(curve),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

fn losses(stdout: &str) -> Vec<(u64, f64)> {
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            for k in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
                assert!(v.get(k).is_some(), "{l} lacks {k}");
            }
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn train_json_crash_resume_at_another_layout_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let paths = setup(dir.path());
    let curve = dir.path().join("curve.svg");
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let args = train_args(&paths, 6, &curve, extra);
        let refs = strs(&args);
        tessera_env(&refs, env)
    };
    // The uninterrupted run, at dp 2.
    let (code, out, err) = run(&["--dp", "2"], &[]);
    assert_eq!(code, 0, "{err}");
    let whole = losses(&out);
    assert_eq!(
        whole.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    assert!(whole[5].1 < whole[0].1, "{whole:?}");
    assert!(err.contains("unknown config key `mystery`"), "{err}");
    assert!(std::fs::read_to_string(&curve).unwrap().starts_with("<svg"));

    // Saves every 2 steps; the second save is killed halfway.
    let ck = dir.path().join("ck");
    let (code, _, _) = run(
        &["--dp", "2", "--save", s(&ck), "--save-every", "2"],
        &[("TESSERA_CRASH_DURING_SAVE", "2")],
    );
    assert_ne!(code, 0);
    assert_eq!(
        std::fs::read_to_string(ck.join("latest")).unwrap().trim(),
        "step_00000002"
    );

    // Resume from step 2 at dp 1, ZeRO-3: steps 3..6 as in the uninterrupted run.
    let (code, out, err) = run(
        &[
            "--dp",
            "1",
            "--zero-stage",
            "3",
            "--resume",
            s(&ck),
            "--save",
            s(&ck),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let resumed = losses(&out);
    assert_eq!(resumed.len(), 4);
    for (a, b) in whole[2..].iter().zip(&resumed) {
        assert_eq!(a.0, b.0);
        assert!((a.1 - b.1).abs() / a.1 < 1e-5, "{a:?} vs {b:?}");
    }
    // Its checkpoint logs every step's loss, the first run's two included (its curve starts at
    // step 1), and the validation loss at its end.
    let meta = std::fs::read_to_string(ck.join("step_00000006/trainer.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let logged: Vec<(u64, f64)> = meta["history"]["train"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    assert_eq!(logged.len(), 6, "{meta}");
    for (a, b) in whole.iter().zip(&logged) {
        assert_eq!(a.0, b.0);
        assert!((a.1 - b.1).abs() / a.1 < 1e-5, "{a:?} vs {b:?}");
    }
    assert_eq!(meta["history"]["val"][0][0], 6, "{meta}");

    // Resuming the finished run with the same --steps: nothing to train, refused (the run's
    // checkpoint and curve stay as they are).
    let (code, _, err) = run(&["--resume", s(&ck), "--save", s(&ck)], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("leaves nothing to train"), "{err}");
    let errors = err.lines().filter(|l| !l.starts_with("warning:")).count();
    assert_eq!(errors, 1, "{err}");

    // Resuming with another model config: refused, naming what differs.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let cfg = std::fs::read_to_string(paths.1.join("config.json")).unwrap();
    std::fs::write(
        other.join("config.json"),
        cfg.replace("\"intermediate_size\":64", "\"intermediate_size\":96"),
    )
    .unwrap();
    let mut args = train_args(&paths, 8, &curve, &["--resume", s(&ck)]);
    let at = args.iter().position(|a| a == "--model-config").unwrap();
    args[at + 1] = s(&other).to_string();
    let refs = strs(&args);
    let (code, _, err) = tessera(&refs);
    assert_ne!(code, 0);
    assert!(
        err.contains("differs from --model-config in intermediate_size"),
        "{err}"
    );

    // Resuming an earlier step into the same root would replace the later steps the first run
    // left: refused, step 6 kept byte for byte.
    let state6 = std::fs::read(ck.join("step_00000006/state.safetensors")).unwrap();
    let step2 = ck.join("step_00000002");
    let args = train_args(
        &paths,
        8,
        &curve,
        &["--resume", s(&step2), "--save", s(&ck)],
    );
    let (code, _, err) = tessera(&strs(&args));
    assert_ne!(code, 0);
    assert!(
        err.contains("holds step 6 past the step resumed from (2)"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(ck.join("step_00000006/state.safetensors")).unwrap(),
        state6
    );
    // Another seed than the checkpoint's, or weights to start from besides it: refused, not
    // silently ignored.
    let args = train_args(&paths, 8, &curve, &["--resume", s(&ck), "--seed", "7"]);
    let (code, _, err) = tessera(&strs(&args));
    assert_ne!(code, 0);
    assert!(err.contains("trained with --seed 0"), "{err}");
    let args = train_args(&paths, 8, &curve, &["--resume", s(&ck), "--init-from", "x"]);
    let (code, _, err) = tessera(&strs(&args));
    assert_ne!(code, 0);
    assert!(err.contains("cannot be used with"), "{err}");

    // Export, then score and generate with the exported model.
    let hf = dir.path().join("hf");
    let (code, _, err) = tessera(&["export", "--checkpoint", s(&ck), "--out", s(&hf)]);
    assert_eq!(code, 0, "{err}");
    assert!(hf.join("tokenizer.json").exists());
    serves(&hf);
    // A checkpoint whose tokenizer.json does not load: refused before anything is written (it
    // once exported a model directory that nothing could load).
    std::fs::write(ck.join("step_00000006/tokenizer.json"), "{oops").unwrap();
    let hf2 = dir.path().join("hf2");
    let (code, _, err) = tessera(&["export", "--checkpoint", s(&ck), "--out", s(&hf2)]);
    assert_ne!(code, 0);
    assert!(
        err.contains("not a tokenizer the exported model could load"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!hf2.exists());
}

/// An exported model `score`s a text and `generate`s from a prompt.
fn serves(hf: &Path) {
    let (code, out, err) = tessera(&[
        "score",
        "--model",
        s(hf),
        "--text",
        "To be, or not",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sum_logprob"));
    let (code, _, err) = tessera(&[
        "generate",
        "--model",
        s(hf),
        "--prompt",
        "KING",
        "--max-tokens",
        "5",
    ]);
    assert_eq!(code, 0, "{err}");
}

/// A Qwen3 model (per-head q/k norms) trains at ZeRO-3 over two ranks, its loss falls, and its
/// export (q/k norm weights included) loads for `score` and `generate`.
#[test]
fn qwen3_trains_and_its_export_serves() {
    let dir = tempfile::tempdir().unwrap();
    let paths = setup(dir.path());
    let cfg = std::fs::read_to_string(paths.1.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
    v["model_type"] = "qwen3".into();
    v["head_dim"] = 8.into();
    std::fs::write(paths.1.join("config.json"), v.to_string()).unwrap();
    let ck = dir.path().join("ck");
    let curve = dir.path().join("curve.svg");
    let args = train_args(
        &paths,
        6,
        &curve,
        &["--dp", "2", "--zero-stage", "3", "--save", s(&ck)],
    );
    let (code, out, err) = tessera(&strs(&args));
    assert_eq!(code, 0, "{err}");
    let l = losses(&out);
    assert!(l[5].1 < l[0].1, "{l:?}");
    let hf = dir.path().join("hf");
    let (code, _, err) = tessera(&["export", "--checkpoint", s(&ck), "--out", s(&hf)]);
    assert_eq!(code, 0, "{err}");
    let exported = std::fs::read_to_string(hf.join("config.json")).unwrap();
    assert!(exported.contains("qwen3"), "{exported}");
    serves(&hf);
}

/// The step lines without their timing (`tokens_per_s` differs between any two runs).
fn untimed(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_s");
            v
        })
        .collect()
}

#[test]
fn training_under_launch_equals_training_in_one_process() {
    // dp 2 as two processes (`tessera launch`, TCP) and as two threads: the same losses, learning
    // rates and gradient norms to the bit, and the same saved weights and optimizer state.
    let dir = tempfile::tempdir().unwrap();
    let paths = setup(dir.path());
    let args = |ck: &Path, curve: &Path| {
        train_args(
            &paths,
            4,
            curve,
            &["--dp", "2", "--zero-stage", "1", "--save", s(ck)],
        )
    };
    let (ck_a, ck_b) = (dir.path().join("ck_threads"), dir.path().join("ck_procs"));
    let a = args(&ck_a, &dir.path().join("a.svg"));
    let refs = strs(&a);
    let (code, threads, err) = tessera_env(&refs, &[("TESSERA_COMM_TIMEOUT_S", "60")]);
    assert_eq!(code, 0, "{err}");
    let b = args(&ck_b, &dir.path().join("b.svg"));
    let mut launched = vec!["launch", "--nproc-per-node", "2", "--", "tessera"];
    launched.extend(b.iter().map(String::as_str));
    let (code, procs, err) = tessera_env(&launched, &[("TESSERA_COMM_TIMEOUT_S", "60")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(untimed(&procs), untimed(&threads));
    assert_eq!(untimed(&threads).len(), 4);
    // Only rank 0 reports.
    assert_eq!(err.matches("validation loss").count(), 1, "{err}");
    let weights = |ck: &Path| {
        let step = std::fs::read_to_string(ck.join("latest")).unwrap();
        let dir = ck.join(step.trim());
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        assert!(!files.is_empty());
        files
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect::<Vec<_>>()
    };
    assert!(weights(&ck_a) == weights(&ck_b), "saved state differs");
    // A launch whose process count is not dp: one clear line, non-zero exit.
    let mut wrong = b.clone();
    let at = wrong.iter().position(|x| x == "--dp").unwrap();
    wrong[at + 1] = "4".into();
    // (Into a new root: ck_procs holds the run above, which a new run may not overwrite.)
    let at = wrong.iter().position(|x| x == "--save").unwrap();
    wrong[at + 1] = s(&dir.path().join("ck_wrong")).into();
    let mut launched = vec!["launch", "--nproc-per-node", "2", "--", "tessera"];
    launched.extend(wrong.iter().map(String::as_str));
    let (code, _, err) = tessera_env(&launched, &[("TESSERA_COMM_TIMEOUT_S", "60")]);
    assert_ne!(code, 0);
    assert!(err.contains("dp is 4"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_one_clear_line_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let (data, model, cfg) = setup(dir.path());
    let bad_cfg = dir.path().join("bad.json");
    std::fs::write(&bad_cfg, r#"{"zero_optimization": {"stage": 7}}"#).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--config", s(&bad_cfg)], "zero_optimization.stage"),
        (
            vec!["--config", "/nonexistent.json"],
            "--config /nonexistent.json does not exist",
        ),
        (vec!["--config", "/"], "--config / is a directory"),
        (vec!["--config", s(&cfg), "--dp", "0"], "--dp"),
        (vec!["--config", s(&cfg), "--dp", "3"], "divisible"),
        (
            vec!["--config", s(&cfg), "--data", "/nonexistent"],
            "dataset",
        ),
        (
            vec!["--config", s(&cfg), "--resume", "/nonexistent"],
            "checkpoint",
        ),
        (
            vec!["--config", s(&cfg), "--seq-len", "100000"],
            "exceeds the model's context of 128 positions",
        ),
        (
            vec!["--config", s(&cfg), "--init-from", "/nonexistent"],
            "checkpoint /nonexistent: does not exist",
        ),
    ];
    // A model whose training state cannot fit in memory (8.8 T parameters: 123 TB, more than any
    // host): refused before its weights are made.
    let huge = dir.path().join("huge");
    std::fs::create_dir_all(&huge).unwrap();
    let small = std::fs::read_to_string(model.join("config.json")).unwrap();
    std::fs::write(
        huge.join("config.json"),
        small
            .replace("\"hidden_size\":32", "\"hidden_size\":1048576")
            .replace("\"num_attention_heads\":4", "\"num_attention_heads\":8192")
            .replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":8192"),
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, &str)> = cases
        .into_iter()
        .chain([(
            vec!["--config", s(&cfg), "--model-config", s(&huge)],
            "needs at least",
        )])
        .collect();
    // Ranks of one process are threads: a count no host could run, and a model whose states,
    // held whole by each of 1024 ranks below their ZeRO stage (6 GB at dp 1, 0.8 PB at dp 1024),
    // no host could hold. Both refused before anything is made (the data is never read).
    let wide = dir.path().join("wide");
    std::fs::create_dir_all(&wide).unwrap();
    std::fs::write(
        wide.join("config.json"),
        small
            .replace("\"hidden_size\":32", "\"hidden_size\":4096")
            .replace("\"intermediate_size\":64", "\"intermediate_size\":11008")
            .replace("\"num_attention_heads\":4", "\"num_attention_heads\":32")
            .replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":32"),
    )
    .unwrap();
    // An NVMe swap directory that is not there, and a dataset whose tokenizer (copied into each
    // checkpoint) is not there: found before training, not at its first save.
    let no_nvme = dir.path().join("nvme.json");
    std::fs::write(
        &no_nvme,
        r#"{"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "nvme", "nvme_path": "/nonexistent/swap"}}}"#,
    )
    .unwrap();
    let no_tok = dir.path().join("no_tok");
    std::fs::create_dir_all(&no_tok).unwrap();
    for e in std::fs::read_dir(&data).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "tokenizer.json" {
            std::fs::copy(e.path(), no_tok.join(e.file_name())).unwrap();
        }
    }
    let cases: Vec<(Vec<&str>, &str)> = cases
        .into_iter()
        .chain([
            (
                vec![
                    "--config",
                    s(&cfg),
                    "--dp",
                    "100000",
                    "--data",
                    "/nonexistent",
                ],
                "--dp must be between 1 and 1024 ranks in one process, got 100000",
            ),
            (
                vec![
                    "--config",
                    s(&cfg),
                    "--dp",
                    "1024",
                    "--model-config",
                    s(&wide),
                    "--data",
                    "/nonexistent",
                ],
                "at dp 1024 with ZeRO stage 2 needs at least",
            ),
            (
                vec!["--config", s(&no_nvme)],
                "nvme_path /nonexistent/swap is not a directory",
            ),
            (
                vec!["--config", s(&cfg), "--data", s(&no_tok)],
                "meta.json names tokenizer \"tokenizer.json\", which is not a file",
            ),
        ])
        .collect();
    // A loss curve into a fifo (or a device) is refused before training, not replaced.
    let fifo = dir.path().join("fifo");
    common::mkfifo(&fifo);
    // Checkpoints of another run in the --save root are not overwritten.
    let taken = dir.path().join("taken");
    std::fs::create_dir_all(taken.join("step_00000003")).unwrap();
    std::fs::write(taken.join("latest"), "step_00000003").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = cases
        .into_iter()
        .chain([
            (
                vec!["--config", s(&cfg), "--save", s(&taken)],
                "already holds checkpoints",
            ),
            (
                vec!["--config", s(&cfg), "--eval-batches", "0"],
                "--eval-batches",
            ),
            // A loss curve that could not be written is found before training.
            (
                vec!["--config", s(&cfg), "--curve", "/nonexistent/c.svg"],
                "does not exist",
            ),
            (
                vec!["--config", s(&cfg), "--curve", s(&fifo)],
                "is not a regular file",
            ),
        ])
        .collect();
    for (extra, needle) in cases {
        let mut args = vec![
            "train",
            "--model-config",
            s(&model),
            "--data",
            s(&data),
            "--steps",
            "1",
            "--curve",
        ];
        let curve = dir.path().join("c.svg");
        args.push(s(&curve));
        let mut full: Vec<&str> = args.clone();
        // A flag the case gives replaces the default's.
        for flag in ["--data", "--curve", "--model-config"] {
            if extra.contains(&flag) {
                let i = full.iter().position(|a| *a == flag).unwrap();
                full.drain(i..i + 2);
            }
        }
        full.extend(extra);
        let (code, _, err) = tessera(&full);
        assert_ne!(code, 0, "{full:?}");
        assert!(err.contains(needle), "{full:?}: {err}");
        // One error line (warnings about the config may come before it).
        let errors: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
        assert_eq!(errors.len(), 1, "{full:?}: {err}");
        assert!(!err.contains("panicked"));
        // An I/O error is said once, not again as its own cause.
        assert!(err.matches("(os error").count() <= 1, "{full:?}: {err}");
    }
    assert_eq!(
        std::fs::read_to_string(taken.join("latest")).unwrap(),
        "step_00000003"
    );
    let (code, _, err) = tessera(&[
        "export",
        "--checkpoint",
        "/nonexistent",
        "--out",
        s(&dir.path().join("x")),
    ]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // An existing model directory (or dataset) is not overwritten.
    let before = std::fs::read(model.join("config.json")).unwrap();
    let (code, _, err) = tessera(&["export", "--checkpoint", s(&taken), "--out", s(&model)]);
    assert_ne!(code, 0);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read(model.join("config.json")).unwrap(), before);
    let slice = repo("data/shakespeare/slice.txt");
    let (code, _, err) = tessera(&strs(&prepare_args(&slice, &data, &[])));
    assert_ne!(code, 0);
    assert!(err.contains("not empty"), "{err}");
    // A validation fraction that leaves (next to) nothing to train on, found before any write.
    let fresh = dir.path().join("fresh");
    let (code, _, err) = tessera(&strs(&prepare_args(
        &slice,
        &fresh,
        &["--val-fraction", "0.99999"],
    )));
    assert_ne!(code, 0);
    assert!(err.contains("for training (at least 16 needed)"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!fresh.exists());
    let (code, _, err) = tessera(&[
        "data",
        "prepare",
        "--input",
        "/nonexistent.txt",
        "--tokenizer",
        "/x.json",
        "--out",
        s(&dir.path().join("d")),
    ]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// `train --json` whose lines cannot be written (a full disk): the run ends with one line and
/// exit 1 instead of going on with the curve's lines lost.
#[test]
fn a_json_line_that_cannot_be_written_ends_the_run() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let paths = setup(dir.path());
    let args = train_args(&paths, 3, &dir.path().join("curve.svg"), &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(&args)
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.trim_end().lines().last(),
        Some("error: cannot write to standard output: No space left on device (os error 28)"),
        "{err}"
    );
    assert!(!dir.path().join("curve.svg").exists(), "the run stopped");
    // A reader that has gone (`train --json | head -1`): the run ends quietly, status 141, as
    // any output into a closed pipe ends.
    let out = common::with_stdout_closed(Command::new(env!("CARGO_BIN_EXE_tessera")).args(&args));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("error"), "{err}");
}

/// `tessera` with every file it writes capped at `max_bytes`: a full disk part way through.
fn tessera_on_full_disk(args: &[&str], max_bytes: u64) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    let out = common::cap_file_size(cmd.args(args), max_bytes)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("File too large"), "{err}");
    (out.status.code().unwrap_or(-1), err)
}

#[cfg(unix)]
#[test]
fn a_full_disk_leaves_nothing_behind_and_a_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let paths = setup(dir.path());

    // data prepare: the shards of a short text fit, the tokenizer (8.5 KB) does not. A new --out
    // goes again, an empty one given stays empty, and the retry is not refused.
    let input = dir.path().join("short.txt");
    std::fs::write(
        &input,
        "To be, or not to be, that is the question.\n".repeat(8),
    )
    .unwrap();
    for given in ["new", "empty"] {
        let out = dir.path().join(given);
        if given == "empty" {
            std::fs::create_dir(&out).unwrap();
        }
        let owned = prepare_args(&input, &out, &[]);
        let args = strs(&owned);
        let (code, err) = tessera_on_full_disk(&args, 4096);
        assert_eq!(code, 1, "{err}");
        match given {
            "new" => assert!(!out.exists(), "{:?}", common::entries(&out)),
            _ => assert!(
                common::entries(&out).is_empty(),
                "{:?}",
                common::entries(&out)
            ),
        }
        let (code, _, err) = tessera(&args);
        assert_eq!(code, 0, "{err}");
    }

    // A save that does not fit leaves no temporary directory (retried saves would pile them up).
    let ck = dir.path().join("ck");
    let curve = dir.path().join("curve.svg");
    let args = train_args(&paths, 2, &curve, &["--save", s(&ck), "--save-every", "1"]);
    let refs = strs(&args);
    let (code, err) = tessera_on_full_disk(&refs, 100_000);
    assert_eq!(code, 1, "{err}");
    // The root the run made, with nothing saved in it, is gone with its lock.
    assert!(!ck.exists(), "{:?}", common::entries(&ck));

    // The retry saves; its loss curve goes through a symlink, which stays one.
    let real = dir.path().join("real.svg");
    std::fs::write(&real, "earlier").unwrap();
    let link = dir.path().join("link.svg");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let args = train_args(&paths, 2, &link, &["--save", s(&ck), "--save-every", "1"]);
    let refs = strs(&args);
    let (code, _, err) = tessera(&refs);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::read_to_string(&real).unwrap().starts_with("<svg"));

    // export: the weights do not fit; the new --out goes again, and the retry is not refused.
    let hf = dir.path().join("hf");
    let args = ["export", "--checkpoint", s(&ck), "--out", s(&hf)];
    let (code, err) = tessera_on_full_disk(&args, 4096);
    assert_eq!(code, 1, "{err}");
    assert!(!hf.exists(), "{:?}", common::entries(&hf));
    let (code, _, err) = tessera(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        common::entries(&hf),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
}

/// Bad data input is one error line and exit 1: ids past u16 are kept (u32 shards, a vocabulary
/// above every id), devices are not read without end, and a meta.json listing one shard many
/// times is refused rather than loaded many times.
#[cfg(unix)]
#[test]
fn data_prepare_keeps_wide_ids_and_refuses_unbounded_input() {
    let dir = tempfile::tempdir().unwrap();
    let one_error = |err: &str, want: &str| {
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        assert!(errors[0].contains(want), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    };

    // A WordLevel vocabulary of 3 entries with ids {0, 1, 70000}.
    let tok = dir.path().join("tok_wl.json");
    std::fs::write(
        &tok,
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel",
        "vocab": {"[UNK]": 0, "hello": 1, "world": 70000}, "unk_token": "[UNK]"}}"#,
    )
    .unwrap();
    let input = dir.path().join("hw.txt");
    std::fs::write(&input, "hello world hello\n".repeat(100)).unwrap();
    let data = dir.path().join("wide");
    let (code, _, err) = tessera(&[
        "data",
        "prepare",
        "--input",
        s(&input),
        "--tokenizer",
        s(&tok),
        "--out",
        s(&data),
    ]);
    assert_eq!(code, 0, "{err}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["dtype"], "u32", "{meta}");
    assert_eq!(meta["vocab_size"], 70001, "{meta}");
    let bytes = std::fs::read(data.join("train_00000.bin")).unwrap();
    let ids: Vec<u32> = bytes
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(&ids[..3], [1, 70000, 1]);

    // Devices and directories are refused, as input and as tokenizer.
    for (inp, t) in [
        ("/dev/zero", s(&tok)),
        ("/dev/urandom", s(&tok)),
        (s(&input), "/dev/zero"),
        (s(dir.path()), s(&tok)),
    ] {
        let out = dir.path().join("never");
        let (code, _, err) = tessera(&[
            "data",
            "prepare",
            "--input",
            inp,
            "--tokenizer",
            t,
            "--out",
            s(&out),
        ]);
        assert_eq!(code, 1, "{err}");
        one_error(&err, "is not a regular file");
        assert!(!out.exists());
    }

    // The wide dataset does not fit the fixture model's 300 ids: said before training.
    let paths = setup(dir.path());
    let curve = dir.path().join("curve.svg");
    let wide = (data.clone(), paths.1.clone(), paths.2.clone());
    let (code, _, err) = tessera(&strs(&train_args(&wide, 1, &curve, &[])));
    assert_eq!(code, 1, "{err}");
    one_error(
        &err,
        "vocabulary (70001) is larger than the model's vocab_size (300)",
    );

    // One shard listed 100,000 times, with the token count to match.
    let meta_path = paths.0.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    let shard = meta["train"]["shards"][0].clone();
    let tokens = meta["train"]["tokens"].as_u64().unwrap();
    meta["train"]["shards"] = serde_json::Value::Array(vec![shard; 100_000]);
    meta["train"]["tokens"] = (tokens * 100_000).into();
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let (code, _, err) = tessera(&strs(&train_args(&paths, 1, &curve, &[])));
    assert_eq!(code, 1, "{err}");
    one_error(&err, "more than once");
}

/// A run saving checkpoints from a dataset whose tokenizer does not load is refused at its start
/// (each checkpoint carries it, and `export` would refuse them all after the run), and a second
/// run saving into a root another is saving into now is refused (its saves would replace the
/// first's): a lock held for the run's life.
#[test]
fn what_a_save_needs_is_checked_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let paths = setup(dir.path());
    let curve = dir.path().join("curve.svg");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(paths.0.join("meta.json")).unwrap()).unwrap();
    let tok = paths.0.join(meta["tokenizer"].as_str().unwrap());
    let good = std::fs::read(&tok).unwrap();
    std::fs::write(&tok, "{oops").unwrap();
    let ck = dir.path().join("ck");
    let args = train_args(&paths, 2, &curve, &["--save", s(&ck)]);
    let (code, _, err) = tessera(&strs(&args));
    assert_ne!(code, 0);
    assert!(
        err.contains("tokenizer") && err.contains("does not load"),
        "{err}"
    );
    assert!(!ck.exists());
    std::fs::write(&tok, good).unwrap();
    // The root's lock taken as a running save holds it.
    std::fs::create_dir_all(&ck).unwrap();
    let lock = std::fs::File::create(ck.join(".tessera-lock")).unwrap();
    lock.lock().unwrap();
    let (code, _, err) = tessera(&strs(&args));
    assert_ne!(code, 0);
    assert!(err.contains("is in use by another run"), "{err}");
    drop(lock);
    let (code, _, err) = tessera(&strs(&args));
    assert_eq!(code, 0, "{err}");
    assert!(ck.join("step_00000002").exists());
}

//! Checkpoints are independent of the layout: saved at one dp / ZeRO stage, resumed at another,
//! the loss curve continues as if never interrupted; an interrupted save leaves the previous one
//! loadable; export writes an HF directory that the inference model loads with the same logits.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tessera_model::grad::{random_init, BatchDims, FullParams, ParamLayout, TrainModel};
use tessera_train::checkpoint::{self, load, restore, save};
use tessera_train::{run_dp, Loader, StepStats, Trainer};

/// Trains `steps` steps at (dp, stage), optionally resuming from `from` and saving to `to` at the
/// end; returns rank 0's stats.
fn segment(
    dp: usize,
    stage: u8,
    steps: usize,
    from: Option<&Path>,
    to: Option<&Path>,
) -> Vec<StepStats> {
    let model = tiny_model(false);
    let model_json: serde_json::Value = serde_json::from_str(
        &tessera_model::synthetic::llama_config_json(48, 32, 64, 2, 4, 2, false),
    )
    .unwrap();
    let data = tokens(4000);
    run_dp(dp, |comm| {
        let layout = ParamLayout::new(&model);
        let mut t = Trainer::new(
            comm,
            model.clone(),
            config(stage, ""),
            SEQ,
            random_init(&layout, 0),
        )?;
        if let Some(p) = from {
            restore(&mut t, load(p, &layout)?)?;
        }
        let mut loader = Loader::new(data.clone(), SEQ, 0)?;
        let stats = train_steps(&mut t, &mut loader, steps)?;
        if let Some(p) = to {
            save(&mut t, p, 0, &model_json, None, &Default::default())?;
        }
        Ok(stats)
    })
    .unwrap()
    .swap_remove(0)
}

fn assert_same_losses(a: &[StepStats], b: &[StepStats], what: &str) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.step, y.step, "{what}");
        let rel = (x.loss - y.loss).abs() / x.loss;
        assert!(
            rel < 1e-5,
            "{what}: step {} loss {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
    }
}

#[test]
fn resume_at_another_layout_continues_the_same_loss_curve() {
    let whole = segment(1, 0, 20, None, None);
    let dir = tempfile::tempdir().unwrap();
    let first = segment(2, 1, 10, None, Some(dir.path()));
    assert_same_losses(&whole[..10], &first, "first half");
    for (dp, stage) in [(3, 3), (1, 0), (4, 2)] {
        let second = segment(dp, stage, 10, Some(dir.path()), None);
        assert_same_losses(
            &whole[10..],
            &second,
            &format!("resumed at dp {dp} stage {stage}"),
        );
    }
}

#[test]
fn an_interrupted_save_leaves_the_previous_checkpoint_loadable() {
    let dir = tempfile::tempdir().unwrap();
    segment(2, 2, 3, None, Some(dir.path()));
    // What a crash mid-save leaves behind: a half-written temporary directory.
    let junk = dir.path().join(".step_00000006.tmp-999");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("state.safetensors"), b"\x10\x00\x00garbage").unwrap();
    let layout = ParamLayout::new(&tiny_model(false));
    let ck = load(dir.path(), &layout).unwrap();
    assert_eq!(ck.meta.progress.step, 3);
    // A later good save moves `latest`; a truncated step directory is refused with a clear error.
    segment(1, 0, 2, Some(dir.path()), Some(dir.path()));
    assert_eq!(load(dir.path(), &layout).unwrap().meta.progress.step, 5);
    let state = dir.path().join("step_00000005/state.safetensors");
    let bytes = std::fs::read(&state).unwrap();
    std::fs::write(&state, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(dir.path(), &layout).err().unwrap().to_string();
    assert!(e.contains("state.safetensors") && !e.contains('\n'), "{e}");
    assert!(load(&dir.path().join("nope"), &layout).is_err());
}

/// A run of 2 steps saved at step 2: its directory, the layout it loads with, the step's
/// directory and its state file, and that file's bytes (to corrupt and put back).
fn saved_at_step_two() -> (tempfile::TempDir, ParamLayout, PathBuf, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    segment(2, 1, 2, None, Some(dir.path()));
    let layout = ParamLayout::new(&tiny_model(false));
    let step = dir.path().join("step_00000002");
    let state = step.join("state.safetensors");
    let good = std::fs::read(&state).unwrap();
    (dir, layout, step, state, good)
}

#[test]
fn a_checkpoint_holding_nan_or_a_zero_loss_scale_is_refused() {
    let (dir, layout, step, state, good) = saved_at_step_two();
    // A NaN in the last tensor's last value (the file's tail).
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&state, &bad).unwrap();
    let e = load(dir.path(), &layout).err().unwrap().to_string();
    assert!(e.contains("NaN") && e.contains("corrupt"), "{e}");
    let out = dir.path().join("hf");
    assert!(checkpoint::export(dir.path(), &out, tessera_tensor::DType::F32).is_err());
    std::fs::write(&state, &good).unwrap();
    load(dir.path(), &layout).unwrap();
    // A loss scale of 0 in trainer.json.
    let meta = step.join("trainer.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["progress"]["scaler"]["scale"] = serde_json::json!(0.0);
    std::fs::write(&meta, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = load(dir.path(), &layout).err().unwrap().to_string();
    assert!(e.contains("loss scale 0"), "{e}");
    // `latest` of two lines: one line naming it, not a path with a line break in an error.
    let latest = dir.path().join("latest");
    let was = std::fs::read(&latest).unwrap();
    std::fs::write(&latest, "step_00000002\nstep_00000004").unwrap();
    let e = load(dir.path(), &layout).err().unwrap().to_string();
    assert!(
        e.contains("not a step directory") && !e.contains('\n'),
        "{e}"
    );
    std::fs::write(&latest, was).unwrap();
}

/// A checkpoint whose parts disagree: a negative second moment (a sum of squares), a progress
/// that is not its directory's step, a trainer.json of a smaller model over the state. Each is
/// refused in one line, not trained or exported on.
#[test]
fn a_checkpoint_that_disagrees_with_itself_is_refused() {
    let (dir, layout, step, state, good) = saved_at_step_two();
    // The first value of a second moment, made negative.
    let (n, header) = safetensors::SafeTensors::read_metadata(&good).unwrap();
    let (name, t) = header
        .tensors()
        .into_iter()
        .find(|(k, _)| k.ends_with(".exp_avg_sq"))
        .unwrap();
    let at = 8 + n + t.data_offsets.0;
    let mut bad = good.clone();
    bad[at..at + 4].copy_from_slice(&(-1.0f32).to_le_bytes());
    std::fs::write(&state, &bad).unwrap();
    let e = load(dir.path(), &layout).err().unwrap().to_string();
    assert!(e.contains(&format!("{name} holds -1 at element 0")), "{e}");
    std::fs::write(&state, &good).unwrap();
    load(dir.path(), &layout).unwrap();
    // The step in trainer.json is not the directory's.
    let meta = step.join("trainer.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["progress"]["step"] = serde_json::json!(0);
    std::fs::write(&meta, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = load(dir.path(), &layout).err().unwrap().to_string();
    assert!(
        e.contains("progress.step 0 in the directory of step 2"),
        "{e}"
    );
    // A data position past what its iterations could consume (it overflowed the loader once),
    // a dp of 0 and ZeRO stage 9: refused, naming what is wrong.
    for (key, value, says) in [
        ("samples", serde_json::json!(u64::MAX), "cannot be"),
        ("samples", serde_json::json!(1u64 << 40), "cannot be"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["progress"][key] = value;
        std::fs::write(&meta, serde_json::to_vec(&v).unwrap()).unwrap();
        let e = load(dir.path(), &layout).err().unwrap().to_string();
        assert!(e.contains(says), "{key}: {e}");
    }
    for (key, value) in [("saved_dp", 0u64), ("saved_zero_stage", 9)] {
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v[key] = serde_json::json!(value);
        std::fs::write(&meta, serde_json::to_vec(&v).unwrap()).unwrap();
        let e = load(dir.path(), &layout).err().unwrap().to_string();
        assert!(e.contains("stage 0 to 3"), "{key}: {e}");
    }
    // A model of one layer fewer than the state's: export refuses, writing nothing.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["model_config"]["num_hidden_layers"] = serde_json::json!(1);
    std::fs::write(&meta, serde_json::to_vec(&v).unwrap()).unwrap();
    let out = dir.path().join("hf");
    let e = checkpoint::export(dir.path(), &out, tessera_tensor::DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tensors the model of its trainer.json has not"),
        "{e}"
    );
    assert!(!out.exists());
    std::fs::write(&meta, &text).unwrap();
    checkpoint::export(dir.path(), &out, tessera_tensor::DType::F32).unwrap();
}

#[test]
fn export_writes_an_hf_model_that_inference_loads_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    segment(2, 3, 3, None, Some(dir.path()));
    let out = dir.path().join("hf");
    checkpoint::export(dir.path(), &out, tessera_tensor::DType::F32).unwrap();
    let model = tiny_model(false);
    let layout = ParamLayout::new(&model);
    let ck = load(dir.path(), &layout).unwrap();
    let tokens: Vec<u32> = vec![1, 8, 43, 26, 5, 28, 47];
    let tm = TrainModel::new(model.clone());
    let want = tm
        .logits(
            &mut FullParams::new(ck.master),
            &tokens,
            BatchDims {
                batch: 1,
                seq: tokens.len(),
            },
            tessera_tensor::DType::F32,
        )
        .unwrap();
    let lm = tessera_model::LlamaModel::load(
        &out,
        tessera_model::TpRank { rank: 0, size: 1 },
        tessera_tensor::DType::F32,
    )
    .unwrap();
    let comm = tessera_comm::LocalGroup::new(1).into_comms().pop().unwrap();
    let mut cache = lm.new_cache(16).unwrap();
    let got = lm
        .forward(&tokens, &mut cache, tessera_model::Logits::All, &comm)
        .unwrap();
    let max = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max < 1e-4, "logits differ by {max}");
}

/// The entries of `dir` whose names start with `.step_` (temporary save directories), sorted.
fn temp_dirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".step_"))
        .collect();
    v.sort();
    v
}

/// `body` on a fresh trainer of `tiny_model` (one rank, ZeRO 0, seed 0) and that model's
/// config.json as a save records it.
fn with_fresh_trainer<R: Send>(
    body: impl Fn(&mut Trainer, &serde_json::Value) -> Result<R, tessera_train::TrainError> + Sync,
) -> Result<Vec<R>, tessera_train::TrainError> {
    let model = tiny_model(false);
    let model_json: serde_json::Value = serde_json::from_str(
        &tessera_model::synthetic::llama_config_json(48, 32, 64, 2, 4, 2, false),
    )
    .unwrap();
    run_dp(1, |comm| {
        let layout = ParamLayout::new(&model);
        let mut t = Trainer::new(
            comm,
            model.clone(),
            config(0, ""),
            SEQ,
            random_init(&layout, 0),
        )?;
        body(&mut t, &model_json)
    })
}

#[test]
fn a_failed_save_leaves_no_temporary_directory_and_clears_those_of_dead_runs() {
    let dir = tempfile::tempdir().unwrap();
    // What saves killed midway left: one of a process gone two hours ago (a pid above the
    // system's largest, so never a live one), one of a process gone that wrote a moment ago (as a
    // live save on another host sharing the root would look), one of a process that runs (pid 1).
    let dead = dead_pid();
    let old = dir.path().join(format!(".step_00000004.tmp-{dead}"));
    std::fs::create_dir_all(old.join("x")).unwrap();
    let hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    for p in [old.join("x"), old.clone()] {
        std::fs::File::open(&p)
            .unwrap()
            .set_modified(hours_ago)
            .unwrap();
    }
    let recent = format!(".step_00000005.tmp-{}", dead + 1);
    std::fs::create_dir_all(dir.path().join(&recent)).unwrap();
    std::fs::create_dir_all(dir.path().join(".step_00000004.tmp-1")).unwrap();
    // The save fails after its state file is written: the tokenizer to copy is not there.
    let missing = dir.path().join("no-tokenizer.json");
    let e = with_fresh_trainer(|t, model_json| {
        save(
            t,
            dir.path(),
            0,
            model_json,
            Some(&missing),
            &Default::default(),
        )
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("no-tokenizer.json"), "{e}");
    assert_eq!(
        temp_dirs(dir.path()),
        [".step_00000004.tmp-1".to_string(), recent]
    );
    assert!(!dir.path().join("latest").exists());
}

/// A step saved again (a resumed run passing a step saved before) replaces the old directory
/// whole, leaving nothing beside it.
#[test]
fn a_step_saved_again_replaces_the_old_one_whole() {
    let dir = tempfile::tempdir().unwrap();
    let saved = with_fresh_trainer(|t, model_json| {
        let first = save(t, dir.path(), 0, model_json, None, &Default::default())?;
        std::fs::write(first.join("marker"), "old").unwrap();
        save(t, dir.path(), 0, model_json, None, &Default::default())
    })
    .unwrap();
    assert!(
        !saved[0].join("marker").exists(),
        "the old directory stayed"
    );
    assert!(saved[0].join("state.safetensors").exists());
    assert_eq!(temp_dirs(dir.path()), Vec::<String>::new());
    load(dir.path(), &ParamLayout::new(&tiny_model(false))).unwrap();
}

/// A pid above the system's largest: never a live process.
fn dead_pid() -> u64 {
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4_194_304);
    pid_max + 1000
}

/// A save of a step again, killed between moving the old copy aside and renaming the new one in,
/// loses nothing: the old copy loads where it is, and the next save puts it back under its name;
/// one killed after the rename (or while removing the old copy) leaves it to that save to remove.
/// The killed save's pid is this process's own, as a trainer restarted in a fresh container often
/// gets.
#[test]
fn a_step_moved_aside_by_a_killed_save_is_read_and_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let layout = ParamLayout::new(&tiny_model(false));
    let dead = dead_pid();
    let step0 = dir.path().join("step_00000000");
    let aside = dir
        .path()
        .join(format!(".step_00000000.old-{}", std::process::id()));
    with_fresh_trainer(|t, model_json| {
        save(t, dir.path(), 0, model_json, None, &Default::default())
    })
    .unwrap();
    std::fs::write(step0.join("marker"), "the step").unwrap();
    std::fs::rename(&step0, &aside).unwrap();
    let unfinished = dir.path().join(format!(".step_00000000.tmp-{dead}"));
    std::fs::create_dir_all(&unfinished).unwrap();

    for path in [dir.path().to_path_buf(), step0.clone()] {
        let ck = load(&path, &layout).unwrap();
        assert_eq!(ck.dir, aside, "loading {}", path.display());
        assert_eq!(ck.meta.progress.step, 0);
    }
    assert!(!step0.exists(), "a load wrote to the checkpoint");

    // The next save (of another step) renames the old copy back first.
    with_fresh_trainer(|t, model_json| {
        t.progress.step = 1;
        save(t, dir.path(), 0, model_json, None, &Default::default())
    })
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(step0.join("marker")).unwrap(),
        "the step"
    );
    assert_eq!(
        temp_dirs(dir.path()),
        [format!(".step_00000000.tmp-{dead}")],
        "the unfinished copy is recent, so kept; nothing moved aside is left"
    );

    // Killed after the new copy was renamed in, or while removing the old one (its trainer.json
    // already gone): the old one beside it is removed by the next save.
    let leftover = dir.path().join(format!(".step_00000001.old-{dead}"));
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::copy(
        step0.join("state.safetensors"),
        leftover.join("state.safetensors"),
    )
    .unwrap();
    with_fresh_trainer(|t, model_json| {
        t.progress.step = 2;
        save(t, dir.path(), 0, model_json, None, &Default::default())
    })
    .unwrap();
    assert!(!leftover.exists());
    assert!(dir.path().join("step_00000001/state.safetensors").exists());
    assert_eq!(load(dir.path(), &layout).unwrap().meta.progress.step, 2);
}

#[test]
fn an_export_to_f16_of_a_weight_beyond_its_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    segment(1, 0, 1, None, Some(dir.path()));
    // 1e5 as the first value of a master weight (f16 holds up to 65504).
    let state = dir.path().join("step_00000001/state.safetensors");
    let mut bytes = std::fs::read(&state).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let at = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor(name).unwrap().data().as_ptr() as usize - bytes.as_ptr() as usize
    };
    bytes[at..at + 4].copy_from_slice(&1e5f32.to_le_bytes());
    std::fs::write(&state, &bytes).unwrap();
    let out = dir.path().join("hf");
    let e = checkpoint::export(dir.path(), &out, tessera_tensor::DType::F16)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(name) && e.contains("100000"), "{e}");
    assert!(e.contains("bf16 or f32") && !e.contains('\n'), "{e}");
    assert!(!out.exists(), "nothing is written");
    // bf16 holds it.
    checkpoint::export(dir.path(), &out, tessera_tensor::DType::BF16).unwrap();
}

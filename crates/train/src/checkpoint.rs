//! Training checkpoints, independent of the parallel layout: one entry per full parameter (its HF
//! name) for the fp32 master weight and both Adam moments, plus the progress (step, data position,
//! loss scaler), the seed and the model's `config.json`. A run saved at one dp / ZeRO stage
//! resumes at any other, and `export` turns a checkpoint into an HF model directory.
//!
//! Saves are atomic: a step's files go to a temporary directory, are fsynced, and the directory is
//! renamed into place; only then is `latest` (a one-line pointer) replaced, atomically too. A crash
//! at any point leaves the previous `latest` and what it names intact (a step saved again is moved
//! aside before the new copy is renamed in; [`resolve`] reads it there if the save was killed
//! between the two, and the next save puts it back).
//!
//! ```text
//! CKPT/latest                      "step_00000200"
//! CKPT/step_00000200/state.safetensors   NAME, NAME.exp_avg, NAME.exp_avg_sq (f32)
//! CKPT/step_00000200/trainer.json        progress, seed, seq, model config, losses logged
//! CKPT/step_00000200/tokenizer.json      when the data had one
//! ```

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use tessera_model::grad::ParamLayout;
use tessera_tensor::DType;

pub use crate::files::write_atomic;
use crate::files::{stays_in_dir, sync_dir, NewFiles, TempPath};
use crate::trainer::{Progress, Trainer};
use crate::TrainError;

pub const FORMAT: &str = "tessera-train-checkpoint-v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    pub progress: Progress,
    pub seed: u64,
    pub seq: usize,
    /// The HF `config.json` of the model, verbatim.
    pub model_config: serde_json::Value,
    /// The layout it was saved from (informative: any layout can load it).
    pub saved_dp: usize,
    pub saved_zero_stage: u8,
    /// The losses the run logged up to this save, so that a resumed run's curve starts at step 1
    /// (absent or null in checkpoints of earlier versions: empty).
    #[serde(default, deserialize_with = "null_as_default")]
    pub history: LogHistory,
}

/// The losses a run has logged (as transformers' `log_history` in `trainer_state.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogHistory {
    /// `(step, training loss)` of every step that updated the weights.
    #[serde(default, deserialize_with = "null_as_default")]
    pub train: Vec<(u64, f64)>,
    /// `(step, validation loss)`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub val: Vec<(u64, f64)>,
}

impl LogHistory {
    /// What a run resumed at `step` goes on from: the points up to it, in step order, one a step
    /// (a history edited or copied from elsewhere may hold others).
    pub fn up_to(mut self, step: u64) -> Self {
        for points in [&mut self.train, &mut self.val] {
            points.retain(|p| p.0 <= step);
            points.sort_by_key(|p| p.0);
            points.dedup_by_key(|p| p.0);
        }
        self
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn finite(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
    points.iter().copied().filter(|p| p.1.is_finite()).collect()
}

fn ck_err(path: &Path, msg: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// The three tensors of the state file each parameter has, by the suffix of their names: the
/// master weight, Adam's first and second moments (in that order).
const STATE_SUFFIXES: [&str; 3] = ["", ".exp_avg", ".exp_avg_sq"];

/// Saves started in this process, for the crash test hook below.
static SAVES: AtomicUsize = AtomicUsize::new(0);

/// Test hook: `TESSERA_CRASH_DURING_SAVE=N` aborts the process halfway through writing the Nth
/// save's state file, as a kill would.
fn maybe_crash(file: &mut File, bytes: &[u8]) {
    let n = SAVES.load(Ordering::SeqCst);
    let crash_at = std::env::var("TESSERA_CRASH_DURING_SAVE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if crash_at == Some(n) {
        let _ = file.write_all(&bytes[..bytes.len() / 2]);
        let _ = file.sync_all();
        std::process::abort();
    }
}

/// Saves the trainer's state under `root` (a collective: every rank calls it; rank 0 writes),
/// with the losses logged so far. Returns the step directory.
pub fn save(
    trainer: &mut Trainer,
    root: &Path,
    seed: u64,
    model_config: &serde_json::Value,
    tokenizer: Option<&Path>,
    history: &LogHistory,
) -> Result<PathBuf, TrainError> {
    let (master, m, v) = trainer.engine.gather_full()?;
    let name = format!("step_{:08}", trainer.progress.step);
    let final_dir = root.join(&name);
    if trainer.rank() != 0 {
        return Ok(final_dir);
    }
    SAVES.fetch_add(1, Ordering::SeqCst);
    std::fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
    remove_stale_temp_dirs(root);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    // Removed again on every error below (a full disk): failed saves, retried, would otherwise
    // pile temporary directories up until the disk is full for good. A crash (the test hook's
    // abort) skips this; the next save cleans up after it.
    let tmp_guard = TempPath::new(tmp.clone());
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;

    let layout = &trainer.model.layout;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
    for (u, unit) in layout.units.iter().enumerate() {
        for p in &unit.params {
            for (suffix, src) in STATE_SUFFIXES.into_iter().zip([&master, &m, &v]) {
                let vals = &src[u][p.offset..p.offset + p.len];
                let bytes: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
                tensors.push((format!("{}{suffix}", p.name), p.shape.clone(), bytes));
            }
        }
    }
    let bytes = serialize(&tensors, &tmp)?;
    let state = tmp.join("state.safetensors");
    let mut f = File::create(&state).map_err(|e| TrainError::io(&state, e))?;
    maybe_crash(&mut f, &bytes);
    f.write_all(&bytes).map_err(|e| TrainError::io(&state, e))?;
    f.sync_all().map_err(|e| TrainError::io(&state, e))?;
    drop(f);

    let meta = CheckpointMeta {
        format: FORMAT.into(),
        progress: trainer.progress.clone(),
        seed,
        seq: trainer.seq,
        model_config: model_config.clone(),
        saved_dp: trainer.dp(),
        saved_zero_stage: trainer.engine.stage,
        // JSON has no NaN or infinity: such a loss (none is logged today) is left out.
        history: LogHistory {
            train: finite(&history.train),
            val: finite(&history.val),
        },
    };
    let json = meta_json(&meta);
    write_atomic(&tmp.join("trainer.json"), &json)?;
    if let Some(t) = tokenizer {
        let b = std::fs::read(t).map_err(|e| TrainError::io(t, e))?;
        write_atomic(&tmp.join("tokenizer.json"), &b)?;
    }
    sync_dir(&tmp);
    // A step saved again (a resumed run passing the same step): the old directory is moved
    // aside, the new one renamed in, and only then the old one removed, so at every moment one
    // whole copy of the step is under its name or beside it.
    let old = root.join(format!(".{name}.old-{}", std::process::id()));
    let had_old = final_dir.exists();
    if had_old {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        std::fs::rename(&final_dir, &old).map_err(|e| TrainError::io(&final_dir, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, &final_dir) {
        if had_old {
            // Put the old step back; the new one stays in its temporary (removed by its guard).
            let _ = std::fs::rename(&old, &final_dir);
        }
        return Err(TrainError::io(&final_dir, e));
    }
    tmp_guard.keep();
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    sync_dir(root);
    write_atomic(&root.join("latest"), name.as_bytes())?;
    Ok(final_dir)
}

/// Removes the temporary directories (`.step_*.tmp-PID`) of saves whose process no longer runs:
/// what a crash or a kill during a save left. A live process's (another rank's run on this host,
/// however unlikely in one root) is left alone, and so is any whose owner cannot be told.
///
/// A step that a save of it again had moved aside (`.step_N.old-PID`) is put back under its name
/// when the save was killed before renaming the new copy in, and removed when it was killed after.
fn remove_stale_temp_dirs(root: &Path) {
    let asides = moved_aside(root);
    let mut names: Vec<&str> = asides.iter().map(|(n, _)| n.as_str()).collect();
    names.dedup();
    for name in names {
        let step = root.join(name);
        let mut copies = asides.iter().filter(|(n, _)| n == name).map(|(_, p)| p);
        // The step is whole under its name: every copy beside it goes, whole or not. Else a
        // whole copy is renamed back (the first; any other then goes in the next round).
        if step.join("trainer.json").exists() {
            for aside in copies {
                let _ = std::fs::remove_dir_all(aside);
            }
        } else if !step.exists() {
            if let Some(aside) = copies.find(|p| is_whole(p)) {
                let _ = std::fs::rename(aside, &step);
            }
        }
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.starts_with(".step_"))
            .and_then(|n| n.rsplit_once(".tmp-"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir
            && pid != std::process::id()
            && process_is_gone(pid)
            && untouched_for(&e.path(), STALE_AFTER)
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// How long a temporary save directory must have been left unwritten before it counts as stale:
/// the process test alone cannot see a live save on another host sharing the root (a network
/// file system) or in another pid namespace, but such a save writes its files all along.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether neither `dir` nor anything directly in it was modified within `age`.
fn untouched_for(dir: &Path, age: std::time::Duration) -> bool {
    let recent = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .map_or(true, |t| t.elapsed().map_or(true, |e| e < age))
    };
    if recent(dir) {
        return false;
    }
    std::fs::read_dir(dir).is_ok_and(|entries| entries.flatten().all(|e| !recent(&e.path())))
}

/// Whether no process `pid` runs on this host (Linux: no `/proc/PID`). Elsewhere it cannot be
/// told cheaply, and a directory that might be a live save's is kept.
fn process_is_gone(pid: u32) -> bool {
    cfg!(target_os = "linux")
        && Path::new("/proc/self").exists()
        && !Path::new("/proc").join(pid.to_string()).exists()
}

fn serialize(tensors: &[(String, Vec<usize>, Vec<u8>)], at: &Path) -> Result<Vec<u8>, TrainError> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(StDtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ck_err(at, format!("tensor {n}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, None).map_err(|e| ck_err(at, e.to_string()))
}

/// The step directory a path names: a step directory itself, or a root with `latest`.
pub fn resolve(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join("trainer.json").exists() {
        return Ok(path.to_path_buf());
    }
    // A step directory named directly that a killed save of it again left moved aside (a bare
    // name is one in the working directory).
    let named = path.file_name().and_then(|n| n.to_str());
    if let (Some(root), Some(name)) = (path.parent(), named.filter(|n| n.starts_with("step_"))) {
        let root = if root.as_os_str().is_empty() {
            Path::new(".")
        } else {
            root
        };
        if let Some(aside) = whole_aside(root, name) {
            return Ok(aside);
        }
    }
    let latest = path.join("latest");
    let name = std::fs::read_to_string(&latest).map_err(|_| {
        ck_err(
            path,
            "is neither a checkpoint step directory nor a root with a `latest` file",
        )
    })?;
    let name = name.trim();
    if name.is_empty() || name.contains(['\n', '\r']) || !stays_in_dir(name) {
        return Err(ck_err(
            &latest,
            format!("names {name:?}, not a step directory"),
        ));
    }
    let dir = path.join(name);
    if !dir.join("trainer.json").exists() {
        // A save of this step again, killed between moving the old copy aside and renaming the
        // new one in: the old copy is the step (read where it is; the next save renames it back).
        if let Some(aside) = whole_aside(path, name) {
            return Ok(aside);
        }
    }
    Ok(dir)
}

/// The copies of steps that saves of them again moved aside (`.step_N.old-PID`) and did not get
/// to remove because their process ended, as (step name, path), sorted. A copy named with this
/// process's own id is a predecessor's too (a restarted container's trainer often gets the same
/// pid): this process removes or restores its own before it returns from a save.
fn moved_aside(root: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return vec![];
    };
    let mut found: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let (name, pid) = file.strip_prefix('.')?.split_once(".old-")?;
            let pid = pid.parse::<u32>().ok()?;
            let ended = pid == std::process::id() || process_is_gone(pid);
            (name.starts_with("step_") && ended && e.path().is_dir())
                .then(|| (name.to_string(), e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Whether a step directory is whole (a removal killed midway leaves part of one).
fn is_whole(dir: &Path) -> bool {
    dir.join("trainer.json").is_file()
}

/// The first whole copy of step `name` moved aside under `root` ([`moved_aside`]).
fn whole_aside(root: &Path, name: &str) -> Option<PathBuf> {
    moved_aside(root)
        .into_iter()
        .find(|(n, p)| n == name && is_whole(p))
        .map(|(_, p)| p)
}

/// A loaded checkpoint: its metadata and per-unit full master weights and moments.
pub struct LoadedCheckpoint {
    pub dir: PathBuf,
    pub meta: CheckpointMeta,
    pub master: Vec<Vec<f32>>,
    pub exp_avg: Vec<Vec<f32>>,
    pub exp_avg_sq: Vec<Vec<f32>>,
}

/// Reads `path` (see [`resolve`]) into `layout`'s units; every tensor must be there with its shape.
pub fn load(path: &Path, layout: &ParamLayout) -> Result<LoadedCheckpoint, TrainError> {
    let dir = resolve(path)?;
    let meta = read_meta(&dir)?;
    let state = dir.join("state.safetensors");
    let bytes = std::fs::read(&state).map_err(|e| TrainError::io(&state, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        ck_err(
            &state,
            format!("not a valid safetensors file (truncated?): {e}"),
        )
    })?;
    let mut out = [vec![], vec![], vec![]];
    for unit in &layout.units {
        let mut bufs = [
            vec![0.0f32; unit.len],
            vec![0.0f32; unit.len],
            vec![0.0f32; unit.len],
        ];
        for p in &unit.params {
            for (k, suffix) in STATE_SUFFIXES.iter().enumerate() {
                let name = format!("{}{suffix}", p.name);
                let t = st.tensor(&name).map_err(|_| {
                    ck_err(&state, format!("has no tensor {name} (another model?)"))
                })?;
                if t.dtype() != StDtype::F32 || t.shape() != p.shape.as_slice() {
                    return Err(ck_err(
                        &state,
                        format!(
                            "{name} is {:?} {:?}, the model needs F32 {:?}",
                            t.dtype(),
                            t.shape(),
                            p.shape
                        ),
                    ));
                }
                let vals = &mut bufs[k][p.offset..p.offset + p.len];
                for (d, c) in vals.iter_mut().zip(t.data().chunks_exact(4)) {
                    *d = f32::from_le_bytes(c.try_into().unwrap());
                }
                // A weight or moment that is not a number would train (or export) NaN on; a
                // negative second moment (a sum of squares) would give NaN at its first step.
                let bad = |x: &f32| !x.is_finite() || (k == 2 && *x < 0.0);
                if let Some(i) = vals.iter().position(bad) {
                    return Err(ck_err(
                        &state,
                        format!(
                            "{name} holds {} at element {i}: the checkpoint is corrupt or its run diverged",
                            vals[i]
                        ),
                    ));
                }
            }
        }
        for (o, b) in out.iter_mut().zip(bufs) {
            o.push(b);
        }
    }
    // Every tensor of the state belongs to the model: a state of another (larger) model under
    // this trainer.json is refused rather than read in part.
    let expected = 3 * layout.units.iter().map(|u| u.params.len()).sum::<usize>();
    if st.len() != expected {
        let known: std::collections::HashSet<String> = layout
            .units
            .iter()
            .flat_map(|u| &u.params)
            .flat_map(|p| STATE_SUFFIXES.map(|suffix| format!("{}{suffix}", p.name)))
            .collect();
        let mut extra: Vec<&str> = st
            .names()
            .into_iter()
            .filter(|n| !known.contains(*n))
            .collect();
        extra.sort();
        return Err(ck_err(
            &state,
            format!(
                "holds {} tensors the model of its trainer.json has not (first: {}): another model's state?",
                extra.len(),
                extra.first().copied().unwrap_or("?")
            ),
        ));
    }
    let [master, exp_avg, exp_avg_sq] = out;
    Ok(LoadedCheckpoint {
        dir,
        meta,
        master,
        exp_avg,
        exp_avg_sq,
    })
}

pub fn read_meta(dir: &Path) -> Result<CheckpointMeta, TrainError> {
    let p = dir.join("trainer.json");
    let text = std::fs::read_to_string(&p).map_err(|e| TrainError::io(&p, e))?;
    let meta: CheckpointMeta = serde_json::from_str(&text)
        .map_err(|e| ck_err(&p, format!("invalid trainer.json: {e}")))?;
    if meta.format != FORMAT {
        return Err(ck_err(
            &p,
            format!("format {:?} is not {FORMAT}", meta.format),
        ));
    }
    // A step directory holds the state after its step: its name and its progress agree.
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step_"))
        .and_then(|n| n.parse::<u64>().ok());
    if let Some(step) = named {
        if step != meta.progress.step as u64 {
            return Err(ck_err(
                &p,
                format!(
                    "invalid trainer.json: progress.step {} in the directory of step {step}",
                    meta.progress.step
                ),
            ));
        }
    }
    // The layout it was saved at and how far it got, within what a run can reach: an edited or
    // corrupt file is refused here, not read as a data position past any epoch's (or as a
    // dp of 0).
    let pr = &meta.progress;
    let max_samples = pr
        .iteration
        .max(pr.step)
        .saturating_mul(crate::config::MAX_SAMPLES_PER_STEP as u64);
    if pr.samples > max_samples {
        return Err(ck_err(
            &p,
            format!(
                "invalid trainer.json: progress of {} step(s) in {} iteration(s) over {} sample(s) cannot be",
                pr.step, pr.iteration, pr.samples
            ),
        ));
    }
    if !(1..=tessera_comm::MAX_WORLD_SIZE).contains(&meta.saved_dp) || meta.saved_zero_stage > 3 {
        return Err(ck_err(
            &p,
            format!(
                "invalid trainer.json: saved at dp {} and ZeRO stage {} (dp 1 to {}, stage 0 to 3)",
                meta.saved_dp,
                meta.saved_zero_stage,
                tessera_comm::MAX_WORLD_SIZE
            ),
        ));
    }
    let sc = &meta.progress.scaler;
    if !(sc.scale.is_finite() && sc.scale > 0.0 && sc.min_scale.is_finite() && sc.min_scale >= 0.0)
    {
        return Err(ck_err(
            &p,
            format!(
                "invalid trainer.json: loss scale {} (min {}) must be a positive number (min: not negative)",
                sc.scale, sc.min_scale
            ),
        ));
    }
    Ok(meta)
}

/// Restores a trainer (any dp, any ZeRO stage) from a loaded checkpoint.
pub fn restore(trainer: &mut Trainer, ck: LoadedCheckpoint) -> Result<(), TrainError> {
    trainer
        .engine
        .load_full(ck.master, ck.exp_avg, ck.exp_avg_sq)?;
    trainer.progress = ck.meta.progress;
    Ok(())
}

/// Writes an HF model directory from a checkpoint: `model.safetensors` (weights in `dtype`),
/// `config.json`, and `tokenizer.json` when the checkpoint has one.
pub fn export(path: &Path, out: &Path, dtype: DType) -> Result<PathBuf, TrainError> {
    let dir = resolve(path)?;
    let meta = read_meta(&dir)?;
    let cfg = tessera_model::ModelConfig::from_json(&meta.model_config)?;
    let layout = ParamLayout::new(&cfg);
    let ck = load(&dir, &layout)?;
    let st_dtype = match dtype {
        DType::F32 => StDtype::F32,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
    };
    // Every tensor is converted before anything is written, so a value the dtype cannot hold
    // leaves no output behind.
    let mut tensors = vec![];
    for (u, unit) in layout.units.iter().enumerate() {
        for p in &unit.params {
            let vals = &ck.master[u][p.offset..p.offset + p.len];
            let bytes: Vec<u8> = match dtype {
                DType::F32 => vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
                DType::BF16 => {
                    let h: Vec<_> = vals.iter().map(|x| half::bf16::from_f32(*x)).collect();
                    check_range(&ck.dir, &p.name, vals, &h, "bf16", "f32")?;
                    h.iter().flat_map(|x| x.to_le_bytes()).collect()
                }
                DType::F16 => {
                    let h: Vec<_> = vals.iter().map(|x| half::f16::from_f32(*x)).collect();
                    check_range(
                        &ck.dir,
                        &p.name,
                        vals,
                        &h,
                        "f16 (largest 65504)",
                        "bf16 or f32",
                    )?;
                    h.iter().flat_map(|x| x.to_le_bytes()).collect()
                }
            };
            tensors.push((p.name.clone(), p.shape.clone(), bytes));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(st_dtype, s.clone(), b).expect("sizes agree"),
            )
        })
        .collect();
    let mut md = std::collections::HashMap::new();
    md.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(views, Some(md)).map_err(|e| ck_err(out, e.to_string()))?;
    // A failure (a full disk) takes back what this export wrote, so a retry finds `out` as it was.
    let mut files = NewFiles::create(out)?;
    files.write(&out.join("model.safetensors"), &bytes)?;
    let mut config = meta.model_config.clone();
    if let Some(o) = config.as_object_mut() {
        let name = match dtype {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        };
        o.insert("torch_dtype".into(), name.into());
        o.remove("dtype");
    }
    let json = serde_json::to_vec_pretty(&config).expect("config serialises");
    files.write(&out.join("config.json"), &json)?;
    let tok = dir.join("tokenizer.json");
    if tok.exists() {
        let b = std::fs::read(&tok).map_err(|e| TrainError::io(&tok, e))?;
        files.write(&out.join("tokenizer.json"), &b)?;
    }
    files.finish();
    Ok(out.to_path_buf())
}

/// A weight beyond what the export dtype holds (|x| > 65504 for f16) would be written as inf:
/// refused, naming the tensor, the value and the dtypes that hold it.
fn check_range<T: Copy + Into<f32>>(
    at: &Path,
    name: &str,
    vals: &[f32],
    converted: &[T],
    dtype: &str,
    wider: &str,
) -> Result<(), TrainError> {
    match converted.iter().position(|h| (*h).into().is_infinite()) {
        None => Ok(()),
        Some(i) => Err(ck_err(
            at,
            format!(
                "{name} holds {} at element {i}, beyond the range of {dtype}; export as {wider}",
                vals[i]
            ),
        )),
    }
}

/// `trainer.json`'s text: indented JSON with each logged `[step, loss]` point on a line of its
/// own (plain pretty-printing gives a point four lines, so a run of 100,000 steps 400,000).
fn meta_json(meta: &CheckpointMeta) -> Vec<u8> {
    let mut out = Vec::new();
    let fmt = InnerArraysOnOneLine {
        pretty: serde_json::ser::PrettyFormatter::new(),
        depth: 0,
    };
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    // Strings, numbers and a serde_json::Value into a Vec: nothing here can fail.
    meta.serialize(&mut ser)
        .expect("checkpoint metadata serialises");
    out
}

/// Arrays nested this deep or deeper are written on one line (the history's points: the
/// document's object, `history`, its `train` / `val` arrays, then each point).
const ONE_LINE_FROM_DEPTH: usize = 4;

/// serde_json's pretty formatter, except that arrays at `ONE_LINE_FROM_DEPTH` and deeper are
/// written compactly (`[200, 2.5]`).
struct InnerArraysOnOneLine<'a> {
    pretty: serde_json::ser::PrettyFormatter<'a>,
    depth: usize,
}

impl InnerArraysOnOneLine<'_> {
    fn one_line(&self) -> bool {
        self.depth >= ONE_LINE_FROM_DEPTH
    }
}

impl serde_json::ser::Formatter for InnerArraysOnOneLine<'_> {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth += 1;
        match self.one_line() {
            true => w.write_all(b"["),
            false => self.pretty.begin_array(w),
        }
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        let r = match self.one_line() {
            true => w.write_all(b"]"),
            false => self.pretty.end_array(w),
        };
        self.depth -= 1;
        r
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        match (self.one_line(), first) {
            (true, true) => Ok(()),
            (true, false) => w.write_all(b", "),
            (false, _) => self.pretty.begin_array_value(w, first),
        }
    }

    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        match self.one_line() {
            true => Ok(()),
            false => self.pretty.end_array_value(w),
        }
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth += 1;
        self.pretty.begin_object(w)
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        let r = self.pretty.end_object(w);
        self.depth -= 1;
        r
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.pretty.begin_object_key(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.pretty.begin_object_value(w)
    }

    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.pretty.end_object_value(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// trainer.json is indented JSON with a line a logged point, and reads back as it was.
    #[test]
    fn trainer_json_puts_each_logged_point_on_a_line_and_reads_back() {
        let meta = CheckpointMeta {
            format: FORMAT.into(),
            progress: Progress {
                step: 3,
                iteration: 3,
                samples: 24,
                scaler: crate::LossScaler::none(),
            },
            seed: 1,
            seq: 16,
            model_config: serde_json::json!({
                "vocab_size": 8,
                "architectures": ["LlamaForCausalLM"],
                "rope_scaling": {"factor": 8.0, "pairs": [[1, 2], [3, 4]]},
            }),
            saved_dp: 2,
            saved_zero_stage: 1,
            history: LogHistory {
                train: vec![(1, 3.5), (2, 3.25), (3, 3.0)],
                val: vec![(3, 3.125)],
            },
        };
        let text = String::from_utf8(meta_json(&meta)).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for point in ["[1, 3.5],", "[2, 3.25],", "[3, 3.0]", "[3, 3.125]"] {
            assert!(
                lines.contains(&point),
                "{point} not on a line of its own:\n{text}"
            );
        }
        // Shallower arrays and objects stay indented, one value a line.
        assert!(lines.contains(&"\"LlamaForCausalLM\""), "{text}");
        assert!(lines.contains(&"\"factor\": 8.0,"), "{text}");
        let back: CheckpointMeta = serde_json::from_str(&text).unwrap();
        assert_eq!(back, meta);
    }

    /// A trainer.json written before the losses were logged in it loads with an empty history;
    /// one with them gives them back.
    #[test]
    fn history_is_optional_in_trainer_json() {
        let meta = CheckpointMeta {
            format: FORMAT.into(),
            progress: Progress {
                step: 4,
                iteration: 5,
                samples: 32,
                scaler: crate::LossScaler::none(),
            },
            seed: 1,
            seq: 16,
            model_config: serde_json::json!({"vocab_size": 8}),
            saved_dp: 2,
            saved_zero_stage: 1,
            history: LogHistory {
                train: vec![(1, 3.5), (2, 3.25)],
                val: vec![(2, 3.0)],
            },
        };
        let json = serde_json::to_value(&meta).unwrap();
        let back: CheckpointMeta = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, meta);
        let mut old = json;
        old.as_object_mut().unwrap().remove("history");
        let back: CheckpointMeta = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(back.history, LogHistory::default());
        assert_eq!(back.progress, meta.progress);
        // Null, or a part missing or null: what there is.
        for (history, train) in [
            (serde_json::json!(null), vec![]),
            (serde_json::json!({"train": [[1, 3.5]]}), vec![(1, 3.5)]),
            (
                serde_json::json!({"train": [[1, 3.5]], "val": null}),
                vec![(1, 3.5)],
            ),
        ] {
            old["history"] = history;
            let back: CheckpointMeta = serde_json::from_value(old.clone()).unwrap();
            assert_eq!((back.history.train, back.history.val), (train, vec![]));
        }
    }

    /// A resumed run goes on from the points up to its step, in order, one a step.
    #[test]
    fn history_up_to_a_step() {
        let h = LogHistory {
            train: vec![(2, 2.0), (1, 1.0), (2, 2.5), (5, 5.0)],
            val: vec![(4, 4.0), (2, 2.0)],
        };
        let h = h.up_to(4);
        assert_eq!(h.train, vec![(1, 1.0), (2, 2.0)]);
        assert_eq!(h.val, vec![(2, 2.0), (4, 4.0)]);
    }
}

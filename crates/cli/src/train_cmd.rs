//! `tessera train`: trains a Llama-family model on a token dataset with a DeepSpeed-style config,
//! ZeRO 0-3 over `--dp` in-process data-parallel ranks. Progress goes to stderr (a bar on a
//! terminal); with `--json`, stdout carries exactly one JSON object per optimizer step.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tessera_model::grad::{load_checkpoint, random_init, ParamLayout};
use tessera_model::ModelConfig;
use tessera_train::checkpoint::{self, CheckpointMeta};
use tessera_train::data::unigram_loss;
use tessera_train::{run_dp, CommStats, Dataset, Loader, MemoryStats, TrainConfig, Trainer};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// DeepSpeed-style JSON config (batch sizes, precision, optimizer, scheduler, zero_optimization).
    #[arg(long)]
    pub config: PathBuf,
    /// HF model directory (or config.json file) giving the model's shape.
    #[arg(long)]
    pub model_config: PathBuf,
    /// Dataset directory written by `tessera data prepare`.
    #[arg(long)]
    pub data: PathBuf,
    /// Data-parallel ranks: threads of this process, or, under `tessera launch` (torchrun, srun,
    /// mpirun), the job's processes (then dp must equal their number).
    #[arg(long, default_value_t = 1)]
    pub dp: usize,
    /// Optimizer steps of the whole run (a resumed run continues up to this many).
    #[arg(long, default_value_t = 100)]
    pub steps: u64,
    /// Seed of the initial weights and the data order [default: 0; a resumed run: the
    /// checkpoint's].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// Override `zero_optimization.stage` of the config.
    #[arg(long)]
    pub zero_stage: Option<u8>,
    /// Start from the weights of this HF model directory instead of random ones.
    #[arg(long, conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// Checkpoint root to save into (at the end, and every --save-every steps).
    #[arg(long)]
    pub save: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// Resume from a checkpoint (a root with `latest`, or a step directory), at any dp / stage.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Evaluate the validation loss every N steps (and at the end); 0: only at the end.
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Validation micro-batches per evaluation at most.
    #[arg(long, default_value_t = 64)]
    pub eval_batches: usize,
    /// Where to write the loss-curve image (SVG).
    #[arg(long, default_value = "loss_curve.svg")]
    pub curve: PathBuf,
    /// One JSON object per optimizer step on stdout, and nothing else there.
    #[arg(long)]
    pub json: bool,
}

/// What rank 0 brings back from the run.
struct Outcome {
    /// Every logged loss, a resumed run's checkpoint's included.
    curve: Vec<(u64, f64)>,
    val: Vec<(u64, f64)>,
    tokens: u64,
    secs: f64,
    memory: MemoryStats,
    comm: CommStats,
    steps_run: u64,
}

impl Outcome {
    /// The losses logged so far, for a checkpoint.
    fn history(&self) -> checkpoint::LogHistory {
        checkpoint::LogHistory {
            train: self.curve.clone(),
            val: self.val.clone(),
        }
    }
}

fn read_model_config(p: &Path) -> Result<(serde_json::Value, ModelConfig)> {
    let file = if p.is_dir() {
        p.join("config.json")
    } else {
        p.to_path_buf()
    };
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read model config {}", file.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    let cfg = ModelConfig::from_json(&v).with_context(|| format!("{}", file.display()))?;
    Ok((v, cfg))
}

/// What the planner predicts for this layout's model states, per rank.
fn plan_bytes(
    model: &ModelConfig,
    cfg: &TrainConfig,
    dp: usize,
    seq: usize,
    micro: usize,
    global: usize,
) -> tessera_plan::memory::MemoryBytes {
    use tessera_plan::job::{Optimizer, Precision as P, Recompute, TrainJob};
    use tessera_plan::layout::{Layout, Offload};
    let shape = tessera_plan::ModelShape::from_config("train", model);
    let layout = Layout {
        dp: dp as u64,
        tp: 1,
        pp: 1,
        zero: cfg.zero.stage,
        offload: Offload::None,
    };
    let job = TrainJob {
        seq: seq as u64,
        micro_batch: micro as u64,
        global_batch: global as u64,
        precision: match cfg.precision {
            tessera_train::Precision::F32 => P::Fp32,
            tessera_train::Precision::Bf16 => P::Bf16,
            tessera_train::Precision::Fp16 => P::Fp16,
        },
        optimizer: Optimizer::Adam,
        recompute: if cfg.recompute {
            Recompute::Full
        } else {
            Recompute::None
        },
        sequence_parallel: false,
        interleave: 1,
    };
    // Model states do not depend on the accelerator; the planner needs a cluster shape regardless.
    let mut cluster = tessera_plan::presets::cluster("h100-sxm").expect("a built-in preset");
    cluster.gpus_per_node = cluster.gpus_per_node.max(dp as u64);
    tessera_plan::memory::train_memory(&shape, &layout, &job, &cluster).bytes
}

fn hms(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

pub fn run(a: TrainArgs) -> Result<()> {
    if a.dp == 0 {
        bail!("--dp must be at least 1");
    }
    // Ranks of this process are its threads (launched ones are the job's processes).
    let max_dp = crate::launch_cmd::MAX_LOCAL_RANKS;
    if a.dp > max_dp && !tessera_comm::launched() {
        bail!(
            "--dp must be between 1 and {max_dp} ranks in one process, got {}",
            a.dp
        );
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if a.seq_len < 2 {
        bail!("--seq-len must be at least 2");
    }
    if a.eval_batches == 0 {
        bail!("--eval-batches must be at least 1");
    }
    // What the run writes, checked before it trains: checkpoints of another run are not
    // overwritten (nor those of a run saving into the same root now: it holds the root's lock
    // until it ends), and the loss curve's directory exists.
    let _root_lock = match &a.save {
        Some(root) if tessera_comm::process_rank() == 0 => crate::out_paths::lock_root(root)?,
        _ => None,
    };
    if let Some(root) = &a.save {
        crate::out_paths::checkpoint_root(root, a.resume.as_deref())?;
    }
    crate::out_paths::writable_file(&a.curve, "--curve")?;
    // A pipe (`--config <(jq ...)`, /dev/stdin) reads as a file does.
    if !a.config.exists() || a.config.is_dir() {
        bail!(
            "--config {} {}",
            a.config.display(),
            if a.config.exists() {
                "is a directory (give the training config, DeepSpeed's JSON)"
            } else {
                "does not exist"
            }
        );
    }
    let mut cfg = TrainConfig::from_file(&a.config)?;
    for w in &cfg.warnings {
        errln!("warning: {}: {w}", a.config.display());
    }
    if let Some(s) = a.zero_stage {
        if s > 3 {
            bail!("--zero-stage must be 0, 1, 2 or 3, got {s}");
        }
        cfg.zero.stage = s;
    }
    // The optimizer's swap files go there; a directory that is not there is found now, not after
    // the model is made.
    if let tessera_train::config::OffloadDevice::Nvme(dir) = &cfg.zero.offload_optimizer {
        if !dir.is_dir() {
            bail!(
                "{}: zero_optimization.offload_optimizer.nvme_path {} is not a directory",
                a.config.display(),
                dir.display()
            );
        }
    }
    let (model_json, model_cfg) = read_model_config(&a.model_config)?;
    // A model whose training state cannot fit in this host's memory is refused here, before its
    // weights are made, rather than aborting in an allocation: at least 16-bit weights (2 bytes a
    // parameter), f32 gradients (4) and Adam's two f32 moments (8) unless they go to NVMe, each
    // held whole by every rank below the ZeRO stage that shards it (weights from 3, gradients
    // from 2, moments from 1). (Ranks in this process share the host; launched ranks may span
    // hosts, so they are not checked.)
    let nvme = matches!(
        cfg.zero.offload_optimizer,
        tessera_train::config::OffloadDevice::Nvme(_)
    );
    let copies = |sharded_from: u8| {
        if cfg.zero.stage >= sharded_from {
            1.0
        } else {
            a.dp as f64
        }
    };
    let adam = if nvme { 0.0 } else { 8.0 * copies(1) };
    let need = model_cfg.num_params() as f64 * (2.0 * copies(3) + 4.0 * copies(2) + adam);
    let over = (!tessera_comm::launched())
        .then(|| tessera_tensor::device::exceeds_host_memory(need))
        .flatten();
    if let Some(total) = over {
        bail!(
            "training {} parameters at dp {} with ZeRO stage {} needs at least {:.1} GB of memory (weights, gradients{}), more than this host's {:.1} GB",
            model_cfg.num_params(),
            a.dp,
            cfg.zero.stage,
            need / 1e9,
            if nvme { "" } else { " and Adam's moments" },
            total / 1e9
        );
    }
    if a.seq_len > model_cfg.max_position_embeddings {
        bail!(
            "--seq-len {} exceeds the model's context of {} positions",
            a.seq_len,
            model_cfg.max_position_embeddings
        );
    }
    let (micro, ga) = cfg.batch_for(a.dp)?;
    let ds = Dataset::open(&a.data)?;
    if ds.meta.vocab_size > model_cfg.vocab_size {
        bail!(
            "the dataset's vocabulary ({}) is larger than the model's vocab_size ({})",
            ds.meta.vocab_size,
            model_cfg.vocab_size
        );
    }
    let train_tokens = ds.tokens("train")?;
    let val_tokens = ds.tokens("val")?;
    let tokenizer = ds.meta.tokenizer.as_ref().map(|t| ds.dir.join(t));
    // Saved into every checkpoint and exported with it: one that does not load is refused now,
    // not found out by `export` after the run.
    if let (Some(t), Some(_)) = (&tokenizer, &a.save) {
        if let Err(e) = tokenizers::Tokenizer::from_file(t) {
            bail!(
                "the dataset's tokenizer {} does not load: {e}; the run's checkpoints could not be exported",
                t.display()
            );
        }
    }
    let layout = ParamLayout::new(&model_cfg);
    let mut seed = a.seed.unwrap_or(0);
    let resume: Option<CheckpointMeta> = match &a.resume {
        Some(p) => {
            let dir = checkpoint::resolve(p)?;
            let meta = checkpoint::read_meta(&dir)?;
            if meta.seq != a.seq_len {
                bail!(
                    "the checkpoint was trained with --seq-len {}; resume with the same",
                    meta.seq
                );
            }
            if meta.model_config != model_json
                && ModelConfig::from_json(&meta.model_config)? != model_cfg
            {
                let (a, b) = (&meta.model_config, &model_json);
                let mut keys: Vec<&String> = a
                    .as_object()
                    .into_iter()
                    .chain(b.as_object())
                    .flat_map(|o| o.keys())
                    .filter(|k| a.get(k.as_str()) != b.get(k.as_str()))
                    .collect();
                keys.sort();
                keys.dedup();
                let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
                bail!(
                    "the checkpoint's model config differs from --model-config in {}",
                    keys.join(", ")
                );
            }
            if meta.progress.step >= a.steps {
                bail!(
                    "the checkpoint is at step {} already: --steps {} leaves nothing to train (--steps counts the whole run)",
                    meta.progress.step,
                    a.steps
                );
            }
            if a.seed.is_some_and(|s| s != meta.seed) {
                bail!(
                    "the checkpoint was trained with --seed {}; resume with the same, or without --seed",
                    meta.seed
                );
            }
            if let Some(root) = &a.save {
                crate::out_paths::no_later_steps(root, meta.progress.step)?;
            }
            seed = meta.seed;
            Some(meta)
        }
        None => None,
    };
    let init = match &a.init_from {
        Some(d) => {
            let ck = tessera_model::Checkpoint::open(d)
                .with_context(|| format!("cannot load --init-from {}", d.display()))?;
            load_checkpoint(&layout, &ck)?
        }
        None => random_init(&layout, seed),
    };
    // Fail on a too-small dataset before any thread starts.
    let loader0 = Loader::new(train_tokens.clone(), a.seq_len, seed)?;
    let val_loader = Loader::new(val_tokens.clone(), a.seq_len, seed)?;
    if val_loader.samples_per_epoch() < micro {
        bail!(
            "the validation split holds {} sample(s) of {} tokens, fewer than one micro-batch of {micro}: a shorter --seq-len, a smaller micro-batch, or more validation text (data prepare --val-fraction)",
            val_loader.samples_per_epoch(),
            a.seq_len + 1
        );
    }
    let unigram = unigram_loss(&train_tokens, &val_tokens, model_cfg.vocab_size);
    drop(loader0);
    let params = layout.num_params();
    if !a.json {
        errln!(
            "training {params} parameters: dp {} x micro-batch {micro} x accumulation {ga} x {} tokens, ZeRO stage {}, {:?}",
            a.dp, a.seq_len, cfg.zero.stage, cfg.precision
        );
    }

    let outcome = run_dp(a.dp, |comm| {
        let mut t = Trainer::new(comm, model_cfg.clone(), cfg.clone(), a.seq_len, init.clone())?;
        // A resumed run's curve goes on from the losses its checkpoint logged.
        let mut history = checkpoint::LogHistory::default();
        if let Some(p) = &a.resume {
            let ck = checkpoint::load(p, &t.model.layout)?;
            history = ck.meta.history.clone().up_to(ck.meta.progress.step);
            checkpoint::restore(&mut t, ck)?;
        }
        let rank0 = t.rank() == 0;
        let mut loader = Loader::new(train_tokens.clone(), a.seq_len, seed)?;
        let eval_set = val_loader.eval_batches(t.micro_batch, a.eval_batches, t.dp(), t.rank());
        let mut out = Outcome {
            curve: history.train,
            val: history.val,
            tokens: 0,
            secs: 0.0,
            memory: t.memory(),
            comm: CommStats::default(),
            steps_run: 0,
        };
        let start_step = t.progress.step;
        let t0 = Instant::now();
        let tty = std::io::stderr().is_terminal();
        let mut skipped_in_a_row = 0;
        while t.progress.step < a.steps {
            let b = loader.try_rank_batches(t.progress.samples, t.micro_batch, t.grad_accum, t.dp(), t.rank())?;
            let s = t.train_step(&b)?;
            skipped_in_a_row = if s.skipped { skipped_in_a_row + 1 } else { 0 };
            if skipped_in_a_row >= 50 {
                let why = match cfg.precision {
                    tessera_train::config::Precision::Fp16 => format!(
                        "50 steps in a row overflowed in fp16 (loss scale {}); lower the learning rate or use bf16",
                        s.loss_scale
                    ),
                    p => format!(
                        "50 steps in a row had gradients that are not finite numbers ({p:?}): the run diverged, or a weight is NaN or infinite; lower the learning rate or resume from an earlier checkpoint"
                    ),
                };
                return Err(tessera_train::TrainError::Diverged(why));
            }
            out.tokens += s.tokens as u64;
            out.steps_run += 1;
            let secs = t0.elapsed().as_secs_f64();
            let tps = out.tokens as f64 / secs.max(1e-9);
            if !s.skipped {
                out.curve.push((s.step, s.loss));
            }
            if rank0 {
                if a.json {
                    let line = serde_json::json!({
                        "step": s.step, "loss": s.loss, "lr": s.lr,
                        "grad_norm": s.grad_norm, "tokens_per_s": tps,
                    });
                    // A line that cannot be written (a full disk) ends the run with an error:
                    // the curve asked for would otherwise have holes. A reader that has gone
                    // (`| head -1`) ends it quietly, as any output into a closed pipe does.
                    let mut so = std::io::stdout().lock();
                    if let Err(e) = writeln!(so, "{line}").and_then(|_| so.flush()) {
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            crate::stdout_failed(&e);
                        }
                        return Err(tessera_train::TrainError::Stdout(e));
                    }
                } else {
                    let done = s.step.saturating_sub(start_step);
                    let left = a.steps.saturating_sub(s.step);
                    let eta = secs / done.max(1) as f64 * left as f64;
                    let frac = s.step as f64 / a.steps as f64;
                    let bar: String = (0..30)
                        .map(|i| if (i as f64) < frac * 30.0 { '#' } else { '.' })
                        .collect();
                    let msg = format!(
                        "[{bar}] step {}/{} loss {:.4} lr {:.2e} | {:.0} tok/s | ETA {}{}",
                        s.step,
                        a.steps,
                        s.loss,
                        s.lr,
                        tps,
                        hms(eta),
                        if s.skipped { " (skipped: fp16 overflow)" } else { "" }
                    );
                    if tty {
                        err!("\r{msg}\x1b[K");
                    } else if s.step % 10 == 0 || s.step == a.steps {
                        errln!("{msg}");
                    }
                }
            }
            let at_end = t.progress.step >= a.steps;
            if !s.skipped && a.eval_every > 0 && s.step % a.eval_every == 0 && !at_end {
                let v = t.eval(&eval_set)?;
                out.val.push((s.step, v));
                // On stderr with --json too (stdout then holds only the step objects).
                if rank0 {
                    if tty && !a.json {
                        errln!();
                    }
                    errln!("step {}: validation loss {v:.4}", s.step);
                }
            }
            if let Some(root) = &a.save {
                if !s.skipped && a.save_every > 0 && s.step % a.save_every == 0 && !at_end {
                    let logged = out.history();
                    checkpoint::save(&mut t, root, seed, &model_json, tokenizer.as_deref(), &logged)?;
                }
            }
        }
        out.secs = t0.elapsed().as_secs_f64();
        if rank0 && !a.json && tty {
            errln!();
        }
        let v = t.eval(&eval_set)?;
        out.val.push((t.progress.step, v));
        if let Some(root) = &a.save {
            let logged = out.history();
            let dir =
                checkpoint::save(&mut t, root, seed, &model_json, tokenizer.as_deref(), &logged)?;
            if rank0 {
                errln!("saved {}", dir.display());
            }
        }
        out.memory = t.memory();
        out.comm = t.engine.comm_stats.clone();
        Ok(out)
    })?
    .swap_remove(0);
    // Under a multi-process launch every rank has trained; rank 0 reports and draws the curve.
    if tessera_comm::process_rank() != 0 {
        return Ok(());
    }

    let val = outcome.val.last().map_or(f64::NAN, |v| v.1);
    let svg = tessera_train::curve::loss_curve_svg(&outcome.curve, &outcome.val, Some(unigram));
    tessera_train::checkpoint::write_atomic(&a.curve, svg.as_bytes())
        .with_context(|| format!("cannot write the loss curve to {}", a.curve.display()))?;
    let m = outcome.memory;
    let stage = cfg.zero.stage;
    let dp = a.dp;
    let plan = plan_bytes(&model_cfg, &cfg, dp, a.seq_len, micro, micro * ga * dp);
    let mb = |b: usize| b as f64 / 1e6;
    let steps = outcome.steps_run.max(1) as f64;
    errln!(
        "validation loss {val:.4} (unigram baseline {unigram:.4}); {:.0} train tokens/s over {} steps",
        outcome.tokens as f64 / outcome.secs.max(1e-9),
        outcome.steps_run
    );
    let nvme = if m.nvme > 0 {
        format!(" in memory (+{:.3} on NVMe)", mb(m.nvme))
    } else {
        String::new()
    };
    errln!(
        "per-rank MB: weights {:.3} (+{:.3} gathered peak), gradients {:.3}, optimizer {:.3}{nvme}; `tessera plan` predicts {:.3} / {:.3} / {:.3} for dp {dp} ZeRO-{stage} (gradients here are accumulated in f32)",
        mb(m.weights),
        mb(m.gathered_peak),
        mb(m.grads),
        mb(m.optimizer),
        mb(plan.weights as usize),
        mb(plan.gradients as usize),
        mb(plan.optimizer as usize)
    );
    let c = &outcome.comm;
    errln!(
        "communication per step (rank 0): all-reduce {:.3} MB, reduce-scatter {:.3} MB, all-gather {:.3} MB, {:.1} calls, {:.2} ms waiting",
        c.all_reduce_bytes as f64 / 1e6 / steps,
        c.reduce_scatter_bytes as f64 / 1e6 / steps,
        c.all_gather_bytes as f64 / 1e6 / steps,
        c.calls as f64 / steps,
        c.wait_s * 1e3 / steps
    );
    errln!("loss curve: {}", a.curve.display());
    if let Some(r) = &resume {
        errln!("resumed from step {}", r.progress.step);
    }
    Ok(())
}

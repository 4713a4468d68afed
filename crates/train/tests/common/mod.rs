//! A tiny model, a patterned token stream and a runner shared by the training tests.

#![allow(dead_code)]

use tessera_model::grad::{random_init, ParamLayout};
use tessera_model::ModelConfig;
use tessera_train::{run_dp, Loader, StepStats, TrainConfig, TrainError, Trainer};

pub const SEQ: usize = 16;

pub fn tiny_model(tie: bool) -> ModelConfig {
    let json = tessera_model::synthetic::llama_config_json(48, 32, 64, 2, 4, 2, tie);
    ModelConfig::from_json_str(&json).unwrap()
}

/// A token stream with structure to learn: mostly `t -> 5t + 3 mod 48`, sometimes a jump.
pub fn tokens(n: usize) -> Vec<u32> {
    let mut t = 1u32;
    let mut state = 12345u64;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            t = if (state >> 33) % 7 < 1 {
                ((state >> 40) % 48) as u32
            } else {
                (5 * t + 3) % 48
            };
            t
        })
        .collect()
}

pub fn config(stage: u8, extra: &str) -> TrainConfig {
    TrainConfig::from_json_str(&format!(
        r#"{{"train_batch_size": 24, "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 1.0,
        "optimizer": {{"type": "AdamW", "params": {{"lr": 0.01, "betas": [0.9, 0.95],
                      "eps": 1e-8, "weight_decay": 0.1}}}},
        "scheduler": {{"type": "WarmupCosineLR", "params": {{"total_num_steps": 30,
                      "warmup_num_steps": 5, "warmup_type": "linear"}}}},
        "zero_optimization": {{"stage": {stage}}}{extra}}}"#
    ))
    .unwrap()
}

/// Per rank: the step stats of `steps` steps from sample `start_step`, and the final full master
/// weights (rank 0's).
pub struct RunResult {
    pub stats: Vec<StepStats>,
    pub master: Vec<Vec<f32>>,
}

/// Trains `steps` steps at `dp` ranks from a fresh init (seed 0).
pub fn run(
    dp: usize,
    cfg: &TrainConfig,
    model: &ModelConfig,
    steps: usize,
) -> Result<RunResult, TrainError> {
    let data = tokens(4000);
    let mut out = run_dp(dp, |comm| {
        let layout = ParamLayout::new(model);
        let init = random_init(&layout, 0);
        let mut t = Trainer::new(comm, model.clone(), cfg.clone(), SEQ, init)?;
        let mut loader = Loader::new(data.clone(), SEQ, 0)?;
        let stats = train_steps(&mut t, &mut loader, steps)?;
        let master = t.engine.gather_full()?.0;
        Ok(RunResult { stats, master })
    })?;
    Ok(out.swap_remove(0))
}

/// Runs `steps` optimizer steps of `t` on this rank's batches from `loader`.
pub fn train_steps(
    t: &mut Trainer,
    loader: &mut Loader,
    steps: usize,
) -> Result<Vec<StepStats>, TrainError> {
    let mut stats = vec![];
    for _ in 0..steps {
        let b = loader.rank_batches(
            t.progress.samples,
            t.micro_batch,
            t.grad_accum,
            t.dp(),
            t.rank(),
        );
        stats.push(t.train_step(&b)?);
    }
    Ok(stats)
}

pub fn assert_same_run(a: &RunResult, b: &RunResult, what: &str) {
    assert_eq!(a.stats.len(), b.stats.len());
    for (i, (x, y)) in a.stats.iter().zip(&b.stats).enumerate() {
        let rel = (x.loss - y.loss).abs() / x.loss.abs();
        assert!(
            rel < 1e-5,
            "{what}: step {i} loss {} vs {} (rel {rel:e})",
            x.loss,
            y.loss
        );
        assert_eq!(x.lr, y.lr);
        assert!(
            (x.grad_norm - y.grad_norm).abs() <= 1e-4 * x.grad_norm.abs(),
            "{what}: grad norm"
        );
    }
    for (u, (wa, wb)) in a.master.iter().zip(&b.master).enumerate() {
        let max = wa
            .iter()
            .zip(wb)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(max < 1e-5, "{what}: unit {u} weights differ by {max:e}");
    }
}

//! The trainer of one data-parallel rank: micro-batches forward and backward with gradient
//! accumulation, then one optimizer step through the ZeRO engine, the loss reduced across ranks.
//! Every rank runs the same code (SPMD); only its micro-batches differ.

use std::sync::Arc;

use tessera_comm::{CommExt, Communicator, ReduceOp};
use tessera_model::grad::{BatchDims, TrainModel, TrainOptions};
use tessera_model::ModelConfig;

use crate::config::TrainConfig;
use crate::loss_scale::LossScaler;
use crate::zero::{MemoryStats, ZeroEngine};
use crate::TrainError;

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Optimizer steps applied so far (after this one).
    pub step: u64,
    /// Mean loss over the global batch's tokens.
    pub loss: f64,
    pub lr: f32,
    pub grad_norm: f32,
    /// fp16 overflow: the update was skipped.
    pub skipped: bool,
    pub loss_scale: f32,
    /// Tokens in the global batch.
    pub tokens: usize,
}

/// Training progress that a checkpoint must carry.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Optimizer steps applied (the Adam and schedule counter).
    pub step: u64,
    /// Steps attempted, skipped ones included.
    pub iteration: u64,
    /// Training samples consumed: the data position.
    pub samples: u64,
    pub scaler: LossScaler,
}

pub struct Trainer {
    pub model: TrainModel,
    pub engine: ZeroEngine,
    pub cfg: TrainConfig,
    comm: Arc<dyn Communicator>,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub seq: usize,
    pub progress: Progress,
}

impl Trainer {
    /// `init`: every unit's full initial weights (identical on every rank).
    pub fn new(
        comm: Arc<dyn Communicator>,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        seq: usize,
        init: Vec<Vec<f32>>,
    ) -> Result<Self, TrainError> {
        let dp = comm.world_size();
        let (micro_batch, grad_accum) = cfg.batch_for(dp)?;
        if seq == 0 {
            return Err(TrainError::Config(
                "the sequence length must be at least 1".into(),
            ));
        }
        let model = TrainModel::new(model_cfg);
        let engine = ZeroEngine::new(
            comm.clone(),
            &model.layout,
            cfg.zero.stage,
            cfg.precision.dtype(),
            cfg.zero.overlap_comm,
            init,
            match &cfg.zero.offload_optimizer {
                crate::config::OffloadDevice::Nvme(dir) => Some(dir.as_path()),
                _ => None,
            },
        )?;
        let progress = Progress {
            step: 0,
            iteration: 0,
            samples: 0,
            scaler: cfg.loss_scaler(),
        };
        Ok(Trainer {
            model,
            engine,
            cfg,
            comm,
            micro_batch,
            grad_accum,
            seq,
            progress,
        })
    }

    pub fn dp(&self) -> usize {
        self.comm.world_size()
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Sequences in one global batch.
    pub fn global_batch(&self) -> usize {
        self.micro_batch * self.grad_accum * self.dp()
    }

    pub fn dims(&self) -> BatchDims {
        BatchDims {
            batch: self.micro_batch,
            seq: self.seq,
        }
    }

    /// Sums an f64 over ranks exactly enough (a high and a low f32 part).
    fn sum_f64(&self, x: f64) -> Result<f64, TrainError> {
        let hi = x as f32;
        let mut buf = [hi, (x - hi as f64) as f32];
        self.comm.all_reduce(&mut buf, ReduceOp::Sum)?;
        Ok(buf[0] as f64 + buf[1] as f64)
    }

    /// One optimizer step over this rank's `grad_accum` micro-batches (each `micro_batch` rows
    /// of `seq + 1` tokens).
    pub fn train_step(&mut self, micro_batches: &[Vec<u32>]) -> Result<StepStats, TrainError> {
        if micro_batches.len() != self.grad_accum {
            return Err(TrainError::Data(format!(
                "a step needs {} micro-batches on each rank, got {}",
                self.grad_accum,
                micro_batches.len()
            )));
        }
        let tokens = self.global_batch() * self.seq;
        let scale = self.progress.scaler.scale;
        let opts = TrainOptions {
            dtype: self.cfg.precision.dtype(),
            recompute: self.cfg.recompute,
            grad_scale: scale / tokens as f32,
        };
        let dims = self.dims();
        let mut loss = 0.0f64;
        for mb in micro_batches {
            loss += self
                .model
                .forward_backward(&mut self.engine, mb, dims, opts)?;
        }
        let loss = self.sum_f64(loss)? / tokens as f64;
        let lr = self.cfg.schedule.lr(self.progress.step);
        let scaler = &mut self.progress.scaler;
        let out = self.engine.step(
            lr,
            self.progress.step + 1,
            &self.cfg.adamw,
            self.cfg.gradient_clipping,
            scale,
            |overflow| scaler.update(overflow),
        )?;
        let skipped = out.overflow;
        self.progress.iteration += 1;
        self.progress.samples += self.global_batch() as u64;
        if !skipped {
            self.progress.step += 1;
        }
        Ok(StepStats {
            step: self.progress.step,
            loss,
            lr,
            grad_norm: out.grad_norm,
            skipped,
            loss_scale: scale,
            tokens,
        })
    }

    /// Mean loss over `batches` (this rank's share of the evaluation set; each `micro_batch`
    /// rows), reduced over ranks.
    pub fn eval(&mut self, batches: &[Vec<u32>]) -> Result<f64, TrainError> {
        // The engine's communication counters are training's (bytes and calls an optimizer
        // step): an evaluation's ZeRO-3 gathers and sums are left out of them.
        let stats = self.engine.comm_stats.clone();
        let r = self.eval_batches(batches);
        self.engine.comm_stats = stats;
        r
    }

    fn eval_batches(&mut self, batches: &[Vec<u32>]) -> Result<f64, TrainError> {
        let dims = self.dims();
        let dt = self.cfg.precision.dtype();
        let mut sum = 0.0;
        for b in batches {
            sum += self.model.eval_loss(&mut self.engine, b, dims, dt)?;
        }
        let n = (batches.len() * dims.tokens()) as f64;
        let total = self.sum_f64(sum)?;
        let count = self.sum_f64(n)?;
        Ok(if count > 0.0 { total / count } else { f64::NAN })
    }

    pub fn memory(&self) -> MemoryStats {
        self.engine.memory
    }
}

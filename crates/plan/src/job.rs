//! What the cluster is asked to do: a training job ([`TrainJob`]) or a serving job ([`InferJob`]),
//! with their precisions, optimizer and recomputation policy, each with documented defaults.

use serde::Serialize;

use crate::PlanError;

/// Number format of weights (and activations) during the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Bf16,
    Fp16,
    Fp32,
    /// Inference only: 8-bit weights or KV cache.
    Fp8,
}

impl Precision {
    pub fn bytes(self) -> u64 {
        match self {
            Precision::Fp32 => 4,
            Precision::Bf16 | Precision::Fp16 => 2,
            Precision::Fp8 => 1,
        }
    }

    pub fn parse(s: &str) -> Result<Self, PlanError> {
        match s {
            "bf16" => Ok(Precision::Bf16),
            "fp16" => Ok(Precision::Fp16),
            "fp32" => Ok(Precision::Fp32),
            "fp8" => Ok(Precision::Fp8),
            _ => Err(PlanError::Input(format!(
                "unknown precision {s:?} (bf16, fp16, fp32, fp8)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::Fp32 => "fp32",
            Precision::Fp8 => "fp8",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// AdamW: momentum and variance.
    Adam,
    /// SGD with momentum.
    Sgd,
}

impl Optimizer {
    /// Optimizer-state bytes per parameter (the ZeRO paper's K): with 16-bit training this includes
    /// the fp32 master copy (Adam: 4 + 4 + 4 = 12; SGD: 4 + 4 = 8); fp32 training keeps no copy.
    pub fn state_bytes(self, p: Precision) -> u64 {
        let moments = match self {
            Optimizer::Adam => 8,
            Optimizer::Sgd => 4,
        };
        if p == Precision::Fp32 {
            moments
        } else {
            moments + 4
        }
    }
}

/// Activation recomputation, as in Megatron-LM (`--recompute-granularity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    None,
    /// Only the attention core (softmax, its dropout, attention over V) is recomputed: this is
    /// also what flash attention does.
    Selective,
    /// Only each layer's input is kept; the layer's forward is run again during backward.
    Full,
}

impl Recompute {
    pub fn parse(s: &str) -> Result<Self, PlanError> {
        match s {
            "none" => Ok(Recompute::None),
            "selective" => Ok(Recompute::Selective),
            "full" => Ok(Recompute::Full),
            _ => Err(PlanError::Input(format!(
                "unknown recompute {s:?} (none, selective, full)"
            ))),
        }
    }
}

/// A training job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainJob {
    /// Tokens per sequence (s). Default 4096.
    pub seq: u64,
    /// Sequences per micro-batch per DP rank (b). Default 1.
    pub micro_batch: u64,
    /// Sequences per optimizer step over all DP ranks. Default 512.
    pub global_batch: u64,
    /// Default bf16 (mixed precision with fp32 master weights).
    pub precision: Precision,
    /// Default Adam.
    pub optimizer: Optimizer,
    /// Default selective.
    pub recompute: Recompute,
    /// Megatron sequence parallelism in the TP group. Default on.
    pub sequence_parallel: bool,
    /// Virtual pipeline stages per GPU (interleaved 1F1B). Default 1.
    pub interleave: u64,
}

impl Default for TrainJob {
    fn default() -> Self {
        TrainJob {
            seq: 4096,
            micro_batch: 1,
            global_batch: 512,
            precision: Precision::Bf16,
            optimizer: Optimizer::Adam,
            recompute: Recompute::Selective,
            sequence_parallel: true,
            interleave: 1,
        }
    }
}

/// A serving job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InferJob {
    /// Tokens per sequence, prompt and output together. Default 4096.
    pub context: u64,
    /// Sequences in flight over the whole cluster. Default 64.
    pub seqs: u64,
    /// Weight format. Default bf16.
    pub precision: Precision,
    /// KV cache format. Default: as the weights.
    pub kv_dtype: Precision,
    /// Tokens per KV block, 1 to [`MAX_BLOCK_SIZE`]. Default 16.
    pub block_size: u64,
    /// Token budget of one scheduler step (chunked prefill), which sets the activation peak.
    /// Default 8192.
    pub max_batched_tokens: u64,
}

/// The largest KV block the planner takes, in tokens (vLLM's are 8 to 128).
pub const MAX_BLOCK_SIZE: u64 = 65_536;

impl Default for InferJob {
    fn default() -> Self {
        InferJob {
            context: 4096,
            seqs: 64,
            precision: Precision::Bf16,
            kv_dtype: Precision::Bf16,
            block_size: 16,
            max_batched_tokens: 8192,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Job {
    Train(TrainJob),
    Infer(InferJob),
}

impl TrainJob {
    pub fn validate(&self) -> Result<(), PlanError> {
        for (name, v) in [
            ("seq", self.seq),
            ("micro-batch", self.micro_batch),
            ("global-batch", self.global_batch),
            ("interleave", self.interleave),
        ] {
            if v == 0 {
                return Err(PlanError::Input(format!("--{name} must be > 0")));
            }
        }
        if self.precision == Precision::Fp8 {
            return Err(PlanError::Input(
                "fp8 training is not planned; use bf16, fp16 or fp32".into(),
            ));
        }
        Ok(())
    }
}

impl InferJob {
    pub fn validate(&self) -> Result<(), PlanError> {
        for (name, v) in [
            ("context", self.context),
            ("seqs", self.seqs),
            ("block-size", self.block_size),
            ("max-batched-tokens", self.max_batched_tokens),
        ] {
            if v == 0 {
                return Err(PlanError::Input(format!("--{name} must be > 0")));
            }
        }
        if self.block_size > MAX_BLOCK_SIZE {
            return Err(PlanError::Input(format!(
                "--block-size must be from 1 to {MAX_BLOCK_SIZE} tokens (vLLM uses 8 to 128), got {}",
                self.block_size
            )));
        }
        Ok(())
    }
}

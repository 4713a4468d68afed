//! What the planner is asked: a model, a cluster, a job, the parts of the layout the user fixed,
//! and the two assumptions (memory share, kernel efficiency); and the checks that refuse a request
//! no plan can answer, each with one line.

use crate::job::Job;
use crate::layout::Offload;
use crate::presets::Cluster;
use crate::shape::{ModelShape, MAX_LAYERS};
use crate::PlanError;

/// Parts of the layout the user fixed; the rest is searched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fixed {
    pub dp: Option<u64>,
    pub tp: Option<u64>,
    pub pp: Option<u64>,
    pub zero: Option<u8>,
    pub offload: Option<Offload>,
}

impl Fixed {
    /// Whether the user fixed any part of the layout.
    pub fn any(&self) -> bool {
        self.dp.is_some()
            || self.tp.is_some()
            || self.pp.is_some()
            || self.zero.is_some()
            || self.offload.is_some()
    }
}

/// Everything the planner needs.
#[derive(Debug, Clone)]
pub struct Request {
    pub model: ModelShape,
    pub cluster: Cluster,
    pub job: Job,
    pub fixed: Fixed,
    /// Share of each GPU's memory the job may use. Default 0.9.
    pub mem_util: f64,
    /// Share of peak FLOP/s the kernels reach. Default 0.55.
    pub efficiency: f64,
}

/// Refuses a request no plan can answer.
pub(crate) fn validate(req: &Request) -> Result<(), PlanError> {
    if !(req.mem_util > 0.0 && req.mem_util <= 1.0) {
        return Err(PlanError::Input(format!(
            "--mem-util must be in (0, 1], got {}",
            req.mem_util
        )));
    }
    if !(req.efficiency > 0.0 && req.efficiency <= 1.0) {
        return Err(PlanError::Input(format!(
            "--efficiency must be in (0, 1], got {}",
            req.efficiency
        )));
    }
    let c = &req.cluster;
    if c.nodes == 0 || c.gpus_per_node == 0 || c.gpu_mem_bytes == 0 {
        return Err(PlanError::Input(
            "the cluster needs at least one node, one GPU and some memory".into(),
        ));
    }
    for (name, x) in [
        ("--intra-bw", c.intra_bw),
        ("--inter-bw", c.inter_bw),
        ("--peak-tflops", c.peak_flops_16),
    ] {
        if !(x > 0.0 && x.is_finite()) {
            return Err(PlanError::Input(format!("{name} must be > 0")));
        }
    }
    // The job's own checks first: the magnitudes below round the context to whole KV blocks.
    match &req.job {
        Job::Train(t) => t.validate()?,
        Job::Infer(i) => {
            if req.fixed.zero.is_some_and(|z| z > 0)
                || req.fixed.offload.is_some_and(|o| o != Offload::None)
            {
                return Err(PlanError::Input(
                    "--zero and --offload apply to `train` only".into(),
                ));
            }
            i.validate()?
        }
    }
    check_magnitudes(req)
}

/// Refuses sizes so large that byte counts could overflow 64 bits (no real job comes near).
fn check_magnitudes(req: &Request) -> Result<(), PlanError> {
    let m = &req.model;
    if m.layers > MAX_LAYERS {
        return Err(PlanError::Input(format!(
            "{} has {} layers, more than the {MAX_LAYERS} the planner takes",
            m.name, m.layers
        )));
    }
    let f = |x: u64| x as f64;
    let h = f(m.hidden);
    let mlp = match &m.moe {
        Some(e) => f(m.ffn).max(f(e.expert_ffn) * f(e.experts + e.shared_experts)),
        None => f(m.ffn),
    };
    let attn = f(m.heads) * f(m.head_dim) + f(m.kv_heads) * f(m.head_dim);
    let params = f(m.layers) * (2.0 * h * attn + 3.0 * h * mlp) + 2.0 * f(m.vocab) * h;
    let width = h.max(f(m.vocab)).max(mlp).max(attn);
    let work = match &req.job {
        // A micro-batch's activations, and the step's calls and bytes (each layer's collectives
        // every micro-batch of the global batch).
        Job::Train(t) => {
            (f(t.seq) * f(t.micro_batch) * (width * 64.0 + f(m.heads) * f(t.seq)) * f(m.layers))
                .max(f(t.global_batch) * f(m.layers) * 64.0)
                .max(f(t.global_batch) * f(t.seq) * h * f(m.layers) * 2.0)
        }
        // The KV cache holds the context rounded up to whole blocks, and a replica's blocks.
        Job::Infer(i) => {
            let ctx = f(i.context.div_ceil(i.block_size.max(1))) * f(i.block_size);
            f(i.seqs) * ctx * f(m.layers) * 2.0 * attn * 4.0
                + f(i.max_batched_tokens) * width * 64.0
        }
    };
    let gpus = f(req.cluster.nodes) * f(req.cluster.gpus_per_node);
    let limit = 2f64.powi(60);
    if params * 32.0 > limit || work > limit || gpus > 2f64.powi(24) {
        return Err(PlanError::Input(
            "these sizes are beyond what the planner counts (over an exabyte per GPU, or more than 16M GPUs)".into(),
        ));
    }
    Ok(())
}

//! Estimated time: a training step and its MFU, or serving throughput.
//!
//! Compute runs at `efficiency` × peak FLOP/s. FLOPs per token follow the PaLM convention
//! (Chowdhery et al. 2022, appendix B): forward 2N (N: weights in matmuls, the active experts for
//! MoE, the LM head included) plus 2·s·(d_qk + d_v) per layer for attention, backward twice
//! forward. MFU counts those model FLOPs only; the time also pays for recomputation (another
//! forward for full, the attention core for selective).
//!
//! A training step is `(m + (p − 1)/v)` times the slowest stage's micro-batch (the 1F1B bubble is
//! (p − 1)/(v·m) of the ideal time, Narayanan et al. 2021), TP all-reduces and pipeline sends
//! sitting on the critical path, plus what data-parallel traffic cannot hide behind backward, plus
//! the optimizer step (memory-bound on the GPU, or PCIe, CPU Adam and NVMe under offload).
//!
//! A decode step is memory-bound or compute-bound, whichever is slower: every GPU reads its
//! weights (for MoE, the experts the batch touches) and the KV cache of its sequences.

use serde::Serialize;

use crate::comm_volume::CommItem;
use crate::job::{InferJob, Precision, Recompute, TrainJob};
use crate::layout::{Layout, Offload};
use crate::presets::Cluster;
use crate::shape::ModelShape;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainTime {
    pub step_s: f64,
    /// Pipeline time including the bubble.
    pub pipeline_s: f64,
    /// Pipeline bubble over ideal compute time: (p − 1)/(v·m).
    pub bubble_fraction: f64,
    /// Data-parallel communication not hidden behind compute.
    pub exposed_dp_s: f64,
    pub optimizer_s: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs per step (PaLM convention, no recomputation).
    pub model_flops: f64,
    pub mfu: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InferTime {
    /// Generated tokens per second over all replicas, all sequences decoding.
    pub decode_tokens_per_s: f64,
    /// Time between two tokens of one sequence.
    pub inter_token_s: f64,
    /// Prompt tokens per second over the cluster when it only prefills.
    pub prefill_tokens_per_s: f64,
    /// Share of time a pipeline stage idles because fewer micro-batches than stages are in flight.
    pub bubble_fraction: f64,
}

/// Attention FLOPs per token per layer in the forward pass for a context of `ctx` tokens.
fn attention_flops(model: &ModelShape, ctx: f64) -> f64 {
    2.0 * ctx * (model.q_dim() + model.attn_out_dim()) as f64
}

/// Forward matmul FLOPs per token, on one GPU before TP, of the layers (and LM head) of a stage.
fn stage_forward_flops(model: &ModelShape, layout: &Layout, stage: u64, ctx: f64) -> (f64, f64) {
    let layers = layout.stage_layers(model, stage);
    let mut dense = 0.0;
    let mut attn = 0.0;
    for i in layers {
        dense += 2.0 * model.layer_params(i).active as f64;
        attn += attention_flops(model, ctx);
    }
    if stage == layout.pp - 1 {
        dense += 2.0 * (model.vocab * model.hidden) as f64;
    }
    (dense, attn)
}

fn peak(c: &Cluster, p: Precision) -> f64 {
    if p == Precision::Fp32 {
        c.peak_flops_32
    } else {
        c.peak_flops_16
    }
}

/// Time of one training step.
pub fn train_time(
    model: &ModelShape,
    layout: &Layout,
    job: &TrainJob,
    cluster: &Cluster,
    comm: &[CommItem],
    params_per_gpu: u64,
    efficiency: f64,
) -> TrainTime {
    let m = layout.micro_batches(job) as f64;
    let (p, v) = (layout.pp as f64, job.interleave as f64);
    let rate = peak(cluster, job.precision) * efficiency;
    let tokens_mb = (job.seq * job.micro_batch) as f64;
    let seconds = |what: &str| -> f64 {
        comm.iter()
            .filter(|c| c.what == what)
            .map(|c| c.seconds)
            .sum()
    };
    let tp_mb = seconds("tp_all_reduce") / m;
    let pp_mb = seconds("pp_send_recv") / m;
    let mut slowest = (0.0f64, 0.0f64);
    for stage in 0..layout.pp {
        let (dense, attn) = stage_forward_flops(model, layout, stage, job.seq as f64);
        let fwd = tokens_mb * (dense + attn) / layout.tp as f64;
        let extra = match job.recompute {
            Recompute::None => 0.0,
            Recompute::Selective => tokens_mb * attn / layout.tp as f64,
            Recompute::Full => fwd,
        };
        let total = (3.0 * fwd + extra) / rate;
        let bwd = (2.0 * fwd + extra) / rate;
        if total > slowest.0 {
            slowest = (total, bwd);
        }
    }
    let (compute_mb, bwd_mb) = slowest;
    let t_mb = compute_mb + tp_mb + pp_mb;
    let pipeline_s = (m + (p - 1.0) / v) * t_mb;
    let gather = seconds("dp_all_gather");
    let scatter = seconds("dp_reduce_scatter");
    let exposed_dp_s = match layout.zero {
        0 => (seconds("dp_all_reduce") - bwd_mb).max(0.0),
        1 => (scatter - bwd_mb).max(0.0) + gather,
        2 => m * (scatter / m - bwd_mb).max(0.0) + gather,
        _ => m * ((gather + scatter) / m - compute_mb).max(0.0),
    };
    let shard = if layout.zero >= 1 {
        params_per_gpu.div_ceil(layout.dp)
    } else {
        params_per_gpu
    } as f64;
    let w = job.precision.bytes() as f64;
    let k = job.optimizer.state_bytes(job.precision) as f64;
    let per_node = cluster.gpus_per_node.min(cluster.gpus()) as f64;
    let optimizer_s = match layout.offload {
        Offload::None => shard * (2.0 * k + 2.0 * w) / cluster.hbm_bw,
        Offload::Cpu | Offload::Nvme => {
            let pcie = 2.0 * w * shard / cluster.pcie_bw;
            let cpu = shard * per_node / cluster.cpu_adam_params_per_s;
            let nvme = if layout.offload == Offload::Nvme {
                2.0 * k * shard * per_node / cluster.nvme_bw
            } else {
                0.0
            };
            pcie + cpu + nvme
        }
    };
    let step_s = pipeline_s + exposed_dp_s + optimizer_s;
    let tokens = (job.global_batch * job.seq) as f64;
    let per_token: f64 = 6.0 * model.matmul_params() as f64
        + 3.0 * model.layers as f64 * attention_flops(model, job.seq as f64);
    let model_flops = tokens * per_token;
    TrainTime {
        step_s,
        pipeline_s,
        bubble_fraction: (p - 1.0) / (v * m),
        exposed_dp_s,
        optimizer_s,
        tokens_per_s: tokens / step_s,
        model_flops,
        mfu: model_flops / (step_s * cluster.gpus() as f64 * peak(cluster, job.precision)),
    }
}

/// Throughput of a serving layout. `kv_cache` is the KV bytes the fullest GPU holds.
pub fn infer_time(
    model: &ModelShape,
    layout: &Layout,
    job: &InferJob,
    cluster: &Cluster,
    comm: &[CommItem],
    kv_cache: u64,
    efficiency: f64,
) -> InferTime {
    let seqs = layout.seqs_per_replica(job);
    let micro = layout.pp.min(seqs).max(1);
    let b_mb = seqs.div_ceil(micro) as f64;
    let rate = peak(cluster, job.precision) * efficiency;
    let ctx = job.context as f64;
    let comm_tick: f64 = comm.iter().map(|c| c.seconds).sum::<f64>() / micro as f64;
    let mut tick = 0.0f64;
    for stage in 0..layout.pp {
        let mut weights = 0u64;
        for i in layout.stage_layers(model, stage) {
            let full = layout.layer_params_per_rank(model, i);
            weights += match &model.moe {
                // Expected share of experts that b_mb tokens of top-k routing touch.
                // Only routed experts go unread: attention, the router and the shared experts
                // are read every step.
                Some(moe) if model.is_moe_layer(i) => {
                    let e = moe.experts as f64;
                    let touched = 1.0 - (1.0 - moe.top_k as f64 / e).powf(b_mb);
                    let routed = (moe.experts * model.mlp_params(moe.expert_ffn).0) as f64;
                    full - ((1.0 - touched) * routed / layout.tp as f64) as u64
                }
                _ => full,
            };
        }
        if stage == layout.pp - 1 {
            // The LM head is read whole every step; the embedding only row by row.
            weights += layout.padded_vocab(model) * model.hidden / layout.tp;
        }
        let read = (weights * job.precision.bytes()) as f64 + kv_cache as f64 / micro as f64;
        let (dense, attn) = stage_forward_flops(model, layout, stage, ctx);
        let flops = b_mb * (dense + attn) / layout.tp as f64;
        tick = tick.max((read / cluster.hbm_bw).max(flops / rate));
    }
    let tick = tick + comm_tick;
    let step = layout.pp as f64 * tick;
    let prefill_per_token = 2.0 * model.matmul_params() as f64
        + model.layers as f64 * attention_flops(model, ctx / 2.0);
    InferTime {
        // Every sequence advances once per step of the fullest replica (the others are no slower).
        decode_tokens_per_s: job.seqs as f64 / step,
        inter_token_s: step,
        prefill_tokens_per_s: cluster.gpus() as f64 * rate / prefill_per_token,
        bubble_fraction: 1.0 - micro as f64 / layout.pp as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm_volume;
    use crate::presets;

    #[test]
    fn single_gpu_step_is_compute_plus_optimizer() {
        let model = presets::model("llama-3-8b").unwrap();
        let mut c = presets::cluster("h200").unwrap();
        c.gpus_per_node = 1;
        let job = TrainJob {
            global_batch: 4,
            recompute: Recompute::None,
            ..TrainJob::default()
        };
        let l = Layout {
            dp: 1,
            tp: 1,
            pp: 1,
            zero: 0,
            offload: Offload::None,
        };
        let psi = model.total_params();
        let comm = comm_volume::train_comm(&model, &l, &job, &c, psi);
        assert!(comm.is_empty());
        let t = train_time(&model, &l, &job, &c, &comm, psi, 0.5);
        let tokens = 4.0 * 4096.0;
        let flops =
            tokens * (6.0 * model.matmul_params() as f64 + 3.0 * 32.0 * 2.0 * 4096.0 * 8192.0);
        let compute = flops / (989e12 * 0.5);
        let opt = psi as f64 * 28.0 / 4800e9;
        assert!((t.step_s - compute - opt).abs() < 1e-9 * t.step_s, "{t:?}");
        assert!((t.mfu - flops / (t.step_s * 989e12)).abs() < 1e-12);
        assert_eq!(t.bubble_fraction, 0.0);
    }

    #[test]
    fn bubble_is_p_minus_1_over_m() {
        let model = presets::model("llama-3-70b").unwrap();
        let mut c = presets::cluster("h100-sxm").unwrap();
        c.nodes = 4;
        let job = TrainJob {
            global_batch: 32,
            ..TrainJob::default()
        };
        let l = Layout {
            dp: 1,
            tp: 8,
            pp: 4,
            zero: 0,
            offload: Offload::None,
        };
        let comm = comm_volume::train_comm(&model, &l, &job, &c, 0);
        let t = train_time(&model, &l, &job, &c, &comm, 0, 0.5);
        assert_eq!(t.bubble_fraction, 3.0 / 32.0);
    }
}

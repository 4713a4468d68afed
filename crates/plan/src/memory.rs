//! Memory per GPU for a layout: model states by ZeRO stage (Rajbhandari et al., "ZeRO: Memory
//! Optimizations Toward Training Trillion Parameter Models", arXiv 1910.02054), stored activations
//! ([`crate::activations`]), the buffers of communication and recomputation, the KV cache when
//! serving, and the CPU and NVMe memory that offload takes.
//!
//! Every GPU of a pipeline stage holds the same; the planner reports the stage with the largest
//! total. With Ψ the parameters of a GPU after the TP/PP split, N_d = dp, 16-bit weights and
//! gradients and K optimizer bytes per parameter:
//!
//! | ZeRO | weights | gradients | optimizer |
//! |---|---|---|---|
//! | 0 | 2Ψ | 2Ψ | KΨ |
//! | 1 | 2Ψ | 2Ψ | KΨ/N_d |
//! | 2 | 2Ψ | 2Ψ/N_d | KΨ/N_d |
//! | 3 | 2Ψ/N_d | 2Ψ/N_d | KΨ/N_d |
//!
//! `memory_bytes` counts what tessera allocates. The share of the card left out of `usable`
//! (`1 − mem_util`) covers the CUDA context, NCCL's internal buffers and allocator fragmentation,
//! as vLLM's `gpu_memory_utilization` does.

use serde::Serialize;

use crate::activations::{self, StageActivations};
use crate::job::{InferJob, Recompute, TrainJob};
use crate::layout::{Layout, Offload};
use crate::presets::Cluster;
use crate::shape::ModelShape;

/// Bytes on one GPU, by what they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MemoryBytes {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    /// Communication and working buffers (see [`Buffers`]).
    pub buffers: u64,
    pub kv_cache: u64,
    pub total: u64,
}

impl MemoryBytes {
    fn with_total(mut self) -> Self {
        self.total = self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.buffers
            + self.kv_cache;
        self
    }
}

/// What `buffers` is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Buffers {
    /// ZeRO-3: the layer being computed, gathered whole, and the next one being prefetched.
    pub zero3_gathered: u64,
    /// ZeRO-2/3: a layer's full gradient before its reduce-scatter, double-buffered.
    pub gradient_buckets: u64,
    /// Pipeline send and receive buffers.
    pub pipeline_p2p: u64,
    /// Full recompute: the activations of the one layer being recomputed.
    pub recompute_workspace: u64,
}

impl Buffers {
    fn total(&self) -> u64 {
        self.zero3_gathered + self.gradient_buckets + self.pipeline_p2p + self.recompute_workspace
    }
}

/// Host memory for offload, per node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct HostBytes {
    pub cpu_per_node: u64,
    pub nvme_per_node: u64,
}

/// Memory of the fullest GPU of a training layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainMemory {
    /// The pipeline stage whose GPUs hold the most.
    pub stage: u64,
    pub bytes: MemoryBytes,
    pub buffers: Buffers,
    pub activations: StageActivations,
    /// Parameters the GPUs of the stage holding the most hold, before ZeRO partitioning (what
    /// DP traffic and the optimizer's time are counted on).
    pub params_per_gpu: u64,
    /// Total of every stage, first to last.
    pub stage_totals: Vec<u64>,
    pub host: HostBytes,
}

/// The largest unit ZeRO gathers or buckets on a stage: a layer, or the vocabulary slice.
fn largest_unit(model: &ModelShape, layout: &Layout, stage: u64) -> u64 {
    let layers = layout
        .stage_layers(model, stage)
        .map(|i| layout.layer_params_per_rank(model, i))
        .max()
        .unwrap_or(0);
    let holds_vocab = stage == 0 || stage == layout.pp - 1;
    let vocab = if holds_vocab {
        layout.padded_vocab(model) * model.hidden / layout.tp
    } else {
        0
    };
    layers.max(vocab)
}

fn train_stage(
    model: &ModelShape,
    layout: &Layout,
    job: &TrainJob,
    stage: u64,
) -> (MemoryBytes, Buffers, StageActivations, u64, HostBytes) {
    let psi = layout.stage_params(model, stage);
    let dp = layout.dp;
    let shard = psi.div_ceil(dp);
    let w = job.precision.bytes();
    let k = job.optimizer.state_bytes(job.precision);
    let z = layout.zero;
    let offload = layout.offload != Offload::None;
    let mut m = MemoryBytes {
        weights: w * if z >= 3 { shard } else { psi },
        ..Default::default()
    };
    m.gradients = if z >= 2 {
        // ZeRO-Offload moves each reduced gradient shard to the host as soon as it is ready.
        if offload {
            0
        } else {
            w * shard
        }
    } else {
        w * psi
    };
    m.optimizer = if offload {
        0
    } else {
        k * if z >= 1 { shard } else { psi }
    };
    let act = activations::stage_activations(model, layout, job, stage);
    m.activations = act.total.round() as u64;
    let unit = largest_unit(model, layout, stage);
    let mut b = Buffers::default();
    if z >= 3 {
        b.zero3_gathered = 2 * unit * w;
    }
    if z >= 2 {
        b.gradient_buckets = 2 * unit * w;
    }
    if layout.pp > 1 {
        let hidden_slice = (job.seq * job.micro_batch * model.hidden).div_ceil(layout.tp);
        b.pipeline_p2p = 2 * hidden_slice * job.precision.bytes();
    }
    if job.recompute == Recompute::Full {
        let none = TrainJob {
            recompute: Recompute::None,
            ..job.clone()
        };
        b.recompute_workspace = layout
            .stage_layers(model, stage)
            .map(|i| activations::layer_bytes(model, i, &none, layout.tp).round() as u64)
            .max()
            .unwrap_or(0);
    }
    m.buffers = b.total();
    // Offloaded state per rank: fp32 gradients always on the CPU; optimizer state (K bytes per
    // parameter, fp32 master included) on the CPU or NVMe, with two staging slots of the largest
    // unit in CPU memory for NVMe.
    let host = match layout.offload {
        Offload::None => HostBytes::default(),
        Offload::Cpu => HostBytes {
            cpu_per_node: (k + 4) * shard,
            nvme_per_node: 0,
        },
        Offload::Nvme => HostBytes {
            cpu_per_node: 4 * shard + 2 * k * unit.div_ceil(dp),
            nvme_per_node: k * shard,
        },
    };
    (m.with_total(), b, act, psi, host)
}

/// Memory per GPU of a training layout, and host memory per node for offload.
pub fn train_memory(
    model: &ModelShape,
    layout: &Layout,
    job: &TrainJob,
    cluster: &Cluster,
) -> TrainMemory {
    let stages: Vec<_> = (0..layout.pp)
        .map(|s| train_stage(model, layout, job, s))
        .collect();
    let worst = (0..stages.len())
        .max_by_key(|&s| (stages[s].0.total, std::cmp::Reverse(s)))
        .unwrap_or(0);
    // Upper bound: every GPU of a node holds as much as the fullest rank.
    let per_node = cluster.gpus_per_node.min(cluster.gpus());
    let host = HostBytes {
        cpu_per_node: per_node * stages.iter().map(|s| s.4.cpu_per_node).max().unwrap_or(0),
        nvme_per_node: per_node * stages.iter().map(|s| s.4.nvme_per_node).max().unwrap_or(0),
    };
    let (bytes, buffers, activations, _, _) = stages[worst];
    // The busiest GPU's parameters (DP traffic, optimizer time): the stage holding the most, which
    // is not always the one holding the most bytes (stage 0 keeps the most activations; the last
    // may hold more layers and the LM head).
    let params_per_gpu = stages.iter().map(|s| s.3).max().unwrap_or(0);
    TrainMemory {
        stage: worst as u64,
        bytes,
        buffers,
        activations,
        params_per_gpu,
        stage_totals: stages.iter().map(|s| s.0.total).collect(),
        host,
    }
}

/// Memory of the fullest GPU of a serving layout, and what is left for KV blocks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InferMemory {
    pub stage: u64,
    pub bytes: MemoryBytes,
    pub params_per_gpu: u64,
    /// KV bytes one token takes on one GPU of the fullest stage.
    pub kv_bytes_per_token: u64,
    /// Bytes left for KV blocks on the tightest GPU after weights, activations and buffers.
    pub kv_free_bytes: u64,
    /// KV blocks every GPU of a replica can hold (the same block ids on every rank).
    pub kv_blocks: u64,
    /// Tokens a replica can keep in its KV cache at once.
    pub max_concurrent_tokens: u64,
    pub stage_totals: Vec<u64>,
}

/// Memory per GPU of a serving layout within `usable` bytes per GPU.
pub fn infer_memory(
    model: &ModelShape,
    layout: &Layout,
    job: &InferJob,
    usable: u64,
) -> InferMemory {
    let seqs = layout.seqs_per_replica(job);
    let block = job.block_size.max(1);
    let ctx = job.context.div_ceil(block).saturating_mul(block);
    let a = job.precision.bytes().max(2);
    let mut stages = vec![];
    for stage in 0..layout.pp {
        let layers = layout.stage_layers(model, stage);
        let per_token_layer = model.kv_elems_per_token_layer(layout.tp) * job.kv_dtype.bytes();
        // Saturating: `request::validate` bounds these products far below 2^64, so a saturated
        // sum is a size no GPU holds (a layout that does not fit), never a panic.
        let kv_token = per_token_layer.saturating_mul(layers.clone().count() as u64);
        let kv_needed = layers
            .map(|i| {
                let held = model
                    .window(i)
                    .map_or(ctx, |w| w.div_ceil(block).saturating_mul(block).min(ctx));
                per_token_layer.saturating_mul(held)
            })
            .fold(0u64, u64::saturating_add)
            .saturating_mul(seqs);
        let params = layout.stage_params(model, stage);
        let tokens = job.max_batched_tokens;
        let last = stage == layout.pp - 1;
        let act = activations::infer_peak_bytes(model, layout, tokens, seqs.min(tokens), a, last);
        let mut m = MemoryBytes {
            weights: params * job.precision.bytes(),
            activations: act.round() as u64,
            kv_cache: kv_needed,
            ..Default::default()
        };
        if layout.pp > 1 {
            // Hidden states and the residual stream, sent and received.
            m.buffers = 4 * tokens * model.hidden * a;
        }
        let m = m.with_total();
        let free = usable.saturating_sub(m.weights + m.activations + m.buffers);
        stages.push((m, params, kv_token, free));
    }
    let worst = (0..stages.len())
        .max_by_key(|&s| (stages[s].0.total, std::cmp::Reverse(s)))
        .unwrap_or(0);
    let kv_blocks = stages
        .iter()
        .map(|&(_, _, kv_token, free)| free / kv_token.saturating_mul(block).max(1))
        .min()
        .unwrap_or(0);
    let (bytes, params_per_gpu, kv_token, free) = stages[worst];
    InferMemory {
        stage: worst as u64,
        bytes,
        params_per_gpu,
        kv_bytes_per_token: kv_token,
        kv_free_bytes: free,
        kv_blocks,
        max_concurrent_tokens: kv_blocks.saturating_mul(block),
        stage_totals: stages.iter().map(|s| s.0.total).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;
    use crate::shape::ModelShape;

    fn zero_layout(dp: u64, zero: u8) -> Layout {
        Layout {
            dp,
            tp: 1,
            pp: 1,
            zero,
            offload: Offload::None,
        }
    }

    /// ZeRO paper, Figure 1: Ψ = 7.5B, N_d = 64, K = 12 gives 120, 31.4, 16.6 and 1.9 GB.
    #[test]
    fn zero_paper_figure_1() {
        let model = ModelShape::from_param_count(7_500_000_000, None, None, None, None).unwrap();
        let mut cluster = presets::cluster("a100-80g").unwrap();
        cluster.nodes = 8;
        let job = TrainJob::default();
        let expect = [120.0, 31.4, 16.6, 1.9];
        for (zero, gb) in expect.into_iter().enumerate() {
            let m = train_memory(&model, &zero_layout(64, zero as u8), &job, &cluster).bytes;
            let states = (m.weights + m.gradients + m.optimizer) as f64 / 1e9;
            assert!(
                (states - gb).abs() < 0.05 + 1e-9,
                "zero {zero}: {states} vs {gb}"
            );
        }
        let m = train_memory(&model, &zero_layout(64, 1), &job, &cluster).bytes;
        assert_eq!(
            m.weights + m.gradients + m.optimizer,
            30_000_000_000 + 90_000_000_000 / 64
        );
    }

    #[test]
    fn offload_moves_optimizer_state_to_host() {
        let model = presets::model("llama-3-8b").unwrap();
        let cluster = presets::cluster("h100-sxm").unwrap();
        let job = TrainJob::default();
        let l = Layout {
            dp: 8,
            tp: 1,
            pp: 1,
            zero: 2,
            offload: Offload::Cpu,
        };
        let m = train_memory(&model, &l, &job, &cluster);
        assert_eq!(m.bytes.optimizer, 0);
        assert_eq!(m.bytes.gradients, 0);
        let shard = model.total_params().div_ceil(8);
        // Llama-3's vocabulary is already a multiple of 128, so the shard is Ψ/8.
        assert_eq!(m.host.cpu_per_node, 8 * 16 * shard);
    }

    #[test]
    fn kv_cache_of_llama_70b_at_tp8() {
        // 80 layers × 1 KV head per rank × 128 × 2 (K and V) × 2 bytes = 40 KiB per token per GPU.
        let model = presets::model("llama-3-70b").unwrap();
        let l = Layout {
            dp: 1,
            tp: 8,
            pp: 1,
            zero: 0,
            offload: Offload::None,
        };
        let job = InferJob {
            context: 1000,
            seqs: 3,
            ..InferJob::default()
        };
        let m = infer_memory(&model, &l, &job, 80 << 30);
        assert_eq!(m.kv_bytes_per_token, 80 * 2 * 128 * 2);
        assert_eq!(m.bytes.kv_cache, 3 * 1008 * 80 * 2 * 128 * 2);
        assert_eq!(m.max_concurrent_tokens, m.kv_free_bytes / (40960 * 16) * 16);
    }
}

//! Activation memory: what training stores between a layer's forward and its backward
//! (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
//! arXiv 2205.05198), and the transient peak of one serving step.
//!
//! For a GPT layer (MHA, 4h GeLU MLP, dropout, 16-bit activations) the count reduces exactly to
//! the paper's Table 2, per layer and micro-batch:
//!
//! | | bytes |
//! |---|---|
//! | no parallelism | sbh(34 + 5as/h) |
//! | tensor parallel | sbh(10 + 24/t + 5as/(ht)) |
//! | tensor + sequence parallel | sbh/t · (34 + 5as/h) |
//! | + selective recompute | sbh/t · 34 (or sbh(10 + 24/t) without SP) |
//! | full recompute | 2sbh (2sbh/t with SP) |
//!
//! The same walk over the stored tensors covers GQA (smaller K and V), SwiGLU (three f-wide
//! tensors instead of two), no dropout (no masks), MLA and MoE. Pipeline stage k of the 1F1B
//! schedule holds min(p − k, m) micro-batches; interleaving adds (p − 1)/v on top.

use serde::Serialize;

use crate::job::{Recompute, TrainJob};
use crate::layout::Layout;
use crate::shape::{Attention, ModelShape};

/// Stored activations of one pipeline stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StageActivations {
    /// Bytes one micro-batch stores in the stage's layers.
    pub layers_bytes_per_micro_batch: f64,
    /// Micro-batches whose activations are alive at the peak.
    pub in_flight: f64,
    /// Embedding dropout mask (first stage, per in-flight micro-batch) and final norm, LM head
    /// input and fp32 logits (last stage, one micro-batch).
    pub embedding_and_output_bytes: f64,
    pub total: f64,
}

/// Bytes per token that Megatron's count keeps for layer `i` on one TP rank, before recompute.
/// Returns (held whole by each TP rank unless SP splits it, this rank's share, attention core
/// per unit of sequence length).
fn per_token_terms(model: &ModelShape, i: u64, tp: u64, a: f64) -> (f64, f64, f64) {
    let h = model.hidden as f64;
    let t = tp as f64;
    let mask = if model.dropout { 1.0 } else { 0.0 };
    // Inputs of the two norms and of the two blocks, and the two dropout masks after them.
    let mut whole = 4.0 * a * h + 2.0 * mask * h;
    let mut share = match &model.attention {
        Attention::Gqa { qk_norm, .. } => {
            let q = (model.heads * model.head_dim) as f64 / t;
            let kv = (model.kv_heads.div_ceil(tp) * model.head_dim) as f64;
            // Q, K, V and the input of the output projection; with Qwen3's q/k norms, their
            // inputs too.
            let norms = if *qk_norm { a * (q + kv) } else { 0.0 };
            a * (2.0 * q + 2.0 * kv) + norms
        }
        Attention::Mla {
            q_lora_rank,
            kv_lora_rank,
            qk_rope_head_dim,
            ..
        } => {
            // The latents (norm inputs and up-projection inputs) and the rotary key.
            whole += a
                * (2.0 * *q_lora_rank as f64
                    + 2.0 * *kv_lora_rank as f64
                    + *qk_rope_head_dim as f64);
            let q = model.q_dim() as f64 / t;
            let v = model.attn_out_dim() as f64 / t;
            a * (2.0 * q + 2.0 * v)
        }
    };
    let mlp_tensors = |f: u64| -> f64 {
        // GeLU: its input and the second matmul's input; SwiGLU: gate, up and the down input.
        let n = if model.gated_mlp { 3.0 } else { 2.0 };
        n * a * f as f64 / t
    };
    match &model.moe {
        Some(m) if model.is_moe_layer(i) => {
            // Each token is dispatched to top_k experts; the router's fp32 scores are kept.
            whole += a * h * m.top_k as f64 + 4.0 * m.experts as f64;
            share += (m.top_k + m.shared_experts) as f64 * mlp_tensors(m.expert_ffn);
        }
        _ => share += mlp_tensors(model.ffn),
    }
    // Softmax output, and with dropout its mask and output: (a/t)·s per token each.
    let core = (a + mask * (1.0 + a)) * (model.heads as f64 / t);
    (whole, share, core)
}

/// Bytes layer `i` stores for one micro-batch (`job.micro_batch` sequences of `job.seq` tokens)
/// on one rank of a TP group of `tp`.
pub fn layer_bytes(model: &ModelShape, i: u64, job: &TrainJob, tp: u64) -> f64 {
    let a = job.precision.bytes() as f64;
    let s = job.seq;
    let sp_div = if job.sequence_parallel {
        tp as f64
    } else {
        1.0
    };
    let sb = (s * job.micro_batch) as f64;
    match job.recompute {
        Recompute::Full => sb * a * model.hidden as f64 / sp_div,
        _ => {
            let (whole, share, core) = per_token_terms(model, i, tp, a);
            let core = if job.recompute == Recompute::None {
                core * s as f64
            } else {
                0.0
            };
            sb * (whole / sp_div + share + core)
        }
    }
}

/// Stored activations of pipeline stage `stage` at its peak.
pub fn stage_activations(
    model: &ModelShape,
    layout: &Layout,
    job: &TrainJob,
    stage: u64,
) -> StageActivations {
    let a = job.precision.bytes();
    let (s, b, tp, p) = (job.seq, job.micro_batch, layout.tp, layout.pp);
    let m = layout.micro_batches(job) as f64;
    let sp_div = if job.sequence_parallel {
        tp as f64
    } else {
        1.0
    };
    let per_mb: f64 = layout
        .stage_layers(model, stage)
        .map(|i| layer_bytes(model, i, job, tp))
        .sum();
    let mut in_flight = (p - stage) as f64;
    if job.interleave > 1 {
        in_flight += (p - 1) as f64 / job.interleave as f64;
    }
    let in_flight = in_flight.min(m);
    let sbh = (s * b * model.hidden) as f64;
    let mut extra = 0.0;
    if stage == 0 && model.dropout {
        extra += sbh / sp_div * in_flight;
    }
    if stage == p - 1 {
        let logits = (s * b * layout.padded_vocab(model)) as f64 / tp as f64;
        extra += 2.0 * a as f64 * sbh / sp_div + 4.0 * logits;
    }
    StageActivations {
        layers_bytes_per_micro_batch: per_mb,
        in_flight,
        embedding_and_output_bytes: extra,
        total: per_mb * in_flight + extra,
    }
}

/// Transient activation peak of one serving step of `tokens` tokens on one GPU (layers run one
/// after another, so the largest layer's working set counts once), plus fp32 logits for
/// `sampled` sequences on the last stage.
pub fn infer_peak_bytes(
    model: &ModelShape,
    layout: &Layout,
    tokens: u64,
    sampled: u64,
    act_bytes: u64,
    last_stage: bool,
) -> f64 {
    let a = act_bytes as f64;
    let t = layout.tp as f64;
    let h = model.hidden as f64;
    let attn = match &model.attention {
        Attention::Gqa { .. } => {
            2.0 * h
                + 2.0 * model.q_dim() as f64 / t
                + 2.0 * (model.kv_heads.div_ceil(layout.tp) * model.head_dim) as f64
        }
        Attention::Mla {
            q_lora_rank,
            kv_lora_rank,
            qk_rope_head_dim,
            ..
        } => {
            2.0 * h
                + (q_lora_rank + kv_lora_rank + qk_rope_head_dim) as f64
                + 2.0 * model.q_dim() as f64 / t
                + 2.0 * model.attn_out_dim() as f64 / t
        }
    };
    let n = if model.gated_mlp { 3.0 } else { 2.0 };
    let mlp = match &model.moe {
        Some(m) => {
            2.0 * h
                + m.top_k as f64 * h
                + (m.top_k + m.shared_experts) as f64 * n * m.expert_ffn as f64 / t
        }
        None => 2.0 * h + n * model.ffn as f64 / t,
    }
    .max(2.0 * h + n * model.ffn as f64 / t);
    let mut bytes = tokens as f64 * a * attn.max(mlp);
    if last_stage {
        bytes += 4.0 * (sampled * layout.padded_vocab(model)) as f64 / t;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    /// GPT-3 175B at s = 2048, the shape of the paper's experiments.
    fn gpt3() -> ModelShape {
        presets::model("gpt-3-175b").unwrap()
    }

    fn close(x: f64, y: f64) {
        assert!((x / y - 1.0).abs() < 1e-12, "{x} vs {y}");
    }

    #[test]
    fn megatron_table_2_per_layer() {
        let m = gpt3();
        let (s, b, h, a) = (2048.0, 1.0, 12288.0, 96.0);
        let sbh = s * b * h;
        for t in [1u64, 2, 8] {
            let tf = t as f64;
            let lb = |sequence_parallel, recompute| {
                let job = TrainJob {
                    seq: 2048,
                    sequence_parallel,
                    recompute,
                    ..TrainJob::default()
                };
                layer_bytes(&m, 0, &job, t)
            };
            close(
                lb(false, Recompute::None),
                sbh * (10.0 + 24.0 / tf + 5.0 * a * s / (h * tf)),
            );
            close(
                lb(true, Recompute::None),
                sbh / tf * (34.0 + 5.0 * a * s / h),
            );
            close(lb(true, Recompute::Selective), sbh / tf * 34.0);
            close(lb(false, Recompute::Selective), sbh * (10.0 + 24.0 / tf));
            close(lb(false, Recompute::Full), 2.0 * sbh);
            close(lb(true, Recompute::Full), 2.0 * sbh / tf);
        }
    }

    #[test]
    fn first_stage_holds_p_micro_batches_of_its_layers() {
        // With p stages each of L/p layers, 1F1B keeps p micro-batches on stage 0: L layers' worth.
        let m = gpt3();
        let job = TrainJob {
            seq: 2048,
            global_batch: 64,
            ..TrainJob::default()
        };
        let l = Layout {
            dp: 1,
            tp: 8,
            pp: 8,
            zero: 0,
            offload: crate::layout::Offload::None,
        };
        let st = stage_activations(&m, &l, &job, 0);
        let per_layer = layer_bytes(&m, 0, &job, 8);
        assert_eq!(st.in_flight, 8.0);
        close(
            st.layers_bytes_per_micro_batch * st.in_flight,
            96.0 * per_layer,
        );
        // The embedding dropout mask: sbhp/t.
        close(st.embedding_and_output_bytes, 2048.0 * 12288.0 * 8.0 / 8.0);
        let last = stage_activations(&m, &l, &job, 7);
        assert_eq!(last.in_flight, 1.0);
    }

    #[test]
    fn llama_has_no_masks_and_smaller_kv() {
        let m = presets::model("llama-3-8b").unwrap();
        let (s, h) = (4096.0, 4096.0);
        // whole: 4 tensors of h; share: Q (4096) + K, V (1024 each) + out (4096) + 3 × 14336.
        let expect = s * 2.0 * (4.0 * h + 2.0 * 4096.0 + 2.0 * 1024.0 + 3.0 * 14336.0);
        close(layer_bytes(&m, 0, &TrainJob::default(), 1), expect);
        // With Qwen3's q/k norms, their inputs (q and k) as well.
        let mut q3 = m.clone();
        q3.attention = Attention::Gqa {
            qkv_bias: false,
            o_bias: false,
            qk_norm: true,
        };
        close(
            layer_bytes(&q3, 0, &TrainJob::default(), 1),
            expect + s * 2.0 * (4096.0 + 1024.0),
        );
    }
}

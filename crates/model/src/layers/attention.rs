//! Self-attention with RoPE and grouped KV heads: q/k/v column-parallel over heads, o_proj
//! row-parallel with one all-reduce. Each rank's KV cache holds only its own KV heads.

use std::sync::Arc;

use tessera_comm::{Communicator, ReduceOp};
use tessera_tensor::ops::{self, AttentionShape};
use tessera_tensor::{DType, Tensor};

use super::{ColumnParallelLinear, RowParallelLinear};
use crate::checkpoint::Checkpoint;
use crate::kv_cache::LayerKv;
use crate::tp::TpShard;
use crate::{ModelConfig, ModelError};

pub struct Attention {
    /// q, k and v of this rank's heads as one column-parallel linear: q's rows, then k's, then v's.
    pub qkv: ColumnParallelLinear,
    pub o: RowParallelLinear,
    pub shape: AttentionShape,
    pub window: Option<usize>,
    pub inv_freq: Arc<Vec<f32>>,
    /// The softmax scale, YaRN's attention factor included (`rope::softmax_scale`).
    pub scale: f32,
    /// Qwen3's RMSNorm of each q and k head before RoPE (replicated on every rank).
    pub qk_norm: Option<QkNorm>,
}

/// The weights (`head_dim` each) of Qwen3's per-head q and k norms.
pub struct QkNorm {
    pub q: Tensor,
    pub k: Tensor,
    pub eps: f64,
}

impl Attention {
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        cfg: &ModelConfig,
        layer: usize,
        shard: &TpShard,
        inv_freq: Arc<Vec<f32>>,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (qh, kvh) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let q_rows = shard.q_heads.start * d..shard.q_heads.end * d;
        let kv_rows = shard.kv_heads.start * d..shard.kv_heads.end * d;
        let b = cfg.qkv_bias;
        let col = |name: &str, shape: [usize; 2], rows: std::ops::Range<usize>| {
            ColumnParallelLinear::load(ck, &format!("{prefix}.{name}"), shape, rows, b, dtype)
        };
        let qkv = ColumnParallelLinear::fuse(&[
            col("q_proj", [qh, h], q_rows.clone())?,
            col("k_proj", [kvh, h], kv_rows.clone())?,
            col("v_proj", [kvh, h], kv_rows)?,
        ])?;
        Ok(Attention {
            qkv,
            o: RowParallelLinear::load(
                ck,
                &format!("{prefix}.o_proj"),
                [h, qh],
                q_rows,
                cfg.o_bias,
                shard.tp.rank,
                dtype,
            )?,
            shape: AttentionShape {
                num_heads: shard.q_heads.len(),
                num_kv_heads: shard.kv_heads.len(),
                head_dim: d,
            },
            window: cfg.sliding_window[layer],
            inv_freq,
            scale: crate::rope::softmax_scale(&cfg.rope, d),
            qk_norm: if cfg.qk_norm {
                let w = |n: &str| ck.read_rows(&format!("{prefix}.{n}.weight"), &[d], 0, d, dtype);
                Some(QkNorm {
                    q: w("q_norm")?,
                    k: w("k_norm")?,
                    eps: cfg.rms_norm_eps,
                })
            } else {
                None
            },
        })
    }

    /// `x`: `[tokens, hidden]` of `batch` sequences in lockstep: one sequence of `tokens` tokens at
    /// positions `start..start + tokens`, or `batch` sequences of one token each, all at position
    /// `start` (static batching). Appends their K/V to `cache`.
    ///
    /// Lockstep sequences need no kernel of their own: with the cache laid out `[position,
    /// sequence, kv_head, head_dim]`, `batch` sequences of `h` query heads over `g` KV heads are one
    /// sequence of `batch * h` query heads over `batch * g` KV heads (query head `b * h + i` maps to
    /// KV head `b * g + i / (h / g)`, exactly GQA's grouping).
    pub fn forward(
        &self,
        x: &Tensor,
        batch: usize,
        start: usize,
        cache: &mut LayerKv,
        comm: &dyn Communicator,
    ) -> Result<Tensor, ModelError> {
        let qkv = self.qkv.forward(x)?;
        self.forward_qkv(&qkv, batch, start, cache, comm)
    }

    /// [`Self::forward`] from this rank's fused projection `qkv` = `x W_qkv^T (+ b)` on.
    pub fn forward_qkv(
        &self,
        qkv: &Tensor,
        batch: usize,
        start: usize,
        cache: &mut LayerKv,
        comm: &dyn Communicator,
    ) -> Result<Tensor, ModelError> {
        let mut y = self.forward_qkv_partial(qkv, batch, start, cache)?;
        comm.all_reduce_tensor(&mut y, ReduceOp::Sum)?;
        Ok(y)
    }

    /// [`Self::forward_qkv`] up to the output projection's all-reduce: this rank's part of the
    /// output (the caller sums it, or fuses the sum with the residual add and the next norm).
    pub fn forward_qkv_partial(
        &self,
        qkv: &Tensor,
        batch: usize,
        start: usize,
        cache: &mut LayerKv,
    ) -> Result<Tensor, ModelError> {
        let a = self.attend(qkv, batch, start, cache)?;
        self.o.forward_partial(&a)
    }

    /// The attention of this rank's heads from `qkv` on (RoPE, the cache's new rows, the
    /// attention itself), before the output projection: `[rows, heads x head_dim]`.
    pub fn attend(
        &self,
        qkv: &Tensor,
        batch: usize,
        start: usize,
        cache: &mut LayerKv,
    ) -> Result<Tensor, ModelError> {
        let rows = qkv.dim(0);
        if batch > 1 && rows != batch {
            return Err(ModelError::Input(format!(
                "a lockstep batch of {batch} sequences takes one token each, got {rows} rows"
            )));
        }
        let t = rows / batch;
        let normed;
        let qkv = match &self.qk_norm {
            Some(n) => {
                let heads = (self.shape.num_heads, self.shape.num_kv_heads);
                normed = ops::head_rms_norm(qkv, heads, self.shape.head_dim, &n.q, &n.k, n.eps)?;
                &normed
            }
            None => qkv,
        };
        let AttentionShape {
            num_heads: heads_per_seq,
            num_kv_heads: kv_per_seq,
            head_dim,
        } = self.shape;
        let (num_heads, num_kv_heads) = (heads_per_seq * batch, kv_per_seq * batch);
        let shape = AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
        };
        cache.reserve(start + t)?;
        let scale = self.scale;
        let a = if t == 1 {
            // A decode step: RoPE, the cache append and attention in one op.
            ops::decode_attention(
                qkv,
                batch,
                self.shape,
                &mut cache.k,
                &mut cache.v,
                start,
                &self.inv_freq,
                self.window,
                scale,
            )?
        } else {
            let q = ops::qkv_rope_append(
                qkv,
                batch,
                self.shape,
                &mut cache.k,
                &mut cache.v,
                start,
                &self.inv_freq,
            )?;
            let positions: Vec<usize> = (start..start + t).collect();
            ops::causal_attention(
                &q,
                &cache.k,
                &cache.v,
                start + t,
                shape,
                &positions,
                self.window,
                scale,
            )?
        }
        .reshape(vec![rows, heads_per_seq * head_dim])?;
        Ok(a)
    }

    pub fn weight_bytes(&self) -> usize {
        let norms = self
            .qk_norm
            .as_ref()
            .map_or(0, |n| n.q.size_in_bytes() + n.k.size_in_bytes());
        self.qkv.weight_bytes() + self.o.weight_bytes() + norms
    }
}

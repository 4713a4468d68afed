//! One decoder layer: `h = x + attn(norm(x)); y = h + mlp(norm(h))`.

use std::sync::Arc;

use tessera_comm::Communicator;
use tessera_tensor::{ops, DType, Tensor};

use super::{Attention, ColumnParallelLinear, Mlp, RmsNorm};
use crate::checkpoint::Checkpoint;
use crate::kv_cache::LayerKv;
use crate::tp::TpShard;
use crate::{ModelConfig, ModelError};

pub struct DecoderLayer {
    pub input_norm: RmsNorm,
    pub attn: Attention,
    pub post_attn_norm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    pub fn load(
        ck: &Checkpoint,
        cfg: &ModelConfig,
        layer: usize,
        shard: &TpShard,
        inv_freq: Arc<Vec<f32>>,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let p = format!("model.layers.{layer}");
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(DecoderLayer {
            input_norm: RmsNorm::load(ck, &format!("{p}.input_layernorm.weight"), h, eps, dtype)?,
            attn: Attention::load(
                ck,
                &format!("{p}.self_attn"),
                cfg,
                layer,
                shard,
                inv_freq,
                dtype,
            )?,
            post_attn_norm: RmsNorm::load(
                ck,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                eps,
                dtype,
            )?,
            mlp: Mlp::load(
                ck,
                &format!("{p}.mlp"),
                cfg,
                shard.intermediate.clone(),
                shard.tp.rank,
                dtype,
            )?,
        })
    }

    /// One layer on the residual stream `x`, which still lacks `delta`, this rank's part of the
    /// previous layer's MLP output, not yet summed across the ranks (`None` for the first layer).
    /// Returns this layer's, again neither summed nor added. Each row-parallel output's
    /// all-reduce, residual add and the norm after it run where they are cheapest: fused in one
    /// NVLink kernel when the communicator has one (`RmsNorm::reduce_add`), else the sum on its
    /// own and the add inside the next norm's kernel (`x + a` equals `a + x` exactly, so the
    /// results are those of the unfused layer), which on a GPU runs inside the projection after
    /// it at decode (`ops::norm_matmul_t`).
    pub fn forward(
        &self,
        x: &mut Tensor,
        delta: Option<Tensor>,
        batch: usize,
        start: usize,
        cache: &mut LayerKv,
        comm: &dyn Communicator,
    ) -> Result<Tensor, ModelError> {
        let qkv = norm_project(x, delta, &self.input_norm, &self.attn.qkv, false, comm)?;
        // Each row-parallel output's sum comes next in `norm_project` (or the final norm):
        // the projection may hand its outputs to the peers as it makes them.
        let a = self.attn.attend(&qkv, batch, start, cache)?;
        let a = self.attn.o.forward_partial_then_fused(&a, comm)?;
        let h = norm_project(
            x,
            Some(a),
            &self.post_attn_norm,
            &self.mlp.gate_up,
            true,
            comm,
        )?;
        self.mlp.down.forward_partial_then_fused(&h, comm)
    }

    /// Calls `f` on every weight tensor of the layer (e.g. to move it to a device).
    pub fn visit_tensors(
        &mut self,
        f: &mut dyn FnMut(&mut Tensor) -> Result<(), tessera_tensor::TensorError>,
    ) -> Result<(), ModelError> {
        let a = &mut self.attn;
        let linears = [&mut a.qkv, &mut self.mlp.gate_up];
        for l in linears {
            f(&mut l.weight)?;
            if let Some(b) = l.bias.as_mut() {
                f(b)?;
            }
        }
        for l in [&mut a.o, &mut self.mlp.down] {
            f(&mut l.weight)?;
            if let Some(b) = l.bias.as_mut() {
                f(b)?;
            }
        }
        f(&mut self.input_norm.weight)?;
        f(&mut self.post_attn_norm.weight)?;
        if let Some(n) = a.qk_norm.as_mut() {
            f(&mut n.q)?;
            f(&mut n.k)?;
        }
        Ok(())
    }

    pub fn weight_bytes(&self) -> usize {
        self.input_norm.weight.size_in_bytes()
            + self.post_attn_norm.weight.size_in_bytes()
            + self.attn.weight_bytes()
            + self.mlp.weight_bytes()
    }
}

/// `x += ` the group's sum of `part` (when there is one), then `norm(x) W^T (+ b)`, SiLU-gated
/// when `gated`.
fn norm_project(
    x: &mut Tensor,
    part: Option<Tensor>,
    n: &RmsNorm,
    l: &ColumnParallelLinear,
    gated: bool,
    comm: &dyn Communicator,
) -> Result<Tensor, ModelError> {
    let (w, b) = (&l.weight, l.bias.as_ref());
    let delta = match part {
        Some(mut p) => match n.reduce_add(x, &mut p, comm)? {
            Some(xn) if gated => return Ok(ops::matmul_t_gated(&xn, w, b)?),
            Some(xn) => return Ok(ops::matmul_t(&xn, w, b)?),
            None => Some(p),
        },
        None => None,
    };
    Ok(ops::norm_matmul_t(
        x,
        delta.as_ref(),
        &n.weight,
        n.eps,
        w,
        b,
        gated,
    )?)
}

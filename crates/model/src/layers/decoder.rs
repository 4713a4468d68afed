//! One decoder layer: `h = x + attn(norm(x)); y = h + mlp(norm(h))`.

use std::sync::Arc;

use tessera_comm::Communicator;
use tessera_tensor::{ops, DType, Tensor};

use super::{Attention, Mlp, RmsNorm};
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

    /// One layer on the residual stream `x`, which still lacks `delta`, the previous layer's MLP
    /// output (`None` for the first layer). Returns this layer's MLP output, again not added: each
    /// residual add runs inside the next norm's kernel (`x + a` equals `a + x` exactly, so the
    /// results are those of the unfused layer), and on a GPU a decode step's norm runs inside the
    /// projection after it (`ops::norm_matmul_t`).
    pub fn forward(
        &self,
        x: &mut Tensor,
        delta: Option<&Tensor>,
        batch: usize,
        start: usize,
        cache: &mut LayerKv,
        comm: &dyn Communicator,
    ) -> Result<Tensor, ModelError> {
        let (qkv, gate_up) = (&self.attn.qkv, &self.mlp.gate_up);
        let n = &self.input_norm;
        let qkv = ops::norm_matmul_t(
            x,
            delta,
            &n.weight,
            n.eps,
            &qkv.weight,
            qkv.bias.as_ref(),
            false,
        )?;
        let a = self.attn.forward_qkv(&qkv, batch, start, cache, comm)?;
        let n = &self.post_attn_norm;
        let h = ops::norm_matmul_t(
            x,
            Some(&a),
            &n.weight,
            n.eps,
            &gate_up.weight,
            gate_up.bias.as_ref(),
            true,
        )?;
        self.mlp.down.forward(&h, comm)
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
        Ok(())
    }

    pub fn weight_bytes(&self) -> usize {
        self.input_norm.weight.size_in_bytes()
            + self.post_attn_norm.weight.size_in_bytes()
            + self.attn.weight_bytes()
            + self.mlp.weight_bytes()
    }
}

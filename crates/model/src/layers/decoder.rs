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

    pub fn forward(
        &self,
        x: &Tensor,
        batch: usize,
        start: usize,
        cache: &mut LayerKv,
        comm: &dyn Communicator,
    ) -> Result<Tensor, ModelError> {
        // Residuals added into the fresh outputs (a + x equals x + a exactly), so no copy of x.
        let mut h = self
            .attn
            .forward(&self.input_norm.forward(x)?, batch, start, cache, comm)?;
        ops::add_inplace(&mut h, x)?;
        let mut y = self.mlp.forward(&self.post_attn_norm.forward(&h)?, comm)?;
        ops::add_inplace(&mut y, &h)?;
        Ok(y)
    }

    /// Calls `f` on every weight tensor of the layer (e.g. to move it to a device).
    pub fn visit_tensors(
        &mut self,
        f: &mut dyn FnMut(&mut Tensor) -> Result<(), tessera_tensor::TensorError>,
    ) -> Result<(), ModelError> {
        let a = &mut self.attn;
        let linears = [
            &mut a.q,
            &mut a.k,
            &mut a.v,
            &mut self.mlp.gate,
            &mut self.mlp.up,
        ];
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

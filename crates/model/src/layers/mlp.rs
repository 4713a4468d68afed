//! The gated MLP: `down(silu(gate(x)) * up(x))`; gate/up column-parallel over the intermediate
//! features, down row-parallel with one all-reduce.

use std::ops::Range;

use tessera_comm::Communicator;
use tessera_tensor::{ops, DType, Tensor};

use super::{ColumnParallelLinear, RowParallelLinear};
use crate::checkpoint::Checkpoint;
use crate::{ModelConfig, ModelError};

pub struct Mlp {
    /// gate and up as one column-parallel linear: this rank's gate rows, then its up rows.
    pub gate_up: ColumnParallelLinear,
    pub down: RowParallelLinear,
}

impl Mlp {
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        cfg: &ModelConfig,
        part: Range<usize>,
        rank: usize,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let b = cfg.mlp_bias;
        let gate = ColumnParallelLinear::load(
            ck,
            &format!("{prefix}.gate_proj"),
            [i, h],
            part.clone(),
            b,
            dtype,
        )?;
        let up = ColumnParallelLinear::load(
            ck,
            &format!("{prefix}.up_proj"),
            [i, h],
            part.clone(),
            b,
            dtype,
        )?;
        Ok(Mlp {
            gate_up: ColumnParallelLinear::fuse(&[gate, up])?,
            down: RowParallelLinear::load(
                ck,
                &format!("{prefix}.down_proj"),
                [h, i],
                part,
                b,
                rank,
                dtype,
            )?,
        })
    }

    pub fn forward(&self, x: &Tensor, comm: &dyn Communicator) -> Result<Tensor, ModelError> {
        let a = ops::matmul_t_gated(x, &self.gate_up.weight, self.gate_up.bias.as_ref())?;
        self.down.forward(&a, comm)
    }

    pub fn weight_bytes(&self) -> usize {
        self.gate_up.weight_bytes() + self.down.weight_bytes()
    }
}

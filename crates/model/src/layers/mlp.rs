//! The gated MLP: `down(silu(gate(x)) * up(x))`; gate/up column-parallel over the intermediate
//! features, down row-parallel with one all-reduce.

use std::ops::Range;

use tessera_comm::Communicator;
use tessera_tensor::{ops, DType, Tensor};

use super::{ColumnParallelLinear, RowParallelLinear};
use crate::checkpoint::Checkpoint;
use crate::{ModelConfig, ModelError};

pub struct Mlp {
    pub gate: ColumnParallelLinear,
    pub up: ColumnParallelLinear,
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
        Ok(Mlp {
            gate: ColumnParallelLinear::load(
                ck,
                &format!("{prefix}.gate_proj"),
                [i, h],
                part.clone(),
                b,
                dtype,
            )?,
            up: ColumnParallelLinear::load(
                ck,
                &format!("{prefix}.up_proj"),
                [i, h],
                part.clone(),
                b,
                dtype,
            )?,
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
        let g = self.gate.forward(x)?;
        let u = self.up.forward(x)?;
        let a = ops::silu_mul(&g, &u)?;
        self.down.forward(&a, comm)
    }

    pub fn weight_bytes(&self) -> usize {
        self.gate.weight_bytes() + self.up.weight_bytes() + self.down.weight_bytes()
    }
}

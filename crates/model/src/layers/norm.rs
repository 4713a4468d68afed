//! RMSNorm with a learned scale (replicated on every rank).

use tessera_comm::{Communicator, ReduceOp};
use tessera_tensor::{ops, DType, Tensor};

use crate::checkpoint::Checkpoint;
use crate::ModelError;

pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(
        ck: &Checkpoint,
        name: &str,
        hidden: usize,
        eps: f64,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        Ok(RmsNorm {
            weight: ck.read_rows(name, &[hidden], 0, hidden, dtype)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(ops::rms_norm(x, &self.weight, self.eps)?)
    }

    /// `x += ` the group's sum of `part` (a row-parallel projection's output), then this norm of
    /// the new `x`, in one step where the communicator fuses them (`Some`, the NVLink path of
    /// `NcclComm`). Otherwise `part` is summed in place and `None` returned, `x` untouched: the
    /// caller adds and normalises, usually inside the next projection (`ops::norm_matmul_t`).
    pub fn reduce_add(
        &self,
        x: &mut Tensor,
        part: &mut Tensor,
        comm: &dyn Communicator,
    ) -> Result<Option<Tensor>, ModelError> {
        if let Some(y) = comm.all_reduce_add_rms_norm(part, x, &self.weight, self.eps)? {
            return Ok(Some(y));
        }
        comm.all_reduce_tensor(part, ReduceOp::Sum)?;
        Ok(None)
    }

    /// `x += delta`, then the norm of the new `x` (one kernel on a GPU).
    pub fn forward_add(&self, x: &mut Tensor, delta: &Tensor) -> Result<Tensor, ModelError> {
        Ok(ops::add_rms_norm(x, delta, &self.weight, self.eps)?)
    }
}

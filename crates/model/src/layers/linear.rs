//! Column- and row-parallel linear layers (Megatron): a column-parallel layer owns a slice of the
//! output features and needs no communication; a row-parallel layer owns a slice of the input
//! features, and its partial products are summed by one all-reduce.

use std::ops::Range;

use tessera_comm::{Communicator, ReduceOp};
use tessera_tensor::{ops, DType, Tensor};

use crate::checkpoint::Checkpoint;
use crate::ModelError;

/// `y = x W[rows]^T + b[rows]`: this rank's output features `rows` of a `[out, in]` weight.
pub struct ColumnParallelLinear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl ColumnParallelLinear {
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        shape: [usize; 2],
        rows: Range<usize>,
        bias: bool,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let weight = ck.read_rows(
            &format!("{prefix}.weight"),
            &shape,
            rows.start,
            rows.end,
            dtype,
        )?;
        let bias = bias
            .then(|| {
                ck.read_rows(
                    &format!("{prefix}.bias"),
                    &shape[..1],
                    rows.start,
                    rows.end,
                    dtype,
                )
            })
            .transpose()?;
        Ok(ColumnParallelLinear { weight, bias })
    }

    /// Several column-parallel layers over the same input as one (their output features one after
    /// another): one GEMM instead of several, as vLLM fuses q/k/v and gate/up.
    pub fn fuse(parts: &[ColumnParallelLinear]) -> Result<Self, ModelError> {
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|p| p.bias.as_ref()).collect();
        if biases.is_none() && parts.iter().any(|p| p.bias.is_some()) {
            return Err(ModelError::Input(
                "fused linear layers must all have a bias or none".into(),
            ));
        }
        Ok(ColumnParallelLinear {
            weight: Tensor::cat_rows(&weights)?,
            bias: biases.map(|b| Tensor::cat_rows(&b)).transpose()?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(ops::matmul_t(x, &self.weight, self.bias.as_ref())?)
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight.size_in_bytes() + self.bias.as_ref().map_or(0, |b| b.size_in_bytes())
    }
}

/// `y = all_reduce(x[:, cols] W[:, cols]^T) + b`: this rank's input features `cols`.
pub struct RowParallelLinear {
    pub weight: Tensor,
    /// Held by rank 0 only, so that it is added once.
    pub bias: Option<Tensor>,
}

impl RowParallelLinear {
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        shape: [usize; 2],
        cols: Range<usize>,
        bias: bool,
        rank: usize,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let weight = ck.read_cols(
            &format!("{prefix}.weight"),
            &shape,
            cols.start,
            cols.end,
            dtype,
        )?;
        let name = format!("{prefix}.bias");
        let bias = if bias {
            ck.expect_shape(&name, &shape[..1])?;
            (rank == 0)
                .then(|| ck.read_rows(&name, &shape[..1], 0, shape[0], dtype))
                .transpose()?
        } else {
            None
        };
        Ok(RowParallelLinear { weight, bias })
    }

    pub fn forward(&self, x: &Tensor, comm: &dyn Communicator) -> Result<Tensor, ModelError> {
        let mut y = self.forward_partial(x)?;
        comm.all_reduce_tensor(&mut y, ReduceOp::Sum)?;
        Ok(y)
    }

    /// This rank's part of the output, not yet summed across the ranks (`x[:, cols]
    /// W[:, cols]^T`, plus the bias on rank 0).
    pub fn forward_partial(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(ops::matmul_t(x, &self.weight, self.bias.as_ref())?)
    }

    /// [`Self::forward_partial`] where the sum that follows is
    /// [`Communicator::all_reduce_add_rms_norm`] on this output, the next collective: the
    /// communicator may hand the outputs to the peers as it makes them
    /// ([`Communicator::row_parallel_matmul`]: one row at decode over NVLink), which is exact
    /// (the same values, the same kernel's arithmetic).
    pub fn forward_partial_then_fused(
        &self,
        x: &Tensor,
        comm: &dyn Communicator,
    ) -> Result<Tensor, ModelError> {
        if self.bias.is_none() {
            if let Some(y) = comm.row_parallel_matmul(x, &self.weight)? {
                return Ok(y);
            }
        }
        self.forward_partial(x)
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight.size_in_bytes() + self.bias.as_ref().map_or(0, |b| b.size_in_bytes())
    }
}

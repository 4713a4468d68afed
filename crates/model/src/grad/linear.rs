//! A linear layer's training forward and backward: `y = x W^T + b` with HF's `[out, in]` weight.

use tessera_tensor::{ops, DType};

/// Weight `[n, k]` and optional bias `[n]`.
#[derive(Clone, Copy)]
pub struct LinearParams<'a> {
    pub w: &'a [f32],
    pub b: Option<&'a [f32]>,
    pub n: usize,
    pub k: usize,
}

impl LinearParams<'_> {
    /// `y[m, n]`, rounded to the activation dtype.
    pub fn forward(&self, x: &[f32], dt: DType) -> Vec<f32> {
        let m = x.len() / self.k;
        let mut y = ops::linear_forward(x, self.w, m, self.k, self.n);
        if let Some(b) = self.b {
            for row in y.chunks_mut(self.n) {
                for (o, bb) in row.iter_mut().zip(b) {
                    *o += bb;
                }
            }
        }
        ops::round_slice(dt, &mut y);
        y
    }

    /// Returns `dx`; adds into the weight (and bias) gradients.
    pub fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        dw: &mut [f32],
        db: Option<&mut [f32]>,
    ) -> Vec<f32> {
        let m = x.len() / self.k;
        ops::linear_backward_weight(dy, x, m, self.k, self.n, dw);
        if let Some(db) = db {
            ops::bias_backward(dy, self.n, db);
        }
        ops::linear_backward_input(dy, self.w, m, self.k, self.n)
    }
}

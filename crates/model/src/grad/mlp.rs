//! The gated MLP's training forward and backward: `down(silu(gate(x)) * up(x))`.

use tessera_tensor::{ops, DType};

use super::linear::LinearParams;

pub struct MlpParams<'a> {
    pub gate: LinearParams<'a>,
    pub up: LinearParams<'a>,
    pub down: LinearParams<'a>,
}

pub struct MlpActs {
    pub g: Vec<f32>,
    pub u: Vec<f32>,
    pub a: Vec<f32>,
}

pub struct MlpGrads<'a> {
    pub gate: (&'a mut [f32], Option<&'a mut [f32]>),
    pub up: (&'a mut [f32], Option<&'a mut [f32]>),
    pub down: (&'a mut [f32], Option<&'a mut [f32]>),
}

impl MlpParams<'_> {
    pub fn forward(&self, xn: &[f32], dt: DType) -> (Vec<f32>, MlpActs) {
        let g = self.gate.forward(xn, dt);
        let u = self.up.forward(xn, dt);
        let mut a = ops::silu_mul_forward(&g, &u);
        ops::round_slice(dt, &mut a);
        let y = self.down.forward(&a, dt);
        (y, MlpActs { g, u, a })
    }

    pub fn backward(&self, xn: &[f32], acts: &MlpActs, dy: &[f32], g: MlpGrads<'_>) -> Vec<f32> {
        let da = self.down.backward(&acts.a, dy, g.down.0, g.down.1);
        let (dg, du) = ops::silu_mul_backward(&acts.g, &acts.u, &da);
        let mut dxn = self.gate.backward(xn, &dg, g.gate.0, g.gate.1);
        for (d, e) in dxn
            .iter_mut()
            .zip(self.up.backward(xn, &du, g.up.0, g.up.1))
        {
            *d += e;
        }
        dxn
    }
}

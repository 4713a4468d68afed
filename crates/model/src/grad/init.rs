//! Initial weights for training: random (HF's scheme: normal with `initializer_range` std for
//! matrices and embeddings, ones for norms, zeros for biases) or read from an HF checkpoint.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr_normal::normal;
use tessera_tensor::DType;

use super::layout::ParamLayout;
use crate::checkpoint::Checkpoint;
use crate::ModelError;

/// Std of the normal init of every matrix (HF's default `initializer_range`).
pub const INIT_STD: f32 = 0.02;

/// One f32 buffer per unit, drawn from `seed` (the same whatever the parallel layout).
pub fn random_init(layout: &ParamLayout, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    layout
        .units
        .iter()
        .map(|u| {
            let mut buf = vec![0.0f32; u.len];
            for p in &u.params {
                let dst = &mut buf[p.offset..p.offset + p.len];
                if p.name.ends_with("norm.weight") {
                    dst.fill(1.0);
                } else if p.name.ends_with(".bias") {
                    dst.fill(0.0);
                } else {
                    dst.iter_mut()
                        .for_each(|x| *x = normal(&mut rng) * INIT_STD);
                }
            }
            buf
        })
        .collect()
}

/// Every unit's weights read from an HF checkpoint, as f32.
pub fn load_checkpoint(layout: &ParamLayout, ck: &Checkpoint) -> Result<Vec<Vec<f32>>, ModelError> {
    layout
        .units
        .iter()
        .map(|u| {
            let mut buf = vec![0.0f32; u.len];
            for p in &u.params {
                let t = ck.read_rows(&p.name, &p.shape, 0, p.shape[0], DType::F32)?;
                buf[p.offset..p.offset + p.len].copy_from_slice(t.as_f32_slice().expect("f32"));
            }
            Ok(buf)
        })
        .collect()
}

mod rand_distr_normal {
    use rand::Rng;

    /// A standard normal draw (Box-Muller), so no distribution crate is needed.
    pub fn normal<R: Rng>(rng: &mut R) -> f32 {
        let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = rng.random();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

//! A contiguous KV cache for one sequence: per layer, K and V laid out `[position, kv_head,
//! head_dim]` for this rank's KV heads only, in the compute dtype. (Paged blocks come with the
//! serving engine; the layers only need `write` and the two buffers.)

use tessera_tensor::{DType, Device, Storage, TensorError};

pub struct LayerKv {
    pub k: Storage,
    pub v: Storage,
    /// Elements per position (kv heads x head_dim).
    row: usize,
}

impl LayerKv {
    fn new(row: usize, capacity: usize, dtype: DType, device: Device) -> Result<Self, TensorError> {
        let n = elems(row, capacity, device)?;
        Ok(LayerKv {
            k: Storage::zeros_on(dtype, n, device)?,
            v: Storage::zeros_on(dtype, n, device)?,
            row,
        })
    }

    /// Grows the cache (doubling) to hold at least `positions` positions.
    pub fn reserve(&mut self, positions: usize) -> Result<(), TensorError> {
        let need = elems(self.row, positions, self.k.device())?;
        if need > self.k.len() {
            let cap = need.max(self.k.len().saturating_mul(2));
            grow(&mut self.k, cap)?;
            grow(&mut self.v, cap)?;
        }
        Ok(())
    }

    pub fn size_in_bytes(&self) -> usize {
        self.k.size_in_bytes() + self.v.size_in_bytes()
    }
}

/// Elements of `positions` rows of `row`, or an error where that count does not fit in memory's
/// address space.
fn elems(row: usize, positions: usize, device: Device) -> Result<usize, TensorError> {
    row.checked_mul(positions).ok_or_else(|| {
        TensorError::Device(
            device.to_string(),
            format!("a KV cache of {positions} positions does not fit in memory"),
        )
    })
}

fn grow(s: &mut Storage, cap: usize) -> Result<(), TensorError> {
    let mut new = Storage::zeros_on(s.dtype(), cap, s.device())?;
    new.copy_from(0, s)?;
    *s = new;
    Ok(())
}

/// One sequence's cache over all layers.
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    len: usize,
    /// Sequences decoded in lockstep (each position holds a row of K/V per sequence).
    pub(crate) batch: usize,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        row: usize,
        capacity: usize,
        dtype: DType,
        device: Device,
    ) -> Result<Self, TensorError> {
        Ok(KvCache {
            layers: (0..num_layers)
                .map(|_| LayerKv::new(row, capacity, dtype, device))
                .collect::<Result<_, _>>()?,
            len: 0,
            batch: 1,
        })
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn set_len(&mut self, n: usize) {
        self.len = n;
    }

    /// Fills the first `positions` positions of every layer's K and V with `uniform(-1, 1)`
    /// values from `seed` (where the cache lies) and makes them the cached positions, as if a
    /// prompt of that length had run: a benchmark's long cache without the steps that would
    /// write it (a decode step's time depends on the length, not the values). Refused past the
    /// capacity.
    pub fn fill_random(&mut self, positions: usize, seed: u64) -> Result<(), TensorError> {
        if positions > self.capacity() {
            return Err(TensorError::Device(
                self.layers
                    .first()
                    .map_or_else(String::new, |l| l.k.device().to_string()),
                format!(
                    "a cache of {} positions cannot hold {positions}",
                    self.capacity()
                ),
            ));
        }
        for (i, l) in self.layers.iter_mut().enumerate() {
            let n = l.row * positions;
            for (j, s) in [&mut l.k, &mut l.v].into_iter().enumerate() {
                let seed = seed ^ ((2 * i + j) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let r = tessera_tensor::Tensor::random_on(
                    vec![n],
                    s.dtype(),
                    s.device(),
                    seed,
                    1.0,
                    0.0,
                )?;
                s.copy_from(0, r.storage())?;
            }
        }
        self.len = positions;
        Ok(())
    }

    /// Positions the cache holds without growing.
    pub fn capacity(&self) -> usize {
        self.layers.first().map_or(0, |l| l.k.len() / l.row.max(1))
    }

    pub fn size_in_bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::size_in_bytes).sum()
    }
}

#[cfg(test)]
mod fill_tests {
    use super::*;

    #[test]
    fn a_randomly_filled_cache_holds_its_positions_and_refuses_past_its_capacity() {
        let f32s = |s: &Storage| match s {
            Storage::F32(v) => v.clone(),
            _ => panic!("an f32 cache"),
        };
        let mut c = KvCache::new(2, 6, 10, DType::F32, Device::Cpu).unwrap();
        c.fill_random(7, 3).unwrap();
        assert_eq!(c.len(), 7);
        for l in &c.layers {
            let (k, v) = (f32s(&l.k), f32s(&l.v));
            assert!(k[..42]
                .iter()
                .chain(&v[..42])
                .all(|x| x.abs() <= 1.0 && *x != 0.0));
            assert!(k[42..].iter().chain(&v[42..]).all(|&x| x == 0.0));
            assert_ne!(k[..42], v[..42]);
        }
        assert_ne!(f32s(&c.layers[0].k), f32s(&c.layers[1].k));
        assert!(c.fill_random(11, 3).is_err());
        assert_eq!(c.len(), 7);
    }
}

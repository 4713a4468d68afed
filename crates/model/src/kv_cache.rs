//! A contiguous KV cache for one sequence: per layer, K and V laid out `[position, kv_head,
//! head_dim]` for this rank's KV heads only, in the compute dtype. (Paged blocks come with the
//! serving engine; the layers only need `write` and the two buffers.)

use tessera_tensor::{DType, Storage, Tensor};

pub struct LayerKv {
    pub k: Storage,
    pub v: Storage,
    /// Elements per position (kv heads x head_dim).
    row: usize,
}

impl LayerKv {
    fn new(row: usize, capacity: usize, dtype: DType) -> Self {
        LayerKv {
            k: Storage::zeros(dtype, row * capacity),
            v: Storage::zeros(dtype, row * capacity),
            row,
        }
    }

    /// Stores K and V of positions `start..start + k.dim(0)`.
    pub fn write(&mut self, start: usize, k: &Tensor, v: &Tensor) {
        let n = k.elem_count();
        let need = start * self.row + n;
        if need > self.k.len() {
            let cap = need.max(2 * self.k.len());
            grow(&mut self.k, cap);
            grow(&mut self.v, cap);
        }
        self.k.write_f32(start * self.row, &k.to_f32_vec());
        self.v.write_f32(start * self.row, &v.to_f32_vec());
    }

    pub fn size_in_bytes(&self) -> usize {
        self.k.size_in_bytes() + self.v.size_in_bytes()
    }
}

fn grow(s: &mut Storage, cap: usize) {
    let mut old = vec![0.0f32; s.len()];
    s.read_f32(0, &mut old);
    let mut new = Storage::zeros(s.dtype(), cap);
    new.write_f32(0, &old);
    *s = new;
}

/// One sequence's cache over all layers.
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, row: usize, capacity: usize, dtype: DType) -> Self {
        KvCache {
            layers: (0..num_layers)
                .map(|_| LayerKv::new(row, capacity, dtype))
                .collect(),
            len: 0,
        }
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

    pub fn size_in_bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::size_in_bytes).sum()
    }
}

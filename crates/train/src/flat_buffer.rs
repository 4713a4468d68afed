//! Flat, padded per-unit buckets: a unit's parameters (or gradients, or optimizer state) as one
//! contiguous buffer padded to a multiple of the data-parallel size, so rank `r`'s ZeRO shard is
//! the contiguous range `r * shard .. (r + 1) * shard`, and one collective moves a whole unit.

use std::ops::Range;

use tessera_comm::{CommError, CommExt, Communicator};
use tessera_tensor::{DType, Storage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Elements of the unit.
    pub len: usize,
    /// `len` rounded up to a multiple of dp.
    pub padded: usize,
    /// `padded / dp`: elements each rank owns.
    pub shard: usize,
}

impl Bucket {
    pub fn new(len: usize, dp: usize) -> Self {
        let shard = len.div_ceil(dp);
        Bucket {
            len,
            padded: shard * dp,
            shard,
        }
    }

    /// Rank `rank`'s range of the padded buffer.
    pub fn range(&self, rank: usize) -> Range<usize> {
        rank * self.shard..(rank + 1) * self.shard
    }
}

/// `v` padded with zeros to `padded` elements.
pub fn padded(mut v: Vec<f32>, padded: usize) -> Vec<f32> {
    v.resize(padded, 0.0);
    v
}

/// f32 values rounded into 16-bit (or f32) storage.
pub fn to_storage(dt: DType, v: &[f32]) -> Storage {
    Storage::from_f32(dt, v.to_vec())
}

/// The first `n` elements of `s` as f32.
pub fn widen(s: &Storage, n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    s.read_f32(0, &mut out);
    out
}

/// Concatenates every rank's shard, in rank order, in the shard's own dtype.
pub fn all_gather_storage(comm: &dyn Communicator, shard: &Storage) -> Result<Storage, CommError> {
    let n = shard.len() * comm.world_size();
    Ok(match shard {
        Storage::F32(v) => {
            let mut out = vec![0.0f32; n];
            comm.all_gather(v, &mut out)?;
            Storage::F32(out)
        }
        Storage::BF16(v) => {
            let mut out = vec![half::bf16::ZERO; n];
            comm.all_gather(v, &mut out)?;
            Storage::BF16(out)
        }
        Storage::F16(v) => {
            let mut out = vec![half::f16::ZERO; n];
            comm.all_gather(v, &mut out)?;
            Storage::F16(out)
        }
        // Training runs on host buffers; device buffers are staged through the host.
        #[allow(unreachable_patterns)]
        other => {
            let mut host = vec![0.0f32; other.len()];
            other.read_f32(0, &mut host);
            let mut out = vec![0.0f32; n];
            comm.all_gather(&host, &mut out)?;
            Storage::from_f32(other.dtype(), out)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_tile_the_padded_buffer() {
        let b = Bucket::new(10, 4);
        assert_eq!((b.padded, b.shard), (12, 3));
        assert_eq!(b.range(3), 9..12);
        assert_eq!(Bucket::new(10, 1).padded, 10);
    }
}

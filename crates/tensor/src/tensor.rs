//! The CPU tensor: a row-major shape over typed storage.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::shape_err;
use crate::{DType, Device, TensorError};

/// Typed, contiguous, row-major storage: on the host, or (feature `cuda`) on a GPU.
#[derive(Debug, Clone, PartialEq)]
pub enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaBuf),
}

impl Storage {
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::F16(v) => v.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Device::Cuda(b.dev.ordinal),
            _ => Device::Cpu,
        }
    }

    /// Zeros of `dtype` on `device`.
    pub fn zeros_on(dtype: DType, n: usize, device: Device) -> Result<Self, TensorError> {
        match device {
            Device::Cpu => Self::try_zeros(dtype, n),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => Ok(Storage::Cuda(crate::cuda::CudaBuf::zeros(
                &crate::cuda::GpuDevice::get(i)?,
                dtype,
                n,
            )?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => device.ensure_available().map(|_| unreachable!()),
        }
    }

    /// Copies `src` into elements `offset..offset + src.len()` (device to device when both are on
    /// the same GPU).
    pub fn copy_from(&mut self, offset: usize, src: &Storage) -> Result<(), TensorError> {
        match (&mut *self, src) {
            (Storage::F32(d), Storage::F32(s)) => d[offset..offset + s.len()].copy_from_slice(s),
            (Storage::BF16(d), Storage::BF16(s)) => d[offset..offset + s.len()].copy_from_slice(s),
            (Storage::F16(d), Storage::F16(s)) => d[offset..offset + s.len()].copy_from_slice(s),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(d), Storage::Cuda(s)) if d.dtype() == s.dtype() => {
                d.copy_from(offset, s)?
            }
            _ => {
                let mut tmp = vec![0.0f32; src.len()];
                src.read_f32(0, &mut tmp);
                self.write_f32(offset, &tmp);
            }
        }
        Ok(())
    }

    pub fn zeros(dtype: DType, n: usize) -> Self {
        match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
            DType::F16 => Storage::F16(vec![f16::ZERO; n]),
        }
    }

    /// Zeros of `dtype` in host memory, or an error where the memory cannot be had (instead of
    /// the process aborting, as `zeros` would).
    pub fn try_zeros(dtype: DType, n: usize) -> Result<Self, TensorError> {
        let oom = || {
            let gib = n as f64 * dtype.size_in_bytes() as f64 / (1u64 << 30) as f64;
            TensorError::Device(
                "cpu".into(),
                format!("out of memory: {gib:.1} GiB asked (a shorter context or a smaller batch or model)"),
            )
        };
        Ok(match dtype {
            DType::F32 => Storage::F32(zeroed_vec(n).ok_or_else(oom)?),
            DType::BF16 => Storage::BF16(zeroed_vec(n).ok_or_else(oom)?),
            DType::F16 => Storage::F16(zeroed_vec(n).ok_or_else(oom)?),
        })
    }

    /// Converts f32 values into storage of `dtype` (round-to-nearest-even).
    pub fn from_f32(dtype: DType, v: Vec<f32>) -> Self {
        match dtype {
            DType::F32 => Storage::F32(v),
            DType::BF16 => Storage::BF16(v.par_iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => Storage::F16(v.par_iter().map(|&x| f16::from_f32(x)).collect()),
        }
    }

    /// Writes `src` (f32) into elements `offset..offset + src.len()`, rounding to the dtype.
    pub fn write_f32(&mut self, offset: usize, src: &[f32]) {
        match self {
            Storage::F32(v) => v[offset..offset + src.len()].copy_from_slice(src),
            Storage::BF16(v) => {
                for (d, &s) in v[offset..offset + src.len()].iter_mut().zip(src) {
                    *d = bf16::from_f32(s);
                }
            }
            Storage::F16(v) => {
                for (d, &s) in v[offset..offset + src.len()].iter_mut().zip(src) {
                    *d = f16::from_f32(s);
                }
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.write_f32(offset, src).expect("host-to-device copy"),
        }
    }

    /// Reads elements `offset..offset + dst.len()` into `dst` as f32.
    pub fn read_f32(&self, offset: usize, dst: &mut [f32]) {
        match self {
            Storage::F32(v) => dst.copy_from_slice(&v[offset..offset + dst.len()]),
            Storage::BF16(v) => {
                // bf16 is the top half of an f32: a shift the compiler vectorises.
                for (d, s) in dst.iter_mut().zip(&v[offset..]) {
                    *d = f32::from_bits((s.to_bits() as u32) << 16);
                }
            }
            Storage::F16(v) => {
                for (d, s) in dst.iter_mut().zip(&v[offset..]) {
                    *d = s.to_f32();
                }
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.read_f32(offset, dst).expect("device-to-host copy"),
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        self.len() * self.dtype().size_in_bytes()
    }
}

/// A dense row-major tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, storage: Storage) -> Result<Self, TensorError> {
        let n: usize = shape.iter().product();
        if n != storage.len() {
            return Err(shape_err(
                "Tensor::new",
                format!(
                    "shape {shape:?} holds {n} elements, storage has {}",
                    storage.len()
                ),
            ));
        }
        Ok(Tensor { shape, storage })
    }

    /// A tensor of `dtype` from f32 values (rounded when `dtype` is 16-bit).
    pub fn from_f32(shape: Vec<usize>, v: Vec<f32>, dtype: DType) -> Result<Self, TensorError> {
        Self::new(shape, Storage::from_f32(dtype, v))
    }

    pub fn zeros(shape: Vec<usize>, dtype: DType) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape,
            storage: Storage::zeros(dtype, n),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    pub fn elem_count(&self) -> usize {
        self.storage.len()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.storage.size_in_bytes()
    }

    /// Size of dimension `d`.
    pub fn dim(&self, d: usize) -> usize {
        self.shape[d]
    }

    /// All elements as f32 (a copy for 16-bit storage).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.storage {
            Storage::F32(v) => v.clone(),
            Storage::BF16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
            Storage::F16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.to_f32_vec().expect("device-to-host copy"),
        }
    }

    pub fn device(&self) -> Device {
        self.storage.device()
    }

    /// The same tensor on `device` (a copy; converted through f32 when the dtype must change).
    pub fn to_device(&self, device: Device) -> Result<Tensor, TensorError> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let v = self.to_f32_vec();
        let storage = match device {
            Device::Cpu => Storage::from_f32(self.dtype(), v),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => Storage::Cuda(crate::cuda::CudaBuf::from_f32(
                &crate::cuda::GpuDevice::get(i)?,
                self.dtype(),
                &v,
            )?),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return device.ensure_available().map(|_| unreachable!()),
        };
        Tensor::new(self.shape.clone(), storage)
    }

    /// A tensor of `offset + uniform(-scale, scale)` values made from `seed` on `device`
    /// (random weights for benchmarks, without a checkpoint).
    pub fn random_on(
        shape: Vec<usize>,
        dtype: DType,
        device: Device,
        seed: u64,
        scale: f32,
        offset: f32,
    ) -> Result<Tensor, TensorError> {
        let n: usize = shape.iter().product();
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let dev = crate::cuda::GpuDevice::get(i)?;
                let b = crate::cuda::random(&dev, dtype, n, seed, scale, offset)?;
                Tensor::new(shape, Storage::Cuda(b))
            }
            _ => {
                device.ensure_available()?;
                use rand::{Rng, SeedableRng};
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                let v = (0..n)
                    .map(|_| offset + rng.random_range(-scale..=scale))
                    .collect();
                Tensor::from_f32(shape, v, dtype)
            }
        }
    }

    /// The f32 values when stored as f32, without a copy.
    pub fn as_f32_slice(&self) -> Option<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The same values in `dtype`, on the host.
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        Tensor {
            shape: self.shape.clone(),
            storage: Storage::from_f32(dtype, self.to_f32_vec()),
        }
    }

    /// Same data, another shape with the same number of elements.
    pub fn reshape(mut self, shape: Vec<usize>) -> Result<Self, TensorError> {
        let n: usize = shape.iter().product();
        if n != self.elem_count() {
            return Err(shape_err(
                "reshape",
                format!("{:?} -> {shape:?} changes the element count", self.shape),
            ));
        }
        self.shape = shape;
        Ok(self)
    }

    /// Tensors of one dtype and the same trailing dimensions, one after another along the first
    /// (e.g. the q, k and v weights of a layer as one fused weight). The result is on the host.
    pub fn cat_rows(parts: &[&Tensor]) -> Result<Tensor, TensorError> {
        let first = parts
            .first()
            .ok_or_else(|| shape_err("cat_rows", "no tensors"))?;
        let (tail, dt) = (&first.shape[1.min(first.shape.len())..], first.dtype());
        let mut rows = 0;
        let mut v = Vec::with_capacity(parts.iter().map(|p| p.elem_count()).sum());
        for p in parts {
            if p.shape.is_empty() || &p.shape[1..] != tail || p.dtype() != dt {
                return Err(shape_err(
                    "cat_rows",
                    format!("{:?} {} after {:?} {dt}", p.shape, p.dtype(), first.shape),
                ));
            }
            rows += p.shape[0];
            v.extend(p.to_f32_vec());
        }
        let mut shape = vec![rows];
        shape.extend_from_slice(tail);
        Tensor::from_f32(shape, v, dt)
    }

    /// Rows `r0..r1` of a 2-D tensor.
    pub fn rows(&self, r0: usize, r1: usize) -> Result<Tensor, TensorError> {
        if self.shape.len() != 2 || r0 > r1 || r1 > self.shape[0] {
            return Err(shape_err(
                "rows",
                format!("rows {r0}..{r1} of {:?}", self.shape),
            ));
        }
        let c = self.shape[1];
        #[cfg(feature = "cuda")]
        if let Storage::Cuda(b) = &self.storage {
            return Tensor::new(
                vec![r1 - r0, c],
                Storage::Cuda(b.slice_copy(r0 * c, r1 * c)?),
            );
        }
        let mut out = vec![0.0; (r1 - r0) * c];
        self.storage.read_f32(r0 * c, &mut out);
        Tensor::from_f32(vec![r1 - r0, c], out, self.dtype())
    }
}

/// Marks the element types whose all-zero bytes are the value 0.
trait ZeroBits: Copy {}
impl ZeroBits for f32 {}
impl ZeroBits for bf16 {}
impl ZeroBits for f16 {}

/// `n` zeros, taken zeroed from the allocator as `vec![0; n]` does (no pass over them), or
/// `None` where the allocator has not the memory or the size overflows.
fn zeroed_vec<T: ZeroBits>(n: usize) -> Option<Vec<T>> {
    let layout = std::alloc::Layout::array::<T>(n).ok()?;
    if layout.size() == 0 {
        return Some(Vec::new());
    }
    // SAFETY: the layout has a non-zero size; the memory comes from the global allocator with
    // `T`'s array layout for `n` elements, as `Vec<T>` with capacity `n` would hold it, and is
    // zeroed, which is `n` valid values of `T` (`ZeroBits`).
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut T;
        (!p.is_null()).then(|| Vec::from_raw_parts(p, n, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_that_cannot_be_had_are_an_error_not_an_abort() {
        // Past the address space (2^60 bytes), and a size whose bytes overflow.
        for (dtype, n) in [(DType::F32, 1usize << 58), (DType::BF16, usize::MAX / 2)] {
            let e = Storage::try_zeros(dtype, n).unwrap_err().to_string();
            assert!(e.starts_with("device cpu: out of memory: "), "{e}");
        }
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let z = Storage::try_zeros(dtype, 1000).unwrap();
            assert_eq!(z, Storage::zeros(dtype, 1000));
            assert!(Storage::try_zeros(dtype, 0).unwrap().is_empty());
        }
    }

    #[test]
    fn bf16_storage_rounds_and_reads_back() {
        let t = Tensor::from_f32(
            vec![2, 2],
            vec![1.0, 1.003_906_2, 3.0e38, -0.1],
            DType::BF16,
        )
        .unwrap();
        let v = t.to_f32_vec();
        assert_eq!(v[0], 1.0);
        assert_eq!(v[1], 1.0); // 1 + 2^-8 ties to even
        assert!((v[3] + 0.1).abs() < 1e-3);
        assert_eq!(t.size_in_bytes(), 8);
        assert!(Tensor::from_f32(vec![3], vec![1.0], DType::F32).is_err());
    }
}

//! Tensors for tessera: dtypes (f32, bf16, f16), devices, storage, and the kernels of every op the
//! Llama family needs. Storage may be 16-bit; math is always done in f32 (as cuBLAS does with f32
//! accumulation), and results are rounded back to the tensor's dtype.
//!
//! ```
//! use tessera_tensor::{DType, Tensor, ops};
//! let x = Tensor::from_f32(vec![2, 3], vec![1., 2., 3., 4., 5., 6.], DType::F32).unwrap();
//! let w = Tensor::from_f32(vec![1, 3], vec![1., 0., -1.], DType::BF16).unwrap();
//! let y = ops::matmul_t(&x, &w, None).unwrap(); // x @ w^T
//! assert_eq!(y.to_f32_vec(), vec![-2., -2.]);
//! ```

pub mod device;
pub mod dtype;
pub mod error;
pub mod ops;
pub mod sample;
pub mod tensor;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use device::Device;
pub use dtype::DType;
pub use error::TensorError;
pub use sample::{Candidates, Sampler, SamplingParams};
pub use tensor::{Storage, Tensor};

//! The kernels of every op, on CPU. Each op reads its inputs as f32, computes in f32 and writes its
//! output in the dtype of its (first) input, as cuBLAS-style f32 accumulation does on GPU.

mod activation;
mod attention;
mod elementwise;
mod embedding;
mod matmul;
mod norm;
mod rope;
mod softmax;

pub use activation::{silu, silu_mul};
pub use attention::{causal_attention, AttentionShape};
pub use elementwise::add_inplace;
pub use embedding::embedding;
pub use matmul::{matmul_t, matmul_t_into};
pub use norm::rms_norm;
pub use rope::apply_rope;
pub use softmax::{log_softmax, softmax_inplace};

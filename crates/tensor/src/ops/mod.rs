//! The kernels of every op, on CPU. Each op reads its inputs as f32, computes in f32 and writes its
//! output in the dtype of its (first) input, as cuBLAS-style f32 accumulation does on GPU.

mod activation;
mod attention;
mod elementwise;
mod embedding;
mod grad_activation;
mod grad_attention;
mod grad_loss;
mod grad_norm;
mod grad_rope;
mod matmul;
mod matmul_nn;
mod norm;
mod rope;
mod round;
mod softmax;
mod top_k;

pub use activation::{silu, silu_mul, silu_mul_halves};
pub use attention::{causal_attention, decode_attention, AttentionShape};
pub use elementwise::add_inplace;
pub use embedding::embedding;
pub use grad_activation::{silu_mul_backward, silu_mul_forward};
pub use grad_attention::{attention_backward, attention_forward, TrainAttention};
pub use grad_loss::cross_entropy_fused;
pub use grad_norm::{rms_norm_backward, rms_norm_forward};
pub use grad_rope::rope_rotate;
pub use matmul::{matmul_t, matmul_t_gated, matmul_t_into};
pub use matmul_nn::{bias_backward, linear_backward_input, linear_backward_weight, linear_forward};
pub use norm::{add_rms_norm, head_rms_norm, norm_matmul_t, rms_norm};
pub use rope::{apply_rope, qkv_rope_append};
pub use round::round_slice;
pub use softmax::{argmax_rows, log_softmax, logsumexp_rows, softmax_inplace};
pub use top_k::{gather_values, top_k_row_len, top_k_rows, unpack_top_k, TopRow};

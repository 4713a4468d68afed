//! The Llama family's layers, each with an explicit forward and its tensor-parallel split.

mod attention;
mod decoder;
mod embedding;
mod linear;
mod mlp;
mod norm;

pub use attention::{Attention, QkNorm};
pub use decoder::DecoderLayer;
pub use embedding::{top_k_room, DrawLogits, ParallelLmHead, VocabParallelEmbedding};
pub use linear::{ColumnParallelLinear, RowParallelLinear};
pub use mlp::Mlp;
pub use norm::RmsNorm;

//! Training: every layer's explicit forward (keeping activations) and backward, on f32 buffers
//! grouped into per-layer units ([`ParamLayout`]), and the driver that runs them in order
//! ([`TrainModel::forward_backward`]). Mixed precision is emulated by rounding weights and
//! activations to the compute dtype; gradients are computed in f32.

pub mod attention;
pub mod decoder;
pub mod embedding;
pub mod head;
pub mod init;
pub mod layout;
pub mod linear;
pub mod mlp;
pub mod model;

pub use init::{load_checkpoint, random_init};
pub use layout::{ParamEntry, ParamLayout, Unit, UnitKind};
pub use model::{BatchDims, FullParams, TrainModel, TrainOptions, UnitSource};

#[cfg(test)]
mod tests;

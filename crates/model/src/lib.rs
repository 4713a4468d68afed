//! Models of the Llama family: HF configs, safetensors checkpoints read shard by shard, and layers with
//! explicit forward passes and their tensor-parallel split.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod grad;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod rope;
pub mod synthetic;
pub mod tp;

pub use checkpoint::Checkpoint;
pub use config::{Arch, ModelConfig, RopeConfig, RopeScaling};
pub use error::ModelError;
pub use grad::{BatchDims, ParamLayout, TrainModel, TrainOptions, UnitSource};
pub use kv_cache::KvCache;
pub use layers::DrawLogits;
#[cfg(feature = "cuda")]
pub use llama::LockstepGraph;
pub use llama::{LlamaModel, Logits};
pub use tp::{validate_tp, TpRank, TpShard};

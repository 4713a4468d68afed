//! The inference engine: tensor-parallel ranks run SPMD (one thread per rank here; processes with
//! the parallel runtime), each holding its shard of the model and its part of the KV cache. Rank 0
//! is the driver: it samples and broadcasts each next token, so every rank stays in step.
//!
//! ```no_run
//! use tessera_infer::{ModelSource, score};
//! let src = ModelSource::open(&ModelSource::Dir("tests/fixtures/hf/llama".into())).unwrap();
//! let out = score(&src, &[0, 5, 9, 2], 2, tessera_tensor::DType::F32).unwrap();
//! println!("{:?}", out.token_logprobs);
//! ```

mod default_model;
mod error;
mod generate;
mod score;
mod source;
mod spmd;

pub use error::InferError;
pub use generate::{generate, GenerateParams};
pub use score::{score, ScoreOutput};
pub use source::{ModelSource, OpenModel};
pub use spmd::run_tp;

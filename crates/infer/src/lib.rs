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
pub use generate::{generate, generate_on, GenerateParams};
pub use score::{score, score_on, ScoreOutput};
pub use source::{ModelSource, OpenModel};
pub use spmd::run_tp;

/// The device of tensor-parallel rank `rank` when the job runs on `base`: GPUs are numbered from
/// `base`, one per rank.
pub fn rank_device(base: tessera_tensor::Device, rank: usize) -> tessera_tensor::Device {
    match base {
        tessera_tensor::Device::Cpu => tessera_tensor::Device::Cpu,
        tessera_tensor::Device::Cuda(i) => tessera_tensor::Device::Cuda(i + rank),
    }
}

/// Readies the devices of a `tp`-rank job on `base`: on CUDA with tp > 1, one NCCL communicator
/// per GPU, so that the ranks all-reduce activations on the devices.
pub fn prepare_devices(base: tessera_tensor::Device, tp: usize) -> Result<(), InferError> {
    #[cfg(feature = "cuda")]
    if let tessera_tensor::Device::Cuda(i) = base {
        let ordinals: Vec<usize> = (i..i + tp).collect();
        tessera_tensor::cuda::nccl::init_group(&ordinals)
            .map_err(tessera_model::ModelError::from)?;
    }
    let _ = (base, tp);
    Ok(())
}

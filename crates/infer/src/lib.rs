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
    // Ranks that are processes join their group from inside the rank (`join_device_group`).
    let launched = launched()?;
    #[cfg(feature = "cuda")]
    if let (tessera_tensor::Device::Cuda(i), false) = (base, launched) {
        let ordinals: Vec<usize> = (i..i + tp).collect();
        tessera_tensor::cuda::nccl::init_group(&ordinals)
            .map_err(tessera_model::ModelError::from)?;
    }
    let _ = (base, tp, launched);
    Ok(())
}

/// Whether this process is one rank of a multi-process job (started by a launcher).
fn launched() -> Result<bool, InferError> {
    Ok(tessera_comm::LaunchEnv::from_env()?.is_some_and(|e| e.world_size > 1))
}

/// The device of tensor-parallel rank `rank` of a job on `base`: `base + rank` for threads of one
/// process; for a process started by a launcher, `base + its local rank`, so that every node
/// numbers its GPUs from `base`.
pub fn device_of_rank(base: tessera_tensor::Device, rank: usize) -> tessera_tensor::Device {
    let local = tessera_comm::LaunchEnv::from_env()
        .ok()
        .flatten()
        .filter(|e| e.world_size > 1)
        .map_or(rank, |e| e.local_rank);
    rank_device(base, local)
}

/// Inside a rank: when this rank is one process of a multi-process job on GPUs, joins its GPU to
/// the job's NCCL group (rank 0 makes the unique id and broadcasts it through `comm`). Threads of
/// one process were grouped before they started (`prepare_devices`) and need nothing here.
pub fn join_device_group(
    device: tessera_tensor::Device,
    comm: &dyn tessera_comm::Communicator,
) -> Result<(), InferError> {
    #[cfg(feature = "cuda")]
    if let tessera_tensor::Device::Cuda(_) = device {
        if launched()? && comm.world_size() > 1 {
            use tessera_comm::CommExt;
            let mut id = [0u8; 128];
            if comm.rank() == 0 {
                id = tessera_tensor::cuda::nccl::unique_id()
                    .map_err(tessera_model::ModelError::from)?;
            }
            comm.broadcast(&mut id, 0)?;
            if let tessera_tensor::Device::Cuda(ordinal) = device_of_rank(device, comm.rank()) {
                tessera_tensor::cuda::nccl::init_rank(ordinal, comm.rank(), comm.world_size(), id)
                    .map_err(tessera_model::ModelError::from)?;
            }
        }
    }
    let _ = (device, comm);
    Ok(())
}

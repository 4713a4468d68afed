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
pub use source::{
    continuation_text, Acts, AddSpecial, ModelSource, OpenModel, SamplingDefaults, Unapplied,
};
pub use spmd::run_tp;

/// The device of tensor-parallel rank `rank` when the job runs on `base`: GPUs are numbered from
/// `base`, one per rank.
pub fn rank_device(base: tessera_tensor::Device, rank: usize) -> tessera_tensor::Device {
    match base {
        tessera_tensor::Device::Cpu => tessera_tensor::Device::Cpu,
        tessera_tensor::Device::Cuda(i) => tessera_tensor::Device::Cuda(i + rank),
    }
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

/// Runs `f` over the communicator a rank's model uses on `device`: on GPUs with more than one
/// rank, an NCCL communicator made over `comm` (every rank of `comm` joins it, on its own GPU), so
/// that activations are all-reduced on the devices; otherwise `comm` itself.
pub fn with_rank_comm<R>(
    device: tessera_tensor::Device,
    comm: &dyn tessera_comm::Communicator,
    f: impl FnOnce(&dyn tessera_comm::Communicator) -> Result<R, InferError>,
) -> Result<R, InferError> {
    #[cfg(feature = "cuda")]
    if let (tessera_tensor::Device::Cuda(ordinal), true) =
        (device_of_rank(device, comm.rank()), comm.world_size() > 1)
    {
        let nccl = tessera_comm::NcclComm::new(comm, ordinal)?;
        if comm.rank() == 0 {
            let on = if nccl.fused_norm_active() {
                "on"
            } else {
                "off"
            };
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "collectives: NCCL; fused NVLink sum + norm {on}"
            );
        }
        let r = f(&nccl);
        if let Err(e) = &r {
            // Tell the other ranks now: they may be waiting in a collective on their GPUs, and
            // the NCCL communicator's teardown meets them at a barrier.
            if !spmd::is_abort(e) {
                comm.abort(&format!("rank {} failed: {e}", comm.rank()));
            }
        }
        return r;
    }
    let _ = device;
    f(comm)
}

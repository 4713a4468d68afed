//! Runs one closure per tensor-parallel rank and returns rank 0's result.
//!
//! Two ways, the closure cannot tell which:
//! - **threads** (default): one thread per rank in this process, over the in-process backend;
//! - **one rank of a multi-process job**: when this process was started by `tessera launch`,
//!   torchrun, srun or mpirun ([`tessera_comm::process_world`]), it runs the closure once, as its
//!   own rank, over the TCP backend. Every rank returns its own result (score and generate compute
//!   the same result on every rank; rank 0's is the one printed).
//!
//! If a rank fails, the others are aborted by the communicator, and the error reported is the root
//! cause rather than the aborts it caused.

use tessera_comm::spmd::{root_cause, run_threads};
use tessera_comm::{CommError, Communicator, LocalGroup};
use tessera_model::TpRank;

use crate::InferError;

pub(crate) fn is_abort(e: &InferError) -> bool {
    matches!(
        e,
        InferError::Comm(CommError::Aborted { .. })
            | InferError::Model(tessera_model::ModelError::Comm(CommError::Aborted { .. }))
    )
}

pub fn run_tp<R, F>(tp: usize, f: F) -> Result<R, InferError>
where
    R: Send,
    F: Fn(&dyn Communicator, TpRank) -> Result<R, InferError> + Sync,
{
    if tp == 0 {
        return Err(InferError::Request("tp must be at least 1".into()));
    }
    let timeout = tessera_comm::timeout_from_env()?;
    match tessera_comm::process_world()? {
        Some(world) => run_as_process_rank(&*world, tp, f),
        None => run_as_threads(tp, timeout, f),
    }
}

/// This process is one rank of a multi-process job: run `f` once, as that rank.
fn run_as_process_rank<R, F>(world: &dyn Communicator, tp: usize, f: F) -> Result<R, InferError>
where
    F: Fn(&dyn Communicator, TpRank) -> Result<R, InferError>,
{
    let (rank, size) = (world.rank(), world.world_size());
    tessera_comm::spmd::check_world_size(world, "tp", tp).map_err(InferError::Request)?;
    tessera_comm::spmd::run_as_process_rank(
        world,
        is_abort,
        |msg| InferError::Panic { rank, msg },
        || f(world, TpRank { rank, size }),
    )
}

fn run_as_threads<R, F>(tp: usize, timeout: std::time::Duration, f: F) -> Result<R, InferError>
where
    R: Send,
    F: Fn(&dyn Communicator, TpRank) -> Result<R, InferError> + Sync,
{
    let comms = LocalGroup::with_timeout(tp, timeout).into_comms();
    let results = run_threads(
        comms,
        |rank, comm| f(&comm, TpRank { rank, size: tp }),
        |rank, msg| InferError::Panic { rank, msg },
    );
    let mut errors = Vec::new();
    let mut rank0 = None;
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(v) if rank == 0 => rank0 = Some(v),
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
    }
    match (rank0, root_cause(errors, is_abort)) {
        (Some(v), None) => Ok(v),
        (_, Some(e)) => Err(e),
        (None, None) => Err(InferError::Request("rank 0 returned no result".into())),
    }
}

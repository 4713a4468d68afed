//! Runs one closure per data-parallel rank: each on its own thread with its own communicator
//! (in-process ranks), or, when this process is one rank of a multi-process job (`tessera
//! launch`, torchrun, srun, mpirun), once, as that rank, over the job's TCP world. If a rank fails,
//! the others are aborted by the communicator, and the error reported is the root cause rather
//! than the aborts it caused.

use std::sync::Arc;

use tessera_comm::spmd::{root_cause, run_threads};
use tessera_comm::{CommError, Communicator, LocalGroup};

use crate::TrainError;

/// The results of the ranks this process ran, in rank order: all `dp` of them when the ranks are
/// threads, or this process's own when it is one rank of a `dp`-process job.
pub fn run_dp<R, F>(dp: usize, f: F) -> Result<Vec<R>, TrainError>
where
    R: Send,
    F: Fn(Arc<dyn Communicator>) -> Result<R, TrainError> + Sync,
{
    if dp == 0 {
        return Err(TrainError::Config("dp must be at least 1".into()));
    }
    match tessera_comm::process_world()? {
        Some(world) => run_as_process_rank(world, dp, f).map(|r| vec![r]),
        None => run_as_threads(dp, f),
    }
}

fn is_abort(e: &TrainError) -> bool {
    matches!(
        e,
        TrainError::Comm(CommError::Aborted { .. })
            | TrainError::Model(tessera_model::ModelError::Comm(CommError::Aborted { .. }))
    )
}

/// This process is one rank of a multi-process job: run `f` once, as that rank.
fn run_as_process_rank<R, F>(
    world: Arc<tessera_comm::TcpComm>,
    dp: usize,
    f: F,
) -> Result<R, TrainError>
where
    F: Fn(Arc<dyn Communicator>) -> Result<R, TrainError>,
{
    let rank = world.rank();
    tessera_comm::spmd::check_world_size(&*world, "dp", dp).map_err(TrainError::Config)?;
    let comm: Arc<dyn Communicator> = world.clone();
    tessera_comm::spmd::run_as_process_rank(
        &*world,
        is_abort,
        |msg| TrainError::Panic { rank, msg },
        || f(comm),
    )
}

fn run_as_threads<R, F>(dp: usize, f: F) -> Result<Vec<R>, TrainError>
where
    R: Send,
    F: Fn(Arc<dyn Communicator>) -> Result<R, TrainError> + Sync,
{
    let comms = LocalGroup::new(dp).into_comms();
    let results = run_threads(
        comms,
        |_, comm| f(Arc::new(comm)),
        |rank, msg| TrainError::Panic { rank, msg },
    );
    let mut oks = Vec::with_capacity(dp);
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(v) => oks.push(v),
            Err(e) => errors.push(e),
        }
    }
    match root_cause(errors, is_abort) {
        None => Ok(oks),
        Some(e) => Err(e),
    }
}

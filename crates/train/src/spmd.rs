//! Runs one closure per data-parallel rank: each on its own thread with its own communicator
//! (in-process ranks), or, when this process is one rank of a multi-process job (`tessera
//! launch`, torchrun, srun, mpirun), once, as that rank, over the job's TCP world. If a rank fails,
//! the others are aborted by the communicator, and the error reported is the root cause rather
//! than the aborts it caused.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

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

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
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
    let (rank, size) = (world.rank(), world.world_size());
    if size != dp {
        let msg = format!(
            "this process is rank {rank} of a {size}-process job but dp is {dp}: launch with \
             --nproc-per-node {dp} (x nodes) or pass --dp {size}"
        );
        world.abort(&format!("rank {rank}: {msg}"));
        return Err(TrainError::Config(msg));
    }
    let comm: Arc<dyn Communicator> = world.clone();
    let r = catch_unwind(AssertUnwindSafe(|| f(comm))).unwrap_or_else(|p| {
        Err(TrainError::Panic {
            rank,
            msg: panic_message(p),
        })
    });
    if let Err(e) = &r {
        // Tell the other ranks now, with the cause, instead of letting them wait out the deadline.
        if !is_abort(e) {
            world.abort(&format!("rank {rank} failed: {e}"));
        }
    }
    r
}

fn run_as_threads<R, F>(dp: usize, f: F) -> Result<Vec<R>, TrainError>
where
    R: Send,
    F: Fn(Arc<dyn Communicator>) -> Result<R, TrainError> + Sync,
{
    let comms = LocalGroup::new(dp).into_comms();
    let results: Vec<Result<R, TrainError>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let f = &f;
                s.spawn(move || f(Arc::new(comm)))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|p| {
                    Err(TrainError::Panic {
                        rank,
                        msg: panic_message(p),
                    })
                })
            })
            .collect()
    });
    let mut oks = Vec::with_capacity(dp);
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(v) => oks.push(v),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        return Ok(oks);
    }
    let idx = errors.iter().position(|e| !is_abort(e)).unwrap_or(0);
    Err(errors.swap_remove(idx))
}

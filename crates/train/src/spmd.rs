//! Runs one closure per data-parallel rank, each on its own thread with its own communicator
//! (in-process ranks), and returns every rank's result. If a rank fails, the others are aborted by
//! the communicator, and the error reported is the root cause rather than the aborts it caused.

use std::sync::Arc;

use tessera_comm::{CommError, Communicator, LocalGroup};

use crate::TrainError;

pub fn run_dp<R, F>(dp: usize, f: F) -> Result<Vec<R>, TrainError>
where
    R: Send,
    F: Fn(Arc<dyn Communicator>) -> Result<R, TrainError> + Sync,
{
    if dp == 0 {
        return Err(TrainError::Config("dp must be at least 1".into()));
    }
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
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(TrainError::Panic { rank, msg })
                })
            })
            .collect()
    });
    let is_abort = |e: &TrainError| {
        matches!(
            e,
            TrainError::Comm(CommError::Aborted { .. })
                | TrainError::Model(tessera_model::ModelError::Comm(CommError::Aborted { .. }))
        )
    };
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

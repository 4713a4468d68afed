//! Runs one closure per tensor-parallel rank, each on its own thread with its own communicator,
//! and returns rank 0's result. If a rank fails, the others are aborted by the communicator, and
//! the error reported is the root cause rather than the aborts it caused.

use tessera_comm::{CommError, LocalComm, LocalGroup};
use tessera_model::TpRank;

use crate::InferError;

pub fn run_tp<R, F>(tp: usize, f: F) -> Result<R, InferError>
where
    R: Send,
    F: Fn(&LocalComm, TpRank) -> Result<R, InferError> + Sync,
{
    if tp == 0 {
        return Err(InferError::Request("tp must be at least 1".into()));
    }
    let comms = LocalGroup::new(tp).into_comms();
    let results: Vec<Result<R, InferError>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let f = &f;
                s.spawn(move || {
                    let r = f(&comm, TpRank { rank, size: tp });
                    drop(comm);
                    r
                })
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
                    Err(InferError::Panic { rank, msg })
                })
            })
            .collect()
    });
    let is_abort = |e: &InferError| {
        matches!(
            e,
            InferError::Comm(CommError::Aborted { .. })
                | InferError::Model(tessera_model::ModelError::Comm(CommError::Aborted { .. }))
        )
    };
    let mut errors = Vec::new();
    let mut rank0 = None;
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(v) if rank == 0 => rank0 = Some(v),
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        return Ok(rank0.expect("rank 0 returned"));
    }
    // Prefer the root cause over the aborts it caused on the other ranks.
    let idx = errors.iter().position(|e| !is_abort(e)).unwrap_or(0);
    Err(errors.swap_remove(idx))
}

//! The pieces the inference and training runners share to run SPMD ranks: as threads of this
//! process, or once as this process's rank of a multi-process job.

use std::any::Any;
use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::Communicator;

/// The message of a panic's payload.
pub fn panic_message(p: Box<dyn Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Refuses a multi-process job whose process count is not the `n` ranks the command asked for
/// (`--{flag} n`), telling the other ranks at once. The error names both numbers and both ways out.
pub fn check_world_size(world: &dyn Communicator, flag: &str, n: usize) -> Result<(), String> {
    let (rank, size) = (world.rank(), world.world_size());
    if size == n {
        return Ok(());
    }
    let msg = format!(
        "this process is rank {rank} of a {size}-process job but {flag} is {n}: launch with \
         --nproc-per-node {n} (× nodes) or pass --{flag} {size}"
    );
    world.abort(&format!("rank {rank}: {msg}"));
    Err(msg)
}

/// Runs `f` once, as this process's rank of the multi-process job `world`. A panic becomes the
/// error `panicked(message)`; a failure that is not itself an abort (`is_abort`) aborts the other
/// ranks now, with its cause, instead of letting them wait out the deadline.
pub fn run_as_process_rank<R, E: Display>(
    world: &dyn Communicator,
    is_abort: impl Fn(&E) -> bool,
    panicked: impl FnOnce(String) -> E,
    f: impl FnOnce() -> Result<R, E>,
) -> Result<R, E> {
    let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panicked(panic_message(p))));
    if let Err(e) = &r {
        if !is_abort(e) {
            world.abort(&format!("rank {} failed: {e}", world.rank()));
        }
    }
    r
}

/// Runs `f(rank, comm)` for each of `comms` on a thread of its own; a rank that panics gives
/// `panicked(rank, message)`. The results in rank order.
pub fn run_threads<C: Send, R: Send, E: Send>(
    comms: Vec<C>,
    f: impl Fn(usize, C) -> Result<R, E> + Sync,
    panicked: impl Fn(usize, String) -> E,
) -> Vec<Result<R, E>> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| s.spawn(move || f(rank, comm)))
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join()
                    .unwrap_or_else(|p| Err(panicked(rank, panic_message(p))))
            })
            .collect()
    })
}

/// The error to report of several ranks' errors: the first that is not an abort (the root cause
/// rather than the aborts it caused), else the first; `None` when there is none.
pub fn root_cause<E>(mut errors: Vec<E>, is_abort: impl Fn(&E) -> bool) -> Option<E> {
    if errors.is_empty() {
        return None;
    }
    let idx = errors.iter().position(|e| !is_abort(e)).unwrap_or(0);
    Some(errors.swap_remove(idx))
}

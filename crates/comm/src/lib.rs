//! The parallel runtime's collectives: the [`Communicator`] trait that every rank talks through,
//! its backends, the dp × pp × tp [`Mesh`], rendezvous and the launch environment. Code above this
//! crate cannot tell whether its peers are threads or processes.
//!
//! - [`LocalComm`]: one thread per rank, shared memory ([`LocalGroup`]).
//! - [`TcpComm`]: one process per rank, ring collectives over TCP ([`TcpComm::connect`], or
//!   [`process_world`] for a process started by `tessera launch`, torchrun, srun or mpirun).
//! - `NcclComm` (feature `cuda`): one GPU per rank, NCCL on the device's stream, made over
//!   either of the above as its control plane.
//! - The host backends run asynchronous operations on a comm stream ([`CommStream`]), as NCCL does on a CUDA
//!   stream; see `docs/COMM.md`.
//!
//! ```
//! use tessera_comm::{CommExt, Communicator, LocalGroup, ReduceOp};
//! let comms = LocalGroup::new(2).into_comms();
//! let out: Vec<Vec<f32>> = std::thread::scope(|s| {
//!     let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(move || {
//!         let mut v = vec![c.rank() as f32 + 1.0; 3];
//!         c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
//!         // Asynchronous: the buffer is owned by the operation until `wait` gives it back.
//!         let pending = c.all_reduce_async(v, ReduceOp::Max).unwrap();
//!         pending.wait().unwrap()
//!     })).collect();
//!     hs.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! assert_eq!(out, vec![vec![3.0; 3], vec![3.0; 3]]);
//! ```

mod args;
mod check;
mod communicator;
mod element;
mod error;
pub mod launch_env;
mod local;
mod mesh;
#[cfg(feature = "cuda")]
mod nccl;
mod reduce;
pub mod rendezvous;
pub mod spmd;
mod stream;
mod tcp;
mod work;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use check::check_mode_from_env;
pub use communicator::{
    all_gather_tensor_via_host, all_reduce_tensor_via_host, gathered_shape, CommExt, Communicator,
    Pending, ReduceOp,
};
pub use element::{ElemKind, Element, OwnedBuf};
pub use error::CommError;
pub use launch_env::{LaunchEnv, Launcher};
pub use local::{LocalComm, LocalGroup, LocalRank};
pub use mesh::{Coord, Mesh, MeshShape};
#[cfg(feature = "cuda")]
pub use nccl::{nvlink_wanted, NcclComm};
pub use stream::CommStream;
pub use tcp::{TcpComm, TcpConfig, TcpRank, DEFAULT_CHUNK_BYTES};
pub use work::{AsyncOp, Work, WorkHandle};

/// Default deadline of every wait, overridable with `TESSERA_COMM_TIMEOUT_S`.
pub const DEFAULT_TIMEOUT_S: f64 = 300.0;

/// The longest deadline `TESSERA_COMM_TIMEOUT_S` (and `tessera launch --timeout`) may set: 31
/// years, far past any job.
pub const MAX_TIMEOUT_S: f64 = 1e9;

/// The shortest: a millisecond (a shorter one ends every wait at once, which is no deadline).
pub const MIN_TIMEOUT_S: f64 = 1e-3;

/// Whether `secs` is a deadline `TESSERA_COMM_TIMEOUT_S` takes: from [`MIN_TIMEOUT_S`] to below
/// [`MAX_TIMEOUT_S`] (never NaN).
pub fn timeout_in_range(secs: f64) -> bool {
    (MIN_TIMEOUT_S..MAX_TIMEOUT_S).contains(&secs)
}

/// The most ranks a multi-process job may have: far beyond the largest clusters, low enough that
/// a mistyped size is refused instead of failing to allocate a table of its ranks.
pub const MAX_WORLD_SIZE: usize = 1 << 20;

/// The deadline of every collective wait: `TESSERA_COMM_TIMEOUT_S` seconds, else the default
/// (also when the variable is malformed; [`timeout_from_env`] reports that instead).
pub fn default_timeout() -> Duration {
    timeout_from_env().unwrap_or(Duration::from_secs_f64(DEFAULT_TIMEOUT_S))
}

/// The deadline of every wait from `TESSERA_COMM_TIMEOUT_S` (seconds, > 0), else the default.
pub fn timeout_from_env() -> Result<Duration, CommError> {
    match std::env::var("TESSERA_COMM_TIMEOUT_S") {
        Err(_) => Ok(Duration::from_secs_f64(DEFAULT_TIMEOUT_S)),
        Ok(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|&t| timeout_in_range(t))
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                CommError::Setup(format!(
                    "TESSERA_COMM_TIMEOUT_S must be a number of seconds from {MIN_TIMEOUT_S} to below {MAX_TIMEOUT_S:e}, got {s:?}"
                ))
            }),
    }
}

static WORLD: OnceLock<Result<Option<Arc<TcpComm>>, CommError>> = OnceLock::new();

/// This process's world when it was started as one rank of a multi-process job (see
/// [`launch_env`]); `None` when it runs alone (or as the only rank). The first call joins the job
/// (rendezvous, connections); later calls return the same communicator.
pub fn process_world() -> Result<Option<Arc<TcpComm>>, CommError> {
    WORLD
        .get_or_init(|| match LaunchEnv::from_env()? {
            Some(env) if env.world_size > 1 => {
                let cfg = TcpConfig::from_launch_env(&env)?;
                Ok(Some(Arc::new(TcpComm::connect(&cfg)?)))
            }
            _ => Ok(None),
        })
        .clone()
}

/// Whether this process was started as a rank of a multi-process job of more than one rank (whose
/// ranks may span hosts: a check against this host's resources cannot speak for the job).
pub fn launched() -> bool {
    LaunchEnv::from_env().is_ok_and(|e| e.is_some_and(|e| e.world_size > 1))
}

/// This process's rank in its multi-process job, 0 when it runs alone. Only rank 0 prints results.
pub fn process_rank() -> usize {
    LaunchEnv::from_env()
        .ok()
        .flatten()
        .map(|e| e.rank)
        .unwrap_or(0)
}

//! The parallel runtime's collectives: the [`Communicator`] trait that every rank talks through, and
//! its backends. Code above this crate cannot tell whether its peers are threads or processes.
//!
//! ```
//! use tessera_comm::{CommExt, Communicator, LocalGroup, ReduceOp};
//! let comms = LocalGroup::new(2).into_comms();
//! let out: Vec<Vec<f32>> = std::thread::scope(|s| {
//!     let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(move || {
//!         let mut v = vec![c.rank() as f32 + 1.0; 3];
//!         c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
//!         v
//!     })).collect();
//!     hs.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! assert_eq!(out, vec![vec![3.0; 3], vec![3.0; 3]]);
//! ```

mod communicator;
mod element;
mod error;
mod local;

pub use communicator::{CommExt, Communicator, ReduceOp};
pub use element::{ElemKind, Element};
pub use error::CommError;
pub use local::{LocalComm, LocalGroup};

/// Default deadline of every wait, overridable with `TESSERA_COMM_TIMEOUT_S`.
pub const DEFAULT_TIMEOUT_S: f64 = 300.0;

/// The deadline of every collective wait: `TESSERA_COMM_TIMEOUT_S` seconds, else the default.
pub fn default_timeout() -> std::time::Duration {
    let secs = std::env::var("TESSERA_COMM_TIMEOUT_S")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(DEFAULT_TIMEOUT_S);
    std::time::Duration::from_secs_f64(secs)
}

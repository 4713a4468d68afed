//! Errors of collectives. Each names the rank that saw it and, where known, the rank at fault.

use thiserror::Error;

#[derive(Debug, Error, Clone)]
pub enum CommError {
    #[error("rank {rank}: {op} timed out after {secs:.1}s waiting for rank(s) {missing:?}")]
    Timeout {
        rank: usize,
        op: String,
        secs: f64,
        missing: Vec<usize>,
    },
    #[error("rank {rank}: collective mismatch: {msg}")]
    Mismatch { rank: usize, msg: String },
    #[error("rank {rank}: the group was aborted: {reason}")]
    Aborted { rank: usize, reason: String },
    #[error("rank {rank}: invalid collective: {msg}")]
    Invalid { rank: usize, msg: String },
    /// A peer process went away (its connection closed or broke) while this rank needed it.
    #[error("rank {rank}: lost rank {peer}: {msg}")]
    PeerLost {
        rank: usize,
        peer: usize,
        msg: String,
    },
    /// The device backend failed (an NCCL or CUDA error on this rank's GPU).
    #[error("rank {rank}: {msg}")]
    Device { rank: usize, msg: String },
    /// Launch environment, rendezvous or configuration: the job could not be set up.
    #[error("{0}")]
    Setup(String),
}

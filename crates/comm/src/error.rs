//! Errors of collectives. Each names the rank that saw it and, where known, the rank at fault.

use thiserror::Error;

#[derive(Debug, Error, Clone)]
pub enum CommError {
    #[error(
        "rank {rank}: {op} timed out after {secs:.1}s waiting for rank(s) {}",
        rank_list(missing)
    )]
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

/// Ranks as `[1, 2, 5]`, the first 16 of a longer list followed by how many more (a job of a
/// million ranks that never joined is one readable line, not megabytes).
pub fn rank_list(ranks: &[usize]) -> String {
    const SHOWN: usize = 16;
    if ranks.len() <= SHOWN {
        return format!("{ranks:?}");
    }
    let head: Vec<String> = ranks[..SHOWN].iter().map(|r| r.to_string()).collect();
    format!(
        "[{}, ... and {} more]",
        head.join(", "),
        ranks.len() - SHOWN
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_rank_lists_are_cut() {
        assert_eq!(super::rank_list(&[2]), "[2]");
        assert_eq!(super::rank_list(&[1, 2]), "[1, 2]");
        let many: Vec<usize> = (0..1000).collect();
        let s = super::rank_list(&many);
        assert!(
            s.starts_with("[0, 1, 2,") && s.ends_with("15, ... and 984 more]"),
            "{s}"
        );
    }
}

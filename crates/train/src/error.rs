//! Errors of the training engine: each one a single line a user can act on.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("invalid training config: {0}")]
    Config(String),
    #[error("data: {0}")]
    Data(String),
    #[error("training stopped: {0}")]
    Diverged(String),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    /// The I/O error is part of the message (not a `source`), so that error chains print it
    /// once (as `ModelError::Io`).
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    /// An output path holds something other than a regular file (a device, a fifo, a directory):
    /// refused, not replaced (`--curve /dev/null` as root would otherwise replace the device).
    #[error("{path} is {kind}, not a regular file; not replacing it")]
    NotRegularFile { path: String, kind: &'static str },
    /// Standard output refused a line (a full disk, a closed pipe): worded as every command's
    /// failed write (`tessera`'s `outln!`), the error in the message as for `Io`.
    #[error("cannot write to standard output: {0}")]
    Stdout(std::io::Error),
    #[error("rank {rank} panicked: {msg}")]
    Panic { rank: usize, msg: String },
    #[error(transparent)]
    Model(#[from] tessera_model::ModelError),
    #[error(transparent)]
    Comm(#[from] tessera_comm::CommError),
}

impl TrainError {
    pub fn io(path: &std::path::Path, err: std::io::Error) -> Self {
        TrainError::Io {
            path: path.display().to_string(),
            err,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_io_error_is_said_once_in_a_chain() {
        let io = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let text = io.to_string();
        let e = super::TrainError::io(std::path::Path::new("ro/y"), io);
        assert_eq!(e.to_string(), format!("ro/y: {text}"));
        // No source: a chain printer (anyhow's `{:#}`) does not add the I/O error again.
        assert!(std::error::Error::source(&e).is_none());
    }
}

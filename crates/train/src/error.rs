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
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("rank {rank} panicked: {msg}")]
    Panic { rank: usize, msg: String },
    #[error(transparent)]
    Model(#[from] tessera_model::ModelError),
    #[error(transparent)]
    Comm(#[from] tessera_comm::CommError),
}

impl TrainError {
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

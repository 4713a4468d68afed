//! Errors of the inference engine.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum InferError {
    #[error(transparent)]
    Model(#[from] tessera_model::ModelError),
    #[error(transparent)]
    Comm(#[from] tessera_comm::CommError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Request(String),
    #[error("rank {rank} panicked: {msg}")]
    Panic { rank: usize, msg: String },
}

//! Errors of model loading and running: each one a single line a user can act on.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    /// The I/O error is part of the message (not a `source`), so that error chains print it once.
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("layout not allowed: {0}")]
    Layout(String),
    /// The weights or the input made the model compute NaN (a broken checkpoint, or a training
    /// run that diverged): no token can be chosen.
    #[error("the model's logits are not finite (NaN or +inf) {0}; its weights are likely broken")]
    NotANumber(String),
    #[error(transparent)]
    Tensor(#[from] tessera_tensor::TensorError),
    #[error(transparent)]
    Comm(#[from] tessera_comm::CommError),
}

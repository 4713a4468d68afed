//! Errors of tensor construction and ops.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TensorError {
    #[error("shape mismatch in {op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("unknown dtype {0:?} (expected f32, bf16 or f16)")]
    UnknownDType(String),
    #[error("device {0}: {1}")]
    Device(String, String),
}

pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> TensorError {
    TensorError::Shape {
        op,
        msg: msg.into(),
    }
}

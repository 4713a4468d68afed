//! tessera's planner: memory, communication and time for any parallel layout of a model on a
//! cluster, for training (ZeRO 0-3, offload, TP, PP) and serving (TP, PP, replicas, paged KV
//! cache), and the ranked layouts that fit. Pure arithmetic over a model's shape: no tensors.
//!
//! Every formula and its source is in `docs/PLAN.md`.
//!
//! ```
//! use tessera_plan::{job::{Job, TrainJob}, presets, search::{plan, Fixed, Request}};
//! let mut cluster = presets::cluster("h100-sxm").unwrap();
//! cluster.nodes = 2;
//! let p = plan(Request {
//!     model: presets::model("llama-3-70b").unwrap(),
//!     cluster,
//!     job: Job::Train(TrainJob::default()),
//!     fixed: Fixed::default(),
//!     mem_util: 0.9,
//!     efficiency: 0.55,
//! })
//! .unwrap();
//! assert!(p.layouts[0].fits);
//! ```

pub mod activations;
pub mod comm_volume;
pub mod job;
pub mod layout;
pub mod memory;
pub mod presets;
pub mod report;
pub mod request;
pub mod search;
pub mod shape;
pub mod svg;
pub mod time;

pub use shape::ModelShape;

use thiserror::Error;

/// Errors of the planner: each one line a user can act on.
#[derive(Debug, Error)]
pub enum PlanError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Layout(String),
    #[error(transparent)]
    Model(#[from] tessera_model::ModelError),
}

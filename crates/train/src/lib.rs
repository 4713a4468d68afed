//! The training engine: explicit forward/backward (from `tessera-model`), AdamW with mixed
//! precision and fp16 loss scaling, ZeRO stages 0-3 over data-parallel ranks, a DeepSpeed-shaped
//! config, token datasets and a deterministic loader, and layout-independent atomic checkpoints.
//!
//! ```no_run
//! use tessera_train::{run_dp, TrainConfig, Trainer};
//! # fn demo(model_cfg: tessera_model::ModelConfig, tokens: Vec<u32>) -> Result<(), tessera_train::TrainError> {
//! let cfg = TrainConfig::from_json_str(r#"{"train_batch_size": 8, "zero_optimization": {"stage": 2}}"#)?;
//! let losses = run_dp(2, |comm| {
//!     let layout = tessera_model::ParamLayout::new(&model_cfg);
//!     let init = tessera_model::grad::random_init(&layout, 0);
//!     let mut t = Trainer::new(comm, model_cfg.clone(), cfg.clone(), 32, init)?;
//!     let mut loader = tessera_train::Loader::new(tokens.clone(), 32, 0)?;
//!     let b = loader.rank_batches(0, t.micro_batch, t.grad_accum, t.dp(), t.rank());
//!     Ok(t.train_step(&b)?.loss)
//! })?;
//! # Ok(()) }
//! ```

pub mod adamw;
pub mod checkpoint;
pub mod config;
pub mod curve;
pub mod data;
pub mod error;
pub mod files;
pub mod flat_buffer;
pub mod loss_scale;
pub mod schedule;
pub mod spmd;
pub mod swap;
pub mod trainer;
pub mod zero;

pub use adamw::AdamWParams;
pub use config::{Precision, TrainConfig};
pub use data::{Dataset, Loader};
pub use error::TrainError;
pub use loss_scale::LossScaler;
pub use schedule::LrSchedule;
pub use spmd::run_dp;
pub use trainer::{Progress, StepStats, Trainer};
pub use zero::{CommStats, MemoryStats, ZeroEngine};

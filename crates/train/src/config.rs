//! The training config, read from a JSON file in DeepSpeed's own shape and validated once here:
//!
//! ```json
//! {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
//!  "gradient_clipping": 1.0, "bf16": {"enabled": true},
//!  "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
//!                "weight_decay": 0.1}},
//!  "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 1000,
//!                "warmup_num_steps": 50}},
//!  "zero_optimization": {"stage": 2, "overlap_comm": true}}
//! ```
//!
//! Unknown keys are kept as warnings (by their JSON path) for the caller to print; wrong values are
//! errors. `"auto"` (as HF writes for its DeepSpeed integration) means the default.

use serde_json::{Map, Value};

use crate::adamw::AdamWParams;
use crate::loss_scale::LossScaler;
use crate::schedule::{LrSchedule, WarmupType};
use crate::TrainError;

/// Compute precision of weights and activations (master weights and optimizer state are f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
    Fp16,
}

impl Precision {
    pub fn dtype(self) -> tessera_tensor::DType {
        match self {
            Precision::F32 => tessera_tensor::DType::F32,
            Precision::Bf16 => tessera_tensor::DType::BF16,
            Precision::Fp16 => tessera_tensor::DType::F16,
        }
    }
}

/// DeepSpeed's `fp16` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp16Config {
    /// 0 means dynamic.
    pub loss_scale: f32,
    pub initial_scale_power: u32,
    pub loss_scale_window: u64,
    pub hysteresis: u32,
    pub min_loss_scale: f32,
}

impl Default for Fp16Config {
    fn default() -> Self {
        Fp16Config {
            loss_scale: 0.0,
            initial_scale_power: 16,
            loss_scale_window: 1000,
            hysteresis: 2,
            min_loss_scale: 1.0,
        }
    }
}

/// Where optimizer state lives (`zero_optimization.offload_optimizer.device`). On CPU ranks the
/// state is in host memory for none and cpu; nvme keeps it in a file under `nvme_path`, one unit
/// in memory at a time (ZeRO-Infinity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffloadDevice {
    None,
    Cpu,
    Nvme(std::path::PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ZeroConfig {
    /// 0: replicated; 1: optimizer state sharded; 2: + gradients; 3: + weights.
    pub stage: u8,
    /// ZeRO-3: gather the next layer while this one computes.
    pub overlap_comm: bool,
    pub reduce_bucket_size: u64,
    pub offload_optimizer: OffloadDevice,
}

impl Default for ZeroConfig {
    fn default() -> Self {
        ZeroConfig {
            stage: 0,
            overlap_comm: true,
            reduce_bucket_size: 500_000_000,
            offload_optimizer: OffloadDevice::None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub train_batch_size: Option<usize>,
    /// `train_micro_batch_size_per_gpu`; when absent, derived as DeepSpeed derives it (see
    /// [`TrainConfig::batch_for`]).
    pub micro_batch: Option<usize>,
    pub grad_accum: Option<usize>,
    /// Max global gradient norm; 0 disables clipping.
    pub gradient_clipping: f32,
    pub precision: Precision,
    pub fp16: Fp16Config,
    pub lr: f32,
    pub adamw: AdamWParams,
    pub schedule: LrSchedule,
    pub zero: ZeroConfig,
    /// Recompute each layer's activations in the backward (`activation_checkpointing` present).
    pub recompute: bool,
    /// Keys that were not understood, by JSON path.
    pub warnings: Vec<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            train_batch_size: None,
            micro_batch: None,
            grad_accum: None,
            gradient_clipping: 0.0,
            precision: Precision::F32,
            fp16: Fp16Config::default(),
            lr: 1e-3,
            adamw: AdamWParams::default(),
            schedule: LrSchedule::Constant { lr: 1e-3 },
            zero: ZeroConfig::default(),
            recompute: false,
            warnings: vec![],
        }
    }
}

/// Top-level keys DeepSpeed accepts that do not change what tessera computes.
const IGNORED: &[&str] = &[
    "steps_per_print",
    "wall_clock_breakdown",
    "zero_allow_untested_optimizer",
    "dump_state",
    "prescale_gradients",
    "gradient_predivide_factor",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comms_logger",
    "flops_profiler",
    "memory_breakdown",
];

fn err(msg: impl Into<String>) -> TrainError {
    TrainError::Config(msg.into())
}

/// Reads one object's fields, recording the keys it did not ask for.
struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
    seen: Vec<&'static str>,
}

impl<'a> Obj<'a> {
    fn new(path: &str, v: &'a Value) -> Result<Self, TrainError> {
        let map = v.as_object().ok_or_else(|| {
            err(if path.is_empty() {
                "the config must be a JSON object".to_string()
            } else {
                format!("`{path}` must be a JSON object")
            })
        })?;
        Ok(Obj {
            path: path.to_string(),
            map,
            seen: vec![],
        })
    }

    fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value at `key`, `None` when absent, null or "auto".
    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.push(key);
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "auto" => None,
            Some(v) => Some(v),
        }
    }

    fn f64(&mut self, key: &'static str) -> Result<Option<f64>, TrainError> {
        let name = self.name(key);
        self.get(key)
            .map(|v| {
                let x = v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| err(format!("`{name}` must be a number, got {v}")))?;
                // Every number of the config is used as an f32: a larger one would be infinite.
                if x.abs() > f32::MAX as f64 {
                    return Err(err(format!(
                        "`{name}` {v} is too large (at most {:e})",
                        f32::MAX
                    )));
                }
                Ok(x)
            })
            .transpose()
    }

    fn uint(&mut self, key: &'static str) -> Result<Option<u64>, TrainError> {
        let name = self.name(key);
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .or_else(|| {
                        // Whole numbers written as floats (1e3), within u64: a larger one (1e30)
                        // is refused, not clamped to u64::MAX.
                        v.as_f64()
                            .filter(|x| x.fract() == 0.0 && *x >= 0.0 && *x < u64::MAX as f64)
                            .map(|x| x as u64)
                    })
                    .ok_or_else(|| err(format!("`{name}` must be a whole number >= 0, got {v}")))
            })
            .transpose()
    }

    fn bool(&mut self, key: &'static str) -> Result<Option<bool>, TrainError> {
        let name = self.name(key);
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| err(format!("`{name}` must be true or false, got {v}")))
            })
            .transpose()
    }

    fn str(&mut self, key: &'static str) -> Result<Option<&'a str>, TrainError> {
        let name = self.name(key);
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| err(format!("`{name}` must be a string, got {v}")))
            })
            .transpose()
    }

    fn obj(&mut self, key: &'static str) -> Result<Option<Obj<'a>>, TrainError> {
        let name = self.name(key);
        self.get(key).map(|v| Obj::new(&name, v)).transpose()
    }

    /// Records unread keys as warnings.
    fn finish(self, warnings: &mut Vec<String>) {
        for k in self.map.keys() {
            if !self.seen.contains(&k.as_str()) {
                warnings.push(format!("unknown config key `{}` ignored", self.name(k)));
            }
        }
    }
}

fn positive(name: &str, x: Option<f64>) -> Result<Option<f64>, TrainError> {
    match x {
        // As the f32 it is used as: 1e-300 would be 0.
        Some(v) if v as f32 <= 0.0 => Err(err(format!("`{name}` must be > 0, got {v:?}"))),
        _ => Ok(x),
    }
}

fn at_least_one(name: &str, x: Option<u64>) -> Result<Option<usize>, TrainError> {
    match x {
        Some(0) => Err(err(format!("`{name}` must be at least 1"))),
        _ => Ok(x.map(|v| v as usize)),
    }
}

/// The most samples (sequences) one optimizer step may take over all ranks: far above any real
/// batch (DeepSpeed's largest published ones are a few thousand), low enough that a mistyped size
/// is refused instead of overflowing.
pub const MAX_SAMPLES_PER_STEP: usize = 1 << 24;

impl TrainConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            TrainError::Config(m) => TrainError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self, TrainError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let mut top = Obj::new("", &v)?;
        let mut c = TrainConfig::default();
        let mut warnings = vec![];
        for k in IGNORED {
            top.get(k);
        }
        c.train_batch_size = at_least_one("train_batch_size", top.uint("train_batch_size")?)?;
        c.micro_batch = at_least_one(
            "train_micro_batch_size_per_gpu",
            top.uint("train_micro_batch_size_per_gpu")?,
        )?;
        c.grad_accum = at_least_one(
            "gradient_accumulation_steps",
            top.uint("gradient_accumulation_steps")?,
        )?;
        let clip = top.f64("gradient_clipping")?.unwrap_or(0.0);
        // 0 is off; a positive value too small for an f32 would silently be off too.
        if clip < 0.0 || (clip > 0.0 && clip as f32 == 0.0) {
            return Err(err(format!(
                "`gradient_clipping` must be 0 (off) or a positive f32, got {clip:?}"
            )));
        }
        c.gradient_clipping = clip as f32;

        let bf16 = match top.obj("bf16")? {
            Some(mut o) => {
                let on = o.bool("enabled")?.unwrap_or(false);
                o.get("immediate_grad_update");
                o.finish(&mut warnings);
                on
            }
            None => false,
        };
        let fp16 = match top.obj("fp16")? {
            Some(mut o) => {
                let on = o.bool("enabled")?.unwrap_or(false);
                let d = Fp16Config::default();
                let ls = o.f64("loss_scale")?.unwrap_or(0.0);
                // A positive scale too small for an f32 would silently mean 0 (dynamic).
                if ls < 0.0 || (ls > 0.0 && ls as f32 == 0.0) {
                    return Err(err(format!(
                        "`fp16.loss_scale` must be >= 0 (0 = dynamic) and a positive f32 otherwise, got {ls:?}"
                    )));
                }
                let power = o
                    .uint("initial_scale_power")?
                    .unwrap_or(d.initial_scale_power as u64);
                if power > 60 {
                    return Err(err(format!(
                        "`fp16.initial_scale_power` {power} is too large"
                    )));
                }
                c.fp16 = Fp16Config {
                    loss_scale: ls as f32,
                    initial_scale_power: power as u32,
                    loss_scale_window: at_least_one(
                        "fp16.loss_scale_window",
                        o.uint("loss_scale_window")?,
                    )?
                    .map_or(d.loss_scale_window, |x| x as u64),
                    hysteresis: match at_least_one("fp16.hysteresis", o.uint("hysteresis")?)? {
                        None => d.hysteresis,
                        Some(x) => u32::try_from(x)
                            .map_err(|_| err(format!("`fp16.hysteresis` {x} is too large")))?,
                    },
                    min_loss_scale: positive("fp16.min_loss_scale", o.f64("min_loss_scale")?)?
                        .map_or(d.min_loss_scale, |x| x as f32),
                };
                o.get("auto_cast");
                o.get("consecutive_hysteresis");
                o.finish(&mut warnings);
                on
            }
            None => false,
        };
        c.precision = match (bf16, fp16) {
            (true, true) => {
                return Err(err("`bf16.enabled` and `fp16.enabled` cannot both be true"))
            }
            (true, false) => Precision::Bf16,
            (false, true) => Precision::Fp16,
            (false, false) => Precision::F32,
        };

        if let Some(mut o) = top.obj("optimizer")? {
            let ty = o.str("type")?.unwrap_or("AdamW");
            let mut adam_w_mode = true;
            if let Some(mut p) = o.obj("params")? {
                if let Some(lr) = positive("optimizer.params.lr", p.f64("lr")?)? {
                    c.lr = lr as f32;
                }
                if let Some(b) = p.get("betas") {
                    let arr = b.as_array().filter(|a| a.len() == 2);
                    let betas: Option<Vec<f64>> =
                        arr.map(|a| a.iter().filter_map(Value::as_f64).collect());
                    match betas.as_deref() {
                        // In [0, 1) as the f32 they are used as: 0.99999999 would be 1 (NaN).
                        Some([b1, b2])
                            if [b1, b2].iter().all(|b| (0.0..1.0).contains(&(**b as f32))) =>
                        {
                            c.adamw.betas = (*b1 as f32, *b2 as f32)
                        }
                        _ => {
                            return Err(err(format!(
                                "`optimizer.params.betas` must be two numbers in [0, 1), got {b}"
                            )))
                        }
                    }
                }
                if let Some(eps) = positive("optimizer.params.eps", p.f64("eps")?)? {
                    c.adamw.eps = eps as f32;
                }
                if let Some(wd) = p.f64("weight_decay")? {
                    if wd < 0.0 {
                        return Err(err(format!(
                            "`optimizer.params.weight_decay` must be >= 0, got {wd}"
                        )));
                    }
                    c.adamw.weight_decay = wd as f32;
                }
                adam_w_mode = p.bool("adam_w_mode")?.unwrap_or(true);
                p.get("torch_adam");
                p.get("fused");
                p.finish(&mut warnings);
            }
            match ty.to_ascii_lowercase().as_str() {
                "adamw" => {}
                "adam" if adam_w_mode => {}
                "adam" => {
                    return Err(err(
                        "`optimizer`: Adam with adam_w_mode false (L2 weight decay) is not supported; use AdamW",
                    ))
                }
                _ => {
                    return Err(err(format!(
                        "`optimizer.type` {ty:?} is not supported (supported: AdamW, Adam)"
                    )))
                }
            }
            o.finish(&mut warnings);
        }
        c.schedule = LrSchedule::Constant { lr: c.lr };
        if let Some(o) = top.obj("scheduler")? {
            c.schedule = parse_scheduler(o, c.lr, &mut warnings)?;
        }

        if let Some(mut o) = top.obj("zero_optimization")? {
            let stage = o.uint("stage")?.unwrap_or(0);
            if stage > 3 {
                return Err(err(format!(
                    "`zero_optimization.stage` must be 0, 1, 2 or 3, got {stage}"
                )));
            }
            c.zero.stage = stage as u8;
            c.zero.overlap_comm = o.bool("overlap_comm")?.unwrap_or(true);
            if let Some(b) = at_least_one(
                "zero_optimization.reduce_bucket_size",
                o.uint("reduce_bucket_size")?,
            )? {
                c.zero.reduce_bucket_size = b as u64;
            }
            if let Some(mut off) = o.obj("offload_optimizer")? {
                c.zero.offload_optimizer = match off.str("device")?.unwrap_or("none") {
                    "none" => OffloadDevice::None,
                    "cpu" => OffloadDevice::Cpu,
                    "nvme" => match off.str("nvme_path")? {
                        Some(p) if !p.trim().is_empty() => OffloadDevice::Nvme(p.into()),
                        _ => {
                            return Err(err(
                                "`zero_optimization.offload_optimizer.device` nvme needs `nvme_path` (a directory)",
                            ))
                        }
                    },
                    d => {
                        return Err(err(format!(
                            "`zero_optimization.offload_optimizer.device` must be none, cpu or nvme, got {d:?}"
                        )))
                    }
                };
                for k in [
                    "pin_memory",
                    "nvme_path",
                    "buffer_count",
                    "fast_init",
                    "ratio",
                ] {
                    off.get(k);
                }
                off.finish(&mut warnings);
            }
            if let Some(mut off) = o.obj("offload_param")? {
                match off.str("device")?.unwrap_or("none") {
                    "none" => {}
                    d => {
                        return Err(err(format!(
                            "`zero_optimization.offload_param.device` {d:?} is not supported yet (use none)"
                        )))
                    }
                }
                for k in [
                    "pin_memory",
                    "nvme_path",
                    "buffer_count",
                    "buffer_size",
                    "max_in_cpu",
                ] {
                    off.get(k);
                }
                off.finish(&mut warnings);
            }
            for k in [
                "contiguous_gradients",
                "allgather_partitions",
                "allgather_bucket_size",
                "reduce_scatter",
                "round_robin_gradients",
                "sub_group_size",
                "stage3_prefetch_bucket_size",
                "stage3_param_persistence_threshold",
                "stage3_max_live_parameters",
                "stage3_max_reuse_distance",
                "stage3_gather_16bit_weights_on_model_save",
                "load_from_fp32_weights",
                "elastic_checkpoint",
                "ignore_unused_parameters",
            ] {
                o.get(k);
            }
            o.finish(&mut warnings);
        }
        if let Some(mut o) = top.obj("activation_checkpointing")? {
            c.recompute = true;
            for k in [
                "partition_activations",
                "cpu_checkpointing",
                "contiguous_memory_optimization",
                "number_checkpoints",
                "synchronize_checkpoint_boundary",
                "profile",
            ] {
                o.get(k);
            }
            o.finish(&mut warnings);
        }
        top.finish(&mut warnings);
        c.warnings = warnings;
        Ok(c)
    }

    /// `(micro_batch, grad_accum)` for `dp` ranks, DeepSpeed's rule:
    /// `train_batch_size = micro_batch * grad_accum * dp`.
    pub fn batch_for(&self, dp: usize) -> Result<(usize, usize), TrainError> {
        let (m, ga) = self.batch_for_unchecked(dp)?;
        // Samples an optimizer step takes: counted without overflow and bounded, so that a
        // mistyped size is an error here, not an overflow or an allocation that cannot be made.
        let step = m
            .checked_mul(dp)
            .and_then(|x| x.checked_mul(ga))
            .filter(|&x| x <= MAX_SAMPLES_PER_STEP);
        if step.is_none() {
            return Err(err(format!(
                "micro batch {m} x gradient accumulation {ga} x dp {dp} is more than {MAX_SAMPLES_PER_STEP} samples an optimizer step"
            )));
        }
        Ok((m, ga))
    }

    fn batch_for_unchecked(&self, dp: usize) -> Result<(usize, usize), TrainError> {
        // DeepSpeed's rules (`_set_batch_related_parameters`): any two of the three give the
        // third; train_batch_size alone means no accumulation; a micro batch alone, or nothing,
        // means one step of accumulation, the micro batch defaulting to 1.
        let too_large = || err(format!("the batch sizes x dp {dp} are too large"));
        let divide = |tb: usize, by: usize, what: String| {
            if by == 0 || !tb.is_multiple_of(by) {
                Err(err(format!(
                    "train_batch_size {tb} is not divisible by {what}"
                )))
            } else {
                Ok(tb / by)
            }
        };
        match (self.train_batch_size, self.micro_batch, self.grad_accum) {
            (Some(tb), Some(m), ga) => {
                let m_dp = m.checked_mul(dp).ok_or_else(too_large)?;
                let derived = divide(
                    tb,
                    m_dp,
                    format!("train_micro_batch_size_per_gpu {m} x dp {dp}"),
                )?;
                if let Some(g) = ga {
                    if g != derived {
                        return Err(err(format!(
                            "train_batch_size {tb} != micro batch {m} x gradient_accumulation_steps {g} x dp {dp}"
                        )));
                    }
                }
                Ok((m, derived))
            }
            (Some(tb), None, ga) => {
                let g = ga.unwrap_or(1);
                let g_dp = g.checked_mul(dp).ok_or_else(too_large)?;
                let what = match ga {
                    Some(g) => format!("gradient_accumulation_steps {g} x dp {dp}"),
                    None => format!("dp {dp}"),
                };
                Ok((divide(tb, g_dp, what)?, g))
            }
            (None, m, ga) => Ok((m.unwrap_or(1), ga.unwrap_or(1))),
        }
    }

    pub fn loss_scaler(&self) -> LossScaler {
        match self.precision {
            Precision::Fp16 if self.fp16.loss_scale > 0.0 => {
                LossScaler::fixed(self.fp16.loss_scale)
            }
            Precision::Fp16 => LossScaler::dynamic(
                self.fp16.initial_scale_power,
                self.fp16.loss_scale_window,
                self.fp16.hysteresis,
                self.fp16.min_loss_scale,
            ),
            _ => LossScaler::none(),
        }
    }
}

fn parse_scheduler(
    mut o: Obj<'_>,
    lr: f32,
    warnings: &mut Vec<String>,
) -> Result<LrSchedule, TrainError> {
    let ty = o
        .str("type")?
        .ok_or_else(|| err("`scheduler.type` is required"))?
        .to_string();
    let mut p = match o.obj("params")? {
        Some(p) => p,
        None => Obj::new("scheduler.params", &EMPTY)?,
    };
    let warmup = match p.str("warmup_type")?.unwrap_or("log") {
        "log" => WarmupType::Log,
        "linear" => WarmupType::Linear,
        w => {
            return Err(err(format!(
                "`scheduler.params.warmup_type` must be log or linear, got {w:?}"
            )))
        }
    };
    let warmup_steps = p.uint("warmup_num_steps")?.unwrap_or(1000);
    let s = match ty.as_str() {
        "WarmupLR" | "WarmupDecayLR" => {
            let min_lr = p.f64("warmup_min_lr")?.unwrap_or(0.0) as f32;
            let max_lr = positive("scheduler.params.warmup_max_lr", p.f64("warmup_max_lr")?)?
                .map_or(lr, |x| x as f32);
            if min_lr < 0.0 || min_lr > max_lr {
                return Err(err("`scheduler.params.warmup_min_lr` must be in [0, warmup_max_lr]"));
            }
            if ty == "WarmupLR" {
                LrSchedule::WarmupLr {
                    min_lr,
                    max_lr,
                    warmup_steps,
                    warmup,
                }
            } else {
                let total = p
                    .uint("total_num_steps")?
                    .ok_or_else(|| err("`scheduler.params.total_num_steps` is required for WarmupDecayLR"))?;
                if total < warmup_steps {
                    return Err(err("`scheduler.params.total_num_steps` must be >= warmup_num_steps"));
                }
                LrSchedule::WarmupDecayLr {
                    min_lr,
                    max_lr,
                    warmup_steps,
                    total_steps: total,
                    warmup,
                }
            }
        }
        "WarmupCosineLR" => {
            let total = p
                .uint("total_num_steps")?
                .ok_or_else(|| err("`scheduler.params.total_num_steps` is required for WarmupCosineLR"))?;
            if total < warmup_steps {
                return Err(err("`scheduler.params.total_num_steps` must be >= warmup_num_steps"));
            }
            let ratio = |x: Option<f64>, name: &str, d: f64| -> Result<f32, TrainError> {
                let v = x.unwrap_or(d);
                if !(0.0..=1.0).contains(&v) {
                    return Err(err(format!("`scheduler.params.{name}` must be in [0, 1], got {v}")));
                }
                Ok(v as f32)
            };
            LrSchedule::WarmupCosineLr {
                lr,
                warmup_steps,
                total_steps: total,
                warmup_min_ratio: ratio(p.f64("warmup_min_ratio")?, "warmup_min_ratio", 0.0)?,
                cos_min_ratio: ratio(p.f64("cos_min_ratio")?, "cos_min_ratio", 0.0001)?,
                warmup,
            }
        }
        other => {
            return Err(err(format!(
                "`scheduler.type` {other:?} is not supported (supported: WarmupLR, WarmupDecayLR, WarmupCosineLR)"
            )))
        }
    };
    p.get("last_batch_iteration");
    p.finish(warnings);
    o.finish(warnings);
    Ok(s)
}

static EMPTY: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| Value::Object(Map::new()));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_deepspeed_config_and_warns_about_unknown_keys() {
        let c = TrainConfig::from_json_str(
            r#"{"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2,
            "gradient_clipping": 1.0, "steps_per_print": 10, "bogus": 1,
            "fp16": {"enabled": true, "loss_scale": 0, "initial_scale_power": 8,
                     "loss_scale_window": 100, "hysteresis": 2, "min_loss_scale": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95],
                          "eps": 1e-8, "weight_decay": 0.1, "colour": 3}},
            "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100,
                          "warmup_num_steps": 10, "warmup_type": "linear"}},
            "zero_optimization": {"stage": 3, "overlap_comm": true, "reduce_bucket_size": 5e8,
                                  "offload_optimizer": {"device": "cpu"}}}"#,
        )
        .unwrap();
        assert_eq!(c.precision, Precision::Fp16);
        assert_eq!(c.zero.stage, 3);
        assert_eq!(c.batch_for(2).unwrap(), (2, 4));
        assert!(c.batch_for(3).is_err());
        // Sizes that would overflow, or take more than MAX_SAMPLES_PER_STEP a step: errors.
        assert!(c.batch_for(usize::MAX).is_err());
        let huge = |tb: &str, mb: &str| {
            TrainConfig::from_json_str(&format!(
                r#"{{"train_batch_size": {tb}, "train_micro_batch_size_per_gpu": {mb}}}"#
            ))
            .and_then(|c| c.batch_for(1))
        };
        assert!(huge("18446744073709551615", "1").is_err());
        let e = TrainConfig::from_json_str("[1]").unwrap_err().to_string();
        assert!(e.contains("the config must be a JSON object"), "{e}");
        assert!(huge("33554432", "1").is_err());
        assert_eq!(huge("4096", "4").unwrap(), (4, 1024));
        // Any two of the three give the third, as DeepSpeed derives them; train_batch_size
        // alone is one micro batch a rank, no accumulation.
        let sizes = |json: &str, dp: usize| TrainConfig::from_json_str(json)?.batch_for(dp);
        let tb_ga = r#"{"train_batch_size": 32, "gradient_accumulation_steps": 2}"#;
        assert_eq!(sizes(tb_ga, 1).unwrap(), (16, 2));
        assert_eq!(sizes(tb_ga, 2).unwrap(), (8, 2));
        let e = sizes(tb_ga, 3).unwrap_err().to_string();
        assert!(
            e.contains(
                "train_batch_size 32 is not divisible by gradient_accumulation_steps 2 x dp 3"
            ),
            "{e}"
        );
        assert_eq!(sizes(r#"{"train_batch_size": 32}"#, 2).unwrap(), (16, 1));
        assert_eq!(
            sizes(r#"{"train_micro_batch_size_per_gpu": 3}"#, 2).unwrap(),
            (3, 1)
        );
        assert_eq!(
            sizes(r#"{"gradient_accumulation_steps": 5}"#, 2).unwrap(),
            (1, 5)
        );
        assert_eq!(sizes("{}", 4).unwrap(), (1, 1));
        assert_eq!(c.loss_scaler().scale, 256.0);
        assert_eq!(c.adamw.betas, (0.9, 0.95));
        assert_eq!(
            c.warnings,
            vec![
                "unknown config key `optimizer.params.colour` ignored".to_string(),
                "unknown config key `bogus` ignored".to_string()
            ]
        );
    }

    #[test]
    fn refuses_invalid_values_with_their_name() {
        for (json, want) in [
            (
                r#"{"zero_optimization": {"stage": 4}}"#,
                "zero_optimization.stage",
            ),
            (r#"{"optimizer": {"type": "SGD"}}"#, "optimizer.type"),
            (
                r#"{"optimizer": {"params": {"lr": -1}}}"#,
                "optimizer.params.lr",
            ),
            (r#"{"optimizer": {"params": {"betas": [0.9]}}}"#, "betas"),
            (
                r#"{"bf16": {"enabled": true}, "fp16": {"enabled": true}}"#,
                "both",
            ),
            (r#"{"gradient_clipping": "x"}"#, "gradient_clipping"),
            (
                r#"{"train_micro_batch_size_per_gpu": 0}"#,
                "train_micro_batch_size_per_gpu",
            ),
            (r#"{"scheduler": {"type": "OneCycle"}}"#, "scheduler.type"),
            (r#"[1]"#, "object"),
            (
                r#"{"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}"#,
                "nvme_path",
            ),
            (
                r#"{"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": " "}}}"#,
                "nvme_path",
            ),
            (
                r#"{"train_batch_size": 1e30}"#,
                "`train_batch_size` must be a whole number >= 0, got 1e+30",
            ),
            // Numbers that the f32 they are used as cannot hold: infinite, or 0 where > 0 is asked.
            (
                r#"{"optimizer": {"params": {"lr": 1e300}}}"#,
                "`optimizer.params.lr` 1e+300 is too large",
            ),
            (
                r#"{"fp16": {"enabled": true, "loss_scale": 1e39}}"#,
                "`fp16.loss_scale` 1e+39 is too large",
            ),
            (
                r#"{"optimizer": {"params": {"eps": 1e-300}}}"#,
                "`optimizer.params.eps` must be > 0",
            ),
            (
                r#"{"fp16": {"enabled": true, "hysteresis": 4294967296}}"#,
                "`fp16.hysteresis` 4294967296 is too large",
            ),
            (
                r#"{"optimizer": {"params": {"betas": [0.9, 0.99999999]}}}"#,
                "`optimizer.params.betas` must be two numbers in [0, 1)",
            ),
            (
                r#"{"gradient_clipping": 1e-300}"#,
                "`gradient_clipping` must be 0 (off) or a positive f32",
            ),
            (
                r#"{"fp16": {"enabled": true, "loss_scale": 1e-300}}"#,
                "`fp16.loss_scale` must be >= 0 (0 = dynamic) and a positive f32",
            ),
        ] {
            let e = TrainConfig::from_json_str(json).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}

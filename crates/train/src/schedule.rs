//! Learning-rate schedules of DeepSpeed's `scheduler` section: `WarmupLR`, `WarmupDecayLR` and
//! `WarmupCosineLR`, with linear or log warm-up. `lr(step)` is the rate of optimizer step `step`
//! (0-based), so a resumed run continues on the same curve.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmupType {
    Linear,
    Log,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LrSchedule {
    /// The optimizer's `lr` throughout.
    Constant { lr: f32 },
    /// Warm up from `min_lr` to `max_lr` over `warmup_steps`, then hold.
    WarmupLr {
        min_lr: f32,
        max_lr: f32,
        warmup_steps: u64,
        warmup: WarmupType,
    },
    /// As `WarmupLr`, then decay linearly to 0 at `total_steps`.
    WarmupDecayLr {
        min_lr: f32,
        max_lr: f32,
        warmup_steps: u64,
        total_steps: u64,
        warmup: WarmupType,
    },
    /// Warm up from `lr * warmup_min_ratio` to `lr`, then a cosine down to `lr * cos_min_ratio` at
    /// `total_steps`.
    WarmupCosineLr {
        lr: f32,
        warmup_steps: u64,
        total_steps: u64,
        warmup_min_ratio: f32,
        cos_min_ratio: f32,
        warmup: WarmupType,
    },
}

/// Warm-up progress in [0, 1] at `step` of `steps`.
fn warm(step: u64, steps: u64, kind: WarmupType) -> f64 {
    if steps == 0 || step >= steps {
        return 1.0;
    }
    match kind {
        WarmupType::Linear => step as f64 / steps as f64,
        WarmupType::Log => ((step + 1) as f64).ln() / (steps as f64).ln().max(f64::MIN_POSITIVE),
    }
    .min(1.0)
}

impl LrSchedule {
    pub fn lr(&self, step: u64) -> f32 {
        match *self {
            LrSchedule::Constant { lr } => lr,
            LrSchedule::WarmupLr {
                min_lr,
                max_lr,
                warmup_steps,
                warmup,
            } => {
                let w = warm(step, warmup_steps, warmup);
                (min_lr as f64 + (max_lr - min_lr) as f64 * w) as f32
            }
            LrSchedule::WarmupDecayLr {
                min_lr,
                max_lr,
                warmup_steps,
                total_steps,
                warmup,
            } => {
                if step < warmup_steps {
                    let w = warm(step, warmup_steps, warmup);
                    return (min_lr as f64 + (max_lr - min_lr) as f64 * w) as f32;
                }
                let left = total_steps.saturating_sub(step) as f64;
                let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                (max_lr as f64 * (left / span).clamp(0.0, 1.0)) as f32
            }
            LrSchedule::WarmupCosineLr {
                lr,
                warmup_steps,
                total_steps,
                warmup_min_ratio,
                cos_min_ratio,
                warmup,
            } => {
                let ratio = if step < warmup_steps {
                    let w = warm(step, warmup_steps, warmup);
                    warmup_min_ratio as f64 + (1.0 - warmup_min_ratio as f64) * w
                } else {
                    let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                    let t = ((step - warmup_steps) as f64 / span).min(1.0);
                    let c = (1.0 + (std::f64::consts::PI * t).cos()) / 2.0;
                    cos_min_ratio as f64 + (1.0 - cos_min_ratio as f64) * c
                };
                (lr as f64 * ratio) as f32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warms_up_peaks_and_decays_to_its_floor() {
        let s = LrSchedule::WarmupCosineLr {
            lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            warmup_min_ratio: 0.0,
            cos_min_ratio: 0.1,
            warmup: WarmupType::Linear,
        };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-6);
        assert!((s.lr(10) - 1.0).abs() < 1e-6);
        assert!((s.lr(60) - 0.55).abs() < 1e-6);
        assert!((s.lr(110) - 0.1).abs() < 1e-6);
        assert!((s.lr(500) - 0.1).abs() < 1e-6);
        let d = LrSchedule::WarmupDecayLr {
            min_lr: 0.0,
            max_lr: 2.0,
            warmup_steps: 2,
            total_steps: 12,
            warmup: WarmupType::Linear,
        };
        assert!((d.lr(1) - 1.0).abs() < 1e-6);
        assert!((d.lr(7) - 1.0).abs() < 1e-6);
        assert_eq!(d.lr(12), 0.0);
    }
}

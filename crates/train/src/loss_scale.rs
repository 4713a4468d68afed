//! fp16 loss scaling, as DeepSpeed's `DynamicLossScaler`: the loss is multiplied by `scale` before
//! the backward so small gradients survive in fp16; an overflow (inf/nan in any rank's gradients)
//! skips the step and divides the scale by 2 once `hysteresis` overflows have been seen; every
//! `window` clean steps the scale doubles. `loss_scale > 0` in the config fixes the scale.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f32,
    pub dynamic: bool,
    pub window: u64,
    pub hysteresis: u32,
    pub min_scale: f32,
    /// Overflows still tolerated before the next decrease.
    pub hysteresis_left: u32,
    /// Clean steps since the last overflow or increase.
    pub good_steps: u64,
}

impl LossScaler {
    /// A scale of 1 that never changes (bf16 and f32 training).
    pub fn none() -> Self {
        Self::fixed(1.0)
    }

    pub fn fixed(scale: f32) -> Self {
        LossScaler {
            scale,
            dynamic: false,
            window: 0,
            hysteresis: 1,
            min_scale: scale,
            hysteresis_left: 1,
            good_steps: 0,
        }
    }

    pub fn dynamic(initial_power: u32, window: u64, hysteresis: u32, min_scale: f32) -> Self {
        LossScaler {
            scale: 2f32.powi(initial_power as i32),
            dynamic: true,
            window,
            hysteresis,
            min_scale,
            hysteresis_left: hysteresis,
            good_steps: 0,
        }
    }

    /// Records the outcome of a step; returns whether the optimizer may apply it.
    pub fn update(&mut self, overflow: bool) -> bool {
        if !self.dynamic {
            return !overflow;
        }
        if overflow {
            if self.hysteresis_left <= 1 {
                self.scale = (self.scale / 2.0).max(self.min_scale);
            } else {
                self.hysteresis_left -= 1;
            }
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps.checked_rem(self.window) == Some(0) {
            self.scale *= 2.0;
            self.hysteresis_left = self.hysteresis;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_after_hysteresis_and_doubles_after_a_window() {
        let mut s = LossScaler::dynamic(4, 2, 2, 1.0);
        assert!(!s.update(true));
        assert_eq!(s.scale, 16.0);
        assert!(!s.update(true));
        assert_eq!(s.scale, 8.0);
        assert!(s.update(false));
        assert!(s.update(false));
        assert_eq!(s.scale, 16.0);
        let mut f = LossScaler::fixed(128.0);
        assert!(!f.update(true));
        assert_eq!(f.scale, 128.0);
    }
}

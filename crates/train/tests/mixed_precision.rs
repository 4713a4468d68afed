//! bf16 compute with fp32 master weights, and fp16 with dynamic loss scaling: overflowing steps are
//! skipped and the scale backs off, identically at every layout.

mod common;

use common::*;

#[test]
fn bf16_with_fp32_master_weights_trains_like_f32() {
    let model = tiny_model(false);
    let f32_run = run(1, &config(0, ""), &model, 20).unwrap();
    let bf = run(2, &config(2, r#","bf16": {"enabled": true}"#), &model, 20).unwrap();
    for (a, b) in f32_run.stats.iter().zip(&bf.stats) {
        assert!(
            (a.loss - b.loss).abs() / a.loss < 0.02,
            "{} vs {}",
            a.loss,
            b.loss
        );
    }
    let last = bf.stats.last().unwrap().loss;
    assert!(last < bf.stats[0].loss - 0.5);
}

#[test]
fn fp16_overflow_skips_steps_and_lowers_the_scale_at_every_layout() {
    let model = tiny_model(false);
    // 2^40 overflows fp16 gradients at once; the scaler halves (hysteresis 1) until they fit.
    let extra = r#","fp16": {"enabled": true, "initial_scale_power": 40, "hysteresis": 1,
                   "loss_scale_window": 5, "min_loss_scale": 1}"#;
    let one = run(1, &config(0, extra), &model, 40).unwrap();
    assert!(one.stats[0].skipped && one.stats[0].loss_scale == 2f32.powi(40));
    let firsts = one.stats.iter().position(|s| !s.skipped).unwrap();
    assert!(firsts > 0 && one.stats[firsts].loss_scale < 2f32.powi(40));
    let last = one.stats.last().unwrap();
    assert!(
        !last.skipped && last.loss < one.stats[0].loss - 0.5,
        "{last:?}"
    );
    for (dp, stage) in [(2, 1), (3, 3)] {
        let r = run(dp, &config(stage, extra), &model, 40).unwrap();
        for (a, b) in one.stats.iter().zip(&r.stats) {
            assert_eq!(
                (a.skipped, a.loss_scale, a.step),
                (b.skipped, b.loss_scale, b.step)
            );
            assert!((a.loss - b.loss).abs() / a.loss < 1e-3);
        }
    }
}

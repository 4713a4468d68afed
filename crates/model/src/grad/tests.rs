//! Every parameter's gradient against central finite differences, for model variants that cover
//! every layer path: GQA, biases (Qwen2-style), tied embeddings, sliding windows, recomputation.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_tensor::DType;

use super::*;
use crate::ModelConfig;

fn config(extra: &str, tie: bool) -> ModelConfig {
    let json = format!(
        r#"{{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":19,
        "hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,
        "tie_word_embeddings":{tie}{extra}}}"#
    );
    ModelConfig::from_json_str(&json).unwrap()
}

fn weights(layout: &ParamLayout, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    layout
        .units
        .iter()
        .map(|u| {
            let mut b = vec![0.0f32; u.len];
            for p in &u.params {
                let base = if p.name.ends_with("norm.weight") {
                    1.0
                } else {
                    0.0
                };
                for x in &mut b[p.offset..p.offset + p.len] {
                    *x = base + rng.random_range(-0.6..0.6);
                }
            }
            b
        })
        .collect()
}

fn loss(m: &TrainModel, w: &[Vec<f32>], tokens: &[u32], dims: BatchDims) -> f64 {
    let mut src = FullParams::new(w.to_vec());
    m.eval_loss(&mut src, tokens, dims, DType::F32).unwrap() / dims.tokens() as f64
}

/// Checks every tensor's gradient along a random direction, and a few single elements.
fn check(cfg: ModelConfig, recompute: bool) {
    let m = TrainModel::new(cfg);
    let w = weights(&m.layout, 3);
    let dims = BatchDims { batch: 2, seq: 5 };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let tokens: Vec<u32> = (0..dims.batch * (dims.seq + 1))
        .map(|_| rng.random_range(0..m.cfg.vocab_size as u32))
        .collect();
    let mut src = FullParams::new(w.clone());
    let opts = TrainOptions {
        dtype: DType::F32,
        recompute,
        grad_scale: 1.0 / dims.tokens() as f32,
    };
    let l = m.forward_backward(&mut src, &tokens, dims, opts).unwrap() / dims.tokens() as f64;
    assert!((l - loss(&m, &w, &tokens, dims)).abs() < 1e-6);
    let eps = 1e-2f32;
    for (ui, u) in m.layout.units.iter().enumerate() {
        for p in &u.params {
            let mut dir: Vec<f32> = (0..p.len).map(|_| rng.random_range(-1.0..1.0)).collect();
            let norm = dir.iter().map(|d| d * d).sum::<f32>().sqrt();
            dir.iter_mut().for_each(|d| *d /= norm);
            let analytic: f64 = dir
                .iter()
                .zip(&src.grads[ui][p.offset..p.offset + p.len])
                .map(|(d, g)| (*d as f64) * (*g as f64))
                .sum();
            let shifted = |s: f32| {
                let mut w2 = w.clone();
                for (x, d) in w2[ui][p.offset..p.offset + p.len].iter_mut().zip(&dir) {
                    *x += s * d;
                }
                loss(&m, &w2, &tokens, dims)
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            assert!(
                (analytic - numeric).abs() < 5e-3 * numeric.abs() + 1e-4,
                "{}: analytic {analytic} vs numeric {numeric}",
                p.name
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences_gqa_untied() {
    check(config("", false), false);
}

#[test]
fn gradients_match_finite_differences_tied_with_biases() {
    check(
        config(r#","attention_bias":true,"mlp_bias":true"#, true),
        false,
    );
}

#[test]
fn gradients_match_finite_differences_qwen3_head_norms() {
    // Qwen3: an RMSNorm of each q and k head before RoPE; their weights get gradients too.
    // Heads of 4 (of 2, the norm of a pair is too curved for the finite differences' step).
    let mut cfg = config(r#","attention_bias":true,"head_dim":4"#, true);
    cfg.arch = crate::Arch::Qwen3;
    cfg.qk_norm = true;
    let m = TrainModel::new(cfg.clone());
    assert!(m.layout.units[1].entry("self_attn.q_norm.weight").is_some());
    check(cfg.clone(), false);
    check(cfg, true);
}

#[test]
fn gradients_match_finite_differences_sliding_window_recomputed() {
    let mut cfg = config("", false);
    cfg.sliding_window = vec![Some(2), None];
    check(cfg, true);
}

#[test]
fn recomputation_gives_identical_gradients() {
    let m = TrainModel::new(config("", true));
    let w = weights(&m.layout, 5);
    let dims = BatchDims { batch: 3, seq: 4 };
    let tokens: Vec<u32> = (0..15).map(|i| (i * 7 % 19) as u32).collect();
    let run = |recompute| {
        let mut src = FullParams::new(w.clone());
        let opts = TrainOptions {
            dtype: DType::F32,
            recompute,
            grad_scale: 0.1,
        };
        let l = m.forward_backward(&mut src, &tokens, dims, opts).unwrap();
        (l, src.grads)
    };
    assert_eq!(run(false), run(true));
}

#[test]
fn bad_tokens_and_shapes_are_errors() {
    let m = TrainModel::new(config("", false));
    let mut src = FullParams::new(weights(&m.layout, 1));
    let dims = BatchDims { batch: 1, seq: 2 };
    let opts = TrainOptions {
        dtype: DType::F32,
        recompute: false,
        grad_scale: 1.0,
    };
    assert!(m.forward_backward(&mut src, &[1, 2], dims, opts).is_err());
    assert!(m
        .forward_backward(&mut src, &[1, 2, 99], dims, opts)
        .is_err());
}

/// Training's norm rounds as inference's `ops::rms_norm` (and transformers): bit for bit in bf16
/// and f16, rows of 8 with a weight of 8.
#[test]
fn training_norm_rounds_as_inference() {
    let x: Vec<f32> = (0..24)
        .map(|i| ((i * 7) as f32 * 0.37).sin() * 3.0)
        .collect();
    let w: Vec<f32> = (0..8).map(|i| 1.0 + (i as f32 * 0.9).cos() * 0.3).collect();
    for dt in [DType::BF16, DType::F16, DType::F32] {
        let xt = tessera_tensor::Tensor::from_f32(vec![3, 8], x.clone(), dt).unwrap();
        let wt = tessera_tensor::Tensor::from_f32(vec![8], w.clone(), dt).unwrap();
        let want = tessera_tensor::ops::rms_norm(&xt, &wt, 1e-5)
            .unwrap()
            .to_f32_vec();
        let (got, _) = super::rms_norm_rounded(&xt.to_f32_vec(), &wt.to_f32_vec(), 1e-5, dt);
        assert_eq!(got, want, "{dt:?}");
    }
}

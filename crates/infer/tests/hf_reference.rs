//! Every model path against HF transformers' own numbers (`scripts/make_hf_fixtures.py` made the
//! checkpoints and `reference.json`): f32 log-probs within 1e-4 of HF's float64 ones at every
//! valid tp in 1..=8, greedy tokens identical, bf16 within a stated tolerance, and the tps the heads
//! do not allow refused with the numbers named.

use std::path::PathBuf;

use serde::Deserialize;
use tessera_infer::{generate_on, score_on, GenerateParams, ModelSource, OpenModel};
use tessera_tensor::{DType, Device, SamplingParams};

#[derive(Deserialize)]
struct Reference {
    score: Vec<ScoreCase>,
    text: Vec<TextCase>,
    greedy: Vec<GreedyCase>,
}

#[derive(Deserialize)]
struct ScoreCase {
    tokens: Vec<u32>,
    token_logprobs: Vec<f64>,
    bf16_token_logprobs: Vec<f64>,
}

#[derive(Deserialize)]
struct TextCase {
    text: String,
    tokens: Vec<u32>,
    token_logprobs: Vec<f64>,
}

#[derive(Deserialize)]
struct GreedyCase {
    prompt_tokens: Vec<u32>,
    max_new_tokens: usize,
    tokens: Vec<u32>,
}

fn fixture(name: &str) -> (OpenModel, Reference) {
    // TESSERA_FIXTURES lets a test binary built elsewhere (the GPU machine's) find the fixtures.
    let root = std::env::var_os("TESSERA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf")
        });
    let dir = root.join(name);
    let model = ModelSource::open(&ModelSource::Dir(dir.clone())).unwrap();
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    (model, serde_json::from_str(&text).unwrap())
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// f32 tolerance of the issue: 1e-4 per token log-prob.
const F32_TOL: f64 = 1e-4;

/// bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.002 per op). HF's own bf16 run
/// differs from its float64 run by up to 0.105 on the first three fixtures and 0.302 on
/// `qwen2_yarn` (twice their width; recorded in reference.json), and our bf16 rounds at the same
/// op boundaries but not bit-identically, so we require our bf16 log-probs to sit within 0.15 of
/// the float64 reference, or within HF's own largest bf16 error where that is larger, and, on
/// average over all cases, no further from it than 2x HF's own bf16 error plus 0.01.
const BF16_TOL: f64 = 0.15;

fn check_model(name: &str, valid: &[usize]) {
    check_model_on(name, valid, Device::Cpu, 8);
}

/// Checks every tp in `1..=max_tp` on `device` (CUDA: rank r on GPU r).
fn check_model_on(name: &str, valid: &[usize], device: Device, max_tp: usize) {
    let (model, reference) = fixture(name);
    let score = |m: &OpenModel, t: &[u32], tp, dt| score_on(m, t, tp, dt, device);
    let generate =
        |m: &OpenModel, p: &[u32], g: &GenerateParams, tp, dt| generate_on(m, p, g, tp, dt, device);
    let valid: Vec<usize> = valid.iter().copied().filter(|&t| t <= max_tp).collect();
    for tp in 1..=max_tp {
        let allowed = valid.contains(&tp);
        let first = &reference.score[0].tokens;
        let r = score(&model, first, tp, DType::F32);
        if !allowed {
            let e = r.expect_err("tp should be refused").to_string();
            assert!(e.contains(&format!("tp {tp}")), "{name} tp {tp}: {e}");
            continue;
        }
        r.unwrap();
        for case in &reference.score {
            let got = score(&model, &case.tokens, tp, DType::F32).unwrap();
            let d = max_abs_diff(&got.token_logprobs, &case.token_logprobs);
            assert!(
                d < F32_TOL,
                "{name} tp {tp} len {}: f32 max diff {d}",
                case.tokens.len()
            );
        }
        for case in &reference.greedy {
            let params = GenerateParams {
                max_tokens: case.max_new_tokens,
                sampling: SamplingParams::default(),
                stop_at_eos: true,
            };
            let got = generate(&model, &case.prompt_tokens, &params, tp, DType::F32).unwrap();
            assert_eq!(got, case.tokens, "{name} tp {tp}: greedy tokens differ");
        }
    }
    for case in &reference.text {
        let ids = model.encode(&case.text).unwrap();
        assert_eq!(ids, case.tokens, "{name}: tokenizer differs from HF's");
        let got = score(&model, &ids, 1, DType::F32).unwrap();
        let d = max_abs_diff(&got.token_logprobs, &case.token_logprobs);
        assert!(d < F32_TOL, "{name} text: f32 max diff {d}");
    }
    let hf_max = reference
        .score
        .iter()
        .map(|c| max_abs_diff(&c.bf16_token_logprobs, &c.token_logprobs))
        .fold(0.0, f64::max);
    for &tp in &[1, *valid.last().unwrap()] {
        let tp: usize = tp;
        let (mut ours, mut hf, mut n) = (0.0, 0.0, 0.0);
        for case in &reference.score {
            let got = score(&model, &case.tokens, tp, DType::BF16).unwrap();
            let d = max_abs_diff(&got.token_logprobs, &case.token_logprobs);
            assert!(
                d < BF16_TOL.max(hf_max),
                "{name} tp {tp} bf16 max diff {d} (HF's own: {hf_max})"
            );
            ours += got
                .token_logprobs
                .iter()
                .zip(&case.token_logprobs)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>();
            hf += case
                .bf16_token_logprobs
                .iter()
                .zip(&case.token_logprobs)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>();
            n += case.token_logprobs.len() as f64;
        }
        let (ours, hf) = (ours / n, hf / n);
        eprintln!("{name} tp {tp}: bf16 mean |error| {ours:.4} (HF's own bf16: {hf:.4})");
        assert!(
            ours <= 2.0 * hf + 0.01,
            "{name} tp {tp} bf16 mean error {ours} vs HF's own {hf}"
        );
    }
}

#[test]
fn llama_gqa_llama3_rope_matches_hf() {
    // 8 heads, 2 kv heads: tp 8 replicates kv heads; 3, 5, 6, 7 do not divide the heads.
    check_model("llama", &[1, 2, 4, 8]);
}

#[test]
fn mistral_bf16_weights_sliding_window_matches_hf() {
    // 12 heads, 4 kv heads: tp 3 and 6 divide the heads but not the kv heads (nor the reverse).
    check_model("mistral", &[1, 2, 4]);
}

#[test]
fn qwen2_bias_tied_sharded_matches_hf() {
    // 4 heads, 1 kv head: replicated at tp 2 and 4.
    check_model("qwen2", &[1, 2, 4]);
}

#[test]
fn qwen3_qk_norm_explicit_head_dim_matches_hf() {
    // An RMSNorm of each q and k head before RoPE; head_dim 32 with 4 heads over hidden 96;
    // 2 kv heads: replicated at tp 4.
    check_model("qwen3", &[1, 2, 4]);
}

#[test]
fn qwen2_yarn_rope_matches_hf() {
    // YaRN (factor 4 from 256 positions, Qwen2.5's config style) moves every log-prob: its
    // frequencies and the attention factor (1.139, squared into the softmax scale). A score case
    // of 300 positions runs past the original context. 4 heads, 2 kv heads: replicated at tp 4.
    check_model("qwen2_yarn", &[1, 2, 4]);
}

/// The same checks on GPUs (built with `--features cuda`, run by `scripts/gpu_check.sh`): tp 1 and,
/// where the machine has two GPUs, tp 2.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    /// A CUDA graph capture (greedy generate) needs its GPUs to itself: these tests take turns.
    static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// [`check_model_on`] over this machine's GPUs (up to two), one test at a time; nothing
    /// without a GPU.
    fn check_on_gpus(name: &str, valid: &[usize]) {
        let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
        let n = tessera_tensor::cuda::test_gpus(2);
        if n > 0 {
            check_model_on(name, valid, Device::Cuda(0), n);
        }
    }

    #[test]
    fn llama_on_gpu_matches_hf() {
        check_on_gpus("llama", &[1, 2, 4, 8]);
    }

    #[test]
    fn mistral_on_gpu_matches_hf() {
        check_on_gpus("mistral", &[1, 2, 4]);
    }

    #[test]
    fn qwen3_on_gpu_matches_hf() {
        check_on_gpus("qwen3", &[1, 2, 4]);
    }

    #[test]
    fn qwen2_yarn_on_gpu_matches_hf() {
        check_on_gpus("qwen2_yarn", &[1, 2, 4]);
    }

    #[test]
    fn qwen2_on_gpu_matches_hf() {
        check_on_gpus("qwen2", &[1, 2, 4]);
    }
}

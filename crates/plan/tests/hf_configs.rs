//! HF `config.json` files, as published, read through `ModelConfig` into the planner's shape:
//! parameter counts against the published sizes, KV bytes, sliding windows, tied embeddings.

use std::path::{Path, PathBuf};

use tessera_model::ModelConfig;
use tessera_plan::job::InferJob;
use tessera_plan::layout::{Layout, Offload};
use tessera_plan::memory::infer_memory;
use tessera_plan::ModelShape;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn shape(name: &str) -> ModelShape {
    let cfg = ModelConfig::from_dir(&fixture(name)).unwrap();
    let s = ModelShape::from_config(name, &cfg);
    assert_eq!(s.total_params(), cfg.num_params());
    s
}

fn one_gpu() -> Layout {
    Layout {
        dp: 1,
        tp: 1,
        pp: 1,
        zero: 0,
        offload: Offload::None,
    }
}

#[test]
fn llama_3_8b_is_8_03b() {
    let s = shape("llama-3-8b");
    assert_eq!(s.total_params(), 8_030_261_248);
    // 2 · 32 layers · 8 KV heads · 128 · 2 bytes.
    assert_eq!(s.kv_bytes_per_token(2), 131_072);
}

#[test]
fn qwen2_5_0_5b_ties_its_embedding() {
    let s = shape("qwen2.5-0.5b");
    assert!(s.tied_embeddings);
    assert_eq!(s.total_params(), 494_032_768);
}

#[test]
fn mistral_7b_caps_its_kv_cache_at_the_window() {
    let s = shape("mistral-7b");
    assert_eq!(s.total_params(), 7_241_732_096);
    let job = InferJob {
        context: 16_384,
        seqs: 2,
        ..InferJob::default()
    };
    let m = infer_memory(&s, &one_gpu(), &job, 80 << 30);
    // Every layer slides over 4096 tokens, so a 16k context holds 4096 per layer.
    assert_eq!(m.bytes.kv_cache, 2 * 4096 * 32 * 2 * 8 * 128 * 2);
}

#[test]
fn unsupported_architectures_are_refused() {
    let e = ModelConfig::from_dir(&fixture("gpt2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("GPT2LMHeadModel"), "{e}");
}

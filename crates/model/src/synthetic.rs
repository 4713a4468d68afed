//! Random-weight checkpoints of any shape, built in memory in the HF layout: for benchmarks (a
//! model of a chosen size with no download) and for tests of loading and splitting.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use tessera_tensor::DType;

use crate::ModelConfig;

/// The HF tensor names and shapes a config implies, in checkpoint order.
pub fn tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v, d) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.head_dim,
    );
    let (q, kv) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let mut push = |n: &str, s: Vec<usize>| out.push((format!("{p}.{n}"), s));
        push("input_layernorm.weight", vec![h]);
        push("post_attention_layernorm.weight", vec![h]);
        push("self_attn.q_proj.weight", vec![q, h]);
        push("self_attn.k_proj.weight", vec![kv, h]);
        push("self_attn.v_proj.weight", vec![kv, h]);
        push("self_attn.o_proj.weight", vec![h, q]);
        if cfg.qkv_bias {
            push("self_attn.q_proj.bias", vec![q]);
            push("self_attn.k_proj.bias", vec![kv]);
            push("self_attn.v_proj.bias", vec![kv]);
        }
        if cfg.o_bias {
            push("self_attn.o_proj.bias", vec![h]);
        }
        if cfg.qk_norm {
            push("self_attn.q_norm.weight", vec![d]);
            push("self_attn.k_norm.weight", vec![d]);
        }
        push("mlp.gate_proj.weight", vec![i, h]);
        push("mlp.up_proj.weight", vec![i, h]);
        push("mlp.down_proj.weight", vec![h, i]);
        if cfg.mlp_bias {
            push("mlp.gate_proj.bias", vec![i]);
            push("mlp.up_proj.bias", vec![i]);
            push("mlp.down_proj.bias", vec![h]);
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// A safetensors file of random weights for `cfg` (normal-ish, std `1/sqrt(fan_in)`; norms near 1).
pub fn random_safetensors(cfg: &ModelConfig, dtype: DType, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let st_dtype = match dtype {
        DType::F32 => StDtype::F32,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
    };
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> = tensor_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let is_norm = name.ends_with("norm.weight");
            let scale = if shape.len() == 2 {
                (3.0 / shape[1] as f32).sqrt()
            } else {
                0.1
            };
            let mut bytes = Vec::with_capacity(n * dtype.size_in_bytes());
            for _ in 0..n {
                let x = rng.random_range(-scale..scale) + if is_norm { 1.0 } else { 0.0 };
                match dtype {
                    DType::F32 => bytes.extend_from_slice(&x.to_le_bytes()),
                    DType::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                    DType::F16 => bytes.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                }
            }
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(st_dtype, s.clone(), b).expect("sizes agree"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serialising in memory cannot fail")
}

/// An HF-style `config.json` for a Llama of the given shape.
#[allow(clippy::too_many_arguments)]
pub fn llama_config_json(
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    tie: bool,
) -> String {
    format!(
        r#"{{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":{vocab},
"hidden_size":{hidden},"intermediate_size":{intermediate},"num_hidden_layers":{layers},
"num_attention_heads":{heads},"num_key_value_heads":{kv_heads},"rms_norm_eps":1e-5,
"rope_theta":500000.0,"max_position_embeddings":8192,"tie_word_embeddings":{tie},
"bos_token_id":1,"eos_token_id":2}}"#
    )
}

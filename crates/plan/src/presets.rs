//! Built-in models and clusters.
//!
//! The Llama presets go through [`ModelConfig`] (their published `config.json` fields), so their
//! counts are the ones the engines load. GPT-3 (learned positions, LayerNorm with bias, 4h GeLU
//! MLP) and DeepSeek-V3 (MLA and MoE) are shapes `ModelConfig` cannot express and are written out
//! here. Cluster figures are vendor data sheets (dense BF16 tensor FLOP/s, NVLink per direction,
//! one 400 Gb/s NIC per GPU on DGX H100/H200, 200 Gb/s on DGX A100) and `nvidia-smi` totals.
//!
//! ```
//! let m = tessera_plan::presets::model("llama-3-70b").unwrap();
//! assert_eq!(m.total_params(), 70_553_706_496);
//! ```

use serde::Serialize;
use tessera_model::ModelConfig;

use crate::shape::{Attention, ModelShape, Moe, Norm};
use crate::PlanError;

pub const MODEL_NAMES: [&str; 5] = [
    "llama-3-8b",
    "llama-3-70b",
    "llama-3.1-405b",
    "gpt-3-175b",
    "deepseek-v3",
];

pub const CLUSTER_NAMES: [&str; 3] = ["h100-sxm", "h200", "a100-80g"];

fn llama_config(
    vocab: u64,
    hidden: u64,
    ffn: u64,
    layers: u64,
    heads: u64,
    kv: u64,
) -> ModelConfig {
    let json = format!(
        r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":{vocab},"hidden_size":{hidden},
        "intermediate_size":{ffn},"num_hidden_layers":{layers},"num_attention_heads":{heads},
        "num_key_value_heads":{kv},"rms_norm_eps":1e-5,"rope_theta":500000.0,
        "max_position_embeddings":131072,"tie_word_embeddings":false}}"#
    );
    ModelConfig::from_json_str(&json).expect("preset configs are valid")
}

/// A built-in model by name.
pub fn model(name: &str) -> Result<ModelShape, PlanError> {
    let shape = match name {
        "llama-3-8b" => {
            ModelShape::from_config(name, &llama_config(128_256, 4096, 14_336, 32, 32, 8))
        }
        "llama-3-70b" => {
            ModelShape::from_config(name, &llama_config(128_256, 8192, 28_672, 80, 64, 8))
        }
        "llama-3.1-405b" => {
            ModelShape::from_config(name, &llama_config(128_256, 16_384, 53_248, 126, 128, 8))
        }
        "gpt-3-175b" => ModelShape {
            name: name.into(),
            vocab: 50_257,
            hidden: 12_288,
            layers: 96,
            heads: 96,
            kv_heads: 96,
            head_dim: 128,
            ffn: 4 * 12_288,
            gated_mlp: false,
            mlp_bias: true,
            norm: Norm::LayerNorm,
            attention: Attention::Gqa {
                qkv_bias: true,
                o_bias: true,
                qk_norm: false,
            },
            learned_positions: 2048,
            tied_embeddings: true,
            dropout: true,
            moe: None,
            sliding_window: vec![],
            layer_params_override: None,
        },
        // config.json of deepseek-ai/DeepSeek-V3 without the multi-token-prediction module
        // (num_nextn_predict_layers), which the 671B figure leaves out.
        "deepseek-v3" => ModelShape {
            name: name.into(),
            vocab: 129_280,
            hidden: 7168,
            layers: 61,
            heads: 128,
            kv_heads: 128,
            head_dim: 192,
            ffn: 18_432,
            gated_mlp: true,
            mlp_bias: false,
            norm: Norm::RmsNorm,
            attention: Attention::Mla {
                q_lora_rank: 1536,
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128,
            },
            learned_positions: 0,
            tied_embeddings: false,
            dropout: false,
            moe: Some(Moe {
                experts: 256,
                top_k: 8,
                shared_experts: 1,
                expert_ffn: 2048,
                first_dense_layers: 3,
                router_bias: true,
            }),
            sliding_window: vec![],
            layer_params_override: None,
        },
        other => {
            return Err(PlanError::Input(format!(
                "unknown model preset {other:?} (presets: {})",
                MODEL_NAMES.join(", ")
            )))
        }
    };
    Ok(shape)
}

/// The machines a job runs on. Bandwidths are bytes/s one GPU can send in one direction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    pub name: String,
    pub nodes: u64,
    pub gpus_per_node: u64,
    pub gpu_mem_bytes: u64,
    /// NVLink, per GPU per direction.
    pub intra_bw: f64,
    /// Network, per GPU per direction.
    pub inter_bw: f64,
    /// Dense 16-bit tensor FLOP/s per GPU.
    pub peak_flops_16: f64,
    /// TF32 tensor FLOP/s per GPU (used for fp32 training).
    pub peak_flops_32: f64,
    pub hbm_bw: f64,
    pub cpu_mem_bytes_per_node: u64,
    pub nvme_bytes_per_node: u64,
    /// Host-device copy bandwidth per GPU.
    pub pcie_bw: f64,
    /// NVMe read or write bandwidth per node.
    pub nvme_bw: f64,
    /// Parameters per second CPU Adam updates on one node.
    pub cpu_adam_params_per_s: f64,
}

impl Cluster {
    pub fn gpus(&self) -> u64 {
        self.nodes * self.gpus_per_node
    }
}

const MIB: u64 = 1 << 20;
const GB: f64 = 1e9;

/// A built-in cluster of one node.
pub fn cluster(name: &str) -> Result<Cluster, PlanError> {
    let c = match name {
        "h100-sxm" => Cluster {
            name: name.into(),
            nodes: 1,
            gpus_per_node: 8,
            gpu_mem_bytes: 81_559 * MIB,
            intra_bw: 450.0 * GB,
            inter_bw: 50.0 * GB,
            peak_flops_16: 989e12,
            peak_flops_32: 494.5e12,
            hbm_bw: 3350.0 * GB,
            cpu_mem_bytes_per_node: 2_000_000_000_000,
            nvme_bytes_per_node: 30_720_000_000_000,
            pcie_bw: 55.0 * GB,
            nvme_bw: 25.0 * GB,
            cpu_adam_params_per_s: 3e9,
        },
        "h200" => Cluster {
            name: name.into(),
            nodes: 1,
            gpus_per_node: 8,
            gpu_mem_bytes: 143_771 * MIB,
            intra_bw: 450.0 * GB,
            inter_bw: 50.0 * GB,
            peak_flops_16: 989e12,
            peak_flops_32: 494.5e12,
            hbm_bw: 4800.0 * GB,
            cpu_mem_bytes_per_node: 2_000_000_000_000,
            nvme_bytes_per_node: 30_720_000_000_000,
            pcie_bw: 55.0 * GB,
            nvme_bw: 25.0 * GB,
            cpu_adam_params_per_s: 3e9,
        },
        "a100-80g" => Cluster {
            name: name.into(),
            nodes: 1,
            gpus_per_node: 8,
            gpu_mem_bytes: 81_920 * MIB,
            intra_bw: 300.0 * GB,
            inter_bw: 25.0 * GB,
            peak_flops_16: 312e12,
            peak_flops_32: 156e12,
            hbm_bw: 2039.0 * GB,
            cpu_mem_bytes_per_node: 1_000_000_000_000,
            nvme_bytes_per_node: 15_360_000_000_000,
            pcie_bw: 25.0 * GB,
            nvme_bw: 12.5 * GB,
            cpu_adam_params_per_s: 2e9,
        },
        other => {
            return Err(PlanError::Input(format!(
                "unknown cluster preset {other:?} (presets: {})",
                CLUSTER_NAMES.join(", ")
            )))
        }
    };
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn billions(n: u64) -> f64 {
        (n as f64 / 1e8).round() / 10.0
    }

    #[test]
    fn llama_counts_match_published_sizes() {
        // Meta's model cards: 8.03B, 70.6B, 405.9B (rounded to 0.1B below for the two large ones).
        assert_eq!(model("llama-3-8b").unwrap().total_params(), 8_030_261_248);
        assert_eq!(billions(model("llama-3-70b").unwrap().total_params()), 70.6);
        assert_eq!(
            billions(model("llama-3.1-405b").unwrap().total_params()),
            405.9
        );
        assert_eq!(
            model("llama-3.1-405b").unwrap().total_params(),
            405_853_388_800
        );
    }

    #[test]
    fn gpt3_is_175b() {
        let p = model("gpt-3-175b").unwrap().total_params();
        assert_eq!(p, 174_604_259_328);
        assert!((p as f64 / 175e9 - 1.0).abs() < 0.005);
    }

    #[test]
    fn deepseek_v3_total_and_active() {
        let m = model("deepseek-v3").unwrap();
        assert_eq!(m.total_params(), 671_026_419_200);
        let active = m.active_params() as f64 / 1e9;
        assert!((37.0..38.0).contains(&active), "{active}");
        // The KV cache holds the 512-wide latent and the 64-wide rotary key, nothing per head.
        assert_eq!(m.kv_bytes_per_token(2), 61 * 576 * 2);
    }

    #[test]
    fn unknown_names_list_the_presets() {
        let e = model("llama-4").unwrap_err().to_string();
        assert!(e.contains("llama-3-8b"), "{e}");
        let e = cluster("tpu").unwrap_err().to_string();
        assert!(e.contains("h100-sxm"), "{e}");
    }
}

//! [`ModelShape`]: a transformer as the planner sees it, whatever its origin (an HF `config.json`
//! read into a [`ModelConfig`], a built-in preset that `ModelConfig` cannot express such as GPT-3 or
//! DeepSeek-V3, or a bare `--params N`).
//!
//! It owns the exact parameter count of every piece and how each piece is split by tensor
//! parallelism: column- and row-parallel matrices are split across the TP ranks, norms and
//! row-parallel biases are held whole by each rank, and K/V projections are split by KV head and
//! replicated once TP exceeds the number of KV heads.
//!
//! ```
//! let cfg = tessera_model::ModelConfig::from_json_str(r#"{"architectures":["LlamaForCausalLM"],
//!   "vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,
//!   "num_attention_heads":32,"num_key_value_heads":8}"#).unwrap();
//! let shape = tessera_plan::ModelShape::from_config("llama-3-8b", &cfg);
//! assert_eq!(shape.total_params(), cfg.num_params());
//! ```

use serde::Serialize;
use tessera_model::ModelConfig;

use crate::PlanError;

/// The most width, heads or vocabulary `--params` takes, given or guessed: a config's
/// ([`tessera_model::config::MAX_DIM`], 2^24).
pub const MAX_DIM: u64 = tessera_model::config::MAX_DIM as u64;
/// The most layers the planner takes, given, guessed or read: a config's
/// ([`tessera_model::config::MAX_LAYERS`], 2^16; published models have under 200). The search
/// walks every layer of every stage of every layout, so this bounds its time.
pub const MAX_LAYERS: u64 = tessera_model::config::MAX_LAYERS as u64;

/// How a layer attends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Attention {
    /// Multi-head or grouped-query attention: q has `heads × head_dim` features, k and v
    /// `kv_heads × head_dim` each; `qk_norm`: an RMSNorm weight of `head_dim` for q and one for
    /// k (Qwen3), replicated on every rank.
    Gqa {
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
    },
    /// DeepSeek's multi-head latent attention: K and V come out of a `kv_lora_rank` latent that,
    /// with the shared rotary key, is all the KV cache holds. `q_lora_rank == 0` means q is a plain
    /// projection.
    Mla {
        q_lora_rank: u64,
        kv_lora_rank: u64,
        qk_nope_head_dim: u64,
        qk_rope_head_dim: u64,
        v_head_dim: u64,
    },
}

/// Normalisation layer: RMSNorm has a scale (h parameters), LayerNorm a scale and a bias (2h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    RmsNorm,
    LayerNorm,
}

/// Mixture of experts in the MLP of every layer from `first_dense_layers` on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Moe {
    pub experts: u64,
    /// Routed experts each token goes to.
    pub top_k: u64,
    /// Experts every token goes to.
    pub shared_experts: u64,
    /// Intermediate size of one expert.
    pub expert_ffn: u64,
    /// Leading layers that keep a dense MLP of `ffn`.
    pub first_dense_layers: u64,
    /// The router carries a per-expert bias (DeepSeek-V3's score correction).
    pub router_bias: bool,
}

/// One model's shape. Sizes are element counts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    pub name: String,
    pub vocab: u64,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    /// Intermediate size of a dense MLP.
    pub ffn: u64,
    /// SwiGLU (gate, up, down: three matrices) rather than a 2-matrix GeLU MLP.
    pub gated_mlp: bool,
    pub mlp_bias: bool,
    pub norm: Norm,
    pub attention: Attention,
    /// Rows of a learned position embedding (GPT); 0 for rotary models.
    pub learned_positions: u64,
    pub tied_embeddings: bool,
    /// Trained with dropout: Megatron's activation count then holds the dropout masks.
    pub dropout: bool,
    pub moe: Option<Moe>,
    /// Per layer: `Some(w)` when the layer attends to the last `w` positions only. Empty: none do.
    pub sliding_window: Vec<Option<u64>>,
    /// Set for a shape guessed from `--params N`: the parameters of all layers together, spread
    /// evenly, so that the total is exactly N.
    pub layer_params_override: Option<u64>,
}

/// The parameters of one layer, by how tensor parallelism splits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerParams {
    /// Split evenly across TP ranks: column/row-parallel matrices, column-parallel biases, experts.
    pub split: u64,
    /// Held whole by every TP rank: norms, row-parallel biases, MLA down-projections, the router.
    pub replicated: u64,
    /// GQA's K and V projections: split by KV head, one head per rank once tp exceeds kv_heads.
    pub kv: u64,
    /// What one token uses (dense layers: everything; MoE: shared and top-k experts only).
    pub active: u64,
}

impl LayerParams {
    pub fn total(&self) -> u64 {
        self.split + self.replicated + self.kv
    }
}

impl ModelShape {
    /// Shape of a Llama-family model read from its HF config.
    pub fn from_config(name: &str, c: &ModelConfig) -> Self {
        let layers = c.num_layers as u64;
        let windows: Vec<Option<u64>> = c
            .sliding_window
            .iter()
            .map(|w| w.map(|w| w as u64))
            .collect();
        ModelShape {
            name: name.to_string(),
            vocab: c.vocab_size as u64,
            hidden: c.hidden_size as u64,
            layers,
            heads: c.num_heads as u64,
            kv_heads: c.num_kv_heads as u64,
            head_dim: c.head_dim as u64,
            ffn: c.intermediate_size as u64,
            gated_mlp: true,
            mlp_bias: c.mlp_bias,
            norm: Norm::RmsNorm,
            attention: Attention::Gqa {
                qkv_bias: c.qkv_bias,
                o_bias: c.o_bias,
                qk_norm: c.qk_norm,
            },
            learned_positions: 0,
            tied_embeddings: c.tie_word_embeddings,
            dropout: false,
            moe: None,
            sliding_window: if windows.iter().any(Option::is_some) {
                windows
            } else {
                vec![]
            },
            layer_params_override: None,
        }
    }

    /// A GPT-style dense shape (LayerNorm, 4h GeLU MLP, dropout, tied embeddings, 128-wide heads)
    /// holding exactly `params` parameters, for `--params N`. Missing dimensions are guessed with
    /// hidden = 128 × layers, the aspect ratio of GPT-3 175B, rounded to the nearest multiple of
    /// 1,024 (a multiple of 8 heads), or down to one, where neither the width nor the heads are
    /// given and the layers' 12·h² still fit beside the embedding; the vocabulary defaults to
    /// 51200.
    pub fn from_param_count(
        params: u64,
        layers: Option<u64>,
        hidden: Option<u64>,
        heads: Option<u64>,
        vocab: Option<u64>,
    ) -> Result<Self, PlanError> {
        if let Some(l) = layers.filter(|&l| l > MAX_LAYERS) {
            return Err(PlanError::Input(format!(
                "--layers must be at most {MAX_LAYERS}, got {l}"
            )));
        }
        let too_big = |d: &Option<u64>| d.is_some_and(|d| d > MAX_DIM);
        if [layers, hidden, heads, vocab].iter().any(too_big) || params > 1 << 56 {
            return Err(PlanError::Input(
                "--params, --layers, --hidden, --heads or --vocab is beyond any model the planner counts"
                    .into(),
            ));
        }
        let vocab = vocab.unwrap_or(51_200);
        let guessed_width = hidden.is_none() && heads.is_none();
        let (layers, hidden) = match (layers, hidden) {
            (Some(l), Some(h)) => (l, h),
            (Some(l), None) => (l, (128 * l).max(128)),
            (None, Some(h)) => (
                ((params as f64 / (12.0 * (h as f64).powi(2))).round() as u64).max(1),
                h,
            ),
            (None, None) => {
                // 12·L·h² + V·h = N with h = 128·L.
                let mut l = 1u64;
                while 12 * (l + 1) * (128 * (l + 1)).pow(2) + vocab * 128 * (l + 1) <= params {
                    l += 1;
                }
                (l, 128 * l)
            }
        };
        // A guessed width is a whole number of 8 heads of 128 (1,024), as published models' are,
        // so that tp 2, 4 and 8 divide its heads.
        // Only where the rounded width still leaves the layers their 12·h² each beside the
        // embedding: a small model keeps its guessed width.
        let fits = |h: u64| {
            let (v, h, l) = (vocab as u128, h as u128, layers as u128);
            v * h + 2 * h + 12 * l * h * h <= params as u128
        };
        let nearest = ((hidden as f64 / 1024.0).round() as u64).max(1) * 1024;
        let below = (hidden / 1024).max(1) * 1024;
        let hidden = match [nearest, below].into_iter().find(|&h| fits(h)) {
            Some(h) if guessed_width => h,
            _ => hidden,
        };
        let heads = heads.unwrap_or((hidden / 128).max(1));
        if layers == 0 || hidden == 0 || heads == 0 || vocab == 0 {
            return Err(PlanError::Input(
                "layers, hidden, heads and vocab must be > 0".into(),
            ));
        }
        if hidden % heads != 0 {
            return Err(PlanError::Input(format!(
                "hidden {hidden} is not divisible by heads {heads}"
            )));
        }
        let outside = vocab * hidden + 2 * hidden;
        if params < outside + layers {
            return Err(PlanError::Input(format!(
                "--params {params} is too small for {layers} layers of width {hidden} with a {vocab}-token vocabulary (the embedding alone holds {outside}); give --layers, --hidden and --vocab"
            )));
        }
        // A guessed layer count or width has the cap a given one has.
        if layers > MAX_LAYERS {
            return Err(PlanError::Input(format!(
                "--params {params} with --hidden {hidden} means {layers} layers, more than the {MAX_LAYERS} the planner takes; give a wider --hidden or --layers"
            )));
        }
        if hidden > MAX_DIM {
            return Err(PlanError::Input(format!(
                "--params {params} with --layers {layers} means a width of {hidden}, more than the {MAX_DIM} the planner takes; give --hidden"
            )));
        }
        Ok(ModelShape {
            name: format!("--params {params} (GPT-style shape guessed)"),
            vocab,
            hidden,
            layers,
            heads,
            kv_heads: heads,
            head_dim: hidden / heads,
            ffn: 4 * hidden,
            gated_mlp: false,
            mlp_bias: true,
            norm: Norm::LayerNorm,
            attention: Attention::Gqa {
                qkv_bias: true,
                o_bias: true,
                qk_norm: false,
            },
            learned_positions: 0,
            tied_embeddings: true,
            dropout: true,
            moe: None,
            sliding_window: vec![],
            layer_params_override: Some(params - outside),
        })
    }

    fn norm_params(&self, width: u64) -> u64 {
        match self.norm {
            Norm::RmsNorm => width,
            Norm::LayerNorm => 2 * width,
        }
    }

    /// Width of q (all heads) and of k or v (all KV heads) in a GQA layer.
    pub fn q_dim(&self) -> u64 {
        match &self.attention {
            Attention::Gqa { .. } => self.heads * self.head_dim,
            Attention::Mla {
                qk_nope_head_dim,
                qk_rope_head_dim,
                ..
            } => self.heads * (qk_nope_head_dim + qk_rope_head_dim),
        }
    }

    /// Width of the attention output (input of o_proj).
    pub fn attn_out_dim(&self) -> u64 {
        match &self.attention {
            Attention::Gqa { .. } => self.heads * self.head_dim,
            Attention::Mla { v_head_dim, .. } => self.heads * v_head_dim,
        }
    }

    pub fn is_moe_layer(&self, layer: u64) -> bool {
        matches!(&self.moe, Some(m) if layer >= m.first_dense_layers)
    }

    /// Parameters of one MLP with intermediate size `f`: (split, replicated).
    pub(crate) fn mlp_params(&self, f: u64) -> (u64, u64) {
        let h = self.hidden;
        let mats = if self.gated_mlp { 3 } else { 2 };
        let mut split = mats * h * f;
        let mut repl = 0;
        if self.mlp_bias {
            split += (mats - 1) * f;
            repl += h;
        }
        (split, repl)
    }

    /// Parameters of layer `i`, by TP treatment.
    pub fn layer_params(&self, i: u64) -> LayerParams {
        if let Some(total) = self.layer_params_override {
            let n = total / self.layers + u64::from(i < total % self.layers);
            let repl = 2 * self.norm_params(self.hidden);
            let split = n.saturating_sub(repl);
            return LayerParams {
                split,
                replicated: n - split,
                kv: 0,
                active: n,
            };
        }
        let h = self.hidden;
        let mut p = LayerParams {
            replicated: 2 * self.norm_params(h),
            ..Default::default()
        };
        match &self.attention {
            Attention::Gqa {
                qkv_bias,
                o_bias,
                qk_norm,
            } => {
                let q = self.heads * self.head_dim;
                let kv = self.kv_heads * self.head_dim;
                p.split += 2 * h * q + if *qkv_bias { q } else { 0 };
                p.kv += 2 * h * kv + if *qkv_bias { 2 * kv } else { 0 };
                p.replicated += if *o_bias { h } else { 0 };
                p.replicated += if *qk_norm { 2 * self.head_dim } else { 0 };
            }
            Attention::Mla {
                q_lora_rank,
                kv_lora_rank,
                qk_rope_head_dim,
                v_head_dim,
                ..
            } => {
                let qd = self.q_dim();
                if *q_lora_rank > 0 {
                    p.replicated += h * q_lora_rank + self.norm_params(*q_lora_rank);
                    p.split += q_lora_rank * qd;
                } else {
                    p.split += h * qd;
                }
                p.replicated +=
                    h * (kv_lora_rank + qk_rope_head_dim) + self.norm_params(*kv_lora_rank);
                let k_nope = qd - self.heads * qk_rope_head_dim;
                p.split += kv_lora_rank * (k_nope + self.heads * v_head_dim);
                p.split += self.heads * v_head_dim * h;
            }
        }
        let dense_part = p.total();
        match &self.moe {
            Some(m) if i >= m.first_dense_layers => {
                let (e_split, e_repl) = self.mlp_params(m.expert_ffn);
                let router = m.experts * h + if m.router_bias { m.experts } else { 0 };
                p.split += (m.experts + m.shared_experts) * e_split;
                p.replicated += (m.experts + m.shared_experts) * e_repl + router;
                p.active = dense_part + router + (m.top_k + m.shared_experts) * (e_split + e_repl);
            }
            _ => {
                let (s, r) = self.mlp_params(self.ffn);
                p.split += s;
                p.replicated += r;
                p.active = p.total();
            }
        }
        p
    }

    /// Token embedding plus learned positions.
    pub fn embedding_params(&self) -> u64 {
        (self.vocab + self.learned_positions) * self.hidden
    }

    /// The output projection when it is not tied to the embedding.
    pub fn lm_head_params(&self) -> u64 {
        if self.tied_embeddings {
            0
        } else {
            self.vocab * self.hidden
        }
    }

    pub fn final_norm_params(&self) -> u64 {
        self.norm_params(self.hidden)
    }

    pub fn total_params(&self) -> u64 {
        (0..self.layers)
            .map(|i| self.layer_params(i).total())
            .sum::<u64>()
            + self.embedding_params()
            + self.lm_head_params()
            + self.final_norm_params()
    }

    /// Parameters one token uses: equals [`Self::total_params`] for a dense model.
    pub fn active_params(&self) -> u64 {
        (0..self.layers)
            .map(|i| self.layer_params(i).active)
            .sum::<u64>()
            + self.embedding_params()
            + self.lm_head_params()
            + self.final_norm_params()
    }

    /// Parameters in matrix multiplies per token (active layer weights and the output projection,
    /// tied or not): the N of the 6N FLOPs-per-token rule.
    pub fn matmul_params(&self) -> u64 {
        (0..self.layers)
            .map(|i| self.layer_params(i).active)
            .sum::<u64>()
            + self.vocab * self.hidden
    }

    /// KV cache elements one token takes in one layer, on one TP rank of `tp`.
    pub fn kv_elems_per_token_layer(&self, tp: u64) -> u64 {
        match &self.attention {
            Attention::Gqa { .. } => 2 * self.kv_heads.div_ceil(tp) * self.head_dim,
            // The latent and the rotary key are shared by all heads, so every TP rank keeps them whole.
            Attention::Mla {
                kv_lora_rank,
                qk_rope_head_dim,
                ..
            } => kv_lora_rank + qk_rope_head_dim,
        }
    }

    /// KV bytes per token for the whole model on one device: 2 · layers · kv_heads · head_dim · bytes.
    pub fn kv_bytes_per_token(&self, bytes_per_elem: u64) -> u64 {
        self.layers * self.kv_elems_per_token_layer(1) * bytes_per_elem
    }

    pub fn window(&self, layer: u64) -> Option<u64> {
        self.sliding_window.get(layer as usize).copied().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(extra: &str) -> ModelConfig {
        let base = r#""architectures":["LlamaForCausalLM"],"vocab_size":320,"hidden_size":64,
            "intermediate_size":160,"num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":2"#;
        ModelConfig::from_json_str(&format!("{{{base}{extra}}}")).unwrap()
    }

    #[test]
    fn matches_model_config_counts_with_every_flag() {
        for extra in [
            "",
            r#","tie_word_embeddings":true"#,
            r#","attention_bias":true,"mlp_bias":true"#,
            r#","architectures":["Qwen2ForCausalLM"]"#,
            r#","model_type":"qwen3","head_dim":8,"attention_bias":true"#,
        ] {
            let c = llama(extra);
            let s = ModelShape::from_config("t", &c);
            assert_eq!(s.total_params(), c.num_params(), "{extra}");
            assert_eq!(s.active_params(), c.num_params());
            assert_eq!(s.kv_bytes_per_token(2), c.kv_bytes_per_token(2) as u64);
        }
    }

    #[test]
    fn param_count_shape_is_exact() {
        let s = ModelShape::from_param_count(7_500_000_000, None, None, None, None).unwrap();
        assert_eq!(s.total_params(), 7_500_000_000);
        // h = 128 L = 4,224 rounded to whole groups of 8 heads of 128.
        assert_eq!((s.layers, s.hidden, s.heads), (33, 4096, 32));
        let s =
            ModelShape::from_param_count(1_000_003, Some(3), Some(64), Some(4), Some(100)).unwrap();
        assert_eq!(s.total_params(), 1_000_003);
        assert!(ModelShape::from_param_count(1000, None, None, None, None).is_err());
    }

    #[test]
    fn guessed_layers_have_the_cap_given_ones_have() {
        // 1e13 / (12 · 64²) ≈ 2e8 layers guessed from --hidden 64: refused, as --layers 2e8 is.
        let e = ModelShape::from_param_count(10_000_000_000_000, None, Some(64), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("means 203450521 layers, more than the 65536"),
            "{e}"
        );
        let e = ModelShape::from_param_count(
            10_000_000_000_000,
            Some(MAX_LAYERS + 1),
            None,
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--layers must be at most 65536"), "{e}");
        // At the cap: taken.
        let s = ModelShape::from_param_count(1 << 40, Some(MAX_LAYERS), Some(64), None, Some(64))
            .unwrap();
        assert_eq!(s.layers, MAX_LAYERS);
    }

    #[test]
    fn kv_split_replicates_past_kv_heads() {
        let s = ModelShape::from_config("t", &llama(""));
        assert_eq!(s.kv_elems_per_token_layer(1), 2 * 2 * 8);
        assert_eq!(s.kv_elems_per_token_layer(2), 2 * 8);
        assert_eq!(s.kv_elems_per_token_layer(8), 2 * 8);
    }
}

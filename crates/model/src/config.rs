//! HF `config.json` for the Llama family (Llama, Mistral, Qwen2), read into one validated
//! [`ModelConfig`].
//!
//! Both config styles seen on the hub are accepted: transformers-4's top-level `rope_theta` +
//! `rope_scaling`, and transformers-5's `rope_parameters`. Validation happens once, here, so the
//! layers can trust every field.
//!
//! ```
//! let json = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":320,
//!   "hidden_size":64,"intermediate_size":160,"num_hidden_layers":2,"num_attention_heads":8,
//!   "num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0}"#;
//! let cfg = tessera_model::ModelConfig::from_json_str(json).unwrap();
//! assert_eq!(cfg.head_dim, 8);
//! ```

use std::path::Path;

use serde_json::Value;

use crate::error::ModelError;

/// The architectures tessera runs. All share one layer structure; they differ in flags (Qwen3:
/// an RMSNorm of each q and k head before RoPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// How rotary frequencies are scaled (HF `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN (Qwen2.5's long context, DeepSeek-V3, gpt-oss): frequencies ramped between the
    /// original and the interpolated ones over the dimensions between `beta_fast` and `beta_slow`
    /// rotations in the original context, and cos/sin scaled by `attention_factor` (resolved from
    /// `mscale` / `mscale_all_dim` / `factor` as transformers does).
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
        attention_factor: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// One model's shape and flags, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, or `attention_bias: true`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (`attention_bias: true` on Llama).
    pub o_bias: bool,
    /// gate/up/down carry a bias (`mlp_bias: true`).
    pub mlp_bias: bool,
    /// Each q and k head is RMS-normalised (weights `q_norm` / `k_norm` of `head_dim`) before
    /// RoPE (Qwen3).
    pub qk_norm: bool,
    /// Per layer: `Some(w)` when the layer attends to the last `w` positions only.
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint was saved in, as named by the config (`torch_dtype` or `dtype`).
    pub saved_dtype: Option<String>,
}

/// The largest of a model's sizes (vocabulary, widths, heads) a config may give: 2^24.
pub const MAX_DIM: usize = 1 << 24;
/// The most layers a config may give.
pub const MAX_LAYERS: usize = 1 << 16;
/// The longest context a config may give: 2^32 positions.
pub const MAX_POSITIONS: usize = 1 << 32;
/// The most parameters a model may have: 2^44 (17.6 T).
pub const MAX_PARAMS: u64 = 1 << 44;

impl ModelConfig {
    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            err: e,
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::Config(msg) => ModelError::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("not valid JSON: {e}")))?;
        Self::from_json(&v)
    }

    pub fn from_json(v: &Value) -> Result<Self, ModelError> {
        let obj = v
            .as_object()
            .ok_or_else(|| cfg_err("config.json must hold a JSON object"))?;
        let arch = arch_of(v)?;
        let hidden_size = req_usize(v, "hidden_size")?;
        let num_heads = req_usize(v, "num_attention_heads")?;
        let num_kv_heads = opt_usize(v, "num_key_value_heads")?.unwrap_or(num_heads);
        let num_layers = req_usize(v, "num_hidden_layers")?;
        // Before anything is sized by it (the per-layer attention kinds below).
        if num_layers > MAX_LAYERS {
            return Err(cfg_err(format!(
                "num_hidden_layers {num_layers} is larger than {MAX_LAYERS}"
            )));
        }
        if num_heads == 0 || num_kv_heads == 0 {
            return Err(cfg_err(
                "num_attention_heads and num_key_value_heads must be > 0",
            ));
        }
        let head_dim = match opt_usize(v, "head_dim")? {
            Some(d) => d,
            // Qwen3Config's default, whatever the width, where the key is missing (a null one
            // transformers cannot build).
            None if arch == Arch::Qwen3 => {
                if v.get("head_dim").is_some() {
                    return Err(cfg_err("head_dim must be a number for qwen3, got null"));
                }
                128
            }
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(cfg_err(format!(
                        "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} and no head_dim is given"
                    )));
                }
                hidden_size / num_heads
            }
        };
        if num_heads % num_kv_heads != 0 {
            return Err(cfg_err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(cfg_err(format!(
                "head_dim {head_dim} must be even and > 0 for RoPE"
            )));
        }
        // Every architecture here gates its MLP with SiLU; another activation would be computed
        // as SiLU and give other numbers than the model's, so it is refused.
        match obj
            .get("hidden_act")
            .or_else(|| obj.get("hidden_activation"))
        {
            None | Some(Value::Null) => {}
            Some(Value::String(a)) if a == "silu" || a == "swish" => {}
            Some(other) => {
                return Err(cfg_err(format!(
                    "hidden_act {other} is not supported (supported: silu)"
                )))
            }
        }
        // transformers' defaults where the key is missing.
        let default_context = match arch {
            Arch::Llama => 2048,
            Arch::Mistral => 131_072,
            Arch::Qwen2 | Arch::Qwen3 => 32_768,
        };
        let configured_context =
            opt_usize(v, "max_position_embeddings")?.unwrap_or(default_context);
        let (rope, max_position_embeddings) = rope_of(v, configured_context)?;
        // At the top (transformers 4) or inside `rope_parameters` (transformers 5).
        let nested = v
            .get("rope_parameters")
            .filter(|p| p.is_object())
            .map(|p| opt_f64(p, "partial_rotary_factor"))
            .transpose()?
            .flatten();
        if let Some(f) = opt_f64(v, "partial_rotary_factor")?.or(nested) {
            if f != 1.0 {
                return Err(cfg_err(format!(
                    "partial_rotary_factor {f} is not supported (RoPE over the whole head only)"
                )));
            }
        }
        // Biases as transformers builds each architecture: Llama from its flags, Mistral none,
        // Qwen2 on q/k/v only (whatever the flags say).
        let (qkv_bias, o_bias, mlp_bias) = match arch {
            Arch::Llama => {
                let a = opt_bool(v, "attention_bias")?.unwrap_or(false);
                (a, a, opt_bool(v, "mlp_bias")?.unwrap_or(false))
            }
            Arch::Mistral => (false, false, false),
            Arch::Qwen2 => (true, false, false),
            // q/k/v and o from `attention_bias`, the MLP none.
            Arch::Qwen3 => {
                let a = opt_bool(v, "attention_bias")?.unwrap_or(false);
                (a, a, false)
            }
        };
        let sliding_window = sliding_of(v, arch, num_layers)?;
        let eos_token_ids = match obj.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| token_id(x, "eos_token_id"))
                .collect::<Result<_, _>>()?,
            Some(x) => vec![token_id(x, "eos_token_id")?],
        };
        let bos_token_id = match obj.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(x) => Some(token_id(x, "bos_token_id")?),
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: req_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope,
            max_position_embeddings,
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: arch == Arch::Qwen3,
            sliding_window,
            bos_token_id,
            eos_token_ids,
            saved_dtype: obj
                .get("torch_dtype")
                .or_else(|| obj.get("dtype"))
                .and_then(|d| d.as_str())
                .map(str::to_string),
        };
        for (name, x) in [
            ("vocab_size", cfg.vocab_size),
            ("hidden_size", cfg.hidden_size),
            ("intermediate_size", cfg.intermediate_size),
            ("num_hidden_layers", cfg.num_layers),
        ] {
            if x == 0 {
                return Err(cfg_err(format!("{name} must be > 0")));
            }
        }
        if !positive(cfg.rms_norm_eps) {
            return Err(cfg_err("rms_norm_eps must be > 0"));
        }
        if cfg.max_position_embeddings == 0 {
            return Err(cfg_err("max_position_embeddings must be > 0"));
        }
        // Bounds far above any published model, so that sizes computed from these (tensor
        // lengths, offsets, cache rows) cannot overflow and an absurd config is refused here in
        // one line instead of failing an allocation later.
        for (name, x, max) in [
            ("vocab_size", cfg.vocab_size, MAX_DIM),
            ("hidden_size", cfg.hidden_size, MAX_DIM),
            ("intermediate_size", cfg.intermediate_size, MAX_DIM),
            ("num_attention_heads", cfg.num_heads, MAX_DIM),
            ("num_key_value_heads", cfg.num_kv_heads, MAX_DIM),
            ("head_dim", cfg.head_dim, MAX_DIM),
            (
                "max_position_embeddings",
                cfg.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ] {
            if x > max {
                return Err(cfg_err(format!("{name} {x} is larger than {max}")));
            }
        }
        if cfg.num_params() > MAX_PARAMS {
            return Err(cfg_err(format!(
                "the model would have {} parameters, more than {MAX_PARAMS}",
                cfg.num_params()
            )));
        }
        Ok(cfg)
    }

    /// Refuses token ids outside the vocabulary (a bad request, not a crash).
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<(), ModelError> {
        match tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            Some(&bad) => Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// Total parameter count (embedding and, when untied, the LM head included). Saturates rather
    /// than overflowing on absurd configs.
    pub fn num_params(&self) -> u64 {
        let m = |a: u64, b: u64| a.saturating_mul(b);
        let h = self.hidden_size as u64;
        let q = m(self.num_heads as u64, self.head_dim as u64);
        let kv = m(self.num_kv_heads as u64, self.head_dim as u64);
        let i = self.intermediate_size as u64;
        let mut attn = m(h, q).saturating_add(m(2 * h, kv)).saturating_add(m(q, h));
        if self.qkv_bias {
            attn = attn.saturating_add(q).saturating_add(m(2, kv));
        }
        if self.o_bias {
            attn = attn.saturating_add(h);
        }
        let mut mlp = m(m(3, h), i);
        if self.mlp_bias {
            mlp = mlp.saturating_add(m(2, i)).saturating_add(h);
        }
        if self.qk_norm {
            attn = attn.saturating_add(m(2, self.head_dim as u64));
        }
        let layer = attn.saturating_add(mlp).saturating_add(m(2, h));
        let embed = m(self.vocab_size as u64, h);
        let head = if self.tie_word_embeddings { 0 } else { embed };
        m(self.num_layers as u64, layer)
            .saturating_add(embed)
            .saturating_add(head)
            .saturating_add(h)
    }

    /// Bytes of K and V for one token across all layers, at `bytes_per_elem`.
    pub fn kv_bytes_per_token(&self, bytes_per_elem: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_elem
    }
}

/// True for numbers > 0 (false for NaN).
fn positive(x: f64) -> bool {
    x > 0.0
}

fn cfg_err(msg: impl Into<String>) -> ModelError {
    ModelError::Config(msg.into())
}

fn arch_of(v: &Value) -> Result<Arch, ModelError> {
    let from_name = |s: &str| -> Option<Arch> {
        match s {
            "llama" | "LlamaForCausalLM" => Some(Arch::Llama),
            "mistral" | "MistralForCausalLM" => Some(Arch::Mistral),
            "qwen2" | "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            "qwen3" | "Qwen3ForCausalLM" => Some(Arch::Qwen3),
            _ => None,
        }
    };
    // `model_type` decides, as transformers' Auto classes decide; `architectures` where it is
    // missing.
    let first = v
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str());
    if let Some(m) = v.get("model_type").and_then(|m| m.as_str()) {
        return from_name(m).ok_or_else(|| {
            let named = first.map_or(String::new(), |a| format!(", architecture {a:?}"));
            cfg_err(format!(
                "unsupported model_type {m:?}{named} (supported: llama, mistral, qwen2, qwen3)"
            ))
        });
    }
    match first {
        Some(first) => from_name(first).ok_or_else(|| {
            cfg_err(format!(
                "unsupported architecture {first:?} (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
            ))
        }),
        None => Err(cfg_err(
            "config.json names no `architectures` nor `model_type`",
        )),
    }
}

/// The RoPE settings and the context served, from `context` (`max_position_embeddings`): for
/// `dynamic` scaling the context up to which its frequencies are the unscaled ones (past it
/// transformers rescales them with the sequence's length), for `yarn` the original context times
/// its factor where that is longer (vLLM serves that product: Qwen2.5's configs keep
/// `max_position_embeddings` at the original 32,768 and ask for factor 4; transformers sets no
/// limit), capped at [`MAX_POSITIONS`].
fn rope_of(v: &Value, context: usize) -> Result<(RopeConfig, usize), ModelError> {
    // transformers 5 nests everything under `rope_parameters`; older configs keep `rope_theta` at the
    // top and the scaling in `rope_scaling`. As transformers converts them
    // (`rope_scaling or rope_parameters`, theta from that dict, else the top level), a non-empty
    // `rope_scaling` wins.
    let given = |key: &str| {
        v.get(key)
            .filter(|p| !(p.is_null() || p.as_object().is_some_and(|o| o.is_empty())))
    };
    let scaling = given("rope_scaling").or_else(|| given("rope_parameters"));
    let theta = scaling
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| v.get("rope_theta"))
        .map(|t| {
            t.as_f64()
                .ok_or_else(|| cfg_err(format!("rope_theta must be a number, got {t}")))
        })
        .transpose()?
        .unwrap_or(10000.0);
    if !positive(theta) {
        return Err(cfg_err(format!("rope_theta must be > 0, got {theta}")));
    }
    let mut served = context;
    let scaling = match scaling {
        None => RopeScaling::Default,
        Some(s) => {
            if !s.is_object() {
                return Err(cfg_err(format!(
                    "rope scaling must be a JSON object, got {s}"
                )));
            }
            let kind = match s.get("rope_type").or_else(|| s.get("type")) {
                None | Some(Value::Null) => "default",
                Some(Value::String(t)) => t.as_str(),
                Some(t) => return Err(cfg_err(format!("rope_type must be a string, got {t}"))),
            };
            let num = |key: &str| -> Result<f64, ModelError> {
                s.get(key).and_then(|x| x.as_f64()).ok_or_else(|| {
                    cfg_err(format!("rope scaling {kind:?} needs a numeric `{key}`"))
                })
            };
            match kind {
                "default" => RopeScaling::Default,
                // Dynamic NTK scaling leaves the frequencies alone up to the original context.
                "dynamic" => {
                    // transformers reads the factor (when the context passes the original one).
                    if !positive(num("factor")?) {
                        return Err(cfg_err("dynamic rope scaling needs factor > 0"));
                    }
                    if let Some(old) = s
                        .get("original_max_position_embeddings")
                        .and_then(|x| x.as_u64())
                    {
                        served = served.min(old as usize);
                    }
                    RopeScaling::Default
                }
                "linear" => RopeScaling::Linear {
                    factor: num("factor")?,
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                },
                "yarn" => {
                    let (y, extended) = yarn_of(v, s, context)?;
                    served = served.max(extended);
                    y
                }
                other => {
                    return Err(cfg_err(format!(
                    "unsupported rope type {other:?} (supported: default, linear, llama3, dynamic, yarn)"
                )))
                }
            }
        }
    };
    if let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = scaling
    {
        if !(factor > 0.0
            && low_freq_factor > 0.0
            && high_freq_factor > low_freq_factor
            && original_max_position_embeddings > 0.0)
        {
            return Err(cfg_err(
                "llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0",
            ));
        }
    }
    if let RopeScaling::Linear { factor } = scaling {
        if !positive(factor) {
            return Err(cfg_err("linear rope scaling needs factor > 0"));
        }
    }
    Ok((RopeConfig { theta, scaling }, served))
}

/// YaRN's settings as transformers 5 reads them (`_compute_yarn_parameters` after
/// `standardize_rope_params`): the original context from a top-level
/// `original_max_position_embeddings` first, then the scaling's own, then `context`; a missing
/// factor is the ratio of the two contexts; `beta_fast` / `beta_slow` of 0 or none are 32 / 1;
/// `truncate` defaults to true; the attention factor is the given one, else
/// `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` where both are non-zero, else
/// `mscale(factor)`, with `mscale(s, m) = 0.1 m ln s + 1` for `s > 1` and 1 otherwise. Also
/// returns the extended context, original × factor, capped where the positions tessera serves
/// end.
fn yarn_of(v: &Value, s: &Value, context: usize) -> Result<(RopeScaling, usize), ModelError> {
    let num = |x: &Value, key: &str| -> Result<Option<f64>, ModelError> {
        match x.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(n) => n
                .as_f64()
                .filter(|n| n.is_finite())
                .map(Some)
                .ok_or_else(|| {
                    cfg_err(format!(
                        "yarn rope scaling's `{key}` must be a number, got {n}"
                    ))
                }),
        }
    };
    let old = match num(v, "original_max_position_embeddings")? {
        Some(o) => o,
        None => num(s, "original_max_position_embeddings")?.unwrap_or(context as f64),
    };
    if !positive(old) {
        return Err(cfg_err(format!(
            "yarn rope scaling needs original_max_position_embeddings > 0, got {old}"
        )));
    }
    // A missing factor is refused (transformers: a required key); a null one is the ratio of the
    // contexts.
    if s.get("factor").is_none() {
        return Err(cfg_err("yarn rope scaling needs a `factor`"));
    }
    let factor = num(s, "factor")?.unwrap_or(context as f64 / old);
    if !positive(factor) {
        return Err(cfg_err(format!(
            "yarn rope scaling needs factor > 0, got {factor}"
        )));
    }
    let or = |x: Option<f64>, d: f64| x.filter(|&b| b != 0.0).unwrap_or(d);
    let beta_fast = or(num(s, "beta_fast")?, 32.0);
    let beta_slow = or(num(s, "beta_slow")?, 1.0);
    if !(beta_fast > 0.0 && beta_slow > 0.0) {
        return Err(cfg_err(format!(
            "yarn rope scaling needs beta_fast and beta_slow > 0, got {beta_fast} and {beta_slow}"
        )));
    }
    // transformers reads `get("truncate", True)`: a null is falsy there.
    let truncate = match s.get("truncate") {
        None => true,
        Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(t) => {
            return Err(cfg_err(format!(
                "yarn rope scaling's `truncate` must be true or false, got {t}"
            )))
        }
    };
    let mscale = |scale: f64, m: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    let attention_factor = match num(s, "attention_factor")? {
        Some(a) => a,
        None => match (
            num(s, "mscale")?.filter(|&m| m != 0.0),
            num(s, "mscale_all_dim")?.filter(|&m| m != 0.0),
        ) {
            (Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
            _ => mscale(factor, 1.0),
        },
    };
    if !(attention_factor > 0.0 && attention_factor.is_finite()) {
        return Err(cfg_err(format!(
            "yarn rope scaling's attention factor must be > 0, got {attention_factor}"
        )));
    }
    let extended = (old * factor).floor().min(MAX_POSITIONS as f64) as usize;
    let scaling = RopeScaling::Yarn {
        factor,
        original_max_position_embeddings: old,
        beta_fast,
        beta_slow,
        truncate,
        attention_factor,
    };
    Ok((scaling, extended))
}

fn sliding_of(v: &Value, arch: Arch, layers: usize) -> Result<Vec<Option<usize>>, ModelError> {
    let per_layer = sliding_windows(v, arch, layers)?;
    if per_layer.contains(&Some(0)) {
        return Err(cfg_err(
            "sliding_window 0 would let a token see nothing: use null for no window",
        ));
    }
    Ok(per_layer)
}

fn sliding_windows(v: &Value, arch: Arch, layers: usize) -> Result<Vec<Option<usize>>, ModelError> {
    // As transformers reads each architecture's config: Llama has no window; Mistral slides every
    // layer (`sliding_window` 4096 when the key is missing, no window for null; `layer_types` is
    // ignored); Qwen2 slides only with `use_sliding_window`, then the layers from
    // `max_window_layers` (28 when missing) or those `layer_types` names, over `sliding_window`
    // (4096 when missing).
    let window = || -> Result<Option<usize>, ModelError> {
        match v.get("sliding_window") {
            None => Ok(Some(4096)),
            Some(_) => opt_usize(v, "sliding_window"),
        }
    };
    match arch {
        Arch::Llama => Ok(vec![None; layers]),
        Arch::Mistral => Ok(vec![window()?; layers]),
        Arch::Qwen2 | Arch::Qwen3 => {
            let used = opt_bool(v, "use_sliding_window")?.unwrap_or(false);
            let window = if used { window()? } else { None };
            let types = match v.get("layer_types") {
                None | Some(Value::Null) => None,
                Some(Value::Array(t)) => Some(t),
                Some(t) => {
                    return Err(cfg_err(format!(
                        "layer_types must be a list of layer types, got {t}"
                    )))
                }
            };
            if let Some(types) = types {
                if types.len() != layers {
                    return Err(cfg_err(format!(
                        "layer_types has {} entries for {layers} layers",
                        types.len()
                    )));
                }
                return types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("full_attention") => Ok(None),
                        Some("sliding_attention") => window.map(Some).ok_or_else(|| {
                            cfg_err("layer_types names sliding_attention but use_sliding_window is false or sliding_window is null")
                        }),
                        _ => Err(cfg_err(format!("unsupported layer type {t}"))),
                    })
                    .collect();
            }
            let from = opt_usize(v, "max_window_layers")?.unwrap_or(28);
            Ok((0..layers)
                .map(|i| if i >= from { window } else { None })
                .collect())
        }
    }
}

fn token_id(x: &Value, key: &str) -> Result<u32, ModelError> {
    x.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| cfg_err(format!("{key} must be a non-negative integer, got {x}")))
}

fn req_usize(v: &Value, key: &str) -> Result<usize, ModelError> {
    opt_usize(v, key)?.ok_or_else(|| cfg_err(format!("missing `{key}`")))
}

fn opt_usize(v: &Value, key: &str) -> Result<Option<usize>, ModelError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| cfg_err(format!("`{key}` must be a non-negative integer, got {x}"))),
    }
}

fn opt_f64(v: &Value, key: &str) -> Result<Option<f64>, ModelError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| cfg_err(format!("`{key}` must be a number, got {x}"))),
    }
}

fn opt_bool(v: &Value, key: &str) -> Result<Option<bool>, ModelError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .ok_or_else(|| cfg_err(format!("`{key}` must be true or false, got {x}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":320,"hidden_size":64,
        "intermediate_size":160,"num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":2}"#;

    fn with(extra: &str) -> Result<ModelConfig, ModelError> {
        let mut v: Value = serde_json::from_str(BASE).unwrap();
        let e: Value = serde_json::from_str(extra).unwrap();
        for (k, x) in e.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_json(&v)
    }

    #[test]
    fn both_rope_styles_read_the_same() {
        let old = with(r#"{"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#)
        .unwrap();
        let new = with(r#"{"rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#)
        .unwrap();
        assert_eq!(old.rope, new.rope);
        assert_eq!(old.rope.theta, 500000.0);
        assert!(matches!(old.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn refuses_unknown_architecture_and_rope() {
        let e = with(r#"{"architectures":["GPT2LMHeadModel"]}"#).unwrap_err();
        assert!(e.to_string().contains("GPT2LMHeadModel"), "{e}");
        for bad in [
            r#"{"rope_scaling":"x"}"#,
            r#"{"rope_scaling":{"rope_type":5}}"#,
            r#"{"hidden_act":"gelu"}"#,
            r#"{"hidden_act":"bogus"}"#,
            r#"{"hidden_act":3}"#,
        ] {
            assert!(with(bad).is_err(), "{bad} was taken");
        }
        assert!(with(r#"{"hidden_act":"silu"}"#).is_ok());
        let e = with(r#"{"rope_scaling":{"type":"longrope","factor":4.0}}"#).unwrap_err();
        assert!(e.to_string().contains("longrope"), "{e}");
        let e = with(r#"{"num_key_value_heads":3}"#).unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads 3"), "{e}");
        let e = with(r#"{"hidden_size":"big"}"#).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
    }

    #[test]
    fn absurd_sizes_are_refused_before_anything_is_sized_by_them() {
        for (bad, named) in [
            (
                r#"{"intermediate_size":18446744073709551615}"#,
                "intermediate_size",
            ),
            (r#"{"vocab_size":4000000000}"#, "vocab_size"),
            (r#"{"head_dim":9223372036854775808}"#, "head_dim"),
            (
                r#"{"num_attention_heads":9223372036854775808,"num_key_value_heads":1}"#,
                "num_attention_heads",
            ),
            (r#"{"num_hidden_layers":4294967296}"#, "num_hidden_layers"),
            (
                r#"{"num_hidden_layers":1000000000,"layer_types":[]}"#,
                "num_hidden_layers",
            ),
            (
                r#"{"max_position_embeddings":18446744073709551615}"#,
                "max_position_embeddings",
            ),
            (
                r#"{"max_position_embeddings":0}"#,
                "max_position_embeddings",
            ),
            // Each size allowed, the whole too large: 2^24 x 2^24 x 3 a layer, 4 layers.
            (
                r#"{"hidden_size":16777216,"intermediate_size":16777216,"num_attention_heads":8,"num_key_value_heads":8,"num_hidden_layers":4}"#,
                "parameters",
            ),
        ] {
            let e = with(bad).expect_err(bad).to_string();
            assert!(e.contains(named), "{bad}: {e}");
        }
        // The largest published shapes pass (Llama-3.1-405B).
        let big = with(
            r#"{"vocab_size":128256,"hidden_size":16384,"intermediate_size":53248,
            "num_hidden_layers":126,"num_attention_heads":128,"num_key_value_heads":8,
            "max_position_embeddings":131072}"#,
        )
        .unwrap();
        assert!(big.num_params() > 400_000_000_000);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_mistral_slides() {
        let q =
            with(r#"{"architectures":["Qwen2ForCausalLM"],"tie_word_embeddings":true}"#).unwrap();
        assert!(q.qkv_bias && q.tie_word_embeddings && !q.o_bias);
        assert_eq!(q.sliding_window, vec![None, None]);
        let m =
            with(r#"{"architectures":["MistralForCausalLM"],"sliding_window":4096,"head_dim":16}"#)
                .unwrap();
        assert_eq!(m.sliding_window, vec![Some(4096), Some(4096)]);
        assert_eq!(m.head_dim, 16);
        // A window of 0 is refused where it would be used, ignored where it is not.
        let e = with(r#"{"architectures":["MistralForCausalLM"],"sliding_window":0}"#).unwrap_err();
        assert!(e.to_string().contains("sliding_window 0"), "{e}");
        let q = with(r#"{"architectures":["Qwen2ForCausalLM"],"sliding_window":0}"#).unwrap();
        assert_eq!(q.sliding_window, vec![None, None]);
    }

    /// Each architecture's config read as transformers reads it, where tessera once read it
    /// otherwise (silently different numbers).
    #[test]
    fn each_architecture_reads_its_keys_as_transformers_does() {
        let mistral = r#"{"architectures":["MistralForCausalLM"],"model_type":"mistral"}"#;
        let with2 = |a: &str, b: &str| {
            let mut v: Value = serde_json::from_str(BASE).unwrap();
            for extra in [a, b] {
                let e: Value = serde_json::from_str(extra).unwrap();
                for (k, x) in e.as_object().unwrap() {
                    v[k] = x.clone();
                }
            }
            ModelConfig::from_json(&v)
        };
        // Mistral: a missing sliding_window is MistralConfig's 4096, null none; layer_types and
        // the bias flags are not Mistral's (every layer slides; no biases).
        assert_eq!(with(mistral).unwrap().sliding_window, vec![Some(4096); 2]);
        assert_eq!(
            with2(mistral, r#"{"sliding_window":null}"#)
                .unwrap()
                .sliding_window,
            vec![None; 2]
        );
        let m = with2(
            mistral,
            r#"{"sliding_window":8,"layer_types":["full_attention","sliding_attention"],
                "attention_bias":true,"mlp_bias":true}"#,
        )
        .unwrap();
        assert_eq!(m.sliding_window, vec![Some(8); 2]);
        assert!(!m.qkv_bias && !m.o_bias && !m.mlp_bias);
        // Qwen2: q/k/v biases only; sliding only with use_sliding_window, from
        // max_window_layers (28 when missing), over sliding_window (4096 when missing).
        let qwen =
            r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","num_hidden_layers":30}"#;
        let q = with2(qwen, r#"{"attention_bias":true,"mlp_bias":true}"#).unwrap();
        assert!(q.qkv_bias && !q.o_bias && !q.mlp_bias);
        assert_eq!(q.sliding_window, vec![None; 30]);
        let q = with2(qwen, r#"{"use_sliding_window":true}"#).unwrap();
        let mut want = vec![None; 28];
        want.extend([Some(4096), Some(4096)]);
        assert_eq!(q.sliding_window, want);
        let q = with2(
            qwen,
            r#"{"use_sliding_window":false,"sliding_window":64,"max_window_layers":0}"#,
        )
        .unwrap();
        assert_eq!(q.sliding_window, vec![None; 30]);
        let e = with2(
            r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2"}"#,
            r#"{"sliding_window":64,"layer_types":["sliding_attention","full_attention"]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("use_sliding_window is false"), "{e}");
        // layer_types that is not a list: refused, not ignored.
        let e = with2(qwen, r#"{"layer_types":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("layer_types must be a list"), "{e}");
        let q = with2(
            r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","use_sliding_window":true}"#,
            r#"{"sliding_window":64,"layer_types":["sliding_attention","full_attention"]}"#,
        )
        .unwrap();
        assert_eq!(q.sliding_window, vec![Some(64), None]);
        // Llama: no window, whatever layer_types says.
        let l =
            with(r#"{"sliding_window":8,"layer_types":["sliding_attention","sliding_attention"]}"#)
                .unwrap();
        assert_eq!(l.sliding_window, vec![None; 2]);
        // model_type decides over architectures, as AutoModelForCausalLM does.
        let q = with(r#"{"model_type":"qwen2"}"#).unwrap();
        assert_eq!(q.arch, Arch::Qwen2);
        // The context transformers assumes where the key is missing.
        assert_eq!(with("{}").unwrap().max_position_embeddings, 2048);
        assert_eq!(with(mistral).unwrap().max_position_embeddings, 131_072);
        assert_eq!(with(qwen).unwrap().max_position_embeddings, 32_768);
        // partial_rotary_factor other than 1 is refused, not ignored.
        assert!(with(r#"{"partial_rotary_factor":1.0}"#).is_ok());
        let e = with(r#"{"partial_rotary_factor":0.5}"#).unwrap_err();
        assert!(e.to_string().contains("partial_rotary_factor 0.5"), "{e}");
        let e = with(
            r#"{"rope_parameters":{"rope_type":"default","rope_theta":10000.0,
                "partial_rotary_factor":0.5}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("partial_rotary_factor 0.5"), "{e}");
        // Dynamic NTK RoPE: the unscaled frequencies, served up to its original context.
        let d = with(
            r#"{"max_position_embeddings":8192,"rope_scaling":{"type":"dynamic","factor":2.0}}"#,
        )
        .unwrap();
        assert_eq!(d.rope.scaling, RopeScaling::Default);
        assert_eq!(d.max_position_embeddings, 8192);
        let d = with(
            r#"{"max_position_embeddings":8192,"rope_scaling":{"rope_type":"dynamic","factor":2.0,
                "original_max_position_embeddings":4096}}"#,
        )
        .unwrap();
        assert_eq!(d.max_position_embeddings, 4096);
        // Its factor as transformers reads it: a positive number.
        for f in ["\"x\"", "0", "-2"] {
            let e = with(&format!(
                r#"{{"rope_scaling":{{"type":"dynamic","factor":{f}}}}}"#
            ))
            .unwrap_err();
            assert!(e.to_string().contains("dynamic"), "{f}: {e}");
        }
    }

    #[test]
    fn yarn_is_read_as_transformers_reads_it_and_served_to_its_extended_context() {
        let yarn = |extra: &str| with(extra).map(|c| (c.rope.scaling, c.max_position_embeddings));
        // Qwen2.5's recipe: max_position_embeddings stays the original; the served context is
        // factor x original (vLLM's); betas 32 / 1, truncated, attention factor 0.1 ln 4 + 1.
        let (s, ctx) = yarn(
            r#"{"max_position_embeddings":32768,"rope_scaling":{"type":"yarn","factor":4.0,
                "original_max_position_embeddings":32768}}"#,
        )
        .unwrap();
        assert_eq!(ctx, 131_072);
        assert_eq!(
            s,
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 32768.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: true,
                attention_factor: 0.1 * 4f64.ln() + 1.0,
            }
        );
        // A longer max_position_embeddings is kept; a top-level original context wins over the
        // scaling's (transformers' Phi-3 rule); with neither, max_position_embeddings is it.
        let (s, ctx) = yarn(
            r#"{"max_position_embeddings":65536,"original_max_position_embeddings":4096,
                "rope_parameters":{"rope_type":"yarn","rope_theta":1e4,"factor":4.0,
                "original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        assert_eq!(ctx, 65536);
        assert!(
            matches!(s, RopeScaling::Yarn { original_max_position_embeddings: o, .. } if o == 4096.0)
        );
        let (s, _) = yarn(
            r#"{"max_position_embeddings":4096,"rope_scaling":{"rope_type":"yarn","factor":2.0}}"#,
        )
        .unwrap();
        assert!(
            matches!(s, RopeScaling::Yarn { original_max_position_embeddings: o, .. } if o == 4096.0)
        );
        // A null factor: the ratio of the contexts (a missing one is refused, as transformers
        // requires the key). Betas of 0 are the defaults; mscales both set give their ratio, one
        // of them 0 the plain formula; truncate false is kept, and a null one is false too
        // (transformers' `get("truncate", True)` is falsy there).
        let (s, _) = yarn(
            r#"{"max_position_embeddings":16384,"rope_scaling":{"type":"yarn","factor":null,
                "original_max_position_embeddings":2048,"beta_fast":0,"beta_slow":null,
                "mscale":0.707,"mscale_all_dim":1.0,"truncate":false}}"#,
        )
        .unwrap();
        let m = |s: f64, m: f64| 0.1 * m * s.ln() + 1.0;
        assert_eq!(
            s,
            RopeScaling::Yarn {
                factor: 8.0,
                original_max_position_embeddings: 2048.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: false,
                attention_factor: m(8.0, 0.707) / m(8.0, 1.0),
            }
        );
        let (s, _) = yarn(
            r#"{"rope_scaling":{"type":"yarn","factor":8.0,"mscale":0.707,"mscale_all_dim":0}}"#,
        )
        .unwrap();
        assert!(matches!(s, RopeScaling::Yarn { attention_factor: a, .. } if a == m(8.0, 1.0)));
        let (s, _) =
            yarn(r#"{"rope_scaling":{"type":"yarn","factor":8.0,"truncate":null}}"#).unwrap();
        assert!(matches!(
            s,
            RopeScaling::Yarn {
                truncate: false,
                ..
            }
        ));
        // rope_scaling wins over rope_parameters, and its own rope_theta over the top level's.
        let c = with(
            r#"{"rope_theta":10000.0,"rope_parameters":{"rope_type":"default","rope_theta":1e4},
                "rope_scaling":{"type":"yarn","factor":4.0,"rope_theta":500000.0}}"#,
        )
        .unwrap();
        assert!(matches!(c.rope.scaling, RopeScaling::Yarn { factor, .. } if factor == 4.0));
        assert_eq!(c.rope.theta, 500000.0);
        // An extended context past the positions tessera serves is capped there, not refused.
        let (_, ctx) = yarn(r#"{"rope_scaling":{"type":"yarn","factor":1e300}}"#).unwrap();
        assert_eq!(ctx, MAX_POSITIONS);
        for (bad, named) in [
            (
                r#"{"rope_scaling":{"type":"yarn","factor":0}}"#,
                "factor > 0",
            ),
            (
                r#"{"rope_scaling":{"type":"yarn","factor":"4"}}"#,
                "`factor`",
            ),
            (
                r#"{"rope_scaling":{"type":"yarn","factor":4,"original_max_position_embeddings":0}}"#,
                "original_max_position_embeddings > 0",
            ),
            (
                r#"{"rope_scaling":{"type":"yarn","factor":4,"truncate":"no"}}"#,
                "truncate",
            ),
            (
                r#"{"rope_scaling":{"type":"yarn","factor":4,"attention_factor":-1}}"#,
                "attention factor",
            ),
            (
                r#"{"rope_scaling":{"type":"yarn","factor":4,"beta_fast":-2}}"#,
                "beta_fast",
            ),
            (r#"{"rope_scaling":{"type":"yarn"}}"#, "needs a `factor`"),
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains(named), "{bad}: {e}");
        }
    }

    /// Qwen3 as transformers builds it: q/k norms, head_dim 128 where missing (whatever the
    /// width), q/k/v and o biases from `attention_bias` (the MLP none), Qwen2's windows and
    /// context; its parameters count the norms.
    #[test]
    fn qwen3_has_head_norms_and_its_own_defaults() {
        let q = with(r#"{"model_type":"qwen3","tie_word_embeddings":true}"#).unwrap();
        assert_eq!(q.arch, Arch::Qwen3);
        assert!(q.qk_norm && !q.qkv_bias && !q.o_bias && !q.mlp_bias);
        assert_eq!(q.head_dim, 128);
        assert_eq!(q.max_position_embeddings, 32_768);
        assert_eq!(q.sliding_window, vec![None, None]);
        let b = with(
            r#"{"model_type":"qwen3","head_dim":8,"attention_bias":true,"mlp_bias":true,
                "use_sliding_window":true,"sliding_window":16,"max_window_layers":1}"#,
        )
        .unwrap();
        assert!(b.qkv_bias && b.o_bias && !b.mlp_bias);
        assert_eq!(b.head_dim, 8);
        assert_eq!(b.sliding_window, vec![None, Some(16)]);
        let mut plain = b.clone();
        plain.qk_norm = false;
        assert_eq!(b.num_params(), plain.num_params() + 2 * 2 * 8);
        assert!(!with("{}").unwrap().qk_norm);
        let e = with(r#"{"model_type":"qwen3","head_dim":null}"#).unwrap_err();
        assert!(e.to_string().contains("head_dim must be a number"), "{e}");
    }

    #[test]
    fn counts_llama3_8b_parameters() {
        let c = with(
            r#"{"vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8}"#,
        )
        .unwrap();
        assert_eq!(c.num_params(), 8_030_261_248);
    }
}

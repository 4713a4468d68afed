//! Where a model comes from (an HF directory, or the one built into the binary), opened once and
//! shared by every rank thread.

use std::path::PathBuf;

use tessera_model::{Checkpoint, ModelConfig};
use tokenizers::Tokenizer;

use crate::{default_model, InferError};

#[derive(Debug, Clone)]
pub enum ModelSource {
    Dir(PathBuf),
    Embedded,
}

/// A model's config, checkpoint and tokenizer (if it has one).
pub struct OpenModel {
    pub config: ModelConfig,
    pub checkpoint: Checkpoint,
    pub tokenizer: Option<Tokenizer>,
    /// `tokenizer_config.json`'s explicit `add_bos_token` / `add_eos_token` (none where it sets
    /// neither): where set, they decide the special tokens around encoded text, as transformers'
    /// tokenizers rebuild their post-processor from them.
    pub add_special: Option<AddSpecial>,
    /// `generation_config.json`'s sampling where it sets `do_sample: true`: the defaults of
    /// `generate` when no sampling flag is given (transformers' `generate` and vLLM use them).
    pub sampling: Option<SamplingDefaults>,
    /// `generation_config.json`'s `repetition_penalty` as written: transformers applies it
    /// whether or not it samples.
    pub repetition_penalty: Option<serde_json::Value>,
    /// Why `generation_config.json` could not be used (not JSON, e.g. a Python-written `NaN`;
    /// end-of-sequence ids that are not ids): `generate` stops with it, `score` (which uses
    /// nothing of it) reads on.
    pub generation_config_error: Option<String>,
    /// `generation_config.json`'s settings that can change what transformers' `generate` outputs
    /// and that `generate` here does not apply, each with its value and when it acts (`typical_p`
    /// when sampling, ...); `generate` warns of them.
    pub unapplied: Vec<Unapplied>,
}

/// A `generation_config.json` setting [`OpenModel::unapplied`] lists.
#[derive(Debug, Clone, PartialEq)]
pub struct Unapplied {
    pub key: String,
    pub value: serde_json::Value,
    /// The decoding it acts in.
    pub acts: Acts,
}

/// When transformers' `generate` applies a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acts {
    /// Sampling only (`typical_p`, ...).
    Sampling,
    /// Greedy only (`penalty_alpha`: contrastive search).
    Greedy,
    Always,
}

impl Acts {
    /// Whether it acts in a decoding that samples (`true`) or is greedy.
    pub fn when(self, sampling: bool) -> bool {
        match self {
            Acts::Sampling => sampling,
            Acts::Greedy => !sampling,
            Acts::Always => true,
        }
    }
}

/// The sampling settings a model's `generation_config.json` gives (each where it is set, null as
/// unset), as written: `generate` checks those it uses.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SamplingDefaults {
    pub temperature: Option<serde_json::Value>,
    pub top_p: Option<serde_json::Value>,
    pub top_k: Option<serde_json::Value>,
    pub min_p: Option<serde_json::Value>,
}

/// [`SamplingDefaults`] of a `generation_config.json` that samples (`do_sample: true`); none for
/// one that decodes greedily (transformers' default). Nothing is checked here: a value only
/// `generate` uses must not stop `score`.
fn sampling_defaults(v: &serde_json::Value) -> Option<SamplingDefaults> {
    if v.get("do_sample").and_then(|d| d.as_bool()) != Some(true) {
        return None;
    }
    let raw = |key: &str| v.get(key).filter(|x| !x.is_null()).cloned();
    Some(SamplingDefaults {
        temperature: raw("temperature"),
        top_p: raw("top_p"),
        top_k: raw("top_k"),
        min_p: raw("min_p"),
    })
}

/// What `generate` takes from a `generation_config.json`.
struct GenerationConfig {
    sampling: Option<SamplingDefaults>,
    repetition_penalty: Option<serde_json::Value>,
    eos_token_ids: Option<Vec<u32>>,
    unapplied: Vec<Unapplied>,
}

/// transformers' `GenerationConfig` settings that can change `generate`'s tokens and that tessera
/// does not apply, each with when it acts and which values do nothing (its defaults).
type Inert = fn(&serde_json::Value) -> bool;
const UNAPPLIED: [(&str, Acts, Inert); 20] = [
    ("typical_p", Acts::Sampling, |v| v.as_f64() == Some(1.0)),
    ("epsilon_cutoff", Acts::Sampling, |v| {
        v.as_f64() == Some(0.0)
    }),
    ("eta_cutoff", Acts::Sampling, |v| v.as_f64() == Some(0.0)),
    ("top_h", Acts::Sampling, |_| false),
    ("penalty_alpha", Acts::Greedy, |v| v.as_f64() == Some(0.0)),
    ("no_repeat_ngram_size", Acts::Always, |v| {
        v.as_f64() == Some(0.0)
    }),
    ("encoder_no_repeat_ngram_size", Acts::Always, |v| {
        v.as_f64() == Some(0.0)
    }),
    ("encoder_repetition_penalty", Acts::Always, |v| {
        v.as_f64() == Some(1.0)
    }),
    ("guidance_scale", Acts::Always, |v| v.as_f64() == Some(1.0)),
    ("num_beams", Acts::Always, |v| v.as_f64() == Some(1.0)),
    ("min_length", Acts::Always, |v| v.as_f64() == Some(0.0)),
    ("min_new_tokens", Acts::Always, |v| v.as_f64() == Some(0.0)),
    ("bad_words_ids", Acts::Always, empty),
    ("force_words_ids", Acts::Always, empty),
    ("suppress_tokens", Acts::Always, empty),
    ("begin_suppress_tokens", Acts::Always, empty),
    ("sequence_bias", Acts::Always, empty),
    ("forced_bos_token_id", Acts::Always, |_| false),
    ("forced_eos_token_id", Acts::Always, |_| false),
    ("exponential_decay_length_penalty", Acts::Always, |_| false),
];

fn empty(v: &serde_json::Value) -> bool {
    v.as_array().is_some_and(|a| a.is_empty()) || v.as_object().is_some_and(|o| o.is_empty())
}

fn unapplied(v: &serde_json::Value) -> Vec<Unapplied> {
    UNAPPLIED
        .iter()
        .filter_map(|&(key, acts, inert)| {
            let value = v.get(key).filter(|x| !x.is_null() && !inert(x))?;
            Some(Unapplied {
                key: key.into(),
                value: value.clone(),
                acts,
            })
        })
        .collect()
}

fn read_generation_config(text: &str) -> Result<GenerationConfig, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    if !v.is_object() {
        return Err("must be a JSON object".into());
    }
    // transformers samples where `do_sample` is truthy: anything but true, false or null would
    // be read another way here than there.
    if let Some(d) = v
        .get("do_sample")
        .filter(|d| !d.is_null() && !d.is_boolean())
    {
        return Err(format!("`do_sample` must be true or false, got {d}"));
    }
    // HF's generate stops at generation_config.json's end-of-sequence ids, which may differ from
    // config.json's (Llama 3 instruct lists several).
    let ids: Option<Vec<Option<u64>>> = match v.get("eos_token_id") {
        Some(serde_json::Value::Array(a)) => Some(a.iter().map(|x| x.as_u64()).collect()),
        Some(serde_json::Value::Null) | None => None,
        Some(x) => Some(vec![x.as_u64()]),
    };
    let eos_token_ids = ids
        .map(|ids| {
            ids.into_iter()
                .map(|n| n.and_then(|n| u32::try_from(n).ok()))
                .collect::<Option<Vec<u32>>>()
                .ok_or("eos_token_id must hold token ids")
        })
        .transpose()?;
    Ok(GenerationConfig {
        sampling: sampling_defaults(&v),
        repetition_penalty: v
            .get("repetition_penalty")
            .filter(|x| !x.is_null())
            .cloned(),
        eos_token_ids,
        unapplied: unapplied(&v),
    })
}

/// What `tokenizer_config.json` says of BOS and EOS around encoded text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddSpecial {
    /// `add_bos_token` / `add_eos_token`, where set.
    pub bos: Option<bool>,
    pub eos: Option<bool>,
    /// Their tokens' ids (the config's `bos_token` / `eos_token`, none where the tokenizer lacks
    /// the token it names; config.json's ids where it names none).
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
}

/// [`AddSpecial`] from `dir/tokenizer_config.json`; none where it is missing or sets neither flag.
fn add_special(
    dir: &std::path::Path,
    tokenizer: Option<&Tokenizer>,
    config: &ModelConfig,
) -> Result<Option<AddSpecial>, InferError> {
    let path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| InferError::Request(format!("{}: not valid JSON: {e}", path.display())))?;
    // The token the config names (none where the tokenizer lacks it), else config.json's id.
    let token = |key: &str, fallback: Option<u32>| -> Option<u32> {
        let Some(t) = v.get(key) else {
            return fallback;
        };
        match t.as_str().or_else(|| t.get("content")?.as_str()) {
            Some(s) => tokenizer?.token_to_id(s),
            None => fallback,
        }
    };
    let flag = |key: &str| -> Result<Option<bool>, InferError> {
        match v.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
            Some(x) => Err(InferError::Request(format!(
                "{}: `{key}` must be true or false, got {x}",
                path.display()
            ))),
        }
    };
    let (bos, eos) = (flag("add_bos_token")?, flag("add_eos_token")?);
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    Ok(Some(AddSpecial {
        bos,
        eos,
        bos_id: token("bos_token", config.bos_token_id),
        eos_id: token("eos_token", config.eos_token_ids.first().copied()),
    }))
}

impl ModelSource {
    pub fn open(src: &ModelSource) -> Result<OpenModel, InferError> {
        match src {
            ModelSource::Dir(dir) => {
                if !dir.is_dir() {
                    let what = if dir.exists() {
                        "is not a directory (give the model's directory, with config.json)"
                    } else {
                        "does not exist"
                    };
                    return Err(InferError::Request(format!(
                        "model directory {} {what}",
                        dir.display()
                    )));
                }
                let mut config = ModelConfig::from_dir(dir)?;
                // HF's generate stops at generation_config.json's end-of-sequence ids, which may
                // differ from config.json's (Llama 3 instruct lists several).
                let gen = dir.join("generation_config.json");
                let (mut sampling, mut repetition_penalty, mut generation_config_error) =
                    (None, None, None);
                let mut unapplied = vec![];
                if let Ok(text) = std::fs::read_to_string(&gen) {
                    match read_generation_config(&text) {
                        Ok(g) => {
                            sampling = g.sampling;
                            repetition_penalty = g.repetition_penalty;
                            unapplied = g.unapplied;
                            if let Some(ids) = g.eos_token_ids {
                                config.eos_token_ids = ids;
                            }
                        }
                        Err(e) => generation_config_error = Some(format!("{}: {e}", gen.display())),
                    }
                }
                let checkpoint = Checkpoint::open(dir)?;
                let tk = dir.join("tokenizer.json");
                let tokenizer = if tk.exists() {
                    Some(
                        Tokenizer::from_file(&tk)
                            .map_err(|e| InferError::Tokenizer(format!("{}: {e}", tk.display())))?,
                    )
                } else {
                    None
                };
                let add_special = add_special(dir, tokenizer.as_ref(), &config)?;
                Ok(OpenModel {
                    config,
                    checkpoint,
                    tokenizer,
                    add_special,
                    sampling,
                    repetition_penalty,
                    generation_config_error,
                    unapplied,
                })
            }
            ModelSource::Embedded => Ok(OpenModel {
                config: ModelConfig::from_json_str(default_model::CONFIG)?,
                checkpoint: Checkpoint::from_static("<built-in model>", default_model::WEIGHTS)?,
                tokenizer: Some(
                    Tokenizer::from_bytes(default_model::TOKENIZER)
                        .map_err(|e| InferError::Tokenizer(e.to_string()))?,
                ),
                add_special: None,
                sampling: None,
                repetition_penalty: None,
                generation_config_error: None,
                unapplied: vec![],
            }),
        }
    }
}

impl OpenModel {
    /// Rank `rank`'s shard of this model on its device (`base` numbered by rank).
    pub fn load_rank(
        &self,
        rank: tessera_model::TpRank,
        dtype: tessera_tensor::DType,
        base: tessera_tensor::Device,
    ) -> Result<tessera_model::LlamaModel, InferError> {
        let dev = crate::device_of_rank(base, rank.rank);
        Ok(tessera_model::LlamaModel::from_checkpoint_on(
            &self.checkpoint,
            self.config.clone(),
            rank,
            dtype,
            dev,
        )?)
    }

    fn tokenizer(&self) -> Result<&Tokenizer, InferError> {
        self.tokenizer.as_ref().ok_or_else(|| {
            InferError::Tokenizer(
                "this model has no tokenizer.json; pass token ids instead of text".into(),
            )
        })
    }

    /// Token ids of `text`, with the special tokens (BOS) HF's tokenizer adds by default: the
    /// post-processor of `tokenizer.json`, or where `tokenizer_config.json` sets `add_bos_token`
    /// / `add_eos_token`, BOS and EOS as those say (transformers rebuilds the post-processor
    /// from them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, InferError> {
        let tok = self.tokenizer()?;
        let enc = |special: bool| -> Result<Vec<u32>, InferError> {
            Ok(tok
                .encode(text, special)
                .map_err(|e| InferError::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec())
        };
        let with = enc(true)?;
        let Some(a) = self.add_special else {
            return Ok(with);
        };
        let plain = enc(false)?;
        // What the post-processor did, for the flag the config leaves unset: what it put before
        // and after the text's own ids (a special token typed in the text is the text's).
        let (had_bos, had_eos) = if plain.is_empty() {
            // Nothing of the text's own to place them by: first and last (one token is not both).
            let had_bos = a.bos_id.is_some() && with.first().copied() == a.bos_id;
            let had_eos = a.eos_id.is_some()
                && with.len() > usize::from(had_bos)
                && with.last().copied() == a.eos_id;
            (had_bos, had_eos)
        } else {
            match (0..=with.len().saturating_sub(plain.len()))
                .find(|&k| with[k..k + plain.len()] == plain[..])
            {
                Some(k) => (
                    a.bos_id.is_some_and(|b| with[..k].contains(&b)),
                    a.eos_id
                        .is_some_and(|e| with[k + plain.len()..].contains(&e)),
                ),
                None => (false, false),
            }
        };
        let want = |flag: Option<bool>, had: bool, id: Option<u32>, what: &str| {
            match (flag.unwrap_or(had), id) {
                (false, _) => Ok(None),
                (true, Some(id)) => Ok(Some(id)),
                (true, None) => Err(InferError::Tokenizer(format!(
                    "tokenizer_config.json sets add_{what}_token but names no {what} token this tokenizer knows"
                ))),
            }
        };
        let bos = want(a.bos, had_bos, a.bos_id, "bos")?;
        let eos = want(a.eos, had_eos, a.eos_id, "eos")?;
        let mut ids = Vec::with_capacity(plain.len() + 2);
        ids.extend(bos);
        ids.extend(plain);
        ids.extend(eos);
        Ok(ids)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, InferError> {
        decode_with(self.tokenizer()?, ids)
    }

    /// Text that `generated` adds after `prompt`: see [`continuation_text`].
    pub fn decode_continuation(
        &self,
        prompt: &[u32],
        generated: &[u32],
    ) -> Result<String, InferError> {
        continuation_text(self.tokenizer()?, prompt, generated)
    }
}

/// Text of `ids` by `tok`, special tokens skipped.
fn decode_with(tok: &Tokenizer, ids: &[u32]) -> Result<String, InferError> {
    tok.decode(ids, true)
        .map_err(|e| InferError::Tokenizer(e.to_string()))
}

/// The text `generated` adds after `prompt`, as HF's `decode(prompt + generated)` shows it and as
/// vLLM returns it: the text of the whole sequence less the text of the prompt. Decoding the new
/// ids alone loses what depends on the token before them: a SentencePiece decoder (Llama 2,
/// Mistral) strips the leading space of the first piece, so "hello" + "▁world" would read
/// "helloworld". Where the prompt's text is not a prefix of the whole (a byte sequence cut inside
/// a character), the new ids are decoded alone.
pub fn continuation_text(
    tok: &Tokenizer,
    prompt: &[u32],
    generated: &[u32],
) -> Result<String, InferError> {
    let dec = |ids: &[u32]| decode_with(tok, ids);
    let all: Vec<u32> = prompt.iter().chain(generated).copied().collect();
    let (head, whole) = (dec(prompt)?, dec(&all)?);
    match whole.strip_prefix(head.as_str()) {
        Some(rest) => Ok(rest.to_string()),
        None => dec(generated),
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    /// A SentencePiece-style tokenizer (Llama 2 / Mistral's `tokenizer.json` layout: "▁" for a
    /// space, a decoder that strips the first space).
    fn sentencepiece() -> Tokenizer {
        let vocab: Vec<String> = ["<unk>", "<s>", "</s>", "▁hello", "▁world", "▁", "h", "é"]
            .iter()
            .enumerate()
            .map(|(i, t)| format!("\"{t}\": {i}"))
            .collect();
        let json = format!(
            r#"{{"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{{"id": 1, "content": "<s>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}},
                {{"id": 2, "content": "</s>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}}],
            "normalizer": null,
            "pre_tokenizer": {{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                "split": true}},
            "post_processor": {{"type": "TemplateProcessing",
                "single": [{{"SpecialToken": {{"id": "<s>", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}],
                "pair": [{{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"Sequence": {{"id": "B", "type_id": 1}}}}],
                "special_tokens": {{"<s>": {{"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}}}},
            "decoder": {{"type": "Sequence", "decoders": [
                {{"type": "Replace", "pattern": {{"String": "▁"}}, "content": " "}},
                {{"type": "Fuse"}},
                {{"type": "Strip", "content": " ", "start": 1, "stop": 0}}]}},
            "model": {{"type": "WordLevel", "unk_token": "<unk>", "vocab": {{{}}}}}}}"#,
            vocab.join(", ")
        );
        Tokenizer::from_str(&json).unwrap()
    }

    /// `tokenizer_config.json`'s add_bos_token / add_eos_token decide BOS and EOS where set, as
    /// transformers rebuilds the post-processor from them; the post-processor decides the rest.
    #[test]
    fn tokenizer_config_flags_decide_the_special_tokens_where_set() {
        let mut m = ModelSource::open(&ModelSource::Embedded).unwrap();
        m.tokenizer = Some(sentencepiece());
        // The post-processor adds <s> (1).
        assert_eq!(m.encode("hello").unwrap(), vec![1, 3]);
        let dir = std::env::temp_dir().join(format!("tessera-addspecial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let flags = |json: &str| {
            std::fs::write(dir.join("tokenizer_config.json"), json).unwrap();
            add_special(&dir, m.tokenizer.as_ref(), &m.config).unwrap()
        };
        let a = flags(
            r#"{"add_bos_token": false, "add_eos_token": true, "bos_token": "<s>",
                "eos_token": {"content": "</s>"}}"#,
        );
        assert_eq!(
            a,
            Some(AddSpecial {
                bos: Some(false),
                eos: Some(true),
                bos_id: Some(1),
                eos_id: Some(2)
            })
        );
        assert_eq!(flags(r#"{"bos_token": "<s>"}"#), None);
        m.add_special = a;
        assert_eq!(m.encode("hello").unwrap(), vec![3, 2]);
        m.add_special =
            flags(r#"{"add_eos_token": true, "bos_token": "<s>", "eos_token": "</s>"}"#);
        assert_eq!(m.encode("hello").unwrap(), vec![1, 3, 2]);
        m.add_special = flags(r#"{"add_bos_token": false}"#);
        assert_eq!(m.encode("hello world").unwrap(), vec![3, 4]);
        // A special token typed in the text is the text's: not taken for the post-processor's.
        m.add_special =
            flags(r#"{"add_bos_token": true, "bos_token": "<s>", "eos_token": "</s>"}"#);
        assert_eq!(m.encode("hello</s>").unwrap(), vec![1, 3, 2]);
        // Empty text: the post-processor's BOS kept beside the EOS asked for.
        m.add_special =
            flags(r#"{"add_eos_token": true, "bos_token": "<s>", "eos_token": "</s>"}"#);
        assert_eq!(m.encode("").unwrap(), vec![1, 2]);
        // BOS and EOS the same token: the post-processor's one is the BOS, not both.
        m.add_special = flags(r#"{"add_bos_token": true, "bos_token": "<s>", "eos_token": "<s>"}"#);
        assert_eq!(m.encode("").unwrap(), vec![1]);
        // A token the tokenizer lacks is no token: asked for, an error.
        m.add_special = flags(r#"{"add_bos_token": true, "bos_token": "<|begin|>"}"#);
        let e = m.encode("hello").unwrap_err();
        assert!(e.to_string().contains("names no bos token"), "{e}");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"add_bos_token": "yes"}"#,
        )
        .unwrap();
        let e = add_special(&dir, m.tokenizer.as_ref(), &m.config).unwrap_err();
        assert!(
            e.to_string()
                .contains("`add_bos_token` must be true or false"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_continuation_keeps_the_space_a_sentencepiece_decoder_strips_from_a_first_piece() {
        let tok = sentencepiece();
        // "<s> ▁hello" then "▁world": decoded alone the new piece would read "world".
        assert_eq!(tok.decode(&[4], true).unwrap(), "world");
        assert_eq!(continuation_text(&tok, &[1, 3], &[4]).unwrap(), " world");
        assert_eq!(
            continuation_text(&tok, &[1, 3], &[4, 3]).unwrap(),
            " world hello"
        );
        // A piece that starts no word joins the one before it.
        assert_eq!(continuation_text(&tok, &[1, 3], &[6]).unwrap(), "h");
        // An end-of-sequence id (special) adds nothing.
        assert_eq!(continuation_text(&tok, &[1, 3], &[4, 2]).unwrap(), " world");
        assert_eq!(continuation_text(&tok, &[1, 3], &[]).unwrap(), "");
    }
}

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
                if let Ok(text) = std::fs::read_to_string(&gen) {
                    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                        InferError::Request(format!("{}: not valid JSON: {e}", gen.display()))
                    })?;
                    let ids: Option<Vec<Option<u64>>> = match v.get("eos_token_id") {
                        Some(serde_json::Value::Array(a)) => {
                            Some(a.iter().map(|x| x.as_u64()).collect())
                        }
                        Some(serde_json::Value::Null) | None => None,
                        Some(x) => Some(vec![x.as_u64()]),
                    };
                    if let Some(ids) = ids {
                        config.eos_token_ids = ids
                            .into_iter()
                            .map(|n| n.and_then(|n| u32::try_from(n).ok()))
                            .collect::<Option<Vec<u32>>>()
                            .ok_or_else(|| {
                                InferError::Request(format!(
                                    "{}: eos_token_id must hold token ids",
                                    gen.display()
                                ))
                            })?;
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
                Ok(OpenModel {
                    config,
                    checkpoint,
                    tokenizer,
                })
            }
            ModelSource::Embedded => Ok(OpenModel {
                config: ModelConfig::from_json_str(default_model::CONFIG)?,
                checkpoint: Checkpoint::from_static("<built-in model>", default_model::WEIGHTS)?,
                tokenizer: Some(
                    Tokenizer::from_bytes(default_model::TOKENIZER)
                        .map_err(|e| InferError::Tokenizer(e.to_string()))?,
                ),
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

    /// Token ids of `text`, with the tokenizer's special tokens (BOS) as HF adds them by default.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, InferError> {
        let enc = self
            .tokenizer()?
            .encode(text, true)
            .map_err(|e| InferError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, InferError> {
        self.tokenizer()?
            .decode(ids, true)
            .map_err(|e| InferError::Tokenizer(e.to_string()))
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
    let dec = |ids: &[u32]| {
        tok.decode(ids, true)
            .map_err(|e| InferError::Tokenizer(e.to_string()))
    };
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
            "normalizer": {{"type": "Sequence", "normalizers": [
                {{"type": "Prepend", "prepend": "▁"}},
                {{"type": "Replace", "pattern": {{"String": " "}}, "content": "▁"}}]}},
            "pre_tokenizer": null,
            "post_processor": {{"type": "TemplateProcessing",
                "single": [{{"SpecialToken": {{"id": "<s>", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}],
                "pair": [{{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"Sequence": {{"id": "B", "type_id": 1}}}}],
                "special_tokens": {{"<s>": {{"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}}}},
            "decoder": {{"type": "Sequence", "decoders": [
                {{"type": "Replace", "pattern": {{"String": "▁"}}, "content": " "}},
                {{"type": "Fuse"}},
                {{"type": "Strip", "content": " ", "start": 1, "stop": 0}}]}},
            "model": {{"type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": false, "vocab": {{{}}}, "merges": []}}}}"#,
            vocab.join(", ")
        );
        Tokenizer::from_str(&json).unwrap()
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

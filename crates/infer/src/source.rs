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
}

//! The Llama-family causal LM (Llama, Mistral, Qwen2): embedding, decoder layers, final norm and
//! LM head, loaded as one tensor-parallel rank's shard and run SPMD: every rank calls `forward`
//! with the same tokens, and every rank gets the full logits.

use std::path::Path;
use std::sync::Arc;

use tessera_comm::Communicator;
use tessera_tensor::DType;

use crate::checkpoint::Checkpoint;
use crate::kv_cache::KvCache;
use crate::layers::{DecoderLayer, ParallelLmHead, RmsNorm, VocabParallelEmbedding};
use crate::tp::{TpRank, TpShard};
use crate::{ModelConfig, ModelError};

pub struct LlamaModel {
    pub cfg: ModelConfig,
    pub shard: TpShard,
    pub dtype: DType,
    embed: VocabParallelEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    head: ParallelLmHead,
}

/// Which logits `forward` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

impl LlamaModel {
    /// Loads rank `tp.rank`'s shard from an HF model directory.
    pub fn load(dir: &Path, tp: TpRank, dtype: DType) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_dir(dir)?;
        let ck = Checkpoint::open(dir)?;
        Self::from_checkpoint(&ck, cfg, tp, dtype)
    }

    pub fn from_checkpoint(
        ck: &Checkpoint,
        cfg: ModelConfig,
        tp: TpRank,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let shard = TpShard::new(&cfg, tp)?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let inv_freq = Arc::new(crate::rope::inv_freq(&cfg.rope, cfg.head_dim));
        let embed =
            VocabParallelEmbedding::load(ck, "model.embed_tokens.weight", v, h, &shard, dtype)?;
        let layers = (0..cfg.num_layers)
            .map(|l| DecoderLayer::load(ck, &cfg, l, &shard, inv_freq.clone(), dtype))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNorm::load(ck, "model.norm.weight", h, cfg.rms_norm_eps, dtype)?;
        // Some tied checkpoints still carry lm_head.weight; the tie decides.
        let tied = cfg.tie_word_embeddings.then_some(&embed);
        let head = ParallelLmHead::load(ck, v, h, &shard, tied, dtype)?;
        Ok(LlamaModel {
            cfg,
            shard,
            dtype,
            embed,
            layers,
            norm,
            head,
        })
    }

    /// An empty KV cache for one sequence, with room for `capacity` positions (it grows).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let row = self.shard.kv_heads.len() * self.cfg.head_dim;
        KvCache::new(self.cfg.num_layers, row, capacity, self.dtype)
    }

    /// Runs `tokens` at the positions after those in `cache`, appends their K/V, and returns the
    /// logits (`[tokens, vocab]` or `[1, vocab]` for `Logits::Last`) as f32.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        comm: &dyn Communicator,
    ) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Input("forward needs at least one token".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let start = cache.len();
        let mut x = self.embed.forward(tokens, comm)?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, start, kv, comm)?;
        }
        cache.advance(tokens.len());
        if logits == Logits::Last {
            x = x.rows(tokens.len() - 1, tokens.len())?;
        }
        let x = self.norm.forward(&x)?;
        self.head.forward(&x, comm)
    }

    /// Bytes of weights this rank holds.
    pub fn weight_bytes(&self) -> usize {
        let head = if self.cfg.tie_word_embeddings {
            0
        } else {
            self.head.weight.size_in_bytes()
        };
        self.embed.table.size_in_bytes()
            + self
                .layers
                .iter()
                .map(DecoderLayer::weight_bytes)
                .sum::<usize>()
            + self.norm.weight.size_in_bytes()
            + head
    }
}

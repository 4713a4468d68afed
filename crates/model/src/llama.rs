//! The Llama-family causal LM (Llama, Mistral, Qwen2): embedding, decoder layers, final norm and
//! LM head, loaded as one tensor-parallel rank's shard and run SPMD: every rank calls `forward`
//! with the same tokens, and every rank gets the full logits.

use std::path::Path;
use std::sync::Arc;

use tessera_comm::{CommExt, Communicator};
use tessera_tensor::{ops, Candidates, DType, Device, Tensor, TensorError};

use crate::checkpoint::Checkpoint;
use crate::kv_cache::KvCache;
use crate::layers::{DecoderLayer, DrawLogits, ParallelLmHead, RmsNorm, VocabParallelEmbedding};
use crate::tp::{TpRank, TpShard};
use crate::{ModelConfig, ModelError};

pub struct LlamaModel {
    pub cfg: ModelConfig,
    pub shard: TpShard,
    pub dtype: DType,
    pub device: Device,
    embed: VocabParallelEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    head: ParallelLmHead,
}

/// A lockstep step takes one token per sequence of the cache.
fn check_lockstep(tokens: &[u32], cache: &KvCache) -> Result<(), ModelError> {
    if tokens.len() != cache.batch {
        return Err(ModelError::Input(format!(
            "{} tokens for a cache of {} sequences",
            tokens.len(),
            cache.batch
        )));
    }
    Ok(())
}

/// Refuses a cache of a lockstep batch where one sequence's is wanted.
fn check_single(cache: &KvCache) -> Result<(), ModelError> {
    if cache.batch != 1 {
        return Err(ModelError::Input(
            "this cache holds a lockstep batch: use forward_lockstep".into(),
        ));
    }
    Ok(())
}

/// Bytes of f32 logits [`LlamaModel::forward_logprobs`] holds at once on the CPU (at least one
/// row).
pub const LOGPROB_CHUNK_BYTES: usize = 64 << 20;

/// The same on a GPU, at most an eighth of its free memory. Each chunk reads the whole LM head
/// again (1 GB for Llama-3-8B's), so chunks of 64 MB (130 rows of a 128k vocabulary) made the head
/// of 2,048 positions read 16 GB; 1 GiB takes 2,048 positions of a 128k vocabulary at once.
/// Counted as f32 logits of the whole vocabulary, as on the CPU: a rank's logits are its shard's,
/// in the compute dtype (about 0.5 GiB at tp 1 in bf16).
pub const LOGPROB_CHUNK_BYTES_GPU: usize = 1 << 30;

/// The fewest of every rank's `mine` over `comm` (every rank gets the same answer; a collective).
/// Counts past `i32::MAX` are taken as `i32::MAX` (a chunk's rows stay below 2^28).
fn fewest_over_ranks(comm: &dyn Communicator, mine: usize) -> Result<usize, ModelError> {
    if comm.world_size() == 1 {
        return Ok(mine);
    }
    let mine = i32::try_from(mine).unwrap_or(i32::MAX);
    let mut all = vec![0i32; comm.world_size()];
    comm.all_gather(&[mine], &mut all)?;
    Ok(all.into_iter().min().unwrap_or(mine) as usize)
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
        Self::from_checkpoint_on(ck, cfg, tp, dtype, Device::Cpu)
    }

    /// Loads rank `tp.rank`'s shard onto `device`, one layer at a time (host memory holds at most
    /// one layer's shard beyond what is already on the device).
    pub fn from_checkpoint_on(
        ck: &Checkpoint,
        cfg: ModelConfig,
        tp: TpRank,
        dtype: DType,
        device: Device,
    ) -> Result<Self, ModelError> {
        device.ensure_available()?;
        let shard = TpShard::new(&cfg, tp)?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let inv_freq = Arc::new(crate::rope::inv_freq(&cfg.rope, cfg.head_dim));
        let mut embed =
            VocabParallelEmbedding::load(ck, "model.embed_tokens.weight", v, h, &shard, dtype)?;
        embed.table = Arc::new(embed.table.to_device(device)?);
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let mut layer = DecoderLayer::load(ck, &cfg, l, &shard, inv_freq.clone(), dtype)?;
                layer.visit_tensors(&mut |t| {
                    *t = t.to_device(device)?;
                    Ok(())
                })?;
                Ok(layer)
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let mut norm = RmsNorm::load(ck, "model.norm.weight", h, cfg.rms_norm_eps, dtype)?;
        norm.weight = norm.weight.to_device(device)?;
        // Some tied checkpoints still carry lm_head.weight; the tie decides.
        let tied = cfg.tie_word_embeddings.then_some(&embed);
        let mut head = ParallelLmHead::load(ck, v, h, &shard, tied, dtype)?;
        if !cfg.tie_word_embeddings {
            head.weight = Arc::new(head.weight.to_device(device)?);
        }
        Ok(LlamaModel {
            cfg,
            shard,
            dtype,
            device,
            embed,
            layers,
            norm,
            head,
        })
    }

    /// An empty KV cache for one sequence, with room for `capacity` positions (it grows).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache, ModelError> {
        let row = self.shard.kv_heads.len() * self.cfg.head_dim;
        Ok(KvCache::new(
            self.cfg.num_layers,
            row,
            capacity,
            self.dtype,
            self.device,
        )?)
    }

    /// Rank `tp.rank`'s shard of a model with random weights made directly on `device` (no
    /// checkpoint: for benchmarks of shapes too large to ship). Weights are uniform with variance
    /// 1/fan_in; norms near 1.
    pub fn random(
        cfg: ModelConfig,
        tp: TpRank,
        dtype: DType,
        device: Device,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let shard = TpShard::new(&cfg, tp)?;
        let mut next = seed
            .wrapping_mul(1_000_003)
            .wrapping_add(tp.rank as u64 * 7919);
        let mut rand = |shape: Vec<usize>| -> Result<Tensor, TensorError> {
            next = next.wrapping_add(0x9E37_79B9);
            let (scale, offset) = match shape.len() {
                2 => ((3.0 / shape[1] as f32).sqrt(), 0.0),
                _ => (0.1, 1.0),
            };
            Tensor::random_on(shape, dtype, device, next, scale, offset)
        };
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (ql, kvl) = (shard.q_heads.len() * d, shard.kv_heads.len() * d);
        let il = shard.intermediate.len();
        let vl = shard.vocab.len();
        let inv_freq = Arc::new(crate::rope::inv_freq(&cfg.rope, d));
        use crate::layers::{
            Attention, ColumnParallelLinear as Col, Mlp, RowParallelLinear as Row,
        };
        let col = |rows: usize,
                   bias: bool,
                   rand: &mut dyn FnMut(Vec<usize>) -> Result<Tensor, TensorError>|
         -> Result<Col, TensorError> {
            Ok(Col {
                weight: rand(vec![rows, h])?,
                bias: if bias {
                    Some(rand(vec![rows])?.to_device(device)?)
                } else {
                    None
                },
            })
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let attn = Attention {
                qkv: col(ql + 2 * kvl, cfg.qkv_bias, &mut rand)?,
                o: Row {
                    weight: rand(vec![h, ql])?,
                    bias: None,
                },
                shape: tessera_tensor::ops::AttentionShape {
                    num_heads: shard.q_heads.len(),
                    num_kv_heads: shard.kv_heads.len(),
                    head_dim: d,
                },
                window: cfg.sliding_window[l],
                inv_freq: inv_freq.clone(),
                scale: crate::rope::softmax_scale(&cfg.rope, d),
                qk_norm: if cfg.qk_norm {
                    Some(crate::layers::QkNorm {
                        q: rand(vec![d])?,
                        k: rand(vec![d])?,
                        eps: cfg.rms_norm_eps,
                    })
                } else {
                    None
                },
            };
            let mlp = Mlp {
                gate_up: col(2 * il, false, &mut rand)?,
                down: Row {
                    weight: rand(vec![h, il])?,
                    bias: None,
                },
            };
            let eps = cfg.rms_norm_eps;
            layers.push(DecoderLayer {
                input_norm: RmsNorm {
                    weight: rand(vec![h])?,
                    eps,
                },
                attn,
                post_attn_norm: RmsNorm {
                    weight: rand(vec![h])?,
                    eps,
                },
                mlp,
            });
        }
        let embed = VocabParallelEmbedding {
            table: Arc::new(rand(vec![vl, h])?),
            vocab_start: shard.vocab.start,
        };
        let head_w = if cfg.tie_word_embeddings {
            embed.table.clone()
        } else {
            Arc::new(rand(vec![vl, h])?)
        };
        let head = ParallelLmHead {
            weight: head_w,
            vocab: cfg.vocab_size,
            padded: shard.vocab_padded,
            tp_size: tp.size,
        };
        let norm = RmsNorm {
            weight: rand(vec![h])?,
            eps: cfg.rms_norm_eps,
        };
        Ok(LlamaModel {
            cfg,
            shard,
            dtype,
            device,
            embed,
            layers,
            norm,
            head,
        })
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
        check_single(cache)?;
        self.run(tokens, 1, cache, logits, comm)
    }

    /// Runs `tokens` (appended to `cache`) and returns `log p(tokens[i + 1] | tokens[..=i])` for
    /// each position but the last, in f64. The LM head runs over a bounded number of rows at a
    /// time ([`LOGPROB_CHUNK_BYTES`] of f32 logits, [`LOGPROB_CHUNK_BYTES_GPU`] on a GPU), so
    /// scoring a long sequence never holds its `[tokens, vocab]` logits at once (32,000 tokens of a 128k vocabulary would be 16 GB), and
    /// its logits never leave the ranks' devices: vocab-parallel log-softmax
    /// ([`ParallelLmHead::logprobs`](crate::layers::ParallelLmHead::logprobs)).
    pub fn forward_logprobs(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        comm: &dyn Communicator,
    ) -> Result<Vec<f64>, ModelError> {
        let rows = |budget: usize| (budget / (self.cfg.vocab_size * 4)).max(1);
        let rows = match self.device {
            Device::Cpu => rows(LOGPROB_CHUNK_BYTES),
            d => {
                // What each rank's GPU has free now: the ranks take the fewest rows any of them
                // can hold (the head's exchange is a collective, every rank the same chunks).
                let free = d
                    .free_memory()
                    .map_or(LOGPROB_CHUNK_BYTES as u64, |f| f / 8);
                let mine =
                    rows(LOGPROB_CHUNK_BYTES_GPU.min(usize::try_from(free).unwrap_or(usize::MAX)));
                fewest_over_ranks(comm, mine)?
            }
        };
        self.forward_logprobs_by(tokens, cache, comm, rows)
    }

    /// [`Self::forward_logprobs`] with the LM head over `rows` positions at a time (every rank
    /// must pass the same `rows`).
    pub fn forward_logprobs_by(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        comm: &dyn Communicator,
        rows: usize,
    ) -> Result<Vec<f64>, ModelError> {
        check_single(cache)?;
        let x = self.hidden(tokens, 1, cache, Logits::All, comm)?;
        let n = tokens.len() - 1;
        let rows = rows.max(1);
        let mut out = Vec::with_capacity(n);
        // Every rank takes the same chunks: the head's exchange is a collective.
        for a in (0..n).step_by(rows) {
            let b = (a + rows).min(n);
            let x = x.rows(a, b)?;
            out.extend(self.head.logprobs(
                &x,
                &tokens[a + 1..b + 1],
                comm,
                self.shard.vocab.start,
            )?);
        }
        Ok(out)
    }

    /// An empty cache for `batch` sequences decoded in lockstep (all at the same position).
    pub fn new_cache_batch(&self, capacity: usize, batch: usize) -> Result<KvCache, ModelError> {
        let row = batch * self.shard.kv_heads.len() * self.cfg.head_dim;
        let mut c = KvCache::new(self.cfg.num_layers, row, capacity, self.dtype, self.device)?;
        c.batch = batch;
        Ok(c)
    }

    /// One step of `tokens.len()` sequences decoded in lockstep (one token each, all at the
    /// position `cache.len()`): static batching, as HF `generate` batches equal-length prompts.
    /// Returns `[batch, vocab]` logits.
    pub fn forward_lockstep(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        comm: &dyn Communicator,
    ) -> Result<Vec<f32>, ModelError> {
        check_lockstep(tokens, cache)?;
        self.run(tokens, cache.batch, cache, Logits::All, comm)
    }

    /// As [`Self::forward_lockstep`], returning each sequence's greedy next token instead of logits
    /// (the logits never leave the device).
    pub fn forward_lockstep_greedy(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        comm: &dyn Communicator,
    ) -> Result<Vec<u32>, ModelError> {
        check_lockstep(tokens, cache)?;
        let x = self.hidden(tokens, cache.batch, cache, Logits::All, comm)?;
        self.head.greedy(&x, comm, self.shard.vocab.start)
    }

    /// The last position's logits of each sequence of `cache` after `tokens` (appended to it), as
    /// draws asking `asks` need them ([`ParallelLmHead::for_draw`]): with candidates asked for,
    /// only each row's candidates leave the devices. One sequence takes any number of tokens; a
    /// lockstep batch one a sequence.
    pub fn forward_for_draw(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        asks: Option<&[Candidates]>,
        comm: &dyn Communicator,
    ) -> Result<DrawLogits, ModelError> {
        // Checked before the step, so a refused ask leaves the cache as it was.
        self.head.check_asks(asks, cache.batch)?;
        let x = if cache.batch == 1 {
            self.hidden(tokens, 1, cache, Logits::Last, comm)?
        } else {
            check_lockstep(tokens, cache)?;
            self.hidden(tokens, cache.batch, cache, Logits::All, comm)?
        };
        self.head.for_draw(&self.head.local_logits(&x)?, asks, comm)
    }

    /// The greedy next token after `tokens` (appended to `cache`).
    pub fn forward_greedy(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        comm: &dyn Communicator,
    ) -> Result<u32, ModelError> {
        let x = self.hidden(tokens, 1, cache, Logits::Last, comm)?;
        Ok(self.head.greedy(&x, comm, self.shard.vocab.start)?[0])
    }

    fn run(
        &self,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        logits: Logits,
        comm: &dyn Communicator,
    ) -> Result<Vec<f32>, ModelError> {
        let x = self.hidden(tokens, batch, cache, logits, comm)?;
        self.head.forward(&x, comm)
    }

    /// The final-norm hidden states of the rows `logits` asks for.
    fn hidden(
        &self,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        logits: Logits,
        comm: &dyn Communicator,
    ) -> Result<Tensor, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Input("forward needs at least one token".into()));
        }
        self.check_tokens(tokens)?;
        let start = cache.len();
        let mut x = self.embed.forward(tokens, comm)?;
        let mut delta = None;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            delta = Some(layer.forward(&mut x, delta.take(), batch, start, kv, comm)?);
        }
        cache.advance(tokens.len() / batch);
        // The last layer's MLP output is this rank's part: summed (with the add and the final
        // norm, where the communicator fuses them) before the norm.
        let delta = match delta {
            Some(mut d) => match self.norm.reduce_add(&mut x, &mut d, comm)? {
                Some(y) if logits == Logits::Last => return Ok(y.rows(y.dim(0) - 1, y.dim(0))?),
                Some(y) => return Ok(y),
                None => Some(d),
            },
            None => None,
        };
        match (delta, logits) {
            (Some(d), Logits::All) => self.norm.forward_add(&mut x, &d),
            (d, _) => {
                if let Some(d) = d {
                    ops::add_inplace(&mut x, &d)?;
                }
                if logits == Logits::Last {
                    x = x.rows(tokens.len() - 1, tokens.len())?;
                }
                self.norm.forward(&x)
            }
        }
    }

    /// Refuses token ids outside the vocabulary (a bad request, not a crash).
    fn check_tokens(&self, tokens: &[u32]) -> Result<(), ModelError> {
        self.cfg.check_tokens(tokens)
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

/// A decode step of a lockstep batch captured as a CUDA graph (see `tessera_tensor::cuda::graph`).
#[cfg(feature = "cuda")]
pub struct LockstepGraph {
    graph: tessera_tensor::cuda::graph::DecodeGraph,
    /// Where a step captured for its logits ([`LlamaModel::capture_lockstep_logits`]) leaves this
    /// rank's `[batch, vocab rows]`: outside the graph's arena, read after each replay. `None`:
    /// a greedy step's graph.
    logits: Option<Tensor>,
}

#[cfg(feature = "cuda")]
impl LockstepGraph {
    /// What the capture recorded (nodes by kind, programmatic edges).
    pub fn stats(&self) -> Result<tessera_tensor::cuda::graph::GraphStats, ModelError> {
        Ok(self.graph.stats()?)
    }
}

#[cfg(feature = "cuda")]
impl LlamaModel {
    /// Captures one greedy decode step of `cache`'s lockstep batch. Run at least one eager step
    /// first (kernels compiled, tables uploaded, cuBLAS initialised). The cache must not grow while
    /// the graph is in use: give it the capacity of the whole run.
    pub fn capture_lockstep_greedy(
        &self,
        cache: &mut KvCache,
        comm: &dyn Communicator,
    ) -> Result<LockstepGraph, ModelError> {
        let graph =
            self.capture_lockstep(cache, comm, |x| self.head.local_argmax(x).map(|_| ()))?;
        Ok(LockstepGraph {
            graph,
            logits: None,
        })
    }

    /// Captures one decode step of `cache`'s lockstep batch up to this rank's logits, for steps
    /// that sample ([`Self::step_lockstep_graph_logits`]); as
    /// [`Self::capture_lockstep_greedy`] otherwise.
    pub fn capture_lockstep_logits(
        &self,
        cache: &mut KvCache,
        comm: &dyn Communicator,
    ) -> Result<LockstepGraph, ModelError> {
        let rows = cache.batch * self.head.weight.dim(0);
        let mut out = tessera_tensor::Storage::zeros_on(self.dtype, rows, self.device)?;
        let graph = self.capture_lockstep(cache, comm, |x| {
            // Copied out of the graph's intermediates into memory the graph does not own.
            Ok(out.copy_from(0, self.head.local_logits(x)?.storage())?)
        })?;
        let shape = vec![cache.batch, self.head.weight.dim(0)];
        Ok(LockstepGraph {
            graph,
            logits: Some(Tensor::new(shape, out)?),
        })
    }

    /// Records a lockstep decode step whose last hidden states go to `head`.
    fn capture_lockstep(
        &self,
        cache: &mut KvCache,
        comm: &dyn Communicator,
        mut head: impl FnMut(&Tensor) -> Result<(), ModelError>,
    ) -> Result<tessera_tensor::cuda::graph::DecodeGraph, ModelError> {
        let Device::Cuda(ordinal) = self.device else {
            return Err(ModelError::Input(
                "CUDA graphs need a model on a CUDA device".into(),
            ));
        };
        // A step of a full cache would grow it inside the capture, into memory of the graph.
        Self::room_for_a_captured_step(cache)?;
        let len = cache.len();
        let batch = cache.batch;
        let tokens = vec![0u32; batch];
        // Recorded twice (to size the graph's arena, then for real): each time from this length.
        let graph = tessera_tensor::cuda::graph::DecodeGraph::capture(ordinal, batch, || {
            cache.set_len(len);
            let x = self.hidden(&tokens, batch, cache, Logits::All, comm)?;
            head(&x)
        });
        // Capturing records the step without running it.
        cache.set_len(len);
        graph
    }

    /// A captured step cannot grow the cache: it needs a free position.
    fn room_for_a_captured_step(cache: &KvCache) -> Result<(), ModelError> {
        if cache.len() >= cache.capacity() {
            return Err(ModelError::Input(format!(
                "the KV cache is full ({} positions): a captured step cannot grow it",
                cache.capacity()
            )));
        }
        Ok(())
    }

    /// One greedy decode step through a captured graph: the same tokens as
    /// [`Self::forward_lockstep_greedy`], with one launch instead of hundreds.
    pub fn step_lockstep_graph(
        &self,
        g: &mut LockstepGraph,
        tokens: &[u32],
        cache: &mut KvCache,
        comm: &dyn Communicator,
    ) -> Result<Vec<u32>, ModelError> {
        if g.logits.is_some() {
            return Err(ModelError::Input(
                "a step captured for its logits replayed as a greedy one".into(),
            ));
        }
        Self::room_for_a_captured_step(cache)?;
        self.check_tokens(tokens)?;
        let local = g.graph.replay(tokens, cache.len())?;
        cache.advance(1);
        self.head.pick(local, comm, self.shard.vocab.start)
    }

    /// One decode step through a graph of [`Self::capture_lockstep_logits`]: the logits
    /// `[batch, vocab]` on the host, as [`Self::forward_lockstep`] gives them, with one launch
    /// instead of hundreds (then the ranks' gather).
    pub fn step_lockstep_graph_logits(
        &self,
        g: &mut LockstepGraph,
        tokens: &[u32],
        cache: &mut KvCache,
        comm: &dyn Communicator,
    ) -> Result<Vec<f32>, ModelError> {
        let local = self.replay_to_logits(g, tokens, cache)?;
        self.head.gather(local, comm)
    }

    /// One decode step through a graph of [`Self::capture_lockstep_logits`], its logits as draws
    /// asking `asks` need them: as [`Self::forward_for_draw`] gives them.
    pub fn step_lockstep_graph_for_draw(
        &self,
        g: &mut LockstepGraph,
        tokens: &[u32],
        cache: &mut KvCache,
        asks: Option<&[Candidates]>,
        comm: &dyn Communicator,
    ) -> Result<DrawLogits, ModelError> {
        // Checked before the step, so a refused ask leaves the cache as it was.
        self.head.check_asks(asks, cache.batch)?;
        let local = self.replay_to_logits(g, tokens, cache)?;
        self.head.for_draw(local, asks, comm)
    }

    /// Replays a logits graph `g` for `tokens`: this rank's logits, on its device.
    fn replay_to_logits<'g>(
        &self,
        g: &'g mut LockstepGraph,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<&'g Tensor, ModelError> {
        let Some(local) = &g.logits else {
            return Err(ModelError::Input(
                "a greedy step's graph replayed for its logits".into(),
            ));
        };
        Self::room_for_a_captured_step(cache)?;
        self.check_tokens(tokens)?;
        g.graph.launch(tokens, cache.len())?;
        cache.advance(1);
        Ok(local)
    }
}

#[cfg(test)]
mod tests {
    /// Every rank gets the fewest of the ranks' values (score's head chunks agree across ranks).
    #[test]
    fn the_ranks_agree_on_the_fewest_rows() {
        for tp in [1, 2, 3] {
            let got = tessera_comm::spmd::run_threads(
                tessera_comm::LocalGroup::new(tp).into_comms(),
                |rank, comm| {
                    super::fewest_over_ranks(&comm, [700, 130, 2093][rank])
                        .map_err(|e| e.to_string())
                },
                |rank, msg| format!("rank {rank} panicked: {msg}"),
            );
            let want = [700, 130, 130][tp - 1];
            for r in got {
                assert_eq!(r.unwrap(), want, "tp {tp}");
            }
        }
    }
}

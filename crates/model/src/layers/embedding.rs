//! Vocab-parallel embedding and LM head (Megatron): each rank owns a contiguous range of vocab rows.
//! The embedding looks up the tokens it owns and an all-reduce fills in the rest; the head computes
//! the logits of its rows and an all-gather assembles the full vocabulary on every rank.

use std::sync::Arc;

use rayon::prelude::*;

use tessera_comm::{CommExt, Communicator, ReduceOp};
use tessera_tensor::{ops, Candidates, DType, Storage, Tensor};

use crate::checkpoint::Checkpoint;
use crate::tp::TpShard;
use crate::ModelError;

pub struct VocabParallelEmbedding {
    /// Rows `vocab_start..vocab_start + rows` of the table (shared with a tied LM head).
    pub table: Arc<Tensor>,
    pub vocab_start: usize,
}

impl VocabParallelEmbedding {
    pub fn load(
        ck: &Checkpoint,
        name: &str,
        vocab: usize,
        hidden: usize,
        shard: &TpShard,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let table = ck.read_rows(
            name,
            &[vocab, hidden],
            shard.vocab.start,
            shard.vocab.end,
            dtype,
        )?;
        Ok(VocabParallelEmbedding {
            table: Arc::new(table),
            vocab_start: shard.vocab.start,
        })
    }

    pub fn forward(&self, tokens: &[u32], comm: &dyn Communicator) -> Result<Tensor, ModelError> {
        let mut x = ops::embedding(&self.table, tokens, self.vocab_start, self.table.dtype())?;
        if comm.world_size() > 1 {
            comm.all_reduce_tensor(&mut x, ReduceOp::Sum)?;
        }
        Ok(x)
    }
}

/// The logits a step's draws need, as [`ParallelLmHead::for_draw`] gives them.
#[derive(Debug, Clone, PartialEq)]
pub enum DrawLogits {
    /// Per row, (id, logit) of every token whose logit is at least the row's k-th largest (ties
    /// at the edge included), and at tp > 1 some below it (each rank's own k largest), and of
    /// every id the row's draw asked for, by id: what `Sampler::sample_top` draws from.
    Top(Vec<Vec<(u32, f32)>>),
    /// Every row's logits `[rows, vocab]` (no top-k asked for, or a row whose candidates passed
    /// their room or held a NaN or +inf).
    Full(Vec<f32>),
}

/// The asks [`ParallelLmHead::for_draw`] finds candidates for: `None` where none are given or one
/// asks for no candidates (the whole logits then).
fn taken(asks: Option<&[Candidates]>) -> Option<&[Candidates]> {
    asks.filter(|a| a.iter().all(|c| c.k > 0))
}

/// `a` and `b` (each by id, its ids distinct) as one list by id, an id in both once (from `a`).
fn merge_by_id(a: &[(u32, f32)], b: impl Iterator<Item = (u32, f32)>) -> Vec<(u32, f32)> {
    let mut out = Vec::with_capacity(a.len() + b.size_hint().0);
    let mut a = a.iter().copied().peekable();
    for q in b {
        while let Some(&p) = a.peek() {
            if p.0 > q.0 {
                break;
            }
            out.push(p);
            a.next();
        }
        if out.last().is_none_or(|p| p.0 != q.0) {
            out.push(q);
        }
    }
    out.extend(a);
    out
}

/// Room for a row's candidates on each rank at top-k `k`: ties at the k-th largest (common among
/// bf16 logits) stay within it unless far more than usual are equal; past it the step falls back
/// to the whole rows.
pub fn top_k_room(k: usize) -> usize {
    2 * k + 64
}

pub struct ParallelLmHead {
    pub weight: Arc<Tensor>,
    pub vocab: usize,
    /// Rows every rank pads its logits to before the gather.
    pub padded: usize,
    pub tp_size: usize,
}

impl ParallelLmHead {
    pub fn load(
        ck: &Checkpoint,
        vocab: usize,
        hidden: usize,
        shard: &TpShard,
        tied: Option<&VocabParallelEmbedding>,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let weight = match tied {
            Some(e) => e.table.clone(),
            None => Arc::new(ck.read_rows(
                "lm_head.weight",
                &[vocab, hidden],
                shard.vocab.start,
                shard.vocab.end,
                dtype,
            )?),
        };
        Ok(ParallelLmHead {
            weight,
            vocab,
            padded: shard.vocab_padded,
            tp_size: shard.tp.size,
        })
    }

    /// Logits `[tokens, vocab]` as f32 (rounded to the compute dtype first, as HF's are).
    pub fn forward(&self, x: &Tensor, comm: &dyn Communicator) -> Result<Vec<f32>, ModelError> {
        self.gather(&self.local_logits(x)?, comm)
    }

    /// This rank's logits `[tokens, its vocab rows]`, where `x` lies, in the compute dtype.
    pub fn local_logits(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(ops::matmul_t(x, &self.weight, None)?)
    }

    /// The full logits `[tokens, vocab]` as f32 on the host, from every rank's
    /// [`Self::local_logits`].
    pub fn gather(&self, local: &Tensor, comm: &dyn Communicator) -> Result<Vec<f32>, ModelError> {
        let t = local.dim(0);
        if self.tp_size == 1 {
            return Ok(local.to_f32_vec());
        }
        // Ranks' shards may differ by a row: each sends `t * padded` values, its own `[t, rows]`
        // first. Gathered where the logits lie (over NVLink between GPUs), in the compute
        // dtype, then one copy to the host.
        let chunk = t * self.padded;
        let padded = || -> Result<Tensor, tessera_tensor::TensorError> {
            let mut send = Storage::zeros_on(local.dtype(), chunk, local.device())?;
            send.copy_from(0, local.storage())?;
            Tensor::new(vec![chunk], send)
        };
        // A rank that cannot take its part (out of memory) stops the others' gather at once.
        let send = padded().inspect_err(|e| comm.abort(&format!("rank {}: {e}", comm.rank())))?;
        let all = comm.all_gather_tensor(&send)?.to_f32_vec();
        // Rank r's rows of each position into place, the positions over the host's threads (a
        // batch's logits are tens of MB: one thread took 2-3 ms at 32 positions of 128k).
        let mut out = vec![0.0f32; t * self.vocab];
        let tp = self.tp_size;
        out.par_chunks_mut(self.vocab)
            .enumerate()
            .for_each(|(i, row)| {
                for r in 0..tp {
                    let range = crate::tp::split_range(self.vocab, tp, r);
                    let n = range.len();
                    row[range].copy_from_slice(&all[r * chunk + i * n..r * chunk + (i + 1) * n]);
                }
            });
        Ok(out)
    }

    /// Refuses `asks` that [`Self::for_draw`] cannot take for `rows` rows of logits (one a row,
    /// asked ids within the vocabulary and ascending; asks it answers with the whole logits pass):
    /// checked before a step runs, so a refused request leaves the KV cache as it was, on every
    /// rank alike (before any collective).
    pub fn check_asks(&self, asks: Option<&[Candidates]>, rows: usize) -> Result<(), ModelError> {
        let Some(asks) = taken(asks) else {
            return Ok(());
        };
        if asks.len() != rows {
            return Err(ModelError::Input(format!(
                "{} draws' candidates asked of {rows} rows of logits",
                asks.len()
            )));
        }
        if let Some(id) = asks
            .iter()
            .flat_map(|c| &c.ids)
            .find(|&&id| id as usize >= self.vocab)
        {
            return Err(ModelError::Input(format!(
                "a draw asked for token {id}'s logit of a vocabulary of {}",
                self.vocab
            )));
        }
        if asks.iter().any(|c| c.ids.windows(2).any(|w| w[0] >= w[1])) {
            return Err(ModelError::Input(
                "a draw's asked ids are not in ascending order".into(),
            ));
        }
        Ok(())
    }

    /// What a step's draws need of this rank's logits `local` (`[rows, its vocab rows]`, as
    /// [`Self::local_logits`] gives them), on every rank: `asks` holds a row's
    /// [`Candidates`] (`Sampler::candidates_for`), one a row, the same on every rank. Each rank
    /// finds on its device every logit of its own rows at least their k-th largest
    /// (`ops::top_k_rows`, k the largest asked) and reads the logits of the asked ids it holds
    /// (`ops::gather_values`), and the ranks gather those (a few KB) instead of the logits: the
    /// vocabulary's k-th largest is at least each rank's own, so the union holds every token the
    /// draw keeps. Where some row's candidates passed their room ([`top_k_room`]) or held a NaN
    /// or +inf, every rank sees it in the gathered candidates and all fall back to
    /// [`Self::gather`] together. Without `asks` (or one asking for no candidates):
    /// [`Self::gather`].
    pub fn for_draw(
        &self,
        local: &Tensor,
        asks: Option<&[Candidates]>,
        comm: &dyn Communicator,
    ) -> Result<DrawLogits, ModelError> {
        let (t, n) = (local.dim(0), local.dim(1));
        self.check_asks(asks, t)?;
        let Some(asks) = taken(asks) else {
            return Ok(DrawLogits::Full(self.gather(local, comm)?));
        };
        let k = asks.iter().map(|c| c.k).max().unwrap_or(1);
        let cap = top_k_room(k);
        // A rank that cannot take its part (out of memory) stops the others' gather at once.
        let stop = |e: &tessera_tensor::TensorError| {
            if self.tp_size > 1 {
                comm.abort(&format!("rank {}: {e}", comm.rank()))
            }
        };
        let packed = ops::top_k_rows(local, k.min(n), cap).inspect_err(stop)?;
        // The asked ids' logits this rank holds (a row's ids are in its own vocabulary range).
        let mine = crate::tp::split_range(self.vocab, self.tp_size, comm.rank());
        let asked: Vec<(usize, u32)> = asks
            .iter()
            .enumerate()
            .flat_map(|(r, c)| c.ids.iter().map(move |&id| (r, id)))
            .collect();
        let picks: Vec<(usize, usize)> = asked
            .iter()
            .filter(|p| mine.contains(&(p.1 as usize)))
            .map(|&(r, id)| (r, id as usize - mine.start))
            .collect();
        let held = ops::gather_values(local, &picks).inspect_err(stop)?;
        let (all, asked_values) = if self.tp_size == 1 {
            (packed.to_f32_vec(), held)
        } else {
            let all = comm.all_gather_tensor(&packed)?.to_f32_vec();
            // Each asked id's logit from the rank that holds it: every rank sends a value for
            // each (its own, or 0), in the order of `asked`.
            let mut values = vec![0.0f32; asked.len()];
            if !asked.is_empty() {
                let mut held = held.into_iter();
                let send: Vec<u8> = asked
                    .iter()
                    .map(|p| match mine.contains(&(p.1 as usize)) {
                        true => held.next().expect("one value a pick"),
                        false => 0.0,
                    })
                    .flat_map(f32::to_le_bytes)
                    .collect();
                let mut recv = vec![0u8; send.len() * self.tp_size];
                comm.all_gather_bytes(&send, &mut recv)?;
                for (j, (v, &(_, id))) in values.iter_mut().zip(&asked).enumerate() {
                    let owner = (0..self.tp_size)
                        .find(|&r| {
                            crate::tp::split_range(self.vocab, self.tp_size, r)
                                .contains(&(id as usize))
                        })
                        .expect("an asked id is in the vocabulary");
                    let at = (owner * asked.len() + j) * 4;
                    *v = f32::from_le_bytes(recv[at..at + 4].try_into().expect("4 bytes"));
                }
            }
            (all, values)
        };
        let per_rank = t * ops::top_k_row_len(cap);
        let mut rows = vec![Vec::new(); t];
        for (r, part) in all.chunks_exact(per_rank).enumerate() {
            let start = crate::tp::split_range(self.vocab, self.tp_size, r).start as u32;
            for (row, got) in rows.iter_mut().zip(ops::unpack_top_k(part, cap)) {
                if !got.complete() {
                    return Ok(DrawLogits::Full(self.gather(local, comm)?));
                }
                // Ranks hold ascending ranges: the row stays by id.
                row.extend(got.entries.iter().map(|&(j, l)| (j + start, l)));
            }
        }
        if !asked.is_empty() {
            // Each row's asked (id, logit) pairs, by id as asked, merged into its candidates
            // (by id) in one pass, the rows over the host's threads; a candidate that is also
            // asked for is the same logit, kept once.
            let mut at = 0;
            let asked_rows: Vec<&[f32]> = asks
                .iter()
                .map(|c| {
                    at += c.ids.len();
                    &asked_values[at - c.ids.len()..at]
                })
                .collect();
            rows.par_iter_mut()
                .zip(asks.par_iter().zip(asked_rows))
                .for_each(|(row, (c, values))| {
                    let top = std::mem::take(row);
                    *row = merge_by_id(&top, c.ids.iter().copied().zip(values.iter().copied()));
                });
        }
        Ok(DrawLogits::Top(rows))
    }

    /// `log p(targets[i])` of each row of `x`, in f64, without the logits leaving a rank: each
    /// rank takes the log-sum-exp of its own vocab rows (on its device) and, where it holds the
    /// target, the target's logit; the ranks exchange those (three f64 a row) instead of the
    /// logits. The logits are rounded to the compute dtype first, as HF's are.
    pub fn logprobs(
        &self,
        x: &Tensor,
        targets: &[u32],
        comm: &dyn Communicator,
        vocab_start: usize,
    ) -> Result<Vec<f64>, ModelError> {
        let local = self.local_logits(x)?;
        let rows = self.weight.dim(0);
        let mine: Vec<Option<usize>> = targets
            .iter()
            .map(|&t| (t as usize).checked_sub(vocab_start).filter(|&j| j < rows))
            .collect();
        let parts = ops::logsumexp_rows(&local, &mine)?;
        if self.tp_size == 1 {
            return Ok(parts
                .into_iter()
                .map(|(lse, t)| t.unwrap_or(f64::NAN) - lse)
                .collect());
        }
        // A row's (log-sum-exp, target logit, 1 where this rank holds the target), as bytes.
        let send: Vec<u8> = parts
            .iter()
            .flat_map(|&(lse, t)| [lse, t.unwrap_or(0.0), t.map_or(0.0, |_| 1.0)])
            .flat_map(f64::to_le_bytes)
            .collect();
        let mut recv = vec![0u8; send.len() * self.tp_size];
        comm.all_gather_bytes(&send, &mut recv)?;
        let all: Vec<f64> = recv
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let n = parts.len();
        Ok((0..n)
            .map(|r| {
                let of = |k: usize| &all[(k * n + r) * 3..(k * n + r) * 3 + 3];
                let max = (0..self.tp_size)
                    .map(|k| of(k)[0])
                    .fold(f64::NEG_INFINITY, f64::max);
                let lse = max
                    + (0..self.tp_size)
                        .map(|k| (of(k)[0] - max).exp())
                        .sum::<f64>()
                        .ln();
                // Exactly one rank holds each target (it is in the vocabulary).
                let t = (0..self.tp_size)
                    .find(|&k| of(k)[2] == 1.0)
                    .map_or(f64::NAN, |k| of(k)[1]);
                // A NaN anywhere stays NaN (max would skip it).
                if (0..self.tp_size).any(|k| of(k)[0].is_nan()) {
                    return f64::NAN;
                }
                t - lse
            })
            .collect())
    }

    /// The greedy token of each row of `x`: each rank takes the argmax of its own vocab rows on its
    /// device, and the ranks exchange one (value, index) pair per row instead of the logits.
    pub fn greedy(
        &self,
        x: &Tensor,
        comm: &dyn Communicator,
        vocab_start: usize,
    ) -> Result<Vec<u32>, ModelError> {
        let local = self.local_argmax(x)?;
        self.pick(local, comm, vocab_start)
    }

    /// Each row's (largest logit, index) among this rank's vocab rows.
    pub fn local_argmax(&self, x: &Tensor) -> Result<Vec<(f32, u32)>, ModelError> {
        Ok(ops::argmax_rows(&self.local_logits(x)?)?)
    }

    /// The global greedy tokens from every rank's local (value, index) pairs.
    pub fn pick(
        &self,
        local: Vec<(f32, u32)>,
        comm: &dyn Communicator,
        vocab_start: usize,
    ) -> Result<Vec<u32>, ModelError> {
        // A NaN or +inf logit leaves no greedy token to take (an overflow's +inf would win
        // every row at its lowest index): an error, as a draw gives.
        let nan = |row: usize| ModelError::NotANumber(format!("at row {row}"));
        let broken = |v: f32| v.is_nan() || v == f32::INFINITY;
        if self.tp_size == 1 {
            return local
                .into_iter()
                .enumerate()
                .map(|(r, (v, i))| if broken(v) { Err(nan(r)) } else { Ok(i) })
                .collect();
        }
        // Indices travel as f32: exact below 2^24, far above any vocabulary.
        let send: Vec<f32> = local
            .iter()
            .flat_map(|&(v, i)| [v, (i as usize + vocab_start) as f32])
            .collect();
        let mut recv = vec![0.0f32; send.len() * self.tp_size];
        comm.all_gather(&send, &mut recv)?;
        let rows = local.len();
        (0..rows)
            .map(|r| {
                // Ranks hold ascending vocab ranges, so the first maximum is the lowest index.
                let mut best = (f32::NEG_INFINITY, 0u32);
                for k in 0..self.tp_size {
                    let (v, i) = (recv[k * 2 * rows + 2 * r], recv[k * 2 * rows + 2 * r + 1]);
                    if broken(v) {
                        return Err(nan(r));
                    }
                    if v > best.0 {
                        best = (v, i as u32);
                    }
                }
                Ok(best.1)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::merge_by_id;

    #[test]
    fn merged_by_id_once_each() {
        let a = [(1u32, 1.0f32), (4, 4.0), (9, 9.0)];
        let b = [(0u32, 0.5f32), (4, 4.0), (5, 5.0), (12, 12.0)];
        let got = merge_by_id(&a, b.iter().copied());
        let ids: Vec<u32> = got.iter().map(|p| p.0).collect();
        assert_eq!(ids, [0, 1, 4, 5, 9, 12]);
        assert!(got
            .iter()
            .all(|p| p.1 == if p.0 == 0 { 0.5 } else { p.0 as f32 }));
        assert_eq!(merge_by_id(&a, std::iter::empty()), a);
        assert_eq!(merge_by_id(&[], b.iter().copied()), b);
    }
}

//! Training data: token shards on disk (written by `tessera data prepare`) and the loader that
//! gives each data-parallel rank distinct, deterministic micro-batches.
//!
//! A dataset directory holds `meta.json` and little-endian token shards (`train_00000.bin`,
//! `val_00000.bin`, ...; u16 when the vocabulary fits, else u32). Samples are non-overlapping
//! windows of `seq + 1` tokens; each epoch visits them in an order drawn from the seed and the
//! epoch. Global sample `i` of the run is a pure function of `(seed, seq, i)`, so the loader's
//! whole state is the number of samples consumed: a resumed run continues exactly, at any dp.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::files::{stays_in_dir, NewFiles};
use crate::TrainError;

/// Tokens per shard file.
pub const SHARD_TOKENS: usize = 1 << 24;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitMeta {
    pub shards: Vec<String>,
    pub tokens: u64,
}

/// `meta.json` of a dataset directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetMeta {
    pub format: String,
    /// `u16` or `u32`.
    pub dtype: String,
    pub vocab_size: usize,
    pub train: SplitMeta,
    pub val: SplitMeta,
    /// The tokenizer file in the directory, when there is one.
    pub tokenizer: Option<String>,
}

pub const FORMAT: &str = "tessera-tokens-v1";

fn data_err(msg: impl Into<String>) -> TrainError {
    TrainError::Data(msg.into())
}

/// Writes a dataset directory: shards of both splits, then `meta.json` (last, atomically, so a
/// directory with a `meta.json` is complete). A failure (a full disk) takes back what this call
/// wrote, so a retry finds `dir` as it was.
pub fn write_dataset(
    dir: &Path,
    train: &[u32],
    val: &[u32],
    vocab_size: usize,
    tokenizer: Option<&Path>,
) -> Result<DatasetMeta, TrainError> {
    // The width is set by the vocabulary, which must hold every id written: an id past it is an
    // error, never a truncated token.
    if let Some(&bad) = train.iter().chain(val).find(|&&t| t as usize >= vocab_size) {
        return Err(data_err(format!(
            "token id {bad} is outside the vocabulary of {vocab_size}"
        )));
    }
    let wide = vocab_size > u16::MAX as usize + 1;
    let mut files = NewFiles::create(dir)?;
    let mut write_split = |name: &str, toks: &[u32]| -> Result<SplitMeta, TrainError> {
        let mut shards = vec![];
        for (i, chunk) in toks.chunks(SHARD_TOKENS).enumerate() {
            let file = format!("{name}_{i:05}.bin");
            let mut bytes = Vec::with_capacity(chunk.len() * if wide { 4 } else { 2 });
            for &t in chunk {
                if wide {
                    bytes.extend_from_slice(&t.to_le_bytes());
                } else {
                    let t = u16::try_from(t).map_err(|_| {
                        data_err(format!("token id {t} does not fit the u16 shards"))
                    })?;
                    bytes.extend_from_slice(&t.to_le_bytes());
                }
            }
            files.write(&dir.join(&file), &bytes)?;
            shards.push(file);
        }
        Ok(SplitMeta {
            shards,
            tokens: toks.len() as u64,
        })
    };
    let train = write_split("train", train)?;
    let val = write_split("val", val)?;
    let tokenizer = match tokenizer {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| TrainError::io(p, e))?;
            files.write(&dir.join("tokenizer.json"), &bytes)?;
            Some("tokenizer.json".to_string())
        }
        None => None,
    };
    let meta = DatasetMeta {
        format: FORMAT.into(),
        dtype: if wide { "u32" } else { "u16" }.into(),
        vocab_size,
        train,
        val,
        tokenizer,
    };
    let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
    files.write(&dir.join("meta.json"), &json)?;
    files.finish();
    Ok(meta)
}

/// A dataset directory, opened and checked.
pub struct Dataset {
    pub dir: PathBuf,
    pub meta: DatasetMeta,
}

impl Dataset {
    pub fn open(dir: &Path) -> Result<Self, TrainError> {
        let path = dir.join("meta.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            data_err(format!(
                "{} is not a dataset directory (no readable meta.json: {e}); make one with `tessera data prepare`",
                dir.display()
            ))
        })?;
        let meta: DatasetMeta = serde_json::from_str(&text)
            .map_err(|e| data_err(format!("{}: invalid meta.json: {e}", dir.display())))?;
        if meta.format != FORMAT {
            return Err(data_err(format!(
                "{}: format {:?} is not {FORMAT}",
                dir.display(),
                meta.format
            )));
        }
        if meta.dtype != "u16" && meta.dtype != "u32" {
            return Err(data_err(format!(
                "{}: dtype must be u16 or u32",
                dir.display()
            )));
        }
        // A shard listed twice (in one split or in both) would be loaded twice: refused, so a
        // meta.json naming one file many times cannot multiply what is read into memory.
        let mut seen = std::collections::HashSet::new();
        for f in meta.train.shards.iter().chain(&meta.val.shards) {
            let norm: PathBuf = Path::new(f)
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect();
            if !seen.insert(norm) {
                return Err(data_err(format!(
                    "{}: meta.json lists shard {f:?} more than once",
                    dir.display()
                )));
            }
        }
        // The tokenizer a checkpoint copies when it is saved: found now, not after training.
        if let Some(t) = &meta.tokenizer {
            if !stays_in_dir(t) || !dir.join(t).is_file() {
                return Err(data_err(format!(
                    "{}: meta.json names tokenizer {t:?}, which is not a file of the directory",
                    dir.display()
                )));
            }
        }
        Ok(Dataset {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    /// All tokens of a split (`"train"` or `"val"`), checked against the vocabulary.
    pub fn tokens(&self, split: &str) -> Result<Vec<u32>, TrainError> {
        let s = match split {
            "train" => &self.meta.train,
            "val" => &self.meta.val,
            _ => return Err(data_err(format!("no split {split:?}"))),
        };
        let width = if self.meta.dtype == "u32" { 4 } else { 2 };
        // Sized by the shards' files, not by meta.json's count, which may be anything: the files
        // are measured (and must be regular files, not a device that reads forever) before any is
        // read, and what they hold must fit the host's memory.
        let mut total: u64 = 0;
        for f in &s.shards {
            if !stays_in_dir(f) {
                return Err(data_err(format!("shard name {f:?} leaves the directory")));
            }
            let p = self.dir.join(f);
            let md = std::fs::metadata(&p).map_err(|e| TrainError::io(&p, e))?;
            if !md.is_file() {
                return Err(data_err(format!(
                    "{}: shard is not a regular file",
                    p.display()
                )));
            }
            if md.len() % width as u64 != 0 {
                return Err(data_err(format!("{}: truncated shard", p.display())));
            }
            total = total.saturating_add(md.len() / width as u64);
        }
        if total != s.tokens {
            return Err(data_err(format!(
                "{}: {split} holds {total} tokens, meta.json says {}",
                self.dir.display(),
                s.tokens
            )));
        }
        check_fits_memory(&self.dir, split, total, available_memory())?;
        let mut out = Vec::new();
        for f in &s.shards {
            let p = self.dir.join(f);
            let bytes = std::fs::read(&p).map_err(|e| TrainError::io(&p, e))?;
            if bytes.len() % width != 0 {
                return Err(data_err(format!("{}: truncated shard", p.display())));
            }
            out.reserve(bytes.len() / width);
            out.extend(bytes.chunks(width).map(|c| {
                if width == 4 {
                    u32::from_le_bytes(c.try_into().unwrap())
                } else {
                    u16::from_le_bytes(c.try_into().unwrap()) as u32
                }
            }));
        }
        if out.len() as u64 != s.tokens {
            return Err(data_err(format!(
                "{}: {split} holds {} tokens, meta.json says {}",
                self.dir.display(),
                out.len(),
                s.tokens
            )));
        }
        if let Some(&bad) = out.iter().find(|&&t| t as usize >= self.meta.vocab_size) {
            return Err(data_err(format!(
                "{}: token {bad} is outside the vocabulary of {}",
                self.dir.display(),
                self.meta.vocab_size
            )));
        }
        Ok(out)
    }
}

/// The host memory available now, when it can be read: `MemAvailable`, lowered to what a
/// container's cgroup limit leaves ([`tessera_tensor::device::available_host_memory`]).
pub fn available_memory() -> Option<u64> {
    tessera_tensor::device::available_host_memory()
}

/// The most tokens (4 bytes each as u32) a process may hold with `available` bytes of host memory:
/// half of it, room left for the rest (the training loop holds copies; the tokenizer works
/// beside them). `data prepare` and [`Dataset::tokens`] both bound what they hold by it.
pub fn token_room(available: u64) -> u64 {
    available / 8
}

/// Loading `tokens` tokens must leave room: at most [`token_room`] of the memory available.
fn check_fits_memory(
    dir: &Path,
    split: &str,
    tokens: u64,
    available: Option<u64>,
) -> Result<(), TrainError> {
    let need = tokens.saturating_mul(4);
    if let Some(avail) = available {
        if tokens > token_room(avail) {
            return Err(data_err(format!(
                "{}: the {split} split holds {tokens} tokens ({:.1} GiB as u32), more than half of the {:.1} GiB of host memory available; use a smaller dataset",
                dir.display(),
                need as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            )));
        }
    }
    Ok(())
}

/// Deterministic samples of `seq + 1` tokens, shuffled per epoch.
pub struct Loader {
    tokens: Vec<u32>,
    seq: usize,
    seed: u64,
    samples: usize,
    epoch_order: Option<(u64, Vec<u32>)>,
}

impl Loader {
    pub fn new(tokens: Vec<u32>, seq: usize, seed: u64) -> Result<Self, TrainError> {
        let samples = tokens.len().saturating_sub(1) / seq.max(1);
        if seq == 0 || samples == 0 {
            return Err(data_err(format!(
                "{} tokens hold no sample of {} tokens (sequence length + 1)",
                tokens.len(),
                seq + 1
            )));
        }
        Ok(Loader {
            tokens,
            seq,
            seed,
            samples,
            epoch_order: None,
        })
    }

    pub fn samples_per_epoch(&self) -> usize {
        self.samples
    }

    /// The tokens of global sample `i` (`seq + 1` of them).
    pub fn sample(&mut self, i: u64) -> &[u32] {
        let epoch = i / self.samples as u64;
        if self.epoch_order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<u32> = (0..self.samples as u32).collect();
            let mut rng =
                ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            order.shuffle(&mut rng);
            self.epoch_order = Some((epoch, order));
        }
        let order = &self.epoch_order.as_ref().expect("set above").1;
        let s = order[(i % self.samples as u64) as usize] as usize;
        &self.tokens[s * self.seq..s * self.seq + self.seq + 1]
    }

    /// Rank `rank`'s `grad_accum` micro-batches of the global batch that starts at sample `start`
    /// (`micro * grad_accum * dp` samples: rank r takes micro-batches `r*grad_accum ..`).
    /// A data position past `u64::MAX` (a damaged checkpoint's sample count) gives no
    /// micro-batches, which `Trainer::train_step` refuses; [`Loader::try_rank_batches`] says why.
    pub fn rank_batches(
        &mut self,
        start: u64,
        micro: usize,
        grad_accum: usize,
        dp: usize,
        rank: usize,
    ) -> Vec<Vec<u32>> {
        self.try_rank_batches(start, micro, grad_accum, dp, rank)
            .unwrap_or_default()
    }

    /// [`Loader::rank_batches`], with an error when the batch's sample positions overflow.
    pub fn try_rank_batches(
        &mut self,
        start: u64,
        micro: usize,
        grad_accum: usize,
        dp: usize,
        rank: usize,
    ) -> Result<Vec<Vec<u32>>, TrainError> {
        debug_assert!(rank < dp);
        let overflow = || {
            data_err(format!(
                "data position {start} (samples consumed) plus a batch of {micro} x {grad_accum} x {dp} samples overflows; the progress it came from is damaged"
            ))
        };
        // The last sample of the whole global batch must be addressable.
        let span = micro
            .checked_mul(grad_accum)
            .and_then(|n| n.checked_mul(dp))
            .ok_or_else(overflow)?;
        start.checked_add(span as u64).ok_or_else(overflow)?;
        Ok((0..grad_accum)
            .map(|j| {
                let first = start + ((rank * grad_accum + j) * micro) as u64;
                let mut mb = Vec::with_capacity(micro * (self.seq + 1));
                for k in 0..micro as u64 {
                    mb.extend_from_slice(self.sample(first + k));
                }
                mb
            })
            .collect())
    }

    /// Evaluation micro-batches in order (no shuffle): rank `rank`'s share of the first
    /// `max_batches` batches of `micro` samples. Every rank gets the same number of batches (ZeRO-3
    /// gathers are collectives): a multiple of dp is used, or, with fewer batches than ranks, each
    /// rank evaluates one of them.
    pub fn eval_batches(
        &self,
        micro: usize,
        max_batches: usize,
        dp: usize,
        rank: usize,
    ) -> Vec<Vec<u32>> {
        let n = (self.samples / micro.max(1)).min(max_batches);
        let mine: Vec<usize> = match n {
            0 => vec![],
            n if n < dp => vec![rank % n],
            n => (0..n / dp * dp).filter(|b| b % dp == rank).collect(),
        };
        mine.into_iter()
            .map(|b| {
                let mut mb = Vec::with_capacity(micro * (self.seq + 1));
                for k in 0..micro {
                    let s = b * micro + k;
                    mb.extend_from_slice(&self.tokens[s * self.seq..s * self.seq + self.seq + 1]);
                }
                mb
            })
            .collect()
    }
}

/// Unigram cross-entropy (nats per token) of `eval` under the token frequencies of `train` with
/// add-one smoothing: the baseline a trained model must beat.
pub fn unigram_loss(train: &[u32], eval: &[u32], vocab: usize) -> f64 {
    let mut counts = vec![1.0f64; vocab];
    for &t in train {
        counts[t as usize] += 1.0;
    }
    let total: f64 = counts.iter().sum();
    let nll: f64 = eval
        .iter()
        .map(|&t| -(counts[t as usize] / total).ln())
        .sum();
    nll / eval.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_get_distinct_samples_that_cover_the_global_batch() {
        let toks: Vec<u32> = (0..1000).collect();
        let mut l = Loader::new(toks, 9, 7).unwrap();
        let one = l.rank_batches(40, 2, 4, 1, 0).concat();
        let mut two = l.rank_batches(40, 2, 2, 2, 0).concat();
        two.extend(l.rank_batches(40, 2, 2, 2, 1).concat());
        assert_eq!(one, two);
        let r0 = l.rank_batches(0, 3, 1, 2, 0).concat();
        let r1 = l.rank_batches(0, 3, 1, 2, 1).concat();
        assert_ne!(r0, r1);
        // Every sample once per epoch.
        let n = l.samples_per_epoch() as u64;
        let mut firsts: Vec<u32> = (0..n).map(|i| l.sample(i)[0]).collect();
        firsts.sort();
        assert_eq!(firsts, (0..n as u32).map(|s| s * 9).collect::<Vec<_>>());
        assert!(Loader::new(vec![1, 2], 4, 0).is_err());
    }

    #[test]
    fn dataset_round_trips_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path(), &[1, 2, 3, 299], &[4, 5], 300, None).unwrap();
        let d = Dataset::open(dir.path()).unwrap();
        assert_eq!(d.tokens("train").unwrap(), vec![1, 2, 3, 299]);
        assert_eq!(d.tokens("val").unwrap(), vec![4, 5]);
        std::fs::write(dir.path().join("val_00000.bin"), [1u8, 0, 2]).unwrap();
        assert!(d.tokens("val").is_err());
        assert!(Dataset::open(&dir.path().join("nope")).is_err());
    }

    /// Replaces `dir`'s meta.json with `m` (a damaged one, for the tests).
    fn write_meta(dir: &Path, m: &DatasetMeta) {
        std::fs::write(dir.join("meta.json"), serde_json::to_vec(m).unwrap()).unwrap();
    }

    /// A damaged meta.json: a token count far past its shards is an error, not an allocation of
    /// that many tokens; a tokenizer that is not there is found when the dataset is opened.
    #[test]
    fn meta_json_is_not_trusted_past_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let meta = write_dataset(dir.path(), &[1, 2, 3, 299], &[4, 5], 300, None).unwrap();
        let write_meta = |m: &DatasetMeta| write_meta(dir.path(), m);
        let mut m = meta.clone();
        m.train.tokens = 1 << 62;
        write_meta(&m);
        let e = Dataset::open(dir.path()).unwrap().tokens("train");
        let e = e.unwrap_err().to_string();
        assert!(e.contains("train holds 4 tokens, meta.json says"), "{e}");
        for name in ["tokenizer.json", "../tokenizer.json"] {
            let mut m = meta.clone();
            m.tokenizer = Some(name.into());
            write_meta(&m);
            let e = Dataset::open(dir.path()).err().unwrap().to_string();
            assert!(e.contains("not a file of the directory"), "{e}");
        }
    }

    #[test]
    fn a_failed_write_takes_back_the_dataset_it_began() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("data");
        // Fails after the shards are written: the tokenizer to copy is not there.
        let missing = t.path().join("no-tokenizer.json");
        let e = write_dataset(&dir, &[1, 2, 3], &[4], 300, Some(&missing)).unwrap_err();
        assert!(e.to_string().contains("no-tokenizer.json"), "{e}");
        assert!(!dir.exists());
        // An empty directory given stays, empty.
        std::fs::create_dir(&dir).unwrap();
        assert!(write_dataset(&dir, &[1, 2, 3], &[4], 300, Some(&missing)).is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }

    /// Ids past u16 are written as u32, never truncated; an id past the vocabulary is an error.
    #[test]
    fn the_width_holds_every_id_and_the_vocabulary_exceeds_them() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("wide");
        let meta = write_dataset(&d, &[0, 1, 70000, 1], &[70000], 70001, None).unwrap();
        assert_eq!(meta.dtype, "u32");
        let ds = Dataset::open(&d).unwrap();
        assert_eq!(ds.tokens("train").unwrap(), vec![0, 1, 70000, 1]);
        assert_eq!(ds.tokens("val").unwrap(), vec![70000]);
        // A vocabulary of 3 entries (ids with gaps) cannot hold id 70000.
        let d = dir.path().join("gap");
        let e = write_dataset(&d, &[0, 1, 70000], &[1], 3, None).unwrap_err();
        assert!(
            e.to_string()
                .contains("token id 70000 is outside the vocabulary of 3"),
            "{e}"
        );
        assert!(!d.exists());
        let d = dir.path().join("narrow");
        let meta = write_dataset(&d, &[0, 65535], &[1], 65536, None).unwrap();
        assert_eq!(meta.dtype, "u16");
        assert_eq!(
            Dataset::open(&d).unwrap().tokens("train").unwrap(),
            vec![0, 65535]
        );
    }

    /// One shard listed many times (with a token count to match) is refused when the dataset is
    /// opened; a split larger than the host's memory is refused before it is read.
    #[test]
    fn repeated_shards_and_splits_past_memory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let meta = write_dataset(dir.path(), &[1, 2, 3, 299], &[4, 5], 300, None).unwrap();
        let write_meta = |m: &DatasetMeta| write_meta(dir.path(), m);
        let mut m = meta.clone();
        m.train.shards = vec!["train_00000.bin".into(); 100_000];
        m.train.tokens = 400_000;
        write_meta(&m);
        let e = Dataset::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("lists shard \"train_00000.bin\" more than once"),
            "{e}"
        );
        let mut m = meta.clone();
        m.val.shards = vec!["./train_00000.bin".into()];
        write_meta(&m);
        assert!(Dataset::open(dir.path()).is_err());
        // A shard that is not a regular file is not read.
        let mut m = meta.clone();
        m.val.shards = vec!["sub".into()];
        write_meta(&m);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let e = Dataset::open(dir.path())
            .unwrap()
            .tokens("val")
            .unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        write_meta(&meta);
        assert!(check_fits_memory(dir.path(), "train", 1 << 40, Some(1 << 33)).is_err());
        assert!(check_fits_memory(dir.path(), "train", u64::MAX, Some(1 << 33)).is_err());
        assert!(check_fits_memory(dir.path(), "train", 1 << 20, Some(1 << 33)).is_ok());
        assert!(check_fits_memory(dir.path(), "train", 1 << 40, None).is_ok());
        assert_eq!(
            Dataset::open(dir.path())
                .unwrap()
                .tokens("train")
                .unwrap()
                .len(),
            4
        );
    }

    /// A data position near u64::MAX (a damaged checkpoint's sample count) is an error, not an
    /// overflow panic.
    #[test]
    fn a_data_position_past_u64_is_an_error() {
        let mut l = Loader::new((0..1000).collect(), 9, 7).unwrap();
        for start in [u64::MAX, u64::MAX - 3] {
            let e = l
                .try_rank_batches(start, 2, 2, 2, 1)
                .unwrap_err()
                .to_string();
            assert!(e.contains("overflows"), "{e}");
            assert!(l.rank_batches(start, 2, 2, 2, 1).is_empty());
        }
        // The last whole batch below the limit is still served.
        let b = l.try_rank_batches(u64::MAX - 8, 2, 2, 2, 1).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b, l.rank_batches(u64::MAX - 8, 2, 2, 2, 1));
        assert!(l.try_rank_batches(0, usize::MAX, 2, 2, 0).is_err());
    }
}

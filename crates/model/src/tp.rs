//! How a model splits over `tp` tensor-parallel ranks (Megatron / vLLM style): which heads, rows and
//! columns each rank owns, and which `tp` a config allows.
//!
//! Query heads are split evenly. KV heads are split when `tp` divides them and replicated when `tp`
//! is a multiple of them (each rank then holds the one KV head its query heads use). MLP rows and
//! vocab rows are split as evenly as possible (earlier ranks take one more when uneven).

use std::ops::Range;

use crate::{ModelConfig, ModelError};

/// One rank's place in a tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpRank {
    pub rank: usize,
    pub size: usize,
}

impl TpRank {
    pub fn single() -> Self {
        TpRank { rank: 0, size: 1 }
    }
}

/// The part `idx` of `total` split into `parts` contiguous ranges, as even as possible.
pub fn split_range(total: usize, parts: usize, idx: usize) -> Range<usize> {
    let base = total / parts;
    let extra = total % parts;
    let start = idx * base + idx.min(extra);
    let len = base + usize::from(idx < extra);
    start..start + len
}

/// Refuses a `tp` the model's heads do not allow, naming the numbers.
pub fn validate_tp(cfg: &ModelConfig, tp: usize) -> Result<(), ModelError> {
    if tp == 0 {
        return Err(ModelError::Layout("tp must be at least 1".into()));
    }
    let (h, kv) = (cfg.num_heads, cfg.num_kv_heads);
    if h % tp != 0 {
        return Err(ModelError::Layout(format!(
            "tp {tp} does not divide num_attention_heads {h}"
        )));
    }
    if !kv.is_multiple_of(tp) && !tp.is_multiple_of(kv) {
        return Err(ModelError::Layout(format!(
            "tp {tp} and num_key_value_heads {kv}: one must divide the other (KV heads are split when tp divides them, replicated when tp is a multiple of them)"
        )));
    }
    if tp > cfg.intermediate_size || tp > cfg.vocab_size {
        return Err(ModelError::Layout(format!(
            "tp {tp} exceeds intermediate_size {} or vocab_size {}",
            cfg.intermediate_size, cfg.vocab_size
        )));
    }
    Ok(())
}

/// What one rank owns of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpShard {
    pub tp: TpRank,
    pub q_heads: Range<usize>,
    pub kv_heads: Range<usize>,
    pub intermediate: Range<usize>,
    pub vocab: Range<usize>,
    /// Vocab rows every rank pads its part to, so that gathers are of equal size.
    pub vocab_padded: usize,
}

impl TpShard {
    pub fn new(cfg: &ModelConfig, tp: TpRank) -> Result<Self, ModelError> {
        validate_tp(cfg, tp.size)?;
        let (n, r) = (tp.size, tp.rank);
        let qh = cfg.num_heads / n;
        let q_heads = r * qh..(r + 1) * qh;
        let kv_heads = if cfg.num_kv_heads >= n {
            let k = cfg.num_kv_heads / n;
            r * k..(r + 1) * k
        } else {
            let k = r * cfg.num_kv_heads / n;
            k..k + 1
        };
        Ok(TpShard {
            tp,
            q_heads,
            kv_heads,
            intermediate: split_range(cfg.intermediate_size, n, r),
            vocab: split_range(cfg.vocab_size, n, r),
            vocab_padded: cfg.vocab_size.div_ceil(n),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(h: usize, kv: usize) -> ModelConfig {
        ModelConfig::from_json_str(&format!(
            r#"{{"model_type":"llama","vocab_size":10,"hidden_size":{},"intermediate_size":7,
            "num_hidden_layers":1,"num_attention_heads":{h},"num_key_value_heads":{kv}}}"#,
            h * 4
        ))
        .unwrap()
    }

    #[test]
    fn splits_cover_everything_once() {
        for parts in 1..=8 {
            let mut next = 0;
            for i in 0..parts {
                let r = split_range(10, parts, i);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, 10);
        }
    }

    #[test]
    fn allowed_and_refused_layouts() {
        let c = cfg(8, 2);
        for tp in [1, 2, 4] {
            TpShard::new(&c, TpRank { rank: 0, size: tp }).unwrap();
        }
        // tp 8 > kv 2: each rank holds the kv head its one query head uses.
        let kv: Vec<_> = (0..8)
            .map(|r| TpShard::new(&c, TpRank { rank: r, size: 8 }).unwrap_err())
            .map(|e| e.to_string())
            .collect();
        assert!(kv[0].contains("intermediate_size 7"), "{}", kv[0]);
        let e = validate_tp(&c, 3).unwrap_err().to_string();
        assert!(
            e.contains("tp 3 does not divide num_attention_heads 8"),
            "{e}"
        );
        let e = validate_tp(&cfg(12, 4), 6).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads 4"), "{e}");
        let c = cfg(4, 1);
        let s: Vec<_> = (0..4)
            .map(|r| TpShard::new(&c, TpRank { rank: r, size: 4 }).unwrap())
            .collect();
        assert!(s.iter().all(|s| s.kv_heads == (0..1)));
        assert_eq!(s[3].q_heads, 3..4);
        assert_eq!(s[3].vocab, 8..10);
        assert_eq!(s[0].vocab_padded, 3);
    }
}

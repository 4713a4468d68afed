//! The candidates of a top-k draw, found where the logits lie: per row, every value at least the
//! row's k-th largest. A sampled decode step then moves a few hundred bytes a row to the host
//! instead of a vocabulary's logits (512 KB a row at 128k), and the host draws among ~k tokens
//! ([`crate::Sampler::sample_top`]) instead of passing over all of them.

use crate::{Tensor, TensorError};

/// f32 values a row of [`top_k_rows`]' output takes: `cap` candidates after two header values.
pub fn top_k_row_len(cap: usize) -> usize {
    2 + 2 * cap
}

/// Per row of the 2-D `x` `[rows, n]`: every value at least the row's `k`-th largest (`1 <= k
/// <= n`; the k-th ranked in `f32::total_cmp`'s order, values compared with `>=` as the sampler's
/// top-k compares them, so ties at the edge are all in). Packed where `x` lies as f32 `[rows,
/// top_k_row_len(cap)]`: the row's count of such values, 1 where the row holds a NaN or +inf
/// (else 0), then up to `cap` (value, column) pairs in no particular order (the count may pass
/// `cap`: then only `cap` of them are there). Columns and counts travel as f32: exact up to 2^24,
/// which `n` and `cap` may be at most (the largest vocabulary a config may give). [`unpack_top_k`] reads it.
///
/// On a GPU one block a row selects the k-th largest by its bits, 8 at a time (four passes over
/// the row, which stays in L2), then writes the values at least it.
pub fn top_k_rows(x: &Tensor, k: usize, cap: usize) -> Result<Tensor, TensorError> {
    let bad = |what: String| Err(crate::error::shape_err("top_k_rows", what));
    if x.shape().len() != 2 {
        return bad(format!("x {:?}", x.shape()));
    }
    let (rows, n) = (x.dim(0), x.dim(1));
    if rows == 0 || k == 0 || k > n || n > 1 << 24 || cap == 0 || cap > 1 << 24 {
        return bad(format!("k {k}, cap {cap} of {rows} rows of {n}"));
    }
    let len = top_k_row_len(cap);
    #[cfg(feature = "cuda")]
    if let crate::Storage::Cuda(b) = x.storage() {
        let out = crate::cuda::top_k_rows(b, rows, n, k, cap)?;
        return Tensor::new(vec![rows, len], crate::Storage::Cuda(out));
    }
    use rayon::prelude::*;
    let v = x.to_f32_vec();
    let mut out = vec![0.0f32; rows * len];
    out.par_chunks_mut(len)
        .zip(v.par_chunks(n))
        .for_each(|(o, row)| {
            let non_finite = row.iter().any(|l| l.is_nan() || *l == f32::INFINITY);
            let kth = crate::sample::kth_largest(row, k);
            let mut count = 0usize;
            for (j, &l) in row.iter().enumerate() {
                if l >= kth {
                    if count < cap {
                        o[2 + 2 * count] = l;
                        o[3 + 2 * count] = j as f32;
                    }
                    count += 1;
                }
            }
            o[0] = count as f32;
            o[1] = if non_finite { 1.0 } else { 0.0 };
        });
    Tensor::from_f32(vec![rows, len], out, crate::DType::F32)
}

/// One row of [`top_k_rows`]' output, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct TopRow {
    /// How many values of the row are at least its k-th largest (may pass `entries.len()`).
    pub count: usize,
    /// The row holds a NaN or +inf.
    pub non_finite: bool,
    /// (column, value) of the first `cap` of them, by column.
    pub entries: Vec<(u32, f32)>,
}

impl TopRow {
    /// Every value at least the k-th largest is here, and all are finite or -inf.
    pub fn complete(&self) -> bool {
        !self.non_finite && self.count == self.entries.len()
    }
}

/// The rows of [`top_k_rows`]' output `packed` (on the host), each row's entries by column.
pub fn unpack_top_k(packed: &[f32], cap: usize) -> Vec<TopRow> {
    use rayon::prelude::*;
    // The rows over the host's threads: a penalised batch's rows hold hundreds of entries each.
    packed
        .par_chunks_exact(top_k_row_len(cap))
        .map(|o| {
            let count = o[0] as usize;
            let mut entries: Vec<(u32, f32)> = o[2..2 + 2 * count.min(cap)]
                .chunks_exact(2)
                .map(|p| (p[1] as u32, p[0]))
                .collect();
            entries.sort_unstable_by_key(|p| p.0);
            TopRow {
                count,
                non_finite: o[1] != 0.0,
                entries,
            }
        })
        .collect()
}

/// The values of the 2-D `x` `[rows, n]` at `picks` (row, column), as f32 on the host: what a
/// draw needs of a row beside its top-k candidates (the logits of the tokens a penalty moves).
/// On a GPU one thread a pick, and only those values leave the device.
pub fn gather_values(x: &Tensor, picks: &[(usize, usize)]) -> Result<Vec<f32>, TensorError> {
    if x.shape().len() != 2 {
        return Err(crate::error::shape_err(
            "gather_values",
            format!("x {:?}", x.shape()),
        ));
    }
    let (rows, n) = (x.dim(0), x.dim(1));
    if let Some(&(r, c)) = picks.iter().find(|&&(r, c)| r >= rows || c >= n) {
        return Err(crate::error::shape_err(
            "gather_values",
            format!("({r}, {c}) of [{rows}, {n}]"),
        ));
    }
    if picks.is_empty() {
        return Ok(Vec::new());
    }
    let at: Vec<i64> = picks.iter().map(|&(r, c)| (r * n + c) as i64).collect();
    #[cfg(feature = "cuda")]
    if let crate::Storage::Cuda(b) = x.storage() {
        return crate::cuda::gather_values(b, &at);
    }
    let v = x.to_f32_vec();
    Ok(at.iter().map(|&i| v[i as usize]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    /// Every (column, value) of `row` at least its k-th largest, by brute force.
    fn at_least_kth(row: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut s = row.to_vec();
        s.sort_by(|a, b| b.total_cmp(a));
        let kth = s[k - 1];
        row.iter()
            .enumerate()
            .filter(|p| *p.1 >= kth)
            .map(|(j, &l)| (j as u32, l))
            .collect()
    }

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 20.0 - 10.0
            })
            .collect()
    }

    #[test]
    fn gathered_values_are_the_picked_ones_and_bad_picks_are_refused() {
        let v = lcg(5, 12);
        for dt in [DType::F32, DType::BF16] {
            let x = Tensor::from_f32(vec![3, 4], v.clone(), dt).unwrap();
            let all = x.to_f32_vec();
            let picks = [(0, 0), (2, 3), (1, 2), (2, 3), (0, 3)];
            let got = gather_values(&x, &picks).unwrap();
            let want: Vec<f32> = picks.iter().map(|&(r, c)| all[r * 4 + c]).collect();
            assert_eq!(got, want, "{dt}");
            assert!(gather_values(&x, &[]).unwrap().is_empty());
            assert!(gather_values(&x, &[(3, 0)]).is_err());
            assert!(gather_values(&x, &[(0, 4)]).is_err());
        }
        let flat = Tensor::from_f32(vec![12], v, DType::F32).unwrap();
        assert!(gather_values(&flat, &[(0, 0)]).is_err());
    }

    #[test]
    fn every_value_at_least_the_kth_with_ties_at_the_edge() {
        // bf16 rounding makes ties common, as a GPU's logits have them.
        for (n, k) in [
            (1, 1),
            (7, 3),
            (1000, 1),
            (1000, 50),
            (4097, 64),
            (300, 300),
        ] {
            let v = lcg(n as u64, 3 * n);
            let x = Tensor::from_f32(vec![3, n], v, DType::BF16).unwrap();
            let cap = n;
            let rows = unpack_top_k(&top_k_rows(&x, k, cap).unwrap().to_f32_vec(), cap);
            let xv = x.to_f32_vec();
            for (r, row) in rows.iter().enumerate() {
                let want = at_least_kth(&xv[r * n..(r + 1) * n], k);
                assert!(want.len() >= k);
                assert_eq!(row.entries, want, "n {n} k {k} row {r}");
                assert_eq!(row.count, want.len());
                assert!(row.complete());
            }
        }
    }

    #[test]
    fn past_the_cap_a_row_says_so_and_nan_or_inf_is_flagged() {
        // 20 equal values with k 5: all 20 qualify, 8 fit.
        let mut v = vec![1.0f32; 20];
        v.extend([3.0, f32::NAN, 1.0, 2.0, 0.0]);
        v.extend([f32::INFINITY, 1.0, -0.0, 0.0, f32::NEG_INFINITY]);
        v.extend([-0.0, 0.0, -1.0, f32::NEG_INFINITY, -2.0]);
        let wide = Tensor::from_f32(vec![1, 20], v[..20].to_vec(), DType::F32).unwrap();
        let r = unpack_top_k(&top_k_rows(&wide, 5, 8).unwrap().to_f32_vec(), 8);
        assert_eq!(
            (r[0].count, r[0].entries.len(), r[0].complete()),
            (20, 8, false)
        );
        let t = Tensor::from_f32(vec![3, 5], v[20..].to_vec(), DType::F32).unwrap();
        let r = unpack_top_k(&top_k_rows(&t, 1, 5).unwrap().to_f32_vec(), 5);
        assert!(r[0].non_finite && r[1].non_finite && !r[2].non_finite);
        // -0.0 and 0.0 compare equal: with the largest 0.0 (in total order), -0.0 is in too.
        assert_eq!(r[2].entries, vec![(0, -0.0), (1, 0.0)]);
        assert_eq!(r[2].entries[0].1.to_bits(), (-0.0f32).to_bits());
        assert!(r[2].complete());
        for (k, cap) in [(0, 4), (6, 4), (2, 0)] {
            assert!(top_k_rows(&t, k, cap).is_err(), "k {k} cap {cap}");
        }
        let empty = Tensor::from_f32(vec![0, 5], Vec::new(), DType::F32).unwrap();
        assert!(top_k_rows(&empty, 1, 4).is_err());
    }

    /// The largest vocabulary a config may give, 2^24: its last columns and its count are exact
    /// in f32 (it was refused by one).
    #[test]
    fn a_row_of_two_to_the_24_columns() {
        let n = 1usize << 24;
        let mut v = vec![0.0f32; n];
        v[n - 1] = 3.0;
        v[n - 2] = 2.0;
        v[7] = 1.0;
        let x = Tensor::from_f32(vec![1, n], v, DType::F32).unwrap();
        let r = unpack_top_k(&top_k_rows(&x, 3, 50).unwrap().to_f32_vec(), 50);
        let last = (n - 1) as u32;
        assert_eq!(r[0].entries, vec![(7, 1.0), (last - 1, 2.0), (last, 3.0)]);
        assert!(r[0].complete());
        let all = unpack_top_k(&top_k_rows(&x, n, n).unwrap().to_f32_vec(), n);
        assert_eq!((all[0].count, all[0].entries.len()), (n, n));
        let wide = Tensor::from_f32(vec![1, n + 1], vec![0.0; n + 1], DType::F32).unwrap();
        assert!(top_k_rows(&wide, 1, 4).is_err());
    }
}

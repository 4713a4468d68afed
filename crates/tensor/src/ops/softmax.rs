//! Softmax and log-softmax over a row, with the max subtracted first for stability.

/// Per row of the 2-D `x`: (largest value, its index), the lowest index winning a tie. On a GPU
/// only these pairs leave the device.
pub fn argmax_rows(x: &crate::Tensor) -> Result<Vec<(f32, u32)>, crate::TensorError> {
    if x.shape().len() != 2 {
        return Err(crate::error::shape_err(
            "argmax_rows",
            format!("x {:?}", x.shape()),
        ));
    }
    let (rows, n) = (x.dim(0), x.dim(1));
    #[cfg(feature = "cuda")]
    if let crate::Storage::Cuda(b) = x.storage() {
        return crate::cuda::argmax_rows(b, rows, n);
    }
    let v = x.to_f32_vec();
    Ok((0..rows)
        .map(|r| {
            let row = &v[r * n..(r + 1) * n];
            let i = crate::sample::argmax(row);
            (row[i as usize], i)
        })
        .collect())
}

/// Per row of the 2-D `x`: `log Σ_j exp(x_j)` and, where `targets[row]` is `Some(j)`, `x_j`
/// (`targets` one entry a row, each `j` below the row's length). On the CPU in f64 (rows in
/// parallel); on a GPU one block a row in f32 (its max, and the sum of exp(x - max), combined
/// here in f64), only these leaving the device: a row of log-probabilities over a vocabulary
/// shard without the row itself.
pub fn logsumexp_rows(
    x: &crate::Tensor,
    targets: &[Option<usize>],
) -> Result<Vec<(f64, Option<f64>)>, crate::TensorError> {
    let bad = |what: String| Err(crate::error::shape_err("logsumexp_rows", what));
    if x.shape().len() != 2 || targets.len() != x.dim(0) || x.dim(1) == 0 {
        return bad(format!("x {:?}, {} targets", x.shape(), targets.len()));
    }
    let n = x.dim(1);
    if let Some(j) = targets.iter().flatten().find(|&&j| j >= n) {
        return bad(format!("target {j} of a row of {n}"));
    }
    #[cfg(feature = "cuda")]
    if let crate::Storage::Cuda(b) = x.storage() {
        let t: Vec<i32> = targets.iter().map(|t| t.map_or(-1, |j| j as i32)).collect();
        return Ok(crate::cuda::lse_rows(b, x.dim(0), n, &t)?
            .into_iter()
            .zip(targets)
            .map(|((m, s, v), t)| (m as f64 + (s as f64).ln(), t.map(|_| v as f64)))
            .collect());
    }
    use rayon::prelude::*;
    let v = x.to_f32_vec();
    Ok(v.par_chunks(n)
        .zip(targets)
        .map(|(row, t)| (logsumexp(row), t.map(|j| row[j] as f64)))
        .collect())
}

/// In place, in f32 (sums in f64).
pub fn softmax_inplace(row: &mut [f32]) {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0.0f64;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x as f64;
    }
    let inv = (1.0 / sum) as f32;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// `log Σ exp(row)` in f64, the max subtracted first.
fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// `log_softmax(row)` in f64, for exact log-probabilities.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let lse = logsumexp(row);
    row.iter().map(|&x| x as f64 - lse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log-sum-exp and the target's value give log_softmax's entry; no target, none.
    #[test]
    fn logsumexp_rows_give_log_softmax_entries() {
        let rows = [[1.0f32, 2.0, 3.0, 1000.0], [-5.0, 0.5, 0.25, -0.125]];
        let x = crate::Tensor::from_f32(vec![2, 4], rows.concat(), crate::DType::F32).unwrap();
        let got = logsumexp_rows(&x, &[Some(3), None]).unwrap();
        assert_eq!(got[0].1, Some(1000.0));
        assert!((got[0].1.unwrap() - got[0].0 - log_softmax(&rows[0])[3]).abs() < 1e-12);
        let lse1 = log_softmax(&rows[1])
            .iter()
            .map(|l| 0.5 - l)
            .collect::<Vec<_>>()[1];
        assert!((got[1].0 - lse1).abs() < 1e-12 && got[1].1.is_none());
        assert!(logsumexp_rows(&x, &[Some(4), None]).is_err());
        // A NaN in a row: its log-sum-exp is NaN.
        let y = crate::Tensor::from_f32(vec![1, 3], vec![0.5, f32::NAN, 2.0], crate::DType::F32)
            .unwrap();
        assert!(logsumexp_rows(&y, &[Some(0)]).unwrap()[0].0.is_nan());
        assert!(logsumexp_rows(&x, &[Some(0)]).is_err());
    }

    #[test]
    fn softmax_sums_to_one_and_log_softmax_agrees() {
        let mut r = vec![1.0f32, 2.0, 3.0, 1000.0];
        let l = log_softmax(&r);
        softmax_inplace(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        for (p, lp) in r.iter().zip(&l) {
            assert!((*p as f64 - lp.exp()).abs() < 1e-6);
        }
    }
}

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

/// `log_softmax(row)` in f64, for exact log-probabilities.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! Softmax and log-softmax over a row, with the max subtracted first for stability.

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

//! The token embedding's training forward (a row lookup) and backward (rows of the gradient added
//! into the table's gradient, in token order so the sum is deterministic).

/// `x[t] = table[tokens[t]]`, rows of `hidden`.
pub fn embedding_forward(table: &[f32], tokens: &[u32], hidden: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(tokens.len() * hidden);
    for &t in tokens {
        let t = t as usize;
        x.extend_from_slice(&table[t * hidden..(t + 1) * hidden]);
    }
    x
}

/// `dtable[tokens[t]] += dx[t]`.
pub fn embedding_backward(tokens: &[u32], dx: &[f32], hidden: usize, dtable: &mut [f32]) {
    for (&t, row) in tokens.iter().zip(dx.chunks(hidden)) {
        let t = t as usize;
        for (d, g) in dtable[t * hidden..(t + 1) * hidden].iter_mut().zip(row) {
            *d += g;
        }
    }
}

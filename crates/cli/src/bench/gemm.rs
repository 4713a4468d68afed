//! `tessera bench gemm`: the GEMMs of a batched decode step (a batch of activation rows against
//! each weight matrix) through cuBLAS's GEMM and through every candidate cuBLASLt offers for the
//! shape, beside the GPU's measured copy bandwidth; then the fastest candidate with its weights
//! already in L2 (where they fit), which tells a GEMM bound by memory from one bound by its own
//! latency.

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct GemmArgs {
    /// Rows of activations (the decode batch).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub batch: Vec<usize>,
    #[command(flatten)]
    pub shapes: super::shapes::LayerShapes,
}

pub fn run(a: GemmArgs) -> Result<()> {
    a.shapes.check("gemm")?;
    if a.batch.contains(&0) {
        bail!("--batch takes sizes of at least 1");
    }
    run_cuda(a)
}

#[cfg(feature = "cuda")]
fn run_cuda(a: GemmArgs) -> Result<()> {
    let t = a.shapes.tp;
    // The gate/up GEMM computes both halves: 2n rows.
    let layers = a
        .shapes
        .layers()
        .map(|(name, n, k, gated)| (name, if gated { 2 * n } else { n }, k));
    use super::shapes::{copy_ceiling, fastest, speed};
    let bw = copy_ceiling(&format!("tp {t}"))?;
    println!(
        "\n{:>8} {:>5} {:>7} {:>6} {:>8} {:>9} {:>9} {:>9}",
        "layer", "m", "n", "k", "kernel", "µs", "GB/s", "% copy"
    );
    for &m in &a.batch {
        for (name, n, k) in layers {
            let rows = tessera_tensor::cuda::bench_gemm(0, &[(m, n, k)])?;
            let best = fastest(rows.iter().filter(|r| !r.l2_resident).map(|r| r.micros));
            for r in rows {
                println!(
                    "{:>8} {:>5} {:>7} {:>6} {:>8} {}{}",
                    name,
                    r.m,
                    r.n,
                    r.k,
                    r.kernel,
                    speed(r.micros, r.bytes_per_sec, bw),
                    if r.micros == best { "  <- fastest" } else { "" }
                );
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: GemmArgs) -> Result<()> {
    Err(super::shapes::built_without_cuda())
}

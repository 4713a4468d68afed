//! `tessera bench gemm`: the GEMMs of a batched decode step (a batch of activation rows against
//! each weight matrix) through cuBLAS's GEMM and through every candidate cuBLASLt offers for the
//! shape, beside the GPU's measured copy bandwidth; then the fastest candidate with its weights
//! already in L2 (where they fit), which tells a GEMM bound by memory from one bound by its own
//! latency. With `--probe-pdl`, instead: whether the first kernel of each cuBLASLt candidate
//! waits for the kernel before it (only such a kernel could start early in a captured step).

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct GemmArgs {
    /// Rows of activations (the decode batch).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub batch: Vec<usize>,
    /// Instead of timing: whether each cuBLASLt candidate's first kernel waits for the kernel
    /// before it before reading its input (probed on a programmatic graph edge).
    #[arg(long)]
    pub probe_pdl: bool,
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
    if a.probe_pdl {
        return probe_cuda(&a, layers);
    }
    use super::shapes::{copy_ceiling, fastest, speed};
    let bw = copy_ceiling(&format!("tp {t}"))?;
    outln!(
        "\n{:>8} {:>5} {:>7} {:>6} {:>8} {:>9} {:>9} {:>9}",
        "layer",
        "m",
        "n",
        "k",
        "kernel",
        "µs",
        "GB/s",
        "% copy"
    );
    for &m in &a.batch {
        for (name, n, k) in layers {
            let rows = tessera_tensor::cuda::bench_gemm(0, &[(m, n, k)])?;
            let best = fastest(rows.iter().filter(|r| !r.l2_resident).map(|r| r.micros));
            for r in rows {
                outln!(
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

/// `--probe-pdl`: a line per shape and candidate, then how many of the kernels wait.
#[cfg(feature = "cuda")]
fn probe_cuda(a: &GemmArgs, layers: [(&'static str, usize, usize); 4]) -> Result<()> {
    if !tessera_tensor::cuda::device_has_pdl(0)? {
        bail!("--probe-pdl needs programmatic dependent launch: a GPU of sm_90 or later");
    }
    outln!(
        "\n{:>8} {:>5} {:>7} {:>6} {:>4}  first kernel: waits for the kernel before it?",
        "layer",
        "m",
        "n",
        "k",
        "cand"
    );
    let (mut kernels, mut waiting) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    for &m in &a.batch {
        for (name, n, k) in layers {
            for p in tessera_tensor::cuda::probe_gemm_kernels(0, &[(m, n, k)])? {
                let verdict = match (&p.kernel, p.waits) {
                    (None, _) => "(the probe could not tell)".to_string(),
                    (Some(kn), true) => format!("{kn}: waits"),
                    (Some(kn), false) => format!("{kn}: does not wait"),
                };
                if let Some(kn) = p.kernel {
                    if p.waits {
                        waiting.insert(kn.clone());
                    }
                    kernels.insert(kn);
                }
                outln!(
                    "{name:>8} {:>5} {:>7} {:>6} {:>4}  {verdict}",
                    p.m,
                    p.n,
                    p.k,
                    p.candidate
                );
            }
        }
    }
    outln!(
        "{} distinct first kernels, {} of which wait for the kernel before them",
        kernels.len(),
        waiting.len()
    );
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: GemmArgs) -> Result<()> {
    Err(super::shapes::built_without_cuda())
}

//! `tessera bench gemm`: the GEMMs of a batched decode step (a batch of activation rows against
//! each weight matrix) through cuBLAS's GEMM and through every candidate cuBLASLt offers for the
//! shape, beside the GPU's measured copy bandwidth.

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct GemmArgs {
    /// Rows of activations (the decode batch).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub batch: Vec<usize>,
    /// Hidden size (the default is Llama-3-8B's shape).
    #[arg(long, default_value_t = 4096)]
    pub hidden: usize,
    #[arg(long, default_value_t = 14336)]
    pub intermediate: usize,
    /// q heads x head_dim is the hidden size; KV heads of 128.
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    /// Tensor-parallel degree: each rank's share of the shapes.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// The GPU (only cuda).
    #[arg(long, default_value = "cuda")]
    pub device: String,
}

pub fn run(a: GemmArgs) -> Result<()> {
    if a.device != "cuda" {
        bail!("bench gemm measures the CUDA kernels: --device cuda");
    }
    if a.tp == 0
        || !a.hidden.is_multiple_of(a.tp)
        || !a.intermediate.is_multiple_of(a.tp)
        || !(a.kv_heads * 128).is_multiple_of(a.tp)
    {
        bail!("--tp {} does not divide the shapes", a.tp);
    }
    if a.batch.contains(&0) {
        bail!("--batch takes sizes of at least 1");
    }
    run_cuda(a)
}

#[cfg(feature = "cuda")]
fn run_cuda(a: GemmArgs) -> Result<()> {
    let (h, i, t) = (a.hidden, a.intermediate, a.tp);
    let layers = [
        ("qkv", (h + 2 * a.kv_heads * 128) / t, h),
        ("o", h, h / t),
        ("gate_up", 2 * i / t, h),
        ("down", h, i / t),
    ];
    let bw = tessera_tensor::cuda::copy_bandwidth(0)?;
    println!(
        "ceiling: {:.1} GB/s measured (device-to-device copy); tp {t}",
        bw / 1e9
    );
    println!(
        "\n{:>8} {:>5} {:>7} {:>6} {:>8} {:>9} {:>9} {:>9}",
        "layer", "m", "n", "k", "kernel", "µs", "GB/s", "% copy"
    );
    for &m in &a.batch {
        for (name, n, k) in layers {
            let rows = tessera_tensor::cuda::bench_gemm(0, &[(m, n, k)])?;
            let best = rows.iter().map(|r| r.micros).fold(f64::INFINITY, f64::min);
            for r in rows {
                println!(
                    "{:>8} {:>5} {:>7} {:>6} {:>8} {:>9.2} {:>9.1} {:>9.1}{}",
                    name,
                    r.m,
                    r.n,
                    r.k,
                    r.kernel,
                    r.micros,
                    r.bytes_per_sec / 1e9,
                    100.0 * r.bytes_per_sec / bw,
                    if r.micros == best { "  <- fastest" } else { "" }
                );
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: GemmArgs) -> Result<()> {
    bail!("this tessera was built without CUDA (cargo build --features cuda)")
}

//! `tessera bench gemv`: the decode GEMV kernels (one row of activations against a weight matrix) at
//! the shapes of a Llama decode step, beside cuBLAS and the GPU's measured copy bandwidth.

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct GemvArgs {
    /// Hidden size (the default is Llama-3-8B's shape).
    #[arg(long, default_value_t = 4096)]
    pub hidden: usize,
    #[arg(long, default_value_t = 14336)]
    pub intermediate: usize,
    /// q heads x head_dim is the hidden size; KV heads of 128.
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 128256)]
    pub vocab: usize,
    /// Tensor-parallel degree: each rank's share of the shapes.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// The GPU (only cuda).
    #[arg(long, default_value = "cuda")]
    pub device: String,
}

pub fn run(a: GemvArgs) -> Result<()> {
    if a.device != "cuda" {
        bail!("bench gemv measures the CUDA kernels: --device cuda");
    }
    if a.tp == 0
        || !a.hidden.is_multiple_of(a.tp)
        || !a.intermediate.is_multiple_of(a.tp)
        || !(a.kv_heads * 128).is_multiple_of(a.tp)
    {
        bail!("--tp {} does not divide the shapes", a.tp);
    }
    run_cuda(a)
}

#[cfg(feature = "cuda")]
fn run_cuda(a: GemvArgs) -> Result<()> {
    let (h, i, t) = (a.hidden, a.intermediate, a.tp);
    let shapes = [
        ("qkv", (h + 2 * a.kv_heads * 128) / t, h, false),
        ("o", h, h / t, false),
        ("gate_up", i / t, h, true),
        ("down", h, i / t, false),
        ("lm_head", a.vocab.div_ceil(t), h, false),
    ];
    let bw = tessera_tensor::cuda::copy_bandwidth(0)?;
    println!(
        "ceiling: {:.1} GB/s measured (device-to-device copy); tp {t}",
        bw / 1e9
    );
    println!(
        "\n{:>8} {:>7} {:>6} {:>10} {:>9} {:>9} {:>9}",
        "layer", "n", "k", "kernel", "µs", "GB/s", "% copy"
    );
    for (name, n, k, gated) in shapes {
        let rows = tessera_tensor::cuda::bench_gemv(0, &[(n, k, gated)])?;
        let best = rows
            .iter()
            .filter(|r| r.kernel != "cublas")
            .map(|r| r.micros)
            .fold(f64::INFINITY, f64::min);
        for r in rows {
            println!(
                "{:>8} {:>7} {:>6} {:>10} {:>9.2} {:>9.1} {:>9.1}{}",
                name,
                if r.gated { 2 * r.n } else { r.n },
                r.k,
                r.kernel,
                r.micros,
                r.bytes_per_sec / 1e9,
                100.0 * r.bytes_per_sec / bw,
                match (r.micros == best, r.chosen) {
                    (true, true) => "  <- fastest, used",
                    (true, false) => "  <- fastest",
                    (false, true) => "  <- used",
                    _ => "",
                }
            );
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: GemvArgs) -> Result<()> {
    bail!("this tessera was built without CUDA (cargo build --features cuda)")
}

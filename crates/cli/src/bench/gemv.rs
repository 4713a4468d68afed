//! `tessera bench gemv`: the decode GEMV kernels (one row of activations against a weight matrix) at
//! the shapes of a Llama decode step, beside cuBLAS and the GPU's measured copy bandwidth.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct GemvArgs {
    #[command(flatten)]
    pub shapes: super::shapes::LayerShapes,
    #[arg(long, default_value_t = 128256)]
    pub vocab: usize,
}

pub fn run(a: GemvArgs) -> Result<()> {
    a.shapes.check("gemv")?;
    run_cuda(a)
}

#[cfg(feature = "cuda")]
fn run_cuda(a: GemvArgs) -> Result<()> {
    let (h, t) = (a.shapes.hidden, a.shapes.tp);
    let lm_head = ("lm_head", a.vocab.div_ceil(t), h, false);
    let shapes = a.shapes.layers().into_iter().chain([lm_head]);
    use super::shapes::{copy_ceiling, fastest, speed};
    let bw = copy_ceiling(&format!("tp {t}"))?;
    outln!(
        "\n{:>8} {:>7} {:>6} {:>16} {:>6} {:>9} {:>9} {:>9}",
        "layer",
        "n",
        "k",
        "kernel",
        "blk/SM",
        "µs",
        "GB/s",
        "% copy"
    );
    for (name, n, k, gated) in shapes {
        let rows = tessera_tensor::cuda::bench_gemv(0, &[(n, k, gated)])?;
        let best = fastest(
            rows.iter()
                .filter(|r| r.kernel != "cublas")
                .map(|r| r.micros),
        );
        for r in rows {
            outln!(
                "{:>8} {:>7} {:>6} {:>16} {:>6} {}{}",
                name,
                if r.gated { 2 * r.n } else { r.n },
                r.k,
                r.kernel,
                r.blocks_per_sm.map_or("-".to_string(), |b| b.to_string()),
                speed(r.micros, r.bytes_per_sec, bw),
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
    Err(super::shapes::built_without_cuda())
}

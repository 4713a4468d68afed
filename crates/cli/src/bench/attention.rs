//! `tessera bench attention`: the decode attention kernels (RoPE, the K/V append and attention
//! over the cache in one kernel) at the head shapes of a Llama decode step, over a range of batch
//! sizes and cache lengths, beside the GPU's measured copy bandwidth (the K/V bytes a call reads).

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct AttentionArgs {
    /// Sequences decoded at once.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub batch: Vec<usize>,
    /// Cached positions each sequence attends to.
    #[arg(long, value_delimiter = ',', default_value = "16,48,512,2048")]
    pub keys: Vec<usize>,
    #[command(flatten)]
    pub shapes: super::shapes::LayerShapes,
}

pub fn run(a: AttentionArgs) -> Result<()> {
    a.shapes.check("attention")?;
    if a.batch.contains(&0) || a.keys.contains(&0) {
        bail!("--batch and --keys take sizes of at least 1");
    }
    run_cuda(a)
}

#[cfg(feature = "cuda")]
fn run_cuda(a: AttentionArgs) -> Result<()> {
    let t = a.shapes.tp;
    let (hq, hkv, hd) = (a.shapes.hidden / 128 / t, a.shapes.kv_heads / t, 128);
    use super::shapes::{copy_ceiling, fastest, speed};
    let bw = copy_ceiling(&format!(
        "tp {t}: {hq} query / {hkv} KV heads of {hd} a rank"
    ))?;
    outln!(
        "\n{:>5} {:>5} {:>9} {:>72} {:>9} {:>9} {:>9}",
        "batch",
        "keys",
        "kernel",
        "plan",
        "µs",
        "GB/s",
        "% copy"
    );
    for &b in &a.batch {
        for &k in &a.keys {
            let rows = tessera_tensor::cuda::bench_decode_attention(0, (b, hq, hkv, hd, k))?;
            let best = fastest(rows.iter().map(|r| r.micros));
            for r in rows {
                outln!(
                    "{:>5} {:>5} {:>9} {:>72} {}{}",
                    b,
                    k,
                    r.kernel,
                    r.plan,
                    speed(r.micros, r.bytes_per_sec, bw),
                    if r.micros == best { "  <- fastest" } else { "" }
                );
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: AttentionArgs) -> Result<()> {
    Err(super::shapes::built_without_cuda())
}

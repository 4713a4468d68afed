//! `tessera bench attention`: the decode attention kernels (RoPE, the K/V append and attention
//! over the cache in one kernel) at the head shapes of a Llama decode step, over a range of batch
//! sizes and cache lengths, beside the GPU's measured copy bandwidth (the K/V bytes a call reads).
//! With `--prefill`: the prefill attention of one prompt of each length (causal over itself),
//! beside the GPU's bf16 GEMM rate measured in the same run.

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct AttentionArgs {
    /// Sequences decoded at once.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub batch: Vec<usize>,
    /// Cached positions each sequence attends to.
    #[arg(long, value_delimiter = ',', default_value = "16,48,512,2048")]
    pub keys: Vec<usize>,
    /// Instead of decode: the prefill attention of a prompt of each of these lengths (tokens).
    #[arg(long, value_delimiter = ',')]
    pub prefill: Vec<usize>,
    /// Each head's dimension: the query heads are --hidden / this, the KV heads --kv-heads (64:
    /// Llama 3.2 1B's and Qwen2.5 0.5B's heads).
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    #[command(flatten)]
    pub shapes: super::shapes::LayerShapes,
}

pub fn run(a: AttentionArgs) -> Result<()> {
    a.shapes.check("attention")?;
    if a.batch.contains(&0) || a.keys.contains(&0) || a.prefill.contains(&0) {
        bail!("--batch, --keys and --prefill take sizes of at least 1");
    }
    if a.prefill.iter().any(|&t| t > MAX_PREFILL) {
        bail!("--prefill takes prompts of at most {MAX_PREFILL} tokens");
    }
    let (hd, t) = (a.head_dim, a.shapes.tp);
    if !(8..=256).contains(&hd) || !hd.is_multiple_of(8) {
        bail!("--head-dim takes a multiple of 8 from 8 to 256, not {hd}");
    }
    if !a.shapes.hidden.is_multiple_of(hd * t)
        || a.shapes.kv_heads == 0
        || !(a.shapes.hidden / hd).is_multiple_of(a.shapes.kv_heads)
    {
        bail!(
            "--head-dim {hd} at --tp {t}: --hidden {} does not split into whole query heads a rank, in groups of --kv-heads {}",
            a.shapes.hidden,
            a.shapes.kv_heads
        );
    }
    run_cuda(a)
}

/// The longest prompt `--prefill` times (at the 8B shape's heads its q alone is 1 GiB, k and v
/// 256 MiB each, the output 1 GiB).
const MAX_PREFILL: usize = 131_072;

/// The prefill attention at each length, beside cuBLAS's bf16 GEMM rate.
#[cfg(feature = "cuda")]
fn run_prefill(a: &AttentionArgs, (hq, hkv, hd): (usize, usize, usize)) -> Result<()> {
    let t = a.shapes.tp;
    let rate = tessera_tensor::cuda::gemm_rate(0, 8192)?;
    outln!(
        "ceiling: {:.0} TFLOP/s measured (cuBLAS bf16 GEMM, 8192 x 8192 x 8192); tp {t}: {hq} query / {hkv} KV heads of {hd} a rank",
        rate / 1e12
    );
    outln!(
        "\n{:>7} {:>18} {:>32} {:>10} {:>9} {:>9}",
        "tokens",
        "kernel",
        "plan",
        "µs",
        "TFLOP/s",
        "% GEMM"
    );
    let rows = tessera_tensor::cuda::bench_prefill_attention(0, &a.prefill, (hq, hkv, hd))?;
    for r in rows {
        outln!(
            "{:>7} {:>18} {:>32} {:>10.1} {:>9.1} {:>9.1}",
            r.tokens,
            r.kernel,
            r.plan,
            r.micros,
            r.flops_per_sec / 1e12,
            100.0 * r.flops_per_sec / rate
        );
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn run_cuda(a: AttentionArgs) -> Result<()> {
    let t = a.shapes.tp;
    let hd = a.head_dim;
    let (hq, hkv) = (a.shapes.hidden / hd / t, a.shapes.kv_heads / t);
    if !a.prefill.is_empty() {
        return run_prefill(&a, (hq, hkv, hd));
    }
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

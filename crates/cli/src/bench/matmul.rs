//! `tessera bench matmul`: square GEMMs through tessera's matmul kernel, in GFLOP/s and as a share
//! of the measured FMA peak.

use anyhow::Result;
use rand::{Rng, SeedableRng};
use tessera_tensor::{ops, DType, Tensor};

use super::{ceiling, median_secs};

#[derive(clap::Args, Debug)]
pub struct MatmulArgs {
    /// Square sizes m = n = k.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048")]
    pub sizes: Vec<usize>,
    /// Weight dtype (x is f32; 16-bit weights are widened in the kernel).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    pub dtypes: Vec<String>,
    /// Also time a GEMV (m = 1) with this k = n, the decode shape (the default's weights, 0.5-1 GiB,
    /// are larger than the last-level cache, so they stream from memory).
    #[arg(long, default_value_t = 16384)]
    pub gemv: usize,
}

/// The largest size the CPU benchmark takes (a matrix of f32 is then 4 GiB).
const MAX_SIZE: usize = 32768;

pub fn run(a: MatmulArgs) -> Result<()> {
    // Checked before anything is measured or printed.
    if let Some(s) = a
        .sizes
        .iter()
        .chain([&a.gemv])
        .find(|&&s| !(1..=MAX_SIZE).contains(&s))
    {
        anyhow::bail!("--sizes and --gemv take 1 to {MAX_SIZE}, got {s}");
    }
    for dt in &a.dtypes {
        dt.parse::<DType>()?;
    }
    let peaks = ceiling::fma_peaks();
    outln!("threads: {}", rayon::current_num_threads());
    for (name, p) in &peaks {
        outln!("measured peak ({name}): {:.1} GFLOP/s", p / 1e9);
    }
    let peak = peaks.first().map(|p| p.1);
    let bw = ceiling::read_bandwidth();
    outln!("measured memory read bandwidth: {:.1} GB/s", bw / 1e9);
    outln!(
        "\n{:>6} {:>6} {:>6} {:>6} {:>10} {:>10} {:>9}",
        "dtype",
        "m",
        "n",
        "k",
        "ms",
        "GFLOP/s",
        "% peak"
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for dt in &a.dtypes {
        let dtype: DType = dt.parse()?;
        for &s in &a.sizes {
            let x: Vec<f32> = (0..s * s).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..s * s).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x = Tensor::from_f32(vec![s, s], x, DType::F32)?;
            let w = Tensor::from_f32(vec![s, s], w, dtype)?;
            let secs = median_secs(5, || {
                std::hint::black_box(ops::matmul_t(&x, &w, None).unwrap());
            });
            let gflops = 2.0 * (s * s * s) as f64 / secs / 1e9;
            let pct = peak.map_or("-".into(), |p| format!("{:.1}", 100.0 * gflops * 1e9 / p));
            outln!(
                "{:>6} {:>6} {:>6} {:>6} {:>10.3} {:>10.1} {:>9}",
                dtype,
                s,
                s,
                s,
                secs * 1e3,
                gflops,
                pct
            );
        }
        if a.gemv > 0 {
            let k = a.gemv;
            let x = Tensor::from_f32(
                vec![1, k],
                (0..k).map(|i| (i as f32).sin()).collect(),
                DType::F32,
            )?;
            let w = Tensor::from_f32(
                vec![k, k],
                (0..k * k).map(|i| ((i % 97) as f32) * 0.01).collect(),
                dtype,
            )?;
            let secs = median_secs(10, || {
                std::hint::black_box(ops::matmul_t(&x, &w, None).unwrap());
            });
            let gbs = w.size_in_bytes() as f64 / secs / 1e9;
            outln!(
                "{:>6} {:>6} {:>6} {:>6} {:>10.3}   GEMV streams weights at {:.1} GB/s = {:.0}% of read bandwidth",
                dtype, 1, k, k, secs * 1e3, gbs, 100.0 * gbs * 1e9 / bw
            );
        }
    }
    Ok(())
}

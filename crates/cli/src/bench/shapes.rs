//! The weight and head shapes of one Llama decoder layer at a tensor-parallel degree, and the
//! copy-bandwidth ceiling and speed columns, shared by the CUDA kernel benchmarks (`bench gemv`,
//! `bench gemm`, `bench attention`).

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct LayerShapes {
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

/// The error of a CUDA kernel benchmark in a build without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub fn built_without_cuda() -> anyhow::Error {
    anyhow::anyhow!("this tessera was built without CUDA (cargo build --features cuda)")
}

impl LayerShapes {
    /// Refuses a device other than cuda and a tp that does not divide the shapes (the query and
    /// KV heads of 128 too: a rank holds whole heads); `what` names the benchmark.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.device != "cuda" {
            bail!("bench {what} measures the CUDA kernels: --device cuda");
        }
        let t = self.tp;
        if t == 0 {
            bail!("--tp must be at least 1");
        }
        if !self.hidden.is_multiple_of(128 * t)
            || !self.intermediate.is_multiple_of(t)
            || !self.kv_heads.is_multiple_of(t)
        {
            bail!("--tp {t} does not divide the shapes");
        }
        Ok(())
    }

    /// One rank's projections: (name, outputs n, inputs k, gated). The gated one (gate/up) has
    /// 2n weight rows for its n outputs.
    #[cfg(feature = "cuda")]
    pub fn layers(&self) -> [(&'static str, usize, usize, bool); 4] {
        let (h, i, t) = (self.hidden, self.intermediate, self.tp);
        [
            ("qkv", (h + 2 * self.kv_heads * 128) / t, h, false),
            ("o", h, h / t, false),
            ("gate_up", i / t, h, true),
            ("down", h, i / t, false),
        ]
    }
}

/// GPU 0's device-to-device copy bandwidth, the ceiling of the kernel benchmarks, printed with
/// `what` (the shapes measured).
#[cfg(feature = "cuda")]
pub fn copy_ceiling(what: &str) -> Result<f64> {
    let bw = tessera_tensor::cuda::copy_bandwidth(0)?;
    outln!(
        "ceiling: {:.1} GB/s measured (device-to-device copy); {what}",
        bw / 1e9
    );
    Ok(bw)
}

/// A kernel's speed beside the ceiling, three columns: µs a call, GB/s, % of the ceiling.
#[cfg(feature = "cuda")]
pub fn speed(micros: f64, bytes_per_sec: f64, ceiling: f64) -> String {
    format!(
        "{micros:>9.2} {:>9.1} {:>9.1}",
        bytes_per_sec / 1e9,
        100.0 * bytes_per_sec / ceiling
    )
}

/// The least of `micros` (the row a table marks fastest).
#[cfg(feature = "cuda")]
pub fn fastest(micros: impl Iterator<Item = f64>) -> f64 {
    micros.fold(f64::INFINITY, f64::min)
}

//! The weight shapes of one Llama decoder layer at a tensor-parallel degree, shared by the CUDA
//! kernel benchmarks (`bench gemv`, `bench gemm`, `bench attention`).

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

impl LayerShapes {
    /// Refuses a device other than cuda and a tp that does not divide the shapes; `what` names
    /// the benchmark.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.device != "cuda" {
            bail!("bench {what} measures the CUDA kernels: --device cuda");
        }
        let t = self.tp;
        if t == 0
            || !self.hidden.is_multiple_of(t)
            || !self.intermediate.is_multiple_of(t)
            || !(self.kv_heads * 128).is_multiple_of(t)
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

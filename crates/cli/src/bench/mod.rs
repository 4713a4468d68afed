//! `tessera bench`: measured speed beside a measured ceiling, never a timed assertion.

mod attention;
mod ceiling;
mod comm;
#[cfg(feature = "cuda")]
mod comm_nccl;
mod decode;
mod gemm;
mod gemv;
mod matmul;
mod persistent;
mod sample;
mod score;
mod shapes;

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: BenchCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCmd {
    /// CPU matmul GFLOP/s against the machine's measured FMA peak.
    Matmul(matmul::MatmulArgs),
    /// Collective bandwidth (nccl-tests style) against memcpy / loopback TCP.
    Comm(comm::CommArgs),
    /// Decode tokens/s of a random-weight model at several tp, against the memory-bandwidth roofline.
    Decode(decode::DecodeArgs),
    /// The CUDA decode GEMV kernels beside cuBLAS and the copy bandwidth.
    Gemv(gemv::GemvArgs),
    /// cuBLAS's GEMM against every cuBLASLt candidate at the shapes of a batched decode step.
    Gemm(gemm::GemmArgs),
    /// The CUDA decode attention kernels over batch sizes and cache lengths, beside the copy
    /// bandwidth.
    Attention(attention::AttentionArgs),
    /// What one persistent kernel a decode step could reach: a step's weights streamed with a
    /// grid barrier at each dependency (and NVLink exchanges on two GPUs), beside the copy
    /// bandwidth.
    Persistent(persistent::PersistentArgs),
    /// Sampling one token from a vocabulary's logits on the host (temperature, top-k, top-p,
    /// min-p), beside a full sort of the vocabulary measured in the same run.
    Sample(sample::SampleArgs),
    /// The log-probabilities of a sequence (`tessera score`), vocab-parallel on the ranks'
    /// devices, beside every logit gathered to the host measured in the same run.
    Score(score::ScoreArgs),
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.which {
        BenchCmd::Matmul(m) => matmul::run(m),
        BenchCmd::Decode(d) => decode::run(d),
        BenchCmd::Comm(c) => comm::run(c),
        BenchCmd::Gemv(g) => gemv::run(g),
        BenchCmd::Gemm(g) => gemm::run(g),
        BenchCmd::Attention(x) => attention::run(x),
        BenchCmd::Persistent(p) => persistent::run(p),
        BenchCmd::Sample(s) => sample::run(s),
        BenchCmd::Score(s) => score::run(s),
    }
}

/// Median of `runs` timings of `f`, in seconds, after one warm-up.
pub fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let s = std::time::Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    median(t)
}

/// The median of timings (the upper one of an even count).
pub fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

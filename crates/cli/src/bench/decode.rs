//! `tessera bench decode`: decode tokens/s of a random-weight Llama at several tp, beside the memory
//! roofline. Each step reads every weight of a rank once, so a step takes at least (bytes of a
//! rank's weights + its KV cache) / bandwidth: the measured device-to-device copy bandwidth of one
//! GPU (ranks on separate GPUs run in parallel), or on the CPU the measured read bandwidth shared by
//! all ranks (so there the bytes of every rank count).

use std::time::Instant;

use anyhow::{bail, Result};
use tessera_comm::{CommError, CommExt, Communicator, ElemKind, ReduceOp};
use tessera_infer::{device_of_rank, run_tp, with_rank_comm, InferError};
use tessera_model::synthetic::llama_config_json;
use tessera_model::{DrawLogits, LlamaModel, ModelConfig, TpRank};
use tessera_tensor::{DType, Device, Sampler, SamplingParams, Tensor};

use super::ceiling;

/// (batch, seconds for the timed steps, weight bytes, KV cache bytes) of one rank.
type Rows = Vec<(usize, f64, usize, usize)>;

#[derive(clap::Args, Debug)]
pub struct DecodeArgs {
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub tp: Vec<usize>,
    /// Replay each decode step as a captured CUDA graph (cuda only).
    #[arg(long)]
    pub graph: bool,
    /// Sample each step's tokens as `generate` does (each rank finds its top-k candidates on its
    /// device, the ranks gather them to the host, rank 0 draws each sequence's token as
    /// `generate` does with Llama 3's generation_config.json: temperature 0.6, top-p 0.9 and
    /// transformers' top-k of 50 where the file gives none; then broadcasts the tokens) instead
    /// of greedy on the device. With --graph the steps up to each rank's logits replay a
    /// captured graph, as `generate`'s do.
    #[arg(long)]
    pub sample: bool,
    /// With --sample: gather every rank's whole logits to the host and draw from those (as
    /// `generate` does without a top-k, and did before the candidates), to compare.
    #[arg(long, requires = "sample")]
    pub full_logits: bool,
    /// With --sample: a repetition penalty over the prompt's and the output's tokens (as Qwen's
    /// generation_config.json asks, 1.05): each draw then also needs the logits of those tokens
    /// (gathered beside the candidates), or the whole logits with --full-logits.
    #[arg(long, requires = "sample", default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Time one rank's share of a tp-N step on one device, every collective skipped (rank 0's
    /// layer shapes; no communication, so the tokens are not the model's): the compute a tp-N
    /// step cannot go below, on a machine with fewer devices than N. Replaces --tp.
    #[arg(long, conflicts_with = "tp")]
    pub one_rank_of: Option<usize>,
    /// With --one-rank-of on cuda: each fused all-reduce + norm holds the step this many µs
    /// after the kernel before it ends, as its exchange over NVLink would (a stand-in, to measure
    /// on one GPU how much of an exchange the kernels around it hide).
    #[arg(long)]
    pub hold_us: Option<f64>,
    /// Sequences decoded in lockstep (static batching of equal-length prompts).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// Weight and activation dtype.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// cpu, or cuda (rank r on GPU r).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// A published shape (llama-3-8b, llama-3-70b, qwen3-8b) instead of the shape flags below
    /// (which it cannot be combined with).
    #[arg(long, conflicts_with_all = ["vocab", "hidden", "intermediate", "layers", "heads", "kv_heads"])]
    pub preset: Option<String>,
    /// Decode steps timed (after a prefill of --prompt-len tokens).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    #[arg(long, default_value_t = 16)]
    pub prompt_len: usize,
    /// Fill the prompt's cache positions with random K/V instead of running a step for each
    /// prompt token (the timed steps cost the same: attention reads the cache whatever it holds);
    /// seconds instead of minutes at long prompts.
    #[arg(long)]
    pub fill_cache: bool,
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    #[arg(long, default_value_t = 1024)]
    pub hidden: usize,
    #[arg(long, default_value_t = 2816)]
    pub intermediate: usize,
    #[arg(long, default_value_t = 12)]
    pub layers: usize,
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    #[arg(long, default_value_t = 4)]
    pub kv_heads: usize,
}

fn shape_json(a: &DecodeArgs) -> Result<String> {
    let shape = (
        a.vocab,
        a.hidden,
        a.intermediate,
        a.layers,
        a.heads,
        a.kv_heads,
    );
    preset_json(a.preset.as_deref(), shape)
}

/// The config.json of a published shape (`preset`), or of `shape` (vocab, hidden, intermediate,
/// layers, heads, KV heads) where there is none.
pub fn preset_json(
    preset: Option<&str>,
    shape: (usize, usize, usize, usize, usize, usize),
) -> Result<String> {
    let (v, h, i, l, heads, kv) = match preset {
        None => shape,
        Some("llama-3-8b") => (128256, 4096, 14336, 32, 32, 8),
        Some("llama-3-70b") => (128256, 8192, 28672, 80, 64, 8),
        // Qwen3-8B's published config.json (its per-head q/k norms included).
        Some("qwen3-8b") => {
            return Ok(
                r#"{"architectures":["Qwen3ForCausalLM"],"model_type":"qwen3",
                "vocab_size":151936,"hidden_size":4096,"intermediate_size":12288,
                "num_hidden_layers":36,"num_attention_heads":32,"num_key_value_heads":8,
                "head_dim":128,"rms_norm_eps":1e-6,"rope_theta":1000000.0,
                "max_position_embeddings":40960,"tie_word_embeddings":false}"#
                    .to_string(),
            )
        }
        Some(p) => bail!("unknown preset {p:?} (expected llama-3-8b, llama-3-70b or qwen3-8b)"),
    };
    Ok(llama_config_json(v, h, i, l, heads, kv, false))
}

pub fn run(a: DecodeArgs) -> Result<()> {
    let dtype: DType = a.dtype.parse()?;
    let device: Device = a.device.parse()?;
    let cfg = ModelConfig::from_json_str(&shape_json(&a)?)?;
    if a.graph && device == Device::Cpu {
        bail!("--graph needs --device cuda");
    }
    if a.steps == 0 || a.batch.contains(&0) {
        bail!("--steps and --batch take at least 1");
    }
    if let Some(&b) = a.batch.iter().find(|&&b| b > MAX_BATCH) {
        bail!("--batch takes at most {MAX_BATCH} sequences, got {b}");
    }
    // The prompt, the untimed step, the timed steps and one spare position.
    let positions = a.prompt_len.saturating_add(a.steps).saturating_add(2);
    if positions > cfg.max_position_embeddings {
        bail!(
            "--prompt-len {} and --steps {} need {positions} positions, more than the shape's context of {}",
            a.prompt_len,
            a.steps,
            cfg.max_position_embeddings
        );
    }
    if let Some(h) = a.hold_us {
        if a.one_rank_of.is_none() || !matches!(device, Device::Cuda(_)) {
            bail!("--hold-us needs --one-rank-of and --device cuda");
        }
        if !(0.0..=1e6).contains(&h) {
            bail!("--hold-us must be between 0 and 1000000, got {h}");
        }
    }
    if a.one_rank_of == Some(0) {
        bail!("--one-rank-of must be at least 1");
    }
    if a.tp.contains(&0) {
        bail!("--tp must be at least 1");
    }
    let tps = a.one_rank_of.map_or_else(|| a.tp.clone(), |n| vec![n]);
    // Under a multi-process launch each process is one rank of every tp group timed: a tp other
    // than the job's size is refused before anything is printed, and only rank 0 prints.
    let launch = tessera_comm::LaunchEnv::from_env()?.filter(|e| e.world_size > 1);
    if let Some(e) = &launch {
        if a.one_rank_of.is_some() {
            bail!("--one-rank-of times one process alone: run it without a multi-process launch");
        }
        if let Some(&tp) = tps.iter().find(|&&tp| tp != e.world_size) {
            bail!(
                "this process is rank {} of a {}-process job but --tp lists {tp}: pass --tp {}",
                e.rank,
                e.world_size,
                e.world_size
            );
        }
    }
    let quiet = launch.is_some_and(|e| e.rank != 0);
    macro_rules! say {
        ($($t:tt)*) => {
            if !quiet {
                outln!($($t)*)
            }
        };
    }
    for &tp in &tps {
        tessera_model::validate_tp(&cfg, tp)?;
        // --one-rank-of runs rank 0 alone, on the first device.
        let ranks = if a.one_rank_of.is_some() { 1 } else { tp };
        for r in 0..ranks {
            device_of_rank(device, r).ensure_available()?;
        }
    }
    // On the CPU the ranks' weights and KV caches share the host's memory: a run larger than it
    // is refused here rather than aborting in an allocation.
    if device == Device::Cpu {
        let share = a.one_rank_of.unwrap_or(1) as f64;
        let weights = cfg.num_params() as f64 * dtype.size_in_bytes() as f64 / share;
        let batch = a.batch.iter().copied().max().unwrap_or(1) as f64;
        let kv =
            cfg.kv_bytes_per_token(dtype.size_in_bytes()) as f64 * positions as f64 * batch / share;
        // A step's logits: every rank's shard in the dtype, and the f32 rows a draw or a
        // greedy pick reads on the host (batch 4096 by a 2M vocabulary: 33 GB).
        let logits = batch * cfg.vocab_size as f64 * (dtype.size_in_bytes() as f64 / share + 4.0);
        if let Some(total) = tessera_tensor::device::exceeds_host_memory(weights + kv + logits) {
            bail!(
                "the shape's {dtype} weights ({:.1} GB), KV cache ({:.1} GB) and a step's logits ({:.1} GB) take more than this host's {:.1} GB of memory",
                weights / 1e9,
                kv / 1e9,
                logits / 1e9,
                total / 1e9
            );
        }
    }
    say!(
        "model: {} layers, hidden {}, {} heads / {} kv, vocab {}: {:.2}B params, {:.1} GB of {dtype} weights, random, on {device}",
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.vocab_size,
        cfg.num_params() as f64 / 1e9,
        cfg.num_params() as f64 * dtype.size_in_bytes() as f64 / 1e9
    );
    let (bw, shared) = match device {
        Device::Cpu => (ceiling::read_bandwidth(), true),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => (tessera_tensor::cuda::copy_bandwidth(i)?, false),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => unreachable!("ensure_available refused it"),
    };
    say!(
        "ceiling: {:.1} GB/s measured ({}); threads: {}",
        bw / 1e9,
        if shared {
            "host memory read, shared by all ranks"
        } else {
            "device-to-device copy of one GPU"
        },
        rayon::current_num_threads()
    );
    if !(a.repetition_penalty.is_finite() && a.repetition_penalty > 0.0) {
        bail!(
            "--repetition-penalty must be a positive number, got {}",
            a.repetition_penalty
        );
    }
    if a.sample {
        say!(
            "tokens sampled on the host at temperature 0.6, top-p 0.9, top-k 50{}, from {}",
            match a.repetition_penalty {
                1.0 => String::new(),
                r => format!(", repetition penalty {r} over the prompt and output"),
            },
            if a.full_logits {
                "every rank's whole logits"
            } else {
                "the ranks' top-k candidates"
            }
        );
    }
    say!(
        "\n{:>3} {:>6} {:>10} {:>10} {:>12} {:>16} {:>11}",
        "tp",
        "batch",
        "ms/step",
        "tok/s",
        "GB/rank",
        "roofline tok/s",
        "% roofline"
    );
    let prompt: Vec<u32> = (0..a.prompt_len as u64)
        .map(|i| (i * 7919 % cfg.vocab_size as u64) as u32)
        .collect();
    for &tp in &tps {
        // One rank's run over its communicator: every rank of a tp group, or rank 0 alone
        // (--one-rank-of) with the collectives skipped.
        let body = |comm: &dyn Communicator, rank: TpRank| -> Result<Rows, InferError> {
            let dev = device_of_rank(device, rank.rank);
            let m = LlamaModel::random(cfg.clone(), rank, dtype, dev, 7)?;
            let mut rows = Vec::new();
            for &batch in &a.batch {
                let mut cache = m.new_cache_batch(prompt.len() + a.steps + 2, batch)?;
                // The prompt, fed in lockstep (untimed) or its positions filled at random
                // (--fill-cache), then one untimed step so that lazy initialisation stays out of
                // the figures.
                let mut toks = vec![0u32; batch];
                if a.fill_cache {
                    cache
                        .fill_random(prompt.len(), 11 + rank.rank as u64)
                        .map_err(tessera_model::ModelError::from)?;
                } else {
                    for &p in &prompt {
                        toks = m.forward_lockstep_greedy(&vec![p; batch], &mut cache, comm)?;
                    }
                }
                toks = m.forward_lockstep_greedy(&toks, &mut cache, comm)?;
                #[cfg(feature = "cuda")]
                let mut graph = if a.graph {
                    let g = if a.sample {
                        m.capture_lockstep_logits(&mut cache, comm)?
                    } else {
                        m.capture_lockstep_greedy(&mut cache, comm)?
                    };
                    if rank.rank == 0 {
                        say!("graph, batch {batch}: {}", g.stats()?);
                    }
                    Some(g)
                } else {
                    None
                };
                // One sampler a sequence, as `generate` has one a request.
                let mut samplers: Vec<Sampler> = (0..batch as u64)
                    .filter(|_| a.sample)
                    .map(|seed| {
                        Sampler::new(SamplingParams {
                            temperature: 0.6,
                            top_p: 0.9,
                            top_k: 50,
                            repetition_penalty: a.repetition_penalty,
                            seed,
                            ..Default::default()
                        })
                    })
                    .collect();
                for s in &mut samplers {
                    s.observe(&prompt);
                }
                // Seconds of the sampled steps to the logits on the host, and drawing.
                let mut parts = [0.0f64; 2];
                comm.barrier()?;
                let start = Instant::now();
                for _ in 0..a.steps {
                    if a.sample {
                        let t = Instant::now();
                        // As `generate`: only the candidates (and the logits of the tokens the
                        // penalty moves) leave the devices.
                        let asks: Option<Vec<_>> = samplers
                            .iter()
                            .map(|s| s.candidates_for(cfg.vocab_size))
                            .collect::<Option<_>>()
                            .filter(|_| !a.full_logits);
                        let asks = asks.as_deref();
                        #[cfg(feature = "cuda")]
                        let logits = match graph.as_mut() {
                            Some(g) => {
                                m.step_lockstep_graph_for_draw(g, &toks, &mut cache, asks, comm)?
                            }
                            None => m.forward_for_draw(&toks, &mut cache, asks, comm)?,
                        };
                        #[cfg(not(feature = "cuda"))]
                        let logits = m.forward_for_draw(&toks, &mut cache, asks, comm)?;
                        parts[0] += t.elapsed().as_secs_f64();
                        let t = Instant::now();
                        toks = draw(&m, &logits, comm, &mut samplers)?;
                        for (s, &t) in samplers.iter_mut().zip(&toks) {
                            s.observe_output(t);
                        }
                        parts[1] += t.elapsed().as_secs_f64();
                        continue;
                    }
                    // Greedy on the device: only the chosen tokens come back to the host, and
                    // every rank gets the same ones from the gathered (value, index) pairs.
                    #[cfg(feature = "cuda")]
                    if let Some(g) = graph.as_mut() {
                        toks = m.step_lockstep_graph(g, &toks, &mut cache, comm)?;
                        continue;
                    }
                    toks = m.forward_lockstep_greedy(&toks, &mut cache, comm)?;
                }
                let secs = start.elapsed().as_secs_f64();
                if a.sample && rank.rank == 0 {
                    let ms = |x: f64| x * 1e3 / a.steps as f64;
                    say!(
                        "batch {batch}, rank 0: {:.2} ms a step to the logits on the host (the forward pass included), {:.2} to draw the tokens",
                        ms(parts[0]),
                        ms(parts[1])
                    );
                }
                let kv = cache.size_in_bytes();
                rows.push((batch, secs, m.weight_bytes(), kv));
            }
            Ok(rows)
        };
        let rows = match a.one_rank_of {
            Some(_) => body(
                &SkipComm::new(tp, device, a.hold_us)?,
                TpRank { rank: 0, size: tp },
            )?,
            None => run_tp(tp, |comm, rank| {
                with_rank_comm(device, comm, |comm| body(comm, rank))
            })?,
        };
        #[cfg(feature = "cuda")]
        if let (Device::Cuda(o), true) = (device, a.batch.iter().any(|&b| b > 1)) {
            let gemms = tessera_tensor::cuda::gemm_choices(o)?;
            let list: Vec<String> = gemms
                .iter()
                .map(|((m, n, k), name)| format!("{m}x{n}x{k} {name}"))
                .collect();
            say!(
                "GEMM kernels kept by the tuner (m x n x k): {}",
                list.join(", ")
            );
        }
        for (batch, secs, weights, kv) in rows {
            let step = secs / a.steps as f64;
            // Per step every weight is read once and the cache up to the current length (the
            // cache is allocated for the whole run, so this slightly overcounts its bytes).
            let rank_bytes = (weights + kv) as f64;
            // On the CPU every rank reads through the same memory (one rank alone: its own).
            let sharing = if shared && a.one_rank_of.is_none() {
                tp
            } else {
                1
            };
            let bytes = rank_bytes * sharing as f64;
            let roof = bw / bytes;
            say!(
                "{:>3} {:>6} {:>10.2} {:>10.1} {:>12.2} {:>16.1} {:>11.1}",
                match a.one_rank_of {
                    Some(n) => format!("1/{n}"),
                    None => tp.to_string(),
                },
                batch,
                step * 1e3,
                batch as f64 / step,
                rank_bytes / 1e9,
                roof * batch as f64,
                100.0 / step / roof
            );
        }
    }
    Ok(())
}

/// Rank 0 draws each sequence's token from its row of `logits` as `generate` samples (the
/// sequences in parallel) and broadcasts them.
fn draw(
    m: &LlamaModel,
    logits: &DrawLogits,
    comm: &dyn Communicator,
    samplers: &mut [Sampler],
) -> Result<Vec<u32>, InferError> {
    let v = m.cfg.vocab_size;
    // Token ids travel as i32 (below 2^24, as every vocabulary is).
    let mut msg = vec![0i32; samplers.len()];
    if comm.rank() == 0 {
        use rayon::prelude::*;
        // The sequences' draws are independent: over the host's threads.
        let draws = msg.par_iter_mut().zip(samplers.par_iter_mut());
        match logits {
            DrawLogits::Top(rows) => draws
                .zip(rows.par_iter())
                .for_each(|((t, s), top)| *t = s.sample_top(top) as i32),
            DrawLogits::Full(l) => draws
                .zip(l.par_chunks(v))
                .for_each(|((t, s), row)| *t = s.sample(row) as i32),
        }
    }
    comm.broadcast(&mut msg, 0)?;
    Ok(msg.into_iter().map(|t| t as u32).collect())
}

/// Rank 0 of a group of `world` with every collective skipped (`--one-rank-of`): sums leave the
/// tensor as it is, gathers repeat this rank's part, a barrier returns at once. Point-to-point
/// and sub-groups are refused (decode uses neither).
///
/// On a GPU, as in-process tp ranks do unless `TESSERA_P2P_ALLREDUCE=0`, the residual add and
/// norm after each row-parallel projection run in the fused NVLink kernel
/// (`all_reduce_add_rms_norm`; with `TESSERA_P2P_PUSH=1` after the GEMV that would push to the
/// peers at batch 1) set up for a group of one: its own kernel and launch in the step, without the exchange (no peer to
/// push to or wait for), so the step shows what the fused path's kernels cost apart from NVLink.
pub(super) struct SkipComm {
    world: usize,
    #[cfg(feature = "cuda")]
    fused: Option<tessera_tensor::cuda::p2p::P2pAllReduce>,
}

impl Communicator for SkipComm {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_bytes(&self, _: &mut [u8], _: ElemKind, _: ReduceOp) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        for part in recv.chunks_mut(send.len().max(1)) {
            part.copy_from_slice(&send[..part.len()]);
        }
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut [u8], _: usize) -> Result<(), CommError> {
        Ok(())
    }
    fn reduce_scatter_bytes(
        &self,
        send: &[u8],
        recv: &mut [u8],
        _: ElemKind,
        _: ReduceOp,
    ) -> Result<(), CommError> {
        recv.copy_from_slice(&send[..recv.len()]);
        Ok(())
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
    fn send_bytes(&self, _: &[u8], _: usize) -> Result<(), CommError> {
        Err(self.refused("send"))
    }
    fn recv_bytes(&self, _: &mut [u8], _: usize) -> Result<(), CommError> {
        Err(self.refused("recv"))
    }
    fn sub_group(&self, _: &[usize]) -> Result<Box<dyn Communicator>, CommError> {
        Err(self.refused("sub_group"))
    }
    fn abort(&self, _: &str) {}
    fn all_reduce_tensor(&self, _: &mut Tensor, _: ReduceOp) -> Result<(), CommError> {
        Ok(())
    }
    /// This rank's part repeated, where it lies (a device copy each, as a device gather writes
    /// them; not through the host).
    fn all_gather_tensor(&self, t: &Tensor) -> Result<Tensor, CommError> {
        let err = |e: tessera_tensor::TensorError| CommError::Invalid {
            rank: 0,
            msg: e.to_string(),
        };
        let n = t.elem_count();
        let mut all = tessera_tensor::Storage::zeros_on(t.dtype(), n * self.world, t.device())
            .map_err(err)?;
        for r in 0..self.world {
            all.copy_from(r * n, t.storage()).map_err(err)?;
        }
        Tensor::new(tessera_comm::gathered_shape(self.world, t), all).map_err(err)
    }
    #[cfg(feature = "cuda")]
    fn all_reduce_add_rms_norm(
        &self,
        part: &Tensor,
        x: &mut Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<Option<Tensor>, CommError> {
        self.on_fused(|f| f.all_reduce_add_rms_norm_tensors(part, x, w, eps))
    }
    #[cfg(feature = "cuda")]
    fn row_parallel_matmul(&self, x: &Tensor, w: &Tensor) -> Result<Option<Tensor>, CommError> {
        self.on_fused(|f| f.matmul_pushing_tensors(x, w))
    }
}

impl SkipComm {
    /// `call` on the fused NVLink kernel's side of this group of one, or `Ok(None)` (the caller's
    /// fallback) where it is not set up.
    #[cfg(feature = "cuda")]
    fn on_fused<T>(
        &self,
        call: impl FnOnce(
            &tessera_tensor::cuda::p2p::P2pAllReduce,
        ) -> Result<Option<T>, tessera_tensor::TensorError>,
    ) -> Result<Option<T>, CommError> {
        let Some(f) = &self.fused else {
            return Ok(None);
        };
        call(f).map_err(|e| CommError::Invalid {
            rank: 0,
            msg: e.to_string(),
        })
    }

    pub(super) fn new(world: usize, device: Device, hold_us: Option<f64>) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let off = !tessera_comm::nvlink_wanted().map_err(anyhow::Error::msg)?;
        #[cfg(feature = "cuda")]
        let fused = match device {
            Device::Cuda(o) if !off => {
                use tessera_tensor::cuda::p2p::P2pAllReduce;
                let hold = std::time::Duration::from_secs_f64(hold_us.unwrap_or(0.0) * 1e-6);
                let mut p =
                    P2pAllReduce::new(o, 0, 1, std::time::Duration::from_secs(10))?.with_hold(hold);
                let me = p.address();
                p.connect(&[(o, me)])?;
                match hold_us {
                    Some(h) => outln!(
                        "one rank alone: residual add + norm in the fused NVLink kernel, each call held {h} µs for an exchange"
                    ),
                    None => outln!(
                        "one rank alone: residual add + norm in the fused NVLink kernel (no exchange)"
                    ),
                }
                Some(p)
            }
            _ => None,
        };
        #[cfg(feature = "cuda")]
        if hold_us.is_some() && fused.is_none() {
            bail!(
                "--hold-us holds the fused NVLink kernel, which TESSERA_P2P_ALLREDUCE turned off"
            );
        }
        #[cfg(not(feature = "cuda"))]
        let _ = (device, hold_us);
        Ok(SkipComm {
            world,
            #[cfg(feature = "cuda")]
            fused,
        })
    }

    fn refused(&self, what: &str) -> CommError {
        CommError::Invalid {
            rank: 0,
            msg: format!("--one-rank-of skips communication; {what} is not available"),
        }
    }
}

/// The largest batch `--batch` takes.
const MAX_BATCH: usize = 4096;

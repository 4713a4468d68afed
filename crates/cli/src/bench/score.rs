//! `tessera bench score`: the log-probabilities of a sequence (what `tessera score` computes) with
//! a random-weight model, timed two ways in the same run: vocab-parallel on the ranks' devices
//! (each rank's log-sum-exp over its own vocabulary rows; three numbers a position exchanged), as
//! `score` does, and the straightforward way it replaces (every position's logits gathered to
//! every rank's host, then a log-softmax of each row there). Both must give the same numbers.
//! Beside them, the layers alone (the same pass with the head over the last row only), so that
//! what the head and its exchange cost shows.

use std::time::Instant;

use anyhow::{bail, Result};
use tessera_comm::Communicator;
use tessera_infer::{device_of_rank, run_tp, with_rank_comm, InferError};
use tessera_model::{LlamaModel, Logits, ModelConfig, TpRank};
use tessera_tensor::{ops, DType, Device};

use super::median;

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub tp: Vec<usize>,
    /// Tokens of the sequence scored.
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
    /// Timed runs of each way (the median is printed).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// A published shape (llama-3-8b, llama-3-70b, qwen3-8b); without it a 0.2B Llama (vocab
    /// 32,000, hidden 1,024, 12 layers).
    #[arg(long)]
    pub preset: Option<String>,
    /// Weight and activation dtype.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// cpu, or cuda (rank r on GPU r).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Rank 0 of a tp group of N alone, its collectives skipped (instead of --tp): the compute
    /// a rank's share of the pass cannot go below. Its log-probs are not the model's.
    #[arg(long, conflicts_with = "tp")]
    pub one_rank_of: Option<usize>,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    let dtype: DType = a.dtype.parse()?;
    let device: Device = a.device.parse()?;
    let small = (32000, 1024, 2816, 12, 16, 4);
    let cfg = ModelConfig::from_json_str(&super::decode::preset_json(a.preset.as_deref(), small)?)?;
    if !(2..=cfg.max_position_embeddings).contains(&a.tokens) {
        bail!(
            "--tokens takes 2 to the shape's context of {}, got {}",
            cfg.max_position_embeddings,
            a.tokens
        );
    }
    if !(1..=100).contains(&a.runs) {
        bail!("--runs takes 1 to 100, got {}", a.runs);
    }
    let tps = a.one_rank_of.map_or_else(|| a.tp.clone(), |n| vec![n]);
    for &tp in &tps {
        if tp == 0 {
            bail!("--tp and --one-rank-of must be at least 1");
        }
        tessera_model::validate_tp(&cfg, tp)?;
        // --one-rank-of runs rank 0 alone, on the first device.
        for r in 0..if a.one_rank_of.is_some() { 1 } else { tp } {
            device_of_rank(device, r).ensure_available()?;
        }
    }
    // The gathered logits: every rank holds all of them, on the host.
    let logits = (a.tokens * cfg.vocab_size * 4) as f64;
    let most = tps.iter().copied().max().unwrap_or(1) as f64;
    let weights = cfg.num_params() as f64 * dtype.size_in_bytes() as f64;
    let host = logits * most + if device == Device::Cpu { weights } else { 0.0 };
    if let Some(total) = tessera_tensor::device::exceeds_host_memory(host) {
        bail!(
            "the gathered logits of {} tokens (and on the CPU the weights) take {:.1} GB, more than this host's {:.1} GB: fewer --tokens",
            a.tokens,
            host / 1e9,
            total / 1e9
        );
    }
    outln!(
        "model: {} layers, hidden {}, vocab {}: {:.2}B params, {dtype}, random, on {device}; {} tokens scored, median of {}",
        cfg.num_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        cfg.num_params() as f64 / 1e9,
        a.tokens,
        a.runs
    );
    outln!(
        "{:>3} {:>16} {:>12} {:>14} {:>15} {:>18} {:>12} {:>8} {:>14}",
        "tp",
        "vocab-parallel",
        "tok/s",
        "TFLOP/s a rank",
        "layers alone",
        "logits to host",
        "tok/s",
        "faster",
        "largest diff"
    );
    // The work of a pass: two FLOPs a weight a token (the embedding table is looked up, not
    // multiplied), and causal attention's q.k and p.v over every pair of a query and a key it
    // sees.
    let n = a.tokens as f64;
    let embed = if cfg.tie_word_embeddings {
        0.0
    } else {
        (cfg.vocab_size * cfg.hidden_size) as f64
    };
    let pairs = n * (n + 1.0) / 2.0;
    let flops = 2.0 * (cfg.num_params() as f64 - embed) * n
        + 4.0 * (cfg.head_dim * cfg.num_heads * cfg.num_layers) as f64 * pairs;
    let tokens: Vec<u32> = (0..a.tokens as u64)
        .map(|i| (i * 7919 % cfg.vocab_size as u64) as u32)
        .collect();
    for &tp in &tps {
        let body = |comm: &dyn Communicator, rank: TpRank| -> Result<_, InferError> {
            let m = LlamaModel::random(
                cfg.clone(),
                rank,
                dtype,
                device_of_rank(device, rank.rank),
                7,
            )?;
            let mut ours = Vec::new();
            let (mut t_ours, mut t_host, mut t_layers) = (Vec::new(), Vec::new(), Vec::new());
            let mut host = Vec::new();
            for _ in 0..a.runs {
                // The layers alone: the same pass with the head over the last row only.
                comm.barrier()?;
                let t = Instant::now();
                let mut cache = m.new_cache(tokens.len())?;
                m.forward_greedy(&tokens, &mut cache, comm)?;
                t_layers.push(t.elapsed().as_secs_f64());
                comm.barrier()?;
                let t = Instant::now();
                let mut cache = m.new_cache(tokens.len())?;
                ours = m.forward_logprobs(&tokens, &mut cache, comm)?;
                t_ours.push(t.elapsed().as_secs_f64());
                comm.barrier()?;
                let t = Instant::now();
                let mut cache = m.new_cache(tokens.len())?;
                let all = m.forward(&tokens, &mut cache, Logits::All, comm)?;
                let v = cfg.vocab_size;
                host = (0..tokens.len() - 1)
                    .map(|i| ops::log_softmax(&all[i * v..(i + 1) * v])[tokens[i + 1] as usize])
                    .collect();
                t_host.push(t.elapsed().as_secs_f64());
            }
            let diff = ours
                .iter()
                .zip(&host)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            Ok((median(t_ours), median(t_host), median(t_layers), diff))
        };
        let (ours, host, layers, diff) = match a.one_rank_of {
            Some(_) => body(
                &super::decode::SkipComm::new(tp, device, None)?,
                TpRank { rank: 0, size: tp },
            )?,
            None => run_tp(tp, |comm, rank| {
                with_rank_comm(device, comm, |comm| body(comm, rank))
            })?,
        };
        let scored = (a.tokens - 1) as f64;
        let label = match a.one_rank_of {
            Some(_) => format!("1/{tp}"),
            None => tp.to_string(),
        };
        outln!(
            "{:>3} {:>13.2} ms {:>12.0} {:>14.1} {:>12.2} ms {:>15.2} ms {:>12.0} {:>7.1}x {:>14.2e}",
            label,
            ours * 1e3,
            scored / ours,
            flops / tp as f64 / ours / 1e12,
            layers * 1e3,
            host * 1e3,
            scored / host,
            host / ours,
            diff
        );
    }
    Ok(())
}

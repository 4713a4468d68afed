//! `tessera bench decode`: batch-1 decode tokens/s of a random-weight Llama at several tp, beside the
//! memory roofline (every step reads every weight once: the bytes of all ranks' weights over the
//! measured read bandwidth; the ranks share this machine's memory).

use std::time::Instant;

use anyhow::Result;
use tessera_comm::{CommExt, Communicator};

use tessera_infer::run_tp;
use tessera_model::synthetic::{llama_config_json, random_safetensors};
use tessera_model::{Checkpoint, LlamaModel, Logits, ModelConfig};
use tessera_tensor::{sample::argmax, DType};

use super::ceiling;

#[derive(clap::Args, Debug)]
pub struct DecodeArgs {
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub tp: Vec<usize>,
    /// Weight and activation dtype.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Decode steps timed (after a prefill of --prompt-len tokens).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    #[arg(long, default_value_t = 16)]
    pub prompt_len: usize,
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

pub fn run(a: DecodeArgs) -> Result<()> {
    let dtype: DType = a.dtype.parse()?;
    let json = llama_config_json(
        a.vocab,
        a.hidden,
        a.intermediate,
        a.layers,
        a.heads,
        a.kv_heads,
        false,
    );
    let cfg = ModelConfig::from_json_str(&json)?;
    for &tp in &a.tp {
        tessera_model::validate_tp(&cfg, tp)?;
    }
    let bytes = random_safetensors(&cfg, dtype, 0);
    println!(
        "model: {} layers, hidden {}, {} heads / {} kv, vocab {}: {:.1}M params, {:.0} MB of {dtype} weights",
        a.layers, a.hidden, a.heads, a.kv_heads, a.vocab,
        cfg.num_params() as f64 / 1e6,
        bytes.len() as f64 / 1e6
    );
    // The benchmark's checkpoint lives as long as the process.
    let ck = Checkpoint::from_static("<random weights>", Box::leak(bytes.into_boxed_slice()))?;
    let bw = ceiling::read_bandwidth();
    println!(
        "measured memory read bandwidth: {:.1} GB/s; threads: {}",
        bw / 1e9,
        rayon::current_num_threads()
    );
    println!(
        "\n{:>3} {:>10} {:>10} {:>14} {:>16} {:>11}",
        "tp", "ms/step", "tok/s", "MB/rank", "roofline tok/s", "% roofline"
    );
    let prompt: Vec<u32> = (0..a.prompt_len as u32)
        .map(|i| (i * 7919) % a.vocab as u32)
        .collect();
    for &tp in &a.tp {
        let (secs, rank_bytes) = run_tp(tp, |comm, rank| {
            let m = LlamaModel::from_checkpoint(&ck, cfg.clone(), rank, dtype)?;
            let mut cache = m.new_cache(prompt.len() + a.steps + 1);
            let logits = m.forward(&prompt, &mut cache, Logits::Last, comm)?;
            let mut tok = [argmax(&logits) as i32];
            comm.barrier()?;
            let start = Instant::now();
            for _ in 0..a.steps {
                let logits = m.forward(&[tok[0] as u32], &mut cache, Logits::Last, comm)?;
                if comm.rank() == 0 {
                    tok[0] = argmax(&logits) as i32;
                }
                comm.broadcast(&mut tok, 0)?;
            }
            Ok((start.elapsed().as_secs_f64(), m.weight_bytes()))
        })?;
        let step = secs / a.steps as f64;
        // Every rank's weights are read once per step through the one shared memory system.
        let total_bytes = rank_bytes as f64 * tp as f64;
        let roof = bw / total_bytes;
        println!(
            "{:>3} {:>10.2} {:>10.1} {:>14.1} {:>16.1} {:>11.1}",
            tp,
            step * 1e3,
            1.0 / step,
            rank_bytes as f64 / 1e6,
            roof,
            100.0 / step / roof
        );
    }
    Ok(())
}

//! Generation: prefill the prompt, then decode one token per step with the KV cache. Rank 0 samples
//! and broadcasts each token, so every rank feeds the same token to the next step.

use tessera_comm::{CommExt, Communicator};
use tessera_model::{DrawLogits, LlamaModel};
use tessera_tensor::{Candidates, DType, Device, Sampler, SamplingParams};

use crate::{run_tp, InferError, OpenModel};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at the config's end-of-sequence token(s).
    pub stop_at_eos: bool,
}

/// Generates up to `max_tokens` after `prompt`, with the model split over `tp` ranks. Returns the
/// generated tokens only (an end-of-sequence token that stopped generation included, as HF does).
pub fn generate(
    model: &OpenModel,
    prompt: &[u32],
    params: &GenerateParams,
    tp: usize,
    dtype: DType,
) -> Result<Vec<u32>, InferError> {
    generate_on(model, prompt, params, tp, dtype, Device::Cpu)
}

/// As [`generate`], on `device` (CUDA: rank r uses device `base + r`).
pub fn generate_on(
    model: &OpenModel,
    prompt: &[u32],
    params: &GenerateParams,
    tp: usize,
    dtype: DType,
    device: Device,
) -> Result<Vec<u32>, InferError> {
    if prompt.is_empty() {
        return Err(InferError::Request(
            "the prompt must hold at least one token".into(),
        ));
    }
    // Before any rank (whose sampler marks the prompt's ids) starts.
    model.config.check_tokens(prompt)?;
    // Its end-of-sequence ids are unknown.
    if let Some(e) = &model.generation_config_error {
        return Err(InferError::Request(e.clone()));
    }
    // The KV cache is sized for the whole request up front (captured CUDA graphs read it in
    // place), so a request past the model's context is refused, as vLLM refuses it.
    let ctx = model.config.max_position_embeddings;
    if prompt.len().saturating_add(params.max_tokens) > ctx {
        return Err(InferError::Request(format!(
            "the prompt's {} tokens and --max-tokens {} exceed the model's context of {ctx} positions",
            prompt.len(),
            params.max_tokens
        )));
    }
    // On the CPU the ranks' caches share the host's memory: one that could never fit is refused
    // here rather than failing (or, where memory is overcommitted, swapping) later. (Launched
    // ranks may span hosts, so they are not checked.)
    if device == Device::Cpu && !tessera_comm::launched() {
        let c = &model.config;
        let positions = prompt.len() + params.max_tokens;
        // KV heads are replicated over the ranks where tp exceeds them.
        let replicas = c.num_kv_heads.max(tp) as f64 / c.num_kv_heads as f64;
        let kv = c.kv_bytes_per_token(dtype.size_in_bytes()) as f64 * replicas * positions as f64;
        if let Some(total) = tessera_tensor::device::exceeds_host_memory(kv) {
            return Err(InferError::Request(format!(
                "the KV cache of {positions} positions takes {:.1} GB, more than this host's {:.1} GB of memory: fewer --max-tokens",
                kv / 1e9,
                total / 1e9
            )));
        }
    }
    tessera_model::validate_tp(&model.config, tp)?;
    run_tp(tp, |comm, rank| {
        let m = model.load_rank(rank, dtype, device)?;
        crate::with_rank_comm(device, comm, |comm| {
            generate_on_rank(&m, prompt, params, comm)
        })
    })
}

pub fn generate_on_rank(
    m: &LlamaModel,
    prompt: &[u32],
    params: &GenerateParams,
    comm: &dyn Communicator,
) -> Result<Vec<u32>, InferError> {
    let mut sampler = Sampler::new(params.sampling);
    sampler.observe(prompt);
    let mut cache = m.new_cache(prompt.len() + params.max_tokens)?;
    let mut out = Vec::with_capacity(params.max_tokens);
    let mut input = prompt.to_vec();
    // Greedy on the raw logits keeps them on the device (the argmax found there).
    let greedy = params.sampling.plain_greedy();
    let mut graph = DecodeGraphs::default();
    while out.len() < params.max_tokens {
        let tok = if greedy {
            // Every rank gets the same argmax from the gathered (value, index) pairs, and the
            // logits stay on the device.
            graph.greedy_step(m, &input, &mut cache, comm)?
        } else {
            // With a top-k (or greedy with a penalty) only the candidates of a draw and the
            // logits of the tokens a penalty moves leave the devices; the penalised set grows
            // with the output, so it is asked for anew each step.
            let ask = sampler.candidates_for(m.cfg.vocab_size);
            let asks = ask.as_ref().map(std::slice::from_ref);
            let logits = graph.draw_step(m, &input, &mut cache, asks, comm)?;
            // -1: the logits hold NaN or +inf (no distribution to draw from; every rank stops
            // with the same error). Candidates are only given where they hold neither.
            let mut msg = [-1i32; 1];
            if comm.rank() == 0 {
                match &logits {
                    DrawLogits::Top(rows) => msg[0] = sampler.sample_top(&rows[0]) as i32,
                    DrawLogits::Full(l) => {
                        if !l.iter().any(|l| l.is_nan() || *l == f32::INFINITY) {
                            msg[0] = sampler.sample(l) as i32;
                        }
                    }
                }
            }
            comm.broadcast(&mut msg, 0)?;
            if msg[0] < 0 {
                return Err(
                    tessera_model::ModelError::NotANumber("of the last position".into()).into(),
                );
            }
            msg[0] as u32
        };
        out.push(tok);
        sampler.observe_output(tok);
        if params.stop_at_eos && m.cfg.eos_token_ids.contains(&tok) {
            break;
        }
        input = vec![tok];
    }
    Ok(out)
}

/// Decode steps on a GPU replayed as one captured CUDA graph: the prompt and the first decode step
/// run eager (kernels compiled, tables uploaded), the next step captures the graph, and every later
/// step replays it (the same tokens, or logits, as eager steps, one launch instead of hundreds).
/// Greedy steps capture the argmax too; sampled ones stop at each rank's logits, whose top-k
/// candidates and penalised tokens' logits (or, without a top-k, the logits) are then gathered
/// and drawn from on the host. Where a capture is refused, decode stays eager (with a warning). On the CPU
/// every step is eager. The captured attention covers the cache's whole
/// capacity (prompt + max_tokens) in splits of 256 positions; the ones past the current position
/// are empty and add exact zeros.
#[derive(Default)]
struct DecodeGraphs {
    /// An eager decode step has run (kernels compiled, tables uploaded): a capture may follow.
    #[cfg(feature = "cuda")]
    warmed: bool,
    #[cfg(feature = "cuda")]
    graph: Option<tessera_model::LockstepGraph>,
    #[cfg(feature = "cuda")]
    refused: bool,
}

impl DecodeGraphs {
    fn greedy_step(
        &mut self,
        m: &LlamaModel,
        input: &[u32],
        cache: &mut tessera_model::KvCache,
        comm: &dyn Communicator,
    ) -> Result<u32, InferError> {
        #[cfg(feature = "cuda")]
        if let Some(g) = self.graph_for(m, input, cache, comm, LlamaModel::capture_lockstep_greedy)
        {
            return Ok(m.step_lockstep_graph(g, input, cache, comm)?[0]);
        }
        Ok(m.forward_greedy(input, cache, comm)?)
    }

    /// The last position's logits (on every rank's host) as a draw asking `asks` needs them.
    fn draw_step(
        &mut self,
        m: &LlamaModel,
        input: &[u32],
        cache: &mut tessera_model::KvCache,
        asks: Option<&[Candidates]>,
        comm: &dyn Communicator,
    ) -> Result<DrawLogits, InferError> {
        #[cfg(feature = "cuda")]
        if let Some(g) = self.graph_for(m, input, cache, comm, LlamaModel::capture_lockstep_logits)
        {
            return Ok(m.step_lockstep_graph_for_draw(g, input, cache, asks, comm)?);
        }
        Ok(m.forward_for_draw(input, cache, asks, comm)?)
    }

    /// The graph to replay this step through, captured by `capture` if this is the step to
    /// capture it; `None`: an eager step.
    #[cfg(feature = "cuda")]
    fn graph_for(
        &mut self,
        m: &LlamaModel,
        input: &[u32],
        cache: &mut tessera_model::KvCache,
        comm: &dyn Communicator,
        capture: impl FnOnce(
            &LlamaModel,
            &mut tessera_model::KvCache,
            &dyn Communicator,
        ) -> Result<tessera_model::LockstepGraph, tessera_model::ModelError>,
    ) -> Option<&mut tessera_model::LockstepGraph> {
        if input.len() != 1 || !matches!(m.device, Device::Cuda(_)) || self.refused {
            return None;
        }
        if self.graph.is_none() && self.warmed {
            // A refused capture leaves the stream usable; decode goes on eager.
            match capture(m, cache, comm) {
                Ok(g) => self.graph = Some(g),
                Err(e) => {
                    use std::io::Write as _;
                    let _ = writeln!(
                        std::io::stderr(),
                        "warning: decoding without a CUDA graph: {e}"
                    );
                    self.refused = true;
                }
            }
        }
        self.warmed = true;
        self.graph.as_mut()
    }
}

//! Generation: prefill the prompt, then decode one token per step with the KV cache. Rank 0 samples
//! and broadcasts each token, so every rank feeds the same token to the next step.

use tessera_comm::{CommExt, Communicator};
use tessera_model::{LlamaModel, Logits};
use tessera_tensor::{DType, Device, Sampler, SamplingParams};

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
    tessera_model::validate_tp(&model.config, tp)?;
    crate::prepare_devices(device, tp)?;
    run_tp(tp, |comm, rank| {
        let m = model.load_rank(rank, dtype, device, comm)?;
        generate_on_rank(&m, prompt, params, comm)
    })
}

pub fn generate_on_rank(
    m: &LlamaModel,
    prompt: &[u32],
    params: &GenerateParams,
    comm: &dyn Communicator,
) -> Result<Vec<u32>, InferError> {
    let mut sampler = Sampler::new(params.sampling);
    let mut cache = m.new_cache(prompt.len() + params.max_tokens)?;
    let mut out = Vec::with_capacity(params.max_tokens);
    let mut input = prompt.to_vec();
    let greedy = params.sampling.temperature <= 0.0;
    while out.len() < params.max_tokens {
        let tok = if greedy {
            // Every rank gets the same argmax from the gathered (value, index) pairs, and the
            // logits stay on the device.
            m.forward_greedy(&input, &mut cache, comm)?
        } else {
            let logits = m.forward(&input, &mut cache, Logits::Last, comm)?;
            let mut msg = [0i32; 1];
            if comm.rank() == 0 {
                msg[0] = sampler.sample(&logits) as i32;
            }
            comm.broadcast(&mut msg, 0)?;
            msg[0] as u32
        };
        out.push(tok);
        if params.stop_at_eos && m.cfg.eos_token_ids.contains(&tok) {
            break;
        }
        input = vec![tok];
    }
    Ok(out)
}

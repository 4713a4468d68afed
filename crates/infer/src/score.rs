//! Scoring: the log-probability of each token given the ones before it, in one forward pass.

use tessera_comm::Communicator;
use tessera_model::LlamaModel;
use tessera_tensor::{DType, Device};

use crate::{run_tp, InferError, OpenModel};

#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOutput {
    /// `token_logprobs[i] = log p(tokens[i + 1] | tokens[..=i])`.
    pub token_logprobs: Vec<f64>,
    pub sum_logprob: f64,
}

/// Scores `tokens` with the model split over `tp` ranks on the CPU.
pub fn score(
    model: &OpenModel,
    tokens: &[u32],
    tp: usize,
    dtype: DType,
) -> Result<ScoreOutput, InferError> {
    score_on(model, tokens, tp, dtype, Device::Cpu)
}

/// Scores `tokens` with the model split over `tp` ranks; on CUDA, rank r uses device `base + r`.
pub fn score_on(
    model: &OpenModel,
    tokens: &[u32],
    tp: usize,
    dtype: DType,
    device: Device,
) -> Result<ScoreOutput, InferError> {
    if tokens.len() < 2 {
        return Err(InferError::Request(format!(
            "score needs at least two tokens (the first is only context), got {}",
            tokens.len()
        )));
    }
    let ctx = model.config.max_position_embeddings;
    if tokens.len() > ctx {
        return Err(InferError::Request(format!(
            "{} tokens exceed the model's context of {ctx} positions",
            tokens.len()
        )));
    }
    tessera_model::validate_tp(&model.config, tp)?;
    run_tp(tp, |comm, rank| {
        let m = model.load_rank(rank, dtype, device)?;
        crate::with_rank_comm(device, comm, |comm| score_on_rank(&m, tokens, comm))
    })
}

/// One rank's part of scoring (every rank computes the same result).
pub fn score_on_rank(
    m: &LlamaModel,
    tokens: &[u32],
    comm: &dyn Communicator,
) -> Result<ScoreOutput, InferError> {
    let mut cache = m.new_cache(tokens.len())?;
    let token_logprobs = m.forward_logprobs(tokens, &mut cache, comm)?;
    // A broken checkpoint (NaN weights, or values beyond the dtype's range) gives scores that are
    // not numbers: an error, not `null` in the output.
    if let Some(i) = token_logprobs.iter().position(|x| !x.is_finite()) {
        return Err(tessera_model::ModelError::NotANumber(format!(
            "at position {i} (log p = {})",
            token_logprobs[i]
        ))
        .into());
    }
    let sum_logprob = token_logprobs.iter().sum();
    Ok(ScoreOutput {
        token_logprobs,
        sum_logprob,
    })
}

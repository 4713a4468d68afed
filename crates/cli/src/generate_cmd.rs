//! `tessera generate`: continue a prompt, greedy or sampled.

use anyhow::{bail, Result};
use tessera_infer::{generate_on, GenerateParams, SamplingDefaults};

/// Each sampling setting from its flag, else from the model's generation_config.json where that
/// samples (transformers' reading: temperature 1, top_p 1 and top_k 50 where it leaves them out),
/// else greedy; `--top-p` / `--top-k` without a temperature sample at 1 (asking for a sampling
/// filter asks for sampling, as vLLM's default temperature of 1 does). Said on stderr where the
/// flags alone do not decide it.
fn sampling_params(a: &GenerateArgs, config: Option<SamplingDefaults>) -> Result<SamplingParams> {
    let bad =
        |key: &str, x: f64| anyhow::anyhow!("generation_config.json: `{key}` {x} is out of range");
    let filters = a.top_p.is_some() || a.top_k.is_some();
    let (temperature, top_p, top_k) = match config {
        Some(d) => {
            let t = match a.temperature {
                Some(t) => t,
                None => {
                    let t = d.temperature.unwrap_or(1.0);
                    if !(t.is_finite() && t >= 0.0) {
                        return Err(bad("temperature", t));
                    }
                    t as f32
                }
            };
            let p = match a.top_p {
                Some(p) => p,
                None => {
                    let p = d.top_p.unwrap_or(1.0);
                    if !(0.0..=1.0).contains(&p) {
                        return Err(bad("top_p", p));
                    }
                    p as f32
                }
            };
            let k = match a.top_k {
                Some(k) => k,
                None => {
                    let k = d.top_k.unwrap_or(50.0);
                    if !(k >= 0.0 && k.fract() == 0.0 && k <= u32::MAX as f64) {
                        return Err(bad("top_k", k));
                    }
                    k as usize
                }
            };
            if tessera_comm::process_rank() == 0 && a.temperature.is_none() {
                if t > 0.0 {
                    errln!(
                        "sampling with generation_config.json's settings where no flag gives them: temperature {t}, top_p {p}, top_k {k} (--temperature 0 for greedy)"
                    );
                } else {
                    errln!("greedy: generation_config.json's temperature is 0");
                }
            }
            (t, p, k)
        }
        None => {
            let t = match a.temperature {
                Some(t) => t,
                None if filters => {
                    if tessera_comm::process_rank() == 0 {
                        errln!("sampling at temperature 1: --top-p / --top-k given without --temperature");
                    }
                    1.0
                }
                None => 0.0,
            };
            (t, a.top_p.unwrap_or(1.0), a.top_k.unwrap_or(0))
        }
    };
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k,
        seed: a.seed,
    })
}
use tessera_tensor::SamplingParams;

use crate::model_args::{parse_tokens, read_text_file, ModelArgs};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_tokens", "prompt_file"])))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text; it may start with a hyphen ("- item", "--- ACT I ---").
    #[arg(long, allow_hyphen_values = true)]
    pub prompt: Option<String>,
    /// Prompt as token ids, comma separated.
    #[arg(long, allow_hyphen_values = true)]
    pub prompt_tokens: Option<String>,
    /// Prompt from a UTF-8 file (`-`: standard input), for prompts longer than a command line
    /// holds.
    #[arg(long)]
    pub prompt_file: Option<std::path::PathBuf>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// 0 means greedy. With no sampling flag, the model's generation_config.json decides (its
    /// temperature, top_p and top_k where it sets do_sample), else greedy.
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (default 1).
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens before top-p (0, the default: all).
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object: {"tokens": [...], "text": "..."} (the generated part only, with the
    /// space before its first word; "text" is null for a model without a tokenizer). Without it
    /// the prompt (as typed, or the text of --prompt-tokens) is printed before the continuation.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if let Some(t) = a.temperature.filter(|t| !(t.is_finite() && *t >= 0.0)) {
        bail!("--temperature must be a number >= 0, got {t}");
    }
    if let Some(p) = a.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        bail!("--top-p must be in (0, 1], got {p}");
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let (model, dtype, device) = a.model.open()?;
    let sampling = sampling_params(&a, model.sampling)?;
    let file_text = match &a.prompt_file {
        Some(f) => Some(read_text_file(f, "--prompt-file")?),
        None => None,
    };
    let prompt_text = a.prompt.as_deref().or(file_text.as_deref());
    let prompt = match (&a.prompt_tokens, prompt_text) {
        (Some(t), _) => parse_tokens(t, "--prompt-tokens")?,
        (None, Some(text)) => model.encode(text)?,
        (None, None) => unreachable!("clap requires one"),
    };
    if prompt.is_empty() {
        bail!("the prompt holds no tokens");
    }
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling,
        stop_at_eos: !a.ignore_eos,
    };
    let tokens = generate_on(&model, &prompt, &params, a.model.tp, dtype, device)?;
    if tessera_comm::process_rank() != 0 {
        return Ok(()); // under a multi-process launch only rank 0 prints
    }
    // The new text as the whole sequence's text less the prompt's (a SentencePiece decoder drops
    // the first space of ids decoded alone).
    let text = if model.tokenizer.is_some() {
        Some(model.decode_continuation(&prompt, &tokens)?)
    } else {
        None
    };
    if a.json {
        outln!("{}", serde_json::json!({ "tokens": tokens, "text": text }));
    } else {
        match text {
            // The prompt as typed, or the text of the prompt's ids, then the continuation.
            Some(t) => match prompt_text {
                Some(p) => outln!("{p}{t}"),
                None => outln!("{}{t}", model.decode(&prompt)?),
            },
            None => outln!("{tokens:?}"),
        }
    }
    Ok(())
}

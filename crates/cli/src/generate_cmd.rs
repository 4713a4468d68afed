//! `tessera generate`: continue a prompt, greedy or sampled.

use anyhow::{bail, Result};
use tessera_infer::{generate_on, GenerateParams, SamplingDefaults};
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
    /// 0 means greedy. Unset: the model's generation_config.json's where it samples (do_sample;
    /// 1 where it gives none), else 1 with --top-p or --top-k, else greedy.
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass. Unset: the
    /// sampling generation_config.json's, else 1 (all).
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (and those tied with the k-th) before top-p; 0: all. Unset:
    /// the sampling generation_config.json's (50 where it gives none), else 0.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// After top-k and top-p, drop tokens less likely than this times the likeliest; 0: none.
    /// Unset: the sampling generation_config.json's, else 0.
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Divide the positive logits of every token already in the prompt or output by this (and
    /// multiply the negative ones), greedy or sampled; 1: off. Unset: generation_config.json's
    /// (which transformers and vLLM apply whether or not it samples), else 1.
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// Subtract this from the logit of every token the output already holds, in [-2, 2] (vLLM's
    /// presence_penalty; 0: off). Applied greedy too, after the repetition penalty.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Subtract this times its count in the output from every output token's logit, in [-2, 2]
    /// (vLLM's frequency_penalty; 0: off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
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
    if let Some(p) = a.min_p.filter(|p| !(*p >= 0.0 && *p <= 1.0)) {
        bail!("--min-p must be in [0, 1], got {p}");
    }
    if let Some(r) = a
        .repetition_penalty
        .filter(|r| !(r.is_finite() && *r > 0.0))
    {
        bail!("--repetition-penalty must be a number > 0, got {r}");
    }
    for (flag, v) in [
        ("--presence-penalty", a.presence_penalty),
        ("--frequency-penalty", a.frequency_penalty),
    ] {
        if !(-2.0..=2.0).contains(&v) {
            bail!("{flag} must be in [-2, 2], got {v}");
        }
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let (model, dtype, device) = a.model.open()?;
    if let Some(e) = &model.generation_config_error {
        bail!("{e}");
    }
    let mut sampling = sampling_params(&a, model.sampling.clone())?;
    sampling.repetition_penalty = repetition_penalty(&a, model.repetition_penalty.as_ref())?;
    sampling.presence_penalty = a.presence_penalty;
    sampling.frequency_penalty = a.frequency_penalty;
    // Settings of the file that transformers' generate may apply and this one does not: said,
    // not silently dropped (those of sampling only where this run samples, of greedy decoding
    // only where it does not).
    let unapplied: Vec<String> = model
        .unapplied
        .iter()
        .filter(|u| u.acts.when(sampling.temperature > 0.0))
        .map(|u| format!("{} {}", u.key, u.value))
        .collect();
    if !unapplied.is_empty() && tessera_comm::process_rank() == 0 {
        errln!(
            "warning: generation_config.json sets {}, which tessera does not apply (transformers' generate may)",
            unapplied.join(", ")
        );
    }
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

/// Each sampling setting from its flag, else from the model's generation_config.json where that
/// samples (transformers' reading: temperature 1, top_p 1 and top_k 50 where it leaves them out),
/// else greedy; `--top-p` / `--top-k` without a temperature from a flag or the config sample at 1
/// (asking for a sampling filter asks for sampling, as vLLM's default temperature of 1 does).
/// Said on stderr where the flags alone do not decide it.
fn sampling_params(a: &GenerateArgs, config: Option<SamplingDefaults>) -> Result<SamplingParams> {
    let filters = a.top_p.is_some() || a.top_k.is_some() || a.min_p.is_some();
    if a.temperature == Some(0.0) && filters && tessera_comm::process_rank() == 0 {
        errln!("greedy at --temperature 0: --top-p / --top-k / --min-p do nothing");
    }
    let Some(d) = config else {
        let t = match a.temperature {
            Some(t) => t,
            None if filters => {
                if tessera_comm::process_rank() == 0 {
                    errln!(
                        "sampling at temperature 1: --top-p / --top-k / --min-p given without --temperature"
                    );
                }
                1.0
            }
            None => 0.0,
        };
        return Ok(SamplingParams {
            temperature: t,
            top_p: a.top_p.unwrap_or(1.0),
            top_k: a.top_k.unwrap_or(0),
            min_p: a.min_p.unwrap_or(0.0),
            seed: a.seed,
            ..Default::default()
        });
    };
    let t = match a.temperature {
        Some(t) => t,
        None => config_number("temperature", d.temperature.as_ref(), 1.0, &|t| {
            t.is_finite() && t >= 0.0
        })? as f32,
    };
    let p = match a.top_p {
        Some(p) => p,
        None => config_number("top_p", d.top_p.as_ref(), 1.0, &|p| {
            (0.0..=1.0).contains(&p)
        })? as f32,
    };
    let k = match a.top_k {
        Some(k) => k,
        None => config_number("top_k", d.top_k.as_ref(), 50.0, &|k| {
            k >= 0.0 && k.fract() == 0.0 && k <= u32::MAX as f64
        })? as usize,
    };
    let min_p = match a.min_p {
        Some(m) => m,
        None => config_number("min_p", d.min_p.as_ref(), 0.0, &|m| {
            (0.0..=1.0).contains(&m)
        })? as f32,
    };
    let from_config = a.temperature.is_none()
        || a.top_p.is_none()
        || a.top_k.is_none()
        || (a.min_p.is_none() && d.min_p.is_some());
    if tessera_comm::process_rank() == 0 && from_config {
        if t > 0.0 {
            let min_p = if min_p > 0.0 {
                format!(", min_p {min_p}")
            } else {
                String::new()
            };
            errln!(
                "sampling at temperature {t}, top_p {p}, top_k {k}{min_p}: generation_config.json's settings where no flag gives them (--temperature 0 for greedy)"
            );
        } else if a.temperature.is_none() {
            errln!("greedy: generation_config.json's temperature is 0");
        }
    }
    Ok(SamplingParams {
        temperature: t,
        top_p: p,
        top_k: k,
        min_p,
        seed: a.seed,
        ..Default::default()
    })
}

/// `--repetition-penalty`, else generation_config.json's (said on stderr where it is not 1), else 1.
fn repetition_penalty(a: &GenerateArgs, config: Option<&serde_json::Value>) -> Result<f32> {
    if let Some(r) = a.repetition_penalty {
        return Ok(r);
    }
    let r = config_number("repetition_penalty", config, 1.0, &|r| {
        r.is_finite() && r > 0.0
    })? as f32;
    if r != 1.0 && tessera_comm::process_rank() == 0 {
        errln!(
            "repetition penalty {r}: generation_config.json's (--repetition-penalty 1 for none)"
        );
    }
    Ok(r)
}

/// A setting of the model's generation_config.json: its number, `default` where unset; anything
/// else (not a number, or not `ok`) one line.
fn config_number(
    key: &str,
    x: Option<&serde_json::Value>,
    default: f64,
    ok: &dyn Fn(f64) -> bool,
) -> Result<f64> {
    match x {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|n| ok(*n))
            .ok_or_else(|| anyhow::anyhow!("generation_config.json: `{key}` {v} is out of range")),
    }
}

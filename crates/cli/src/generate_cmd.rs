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
    // The flags given, else the model's generation_config.json where it samples (as
    // transformers' generate and vLLM do), else greedy.
    let flags = a.temperature.is_some() || a.top_p.is_some() || a.top_k.is_some();
    let defaults = match model.sampling {
        Some(d) if !flags => {
            if tessera_comm::process_rank() == 0 {
                errln!(
                    "sampling as generation_config.json says (temperature {}, top_p {}, top_k {}); --temperature 0 for greedy",
                    d.temperature.unwrap_or(1.0),
                    d.top_p.unwrap_or(1.0),
                    d.top_k.unwrap_or(0)
                );
            }
            SamplingDefaults {
                temperature: Some(d.temperature.unwrap_or(1.0)),
                ..d
            }
        }
        _ => SamplingDefaults::default(),
    };
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
        sampling: SamplingParams {
            temperature: a.temperature.or(defaults.temperature).unwrap_or(0.0),
            top_p: a.top_p.or(defaults.top_p).unwrap_or(1.0),
            top_k: a.top_k.or(defaults.top_k).unwrap_or(0),
            seed: a.seed,
        },
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

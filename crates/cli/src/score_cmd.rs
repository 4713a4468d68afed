//! `tessera score`: per-token log-probabilities of a text or token sequence.

use anyhow::{bail, Result};
use tessera_infer::score_on;

use crate::model_args::{parse_tokens, read_text_file, ModelArgs};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["tokens", "text", "text_file"])))]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token ids, comma separated.
    #[arg(long, allow_hyphen_values = true)]
    pub tokens: Option<String>,
    /// Text, tokenized with the model's tokenizer (BOS added as HF adds it); it may start with
    /// a hyphen ("- item", "--- ACT I ---").
    #[arg(long, allow_hyphen_values = true)]
    pub text: Option<String>,
    /// Text from a UTF-8 file (`-`: standard input), for inputs longer than a command line holds.
    #[arg(long)]
    pub text_file: Option<std::path::PathBuf>,
    /// Print one JSON object: {"token_logprobs": [...], "sum_logprob": x}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    let (model, dtype, device) = a.model.open()?;
    let tokens = match (&a.tokens, &a.text, &a.text_file) {
        (Some(t), _, _) => parse_tokens(t, "--tokens")?,
        (None, Some(text), _) => model.encode(text)?,
        (None, None, Some(f)) => model.encode(&read_text_file(f, "--text-file")?)?,
        (None, None, None) => unreachable!("clap requires one"),
    };
    if tokens.is_empty() {
        bail!("nothing to score: the input holds no tokens");
    }
    let out = score_on(&model, &tokens, a.model.tp, dtype, device)?;
    if tessera_comm::process_rank() != 0 {
        return Ok(()); // under a multi-process launch only rank 0 prints
    }
    if a.json {
        let v = serde_json::json!({
            "token_logprobs": out.token_logprobs,
            "sum_logprob": out.sum_logprob,
        });
        outln!("{v}");
    } else {
        outln!("{:>6} {:>8} {:>12}", "pos", "token", "logprob");
        for (i, lp) in out.token_logprobs.iter().enumerate() {
            outln!("{:>6} {:>8} {:>12.6}", i + 1, tokens[i + 1], lp);
        }
        outln!(
            "sum_logprob {:.6} over {} tokens",
            out.sum_logprob,
            out.token_logprobs.len()
        );
    }
    Ok(())
}

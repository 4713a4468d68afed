//! `tessera export`: a training checkpoint as an HF model directory (model.safetensors,
//! config.json, tokenizer.json) that `tessera score` / `generate` and transformers load.

use std::path::PathBuf;

use anyhow::{bail, Result};
use tessera_tensor::DType;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint root (with `latest`) or one step directory, as `tessera train --save` writes.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output HF model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the exported weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let dtype: DType = a.dtype.parse()?;
    crate::out_paths::fresh_dir(&a.out, "--out")?;
    // The tokenizer is copied as it is: one that does not load would make a model directory
    // that nothing loads.
    let step = tessera_train::checkpoint::resolve(&a.checkpoint)?;
    let tok = step.join("tokenizer.json");
    if tok.exists() {
        if let Err(e) = tokenizers::Tokenizer::from_file(&tok) {
            bail!(
                "{}: not a tokenizer the exported model could load: {e} (nothing was written)",
                tok.display()
            );
        }
    }
    let out = tessera_train::checkpoint::export(&a.checkpoint, &a.out, dtype)?;
    errln!("exported {} to {}", a.checkpoint.display(), out.display());
    Ok(())
}

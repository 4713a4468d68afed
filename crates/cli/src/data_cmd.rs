//! `tessera data prepare`: tokenizes text files into a token dataset (binary shards + meta.json)
//! that `tessera train --data` reads.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

#[derive(clap::Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub cmd: DataCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataCmd {
    /// Tokenize text files into train/val token shards.
    Prepare(PrepareArgs),
}

#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    /// UTF-8 text files, concatenated in the order given.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// An HF tokenizer.json (copied into the dataset, so training and export carry it along).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Fraction of the tokens (the end of the text) held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
}

/// The fewest tokens a training split may hold: a sample of a few positions and its target.
const MIN_TRAIN_TOKENS: usize = 16;

pub fn run(a: DataArgs) -> Result<()> {
    match a.cmd {
        DataCmd::Prepare(p) => prepare(p),
    }
}

fn prepare(a: PrepareArgs) -> Result<()> {
    if !(a.val_fraction > 0.0 && a.val_fraction < 1.0) {
        bail!("--val-fraction must be in (0, 1), got {}", a.val_fraction);
    }
    crate::out_paths::fresh_dir(&a.out, "--out")?;
    let tok = tokenizers::Tokenizer::from_file(&a.tokenizer)
        .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", a.tokenizer.display()))?;
    let mut text = String::new();
    for p in &a.input {
        let t = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {} as UTF-8 text", p.display()))?;
        text.push_str(&t);
    }
    // Tokenized in paragraph-sized pieces, so a large corpus does not go through one call.
    let mut ids: Vec<u32> = Vec::with_capacity(text.len() / 3);
    let mut piece = String::new();
    let flush = |piece: &mut String, ids: &mut Vec<u32>| -> Result<()> {
        if !piece.is_empty() {
            let enc = tok
                .encode(piece.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?;
            ids.extend_from_slice(enc.get_ids());
            piece.clear();
        }
        Ok(())
    };
    for line in text.split_inclusive('\n') {
        piece.push_str(line);
        if line.trim().is_empty() && piece.len() > 4096 {
            flush(&mut piece, &mut ids)?;
        }
    }
    flush(&mut piece, &mut ids)?;
    if ids.len() < 16 {
        bail!(
            "the input holds only {} tokens; training needs more text",
            ids.len()
        );
    }
    let vocab = tok.get_vocab_size(true);
    let n_val = ((ids.len() as f64 * a.val_fraction) as usize).max(1);
    let split = ids.len() - n_val;
    if split < MIN_TRAIN_TOKENS {
        bail!(
            "--val-fraction {} leaves {split} of the input's {} tokens for training (at least {MIN_TRAIN_TOKENS} needed); a smaller fraction or more text",
            a.val_fraction,
            ids.len()
        );
    }
    let meta = tessera_train::data::write_dataset(
        &a.out,
        &ids[..split],
        &ids[split..],
        vocab,
        Some(&a.tokenizer),
    )?;
    errln!(
        "wrote {}: {} train + {} val tokens ({}), vocabulary {}",
        a.out.display(),
        meta.train.tokens,
        meta.val.tokens,
        meta.dtype,
        vocab
    );
    Ok(())
}

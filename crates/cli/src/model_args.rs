//! Flags shared by the commands that run a model: where it is, how it is split, in which dtype.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tessera_infer::{ModelSource, OpenModel};
use tessera_tensor::{DType, Device};

#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// HF model directory (config.json, safetensors, tokenizer.json). Default: the tiny model built
    /// into tessera.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tensor-parallel ranks (threads, one per device shard).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    /// Opens the model and checks the flags against it.
    pub fn open(&self) -> Result<(OpenModel, DType, Device)> {
        let dtype: DType = self.dtype.parse()?;
        let device: Device = self.device.parse()?;
        device.ensure_available()?;
        let src = match &self.model {
            Some(d) => ModelSource::Dir(d.clone()),
            None => ModelSource::Embedded,
        };
        let model = ModelSource::open(&src).with_context(|| match &self.model {
            Some(d) => format!("cannot load model {}", d.display()),
            None => "cannot load the built-in model".into(),
        })?;
        if self.tp == 0 {
            bail!("--tp must be at least 1");
        }
        tessera_model::validate_tp(&model.config, self.tp)?;
        Ok((model, dtype, device))
    }
}

/// Parses `1,2,3` into token ids.
pub fn parse_tokens(s: &str, flag: &str) -> Result<Vec<u32>> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|t| t.trim())
        .map(|t| {
            if t.is_empty() {
                bail!("{flag}: an empty entry between commas in {s:?} (expected e.g. 1,2,3)");
            }
            t.parse::<u32>().map_err(|_| {
                anyhow::anyhow!("{flag}: {t:?} is not a token id (expected e.g. 1,2,3)")
            })
        })
        .collect()
}

/// The text of `--text-file` / `--prompt-file`: a UTF-8 file, or standard input for `-` (not
/// under a multi-process launch, whose ranks would each need the same input).
pub fn read_text_file(path: &std::path::Path, flag: &str) -> Result<String> {
    use std::io::Read;
    let bytes = if path.as_os_str() == "-" {
        if tessera_comm::launched() {
            bail!(
                "{flag} - reads standard input, which the ranks of a multi-process job do not share: give a file"
            );
        }
        let mut b = vec![];
        std::io::stdin()
            .lock()
            .read_to_end(&mut b)
            .context("cannot read standard input")?;
        b
    } else {
        std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))?
    };
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{flag} {}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

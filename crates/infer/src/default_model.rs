//! The model built into the binary, so that `tessera generate` runs with no download: a small
//! Llama (4 layers, hidden 128, 8 query / 4 KV heads, tied embeddings, 0.83 M parameters, bf16)
//! trained by tessera itself on the Shakespeare slice in the repo (`scripts/main_job.sh`: 600 steps,
//! ZeRO-1 over 2 ranks, validation loss 2.30 nats/token against 4.27 for a unigram model), exported
//! with `tessera export --dtype bf16` into `models/shakespeare-tiny/`.

pub const CONFIG: &str = include_str!("../../../models/shakespeare-tiny/config.json");
pub const WEIGHTS: &[u8] = include_bytes!("../../../models/shakespeare-tiny/model.safetensors");
pub const TOKENIZER: &[u8] = include_bytes!("../../../models/shakespeare-tiny/tokenizer.json");

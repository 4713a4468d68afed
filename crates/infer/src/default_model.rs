//! The model built into the binary, so that `tessera generate` runs with no download: a tiny
//! random-weight Llama (GQA, llama3 RoPE scaling) made by transformers
//! (`scripts/make_hf_fixtures.py`). Its outputs are meaningless text; it exists to show the engine
//! run end to end on any machine.

pub const CONFIG: &str = include_str!("../../../tests/fixtures/hf/llama/config.json");
pub const WEIGHTS: &[u8] = include_bytes!("../../../tests/fixtures/hf/llama/model.safetensors");
pub const TOKENIZER: &[u8] = include_bytes!("../../../tests/fixtures/hf/llama/tokenizer.json");

//! Where every parameter of a Llama-family model lives in training: one flat f32 buffer per
//! *unit* (the embedding, each decoder layer, the final norm + LM head), in the HF tensor order.
//! A unit is what ZeRO-3 gathers at once and what gradients are reduced by, so a unit's
//! data-parallel shard is one contiguous range of its buffer.

use crate::synthetic::tensor_shapes;
use crate::ModelConfig;

/// What a unit holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    /// `model.embed_tokens.weight` (also the LM head when embeddings are tied).
    Embedding,
    /// `model.layers.{i}.*`.
    Decoder(usize),
    /// `model.norm.weight` and, when not tied, `lm_head.weight`.
    Head,
}

/// One HF tensor inside its unit's buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    pub kind: UnitKind,
    pub params: Vec<ParamEntry>,
    /// Elements in the unit (unpadded).
    pub len: usize,
}

impl Unit {
    /// The entry whose name ends with `suffix` (e.g. `"q_proj.weight"`).
    pub fn entry(&self, suffix: &str) -> Option<&ParamEntry> {
        self.params.iter().find(|p| p.name.ends_with(suffix))
    }

    /// The slice of `buf` (this unit's buffer) holding the tensor named `...suffix`.
    pub fn slice<'a>(&self, buf: &'a [f32], suffix: &str) -> Option<&'a [f32]> {
        self.entry(suffix).map(|e| &buf[e.offset..e.offset + e.len])
    }

    /// Splits `buf` (this unit's buffer) into one mutable slice per tensor, by name suffix.
    pub fn split_mut<'a>(&self, mut buf: &'a mut [f32]) -> Vec<(&str, &'a mut [f32])> {
        let mut out = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let (head, rest) = std::mem::take(&mut buf).split_at_mut(p.len);
            out.push((p.name.as_str(), head));
            buf = rest;
        }
        out
    }
}

/// The units of a model, in forward order: embedding, decoder layers, head.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamLayout {
    pub units: Vec<Unit>,
}

impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> Self {
        let mut units: Vec<Unit> = Vec::with_capacity(cfg.num_layers + 2);
        for (name, shape) in tensor_shapes(cfg) {
            let kind = if name == "model.embed_tokens.weight" {
                UnitKind::Embedding
            } else if let Some(rest) = name.strip_prefix("model.layers.") {
                let l = rest.split('.').next().and_then(|s| s.parse().ok());
                UnitKind::Decoder(l.expect("tensor_shapes names layers by number"))
            } else {
                UnitKind::Head
            };
            if units.last().is_none_or(|u| u.kind != kind) {
                units.push(Unit {
                    kind,
                    params: vec![],
                    len: 0,
                });
            }
            let u = units.last_mut().expect("pushed above");
            let len = shape.iter().product();
            u.params.push(ParamEntry {
                name,
                shape,
                offset: u.len,
                len,
            });
            u.len += len;
        }
        ParamLayout { units }
    }

    pub fn num_params(&self) -> usize {
        self.units.iter().map(|u| u.len).sum()
    }

    /// `(unit index, entry)` of the tensor named exactly `name`.
    pub fn find(&self, name: &str) -> Option<(usize, &ParamEntry)> {
        self.units
            .iter()
            .enumerate()
            .find_map(|(i, u)| u.params.iter().find(|p| p.name == name).map(|p| (i, p)))
    }

    pub fn head_unit(&self) -> usize {
        self.units.len() - 1
    }
}

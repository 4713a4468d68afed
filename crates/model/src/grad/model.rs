//! The training driver of a Llama-family model, as llm.c's `gpt2_forward` / `gpt2_backward` read:
//! embedding, decoder layers, head + loss, then the layers backward, in order. Where weights come
//! from and where gradients go is the [`UnitSource`]'s business, which is how ZeRO plugs in: it
//! gathers a unit just before it runs (forward and backward), frees it right after, and
//! reduce-scatters each unit's gradients as soon as its backward finishes.

use tessera_tensor::DType;

use super::decoder::{DecoderActs, DecoderParams};
use super::embedding::{embedding_backward, embedding_forward};
use super::head::HeadParams;
use super::layout::{ParamLayout, UnitKind};
use crate::{ModelConfig, ModelError};

/// A micro-batch: `batch` sequences of `seq` tokens (each with its next token as target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchDims {
    pub batch: usize,
    pub seq: usize,
}

impl BatchDims {
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// The position of every token (each sequence starts at 0).
    pub fn positions(&self) -> Vec<usize> {
        (0..self.batch).flat_map(|_| 0..self.seq).collect()
    }
}

/// Where a training step gets each unit's weights and sends its gradients.
pub trait UnitSource {
    /// The unit's compute weights, widened to f32 (all-gathered first under ZeRO-3).
    fn fetch(&mut self, unit: usize) -> Result<Vec<f32>, ModelError>;
    /// A hint that `unit` is fetched next: a source may start gathering it now.
    fn prefetch(&mut self, _unit: usize) -> Result<(), ModelError> {
        Ok(())
    }
    /// The weights fetched for `unit` have been dropped.
    fn release(&mut self, _unit: usize) {}
    /// The unit's gradients of this micro-batch are complete (the unit's length, f32).
    fn grads_done(&mut self, unit: usize, grads: Vec<f32>) -> Result<(), ModelError>;
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    /// Activation dtype (weights arrive already rounded to it).
    pub dtype: DType,
    /// Keep only each layer's input in the forward and recompute the rest in the backward.
    pub recompute: bool,
    /// Multiplies the gradient of the summed loss: `loss_scale / tokens in the global batch`.
    pub grad_scale: f32,
}

enum Saved {
    Full(Box<DecoderActs>),
    Input(Vec<f32>),
}

/// A model's shape, parameter layout and rotary frequencies: what training needs besides weights.
pub struct TrainModel {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    inv_freq: Vec<f32>,
}

impl TrainModel {
    pub fn new(cfg: ModelConfig) -> Self {
        let layout = ParamLayout::new(&cfg);
        let inv_freq = crate::rope::inv_freq(&cfg.rope, cfg.head_dim);
        TrainModel {
            cfg,
            layout,
            inv_freq,
        }
    }

    fn check(&self, tokens: &[u32], dims: BatchDims) -> Result<(), ModelError> {
        if dims.batch == 0 || dims.seq == 0 || tokens.len() != dims.batch * (dims.seq + 1) {
            return Err(ModelError::Input(format!(
                "a micro-batch of {}x{} needs {} tokens, got {}",
                dims.batch,
                dims.seq,
                dims.batch * (dims.seq + 1),
                tokens.len()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Splits `batch` rows of `seq + 1` tokens into inputs and next-token targets.
    fn split(tokens: &[u32], dims: BatchDims) -> (Vec<u32>, Vec<u32>) {
        let mut inputs = Vec::with_capacity(dims.tokens());
        let mut targets = Vec::with_capacity(dims.tokens());
        for row in tokens.chunks(dims.seq + 1) {
            inputs.extend_from_slice(&row[..dims.seq]);
            targets.extend_from_slice(&row[1..]);
        }
        (inputs, targets)
    }

    fn decoder<'a>(&'a self, l: usize, w: &'a [f32]) -> DecoderParams<'a> {
        DecoderParams::new(&self.cfg, l, &self.layout.units[1 + l], w, &self.inv_freq)
    }

    /// One micro-batch forward and backward; returns the summed loss over its tokens. Gradients
    /// (times `opts.grad_scale`) are handed to `src.grads_done` unit by unit.
    pub fn forward_backward(
        &self,
        src: &mut dyn UnitSource,
        tokens: &[u32],
        dims: BatchDims,
        opts: TrainOptions,
    ) -> Result<f64, ModelError> {
        self.check(tokens, dims)?;
        let (inputs, targets) = Self::split(tokens, dims);
        let (h, nl) = (self.cfg.hidden_size, self.cfg.num_layers);
        let head = self.layout.head_unit();
        let tied = self.cfg.tie_word_embeddings;
        let dt = opts.dtype;

        let w0 = src.fetch(0)?;
        src.prefetch(1)?;
        let mut x = embedding_forward(&w0, &inputs, h);
        let w0 = if tied {
            Some(w0)
        } else {
            drop(w0);
            src.release(0);
            None
        };
        let mut saved = Vec::with_capacity(nl);
        for l in 0..nl {
            let w = src.fetch(1 + l)?;
            src.prefetch(2 + l)?;
            let p = self.decoder(l, &w);
            if opts.recompute {
                let x_in = x.clone();
                x = p.forward(x, dims, dt).0;
                saved.push(Saved::Input(x_in));
            } else {
                let (y, acts) = p.forward(x, dims, dt);
                x = y;
                saved.push(Saved::Full(Box::new(acts)));
            }
            drop(w);
            src.release(1 + l);
        }

        let wh = src.fetch(head)?;
        if nl > 0 {
            src.prefetch(nl)?;
        }
        let hu = &self.layout.units[head];
        let mut gh = vec![0.0f32; hu.len];
        let mut g0 = vec![0.0f32; self.layout.units[0].len];
        let out = {
            let p = HeadParams {
                norm: hu
                    .slice(&wh, "model.norm.weight")
                    .expect("layout has the norm"),
                weight: match &w0 {
                    Some(t) => t,
                    None => hu.slice(&wh, "lm_head.weight").expect("untied head"),
                },
                vocab: self.cfg.vocab_size,
                eps: self.cfg.rms_norm_eps,
            };
            let mut parts = hu.split_mut(&mut gh);
            let dnorm = std::mem::take(&mut parts[0].1);
            let dweight: &mut [f32] = if tied {
                &mut g0
            } else {
                std::mem::take(&mut parts[1].1)
            };
            p.forward_backward(&x, &targets, opts.grad_scale, dt, dnorm, dweight)
        };
        drop(wh);
        src.release(head);
        if w0.is_some() {
            drop(w0);
            src.release(0);
        }
        src.grads_done(head, gh)?;

        let mut dx = out.dx;
        for l in (0..nl).rev() {
            let w = src.fetch(1 + l)?;
            if l > 0 {
                src.prefetch(l)?;
            }
            let p = self.decoder(l, &w);
            let acts = match saved.pop().expect("one per layer") {
                Saved::Full(a) => *a,
                Saved::Input(x_in) => p.forward(x_in, dims, dt).1,
            };
            let unit = &self.layout.units[1 + l];
            let mut g = vec![0.0f32; unit.len];
            dx = p.backward(unit, &acts, &dx, dims, &mut g);
            drop(acts);
            drop(w);
            src.release(1 + l);
            src.grads_done(1 + l, g)?;
        }
        embedding_backward(&inputs, &dx, h, &mut g0);
        src.grads_done(0, g0)?;
        Ok(out.loss_sum)
    }

    /// Forward only: the summed loss over the micro-batch's tokens (validation).
    pub fn eval_loss(
        &self,
        src: &mut dyn UnitSource,
        tokens: &[u32],
        dims: BatchDims,
        dt: DType,
    ) -> Result<f64, ModelError> {
        self.check(tokens, dims)?;
        let (inputs, targets) = Self::split(tokens, dims);
        let logits = self.logits(src, &inputs, dims, dt)?;
        let v = self.cfg.vocab_size;
        Ok(logits
            .chunks(v)
            .zip(&targets)
            .map(|(row, &t)| -tessera_tensor::ops::log_softmax(row)[t as usize])
            .sum())
    }

    /// Logits `[batch*seq, vocab]` of `inputs` (`batch` rows of `seq` tokens).
    pub fn logits(
        &self,
        src: &mut dyn UnitSource,
        inputs: &[u32],
        dims: BatchDims,
        dt: DType,
    ) -> Result<Vec<f32>, ModelError> {
        let h = self.cfg.hidden_size;
        let head = self.layout.head_unit();
        let w0 = src.fetch(0)?;
        let mut x = embedding_forward(&w0, inputs, h);
        for l in 0..self.cfg.num_layers {
            let w = src.fetch(1 + l)?;
            x = self.decoder(l, &w).forward(x, dims, dt).0;
            src.release(1 + l);
        }
        let wh = src.fetch(head)?;
        let hu = &self.layout.units[head];
        let p = HeadParams {
            norm: hu
                .slice(&wh, "model.norm.weight")
                .expect("layout has the norm"),
            weight: if self.cfg.tie_word_embeddings {
                &w0
            } else {
                hu.slice(&wh, "lm_head.weight").expect("untied head")
            },
            vocab: self.cfg.vocab_size,
            eps: self.cfg.rms_norm_eps,
        };
        let out = p.logits(&x, dt);
        src.release(head);
        src.release(0);
        Ok(out)
    }
}

/// Every unit's weights held in full, gradients summed in full: one rank, no ZeRO. Used by tests
/// and by anything that runs a model from a flat parameter set.
pub struct FullParams {
    pub weights: Vec<Vec<f32>>,
    pub grads: Vec<Vec<f32>>,
}

impl FullParams {
    pub fn new(weights: Vec<Vec<f32>>) -> Self {
        let grads = weights.iter().map(|w| vec![0.0; w.len()]).collect();
        FullParams { weights, grads }
    }

    pub fn zero_grads(&mut self) {
        self.grads.iter_mut().for_each(|g| g.fill(0.0));
    }
}

impl UnitSource for FullParams {
    fn fetch(&mut self, unit: usize) -> Result<Vec<f32>, ModelError> {
        Ok(self.weights[unit].clone())
    }

    fn grads_done(&mut self, unit: usize, grads: Vec<f32>) -> Result<(), ModelError> {
        for (a, b) in self.grads[unit].iter_mut().zip(&grads) {
            *a += b;
        }
        Ok(())
    }
}

/// True when `kind` is a decoder layer (for callers that walk units).
pub fn is_decoder(kind: UnitKind) -> bool {
    matches!(kind, UnitKind::Decoder(_))
}

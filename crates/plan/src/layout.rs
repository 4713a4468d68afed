//! A parallel layout (dp × tp × pp, ZeRO stage, offload), the checks that make it a valid split of
//! a model over a cluster, and what each GPU of it holds: the layers of its pipeline stage and its
//! TP share of their parameters.
//!
//! Pipeline stages get `layers / pp` layers each, the remainder going one apiece to the last stages
//! (the first stage already carries the embedding and the most in-flight activations). The
//! vocabulary is padded to a multiple of 128 · tp, as Megatron-LM's
//! `--make-vocab-size-divisible-by 128` does, so each TP rank holds an equal slice of it.

use serde::Serialize;

use crate::job::{InferJob, Job, TrainJob};
use crate::presets::Cluster;
use crate::shape::ModelShape;
use crate::PlanError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    None,
    /// ZeRO-Offload: fp32 master weights, optimizer state and fp32 gradients in pinned CPU memory;
    /// Adam runs on the CPU.
    Cpu,
    /// ZeRO-Infinity: optimizer state on NVMe, fp32 gradients and staging buffers in CPU memory.
    Nvme,
}

impl Offload {
    pub fn parse(s: &str) -> Result<Self, PlanError> {
        match s {
            "none" => Ok(Offload::None),
            "cpu" => Ok(Offload::Cpu),
            "nvme" => Ok(Offload::Nvme),
            _ => Err(PlanError::Input(format!(
                "unknown offload {s:?} (none, cpu, nvme)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Offload::None => "none",
            Offload::Cpu => "cpu",
            Offload::Nvme => "nvme",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub dp: u64,
    pub tp: u64,
    pub pp: u64,
    pub zero: u8,
    pub offload: Offload,
}

impl Layout {
    pub fn label(&self) -> String {
        format!(
            "dp{} tp{} pp{} zero{} {}",
            self.dp,
            self.tp,
            self.pp,
            self.zero,
            self.offload.name()
        )
    }

    /// Why this layout is not a valid split of `model` for `job` on `cluster`, if it is not.
    pub fn check(&self, model: &ModelShape, cluster: &Cluster, job: &Job) -> Result<(), PlanError> {
        let bad = |m: String| Err(PlanError::Layout(m));
        let (dp, tp, pp) = (self.dp, self.tp, self.pp);
        if dp == 0 || tp == 0 || pp == 0 {
            return bad("dp, tp and pp must be > 0".into());
        }
        if dp * tp * pp != cluster.gpus() {
            return bad(format!(
                "dp × tp × pp = {dp} × {tp} × {pp} = {} but the cluster has {} GPUs",
                dp * tp * pp,
                cluster.gpus()
            ));
        }
        if self.zero > 3 {
            return bad(format!("ZeRO stage {} does not exist (0..3)", self.zero));
        }
        if model.heads % tp != 0 {
            return bad(format!(
                "tp={tp} does not divide the {} attention heads",
                model.heads
            ));
        }
        let kv = model.kv_heads;
        if (tp <= kv && kv % tp != 0) || (tp > kv && tp % kv != 0) {
            return bad(format!("tp={tp} does not split the {kv} KV heads evenly"));
        }
        if model.layer_params_override.is_none() {
            if model.ffn % tp != 0 {
                return bad(format!(
                    "tp={tp} does not divide the MLP width {}",
                    model.ffn
                ));
            }
            if let Some(m) = &model.moe {
                if m.expert_ffn % tp != 0 {
                    return bad(format!(
                        "tp={tp} does not divide the expert width {}",
                        m.expert_ffn
                    ));
                }
            }
        }
        if pp > model.layers {
            return bad(format!(
                "pp={pp} is more stages than the {} layers",
                model.layers
            ));
        }
        match job {
            Job::Train(t) => self.check_train(model, t),
            Job::Infer(_) => {
                if self.zero != 0 || self.offload != Offload::None {
                    return bad("ZeRO and offload apply to training only".into());
                }
                Ok(())
            }
        }
    }

    fn check_train(&self, model: &ModelShape, t: &TrainJob) -> Result<(), PlanError> {
        let bad = |m: String| Err(PlanError::Layout(m));
        if t.global_batch % (self.dp * t.micro_batch) != 0 {
            return bad(format!(
                "global batch {} is not a multiple of dp × micro-batch = {} × {}",
                t.global_batch, self.dp, t.micro_batch
            ));
        }
        if self.offload != Offload::None && self.zero == 0 {
            return bad(
                "offload needs ZeRO stage 1 or more (the optimizer state must be partitioned)"
                    .into(),
            );
        }
        if t.interleave > 1 {
            let m = t.global_batch / (self.dp * t.micro_batch);
            if self.pp == 1 {
                return bad("--interleave needs pp > 1".into());
            }
            if m % self.pp != 0 {
                return bad(format!(
                    "interleaved 1F1B needs the {m} micro-batches per step to be a multiple of pp={}",
                    self.pp
                ));
            }
            if model.layers % (self.pp * t.interleave) != 0 {
                return bad(format!(
                    "interleaved 1F1B needs pp × interleave = {} to divide the {} layers",
                    self.pp * t.interleave,
                    model.layers
                ));
            }
        }
        Ok(())
    }

    /// The layers of pipeline stage `stage`, as a range of layer indices.
    pub fn stage_layers(&self, model: &ModelShape, stage: u64) -> std::ops::Range<u64> {
        let base = model.layers / self.pp;
        let extra = model.layers % self.pp;
        let first_extra = self.pp - extra;
        let start = stage * base + stage.saturating_sub(first_extra);
        let len = base + u64::from(stage >= first_extra);
        start..start + len
    }

    pub fn padded_vocab(&self, model: &ModelShape) -> u64 {
        model.vocab.next_multiple_of(128 * self.tp)
    }

    /// Parameters one GPU of stage `stage` holds before any ZeRO partitioning.
    pub fn stage_params(&self, model: &ModelShape, stage: u64) -> u64 {
        let tp = self.tp;
        let mut n: u64 = self
            .stage_layers(model, stage)
            .map(|i| self.layer_params_per_rank(model, i))
            .sum();
        let vocab_slice = self.padded_vocab(model) * model.hidden / tp;
        if stage == 0 {
            n += vocab_slice + model.learned_positions * model.hidden;
        }
        if stage == self.pp - 1 {
            n += model.final_norm_params();
            // An untied head is its own matrix; a tied one needs a copy on the last stage once the
            // embedding lives on another stage (Megatron keeps the copies in sync by all-reduce).
            if !model.tied_embeddings || self.pp > 1 {
                n += vocab_slice;
            }
        }
        n
    }

    /// Parameters of layer `i` held by one TP rank.
    pub fn layer_params_per_rank(&self, model: &ModelShape, i: u64) -> u64 {
        let p = model.layer_params(i);
        let kv_per_rank =
            p.kv.checked_div(model.kv_heads).unwrap_or(0) * model.kv_heads.div_ceil(self.tp);
        p.split.div_ceil(self.tp) + p.replicated + kv_per_rank
    }

    /// The largest layer one TP rank holds (sizes ZeRO-3 gather and gradient buckets).
    pub fn max_layer_params_per_rank(&self, model: &ModelShape) -> u64 {
        (0..model.layers)
            .map(|i| self.layer_params_per_rank(model, i))
            .max()
            .unwrap_or(0)
    }

    /// Gradient-accumulation micro-batches per optimizer step (m).
    pub fn micro_batches(&self, t: &TrainJob) -> u64 {
        t.global_batch / (self.dp * t.micro_batch)
    }

    /// Sequences one replica holds at once when serving.
    pub fn seqs_per_replica(&self, j: &InferJob) -> u64 {
        j.seqs.div_ceil(self.dp)
    }

    /// Whether the TP group spans nodes.
    pub fn tp_crosses_nodes(&self, c: &Cluster) -> bool {
        self.tp > c.gpus_per_node
    }

    /// Whether some pipeline hand-off crosses nodes (ranks are laid out tp fastest, then pp).
    pub fn pp_crosses_nodes(&self, c: &Cluster) -> bool {
        self.pp > 1 && self.tp * self.pp > c.gpus_per_node
    }

    /// Whether the DP group spans nodes.
    pub fn dp_crosses_nodes(&self, c: &Cluster) -> bool {
        self.dp > 1 && self.dp * self.tp * self.pp > c.gpus_per_node
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    fn lay(dp: u64, tp: u64, pp: u64) -> Layout {
        Layout {
            dp,
            tp,
            pp,
            zero: 0,
            offload: Offload::None,
        }
    }

    #[test]
    fn stages_cover_every_layer_once() {
        let m = presets::model("deepseek-v3").unwrap();
        let l = lay(1, 1, 4);
        let ranges: Vec<_> = (0..4).map(|s| l.stage_layers(&m, s)).collect();
        assert_eq!(ranges, vec![0..15, 15..30, 30..45, 45..61]);
    }

    #[test]
    fn tp1_pp1_holds_the_whole_model() {
        let m = presets::model("llama-3-8b").unwrap();
        assert_eq!(lay(1, 1, 1).stage_params(&m, 0), m.total_params());
        // Split 8 ways with 8 KV heads: an exact eighth of every matrix, plus the norms whole.
        let l = lay(1, 8, 1);
        let per_layer_norms = 2 * 4096;
        let layer = m.layer_params(0);
        assert_eq!(
            l.layer_params_per_rank(&m, 0),
            (layer.total() - per_layer_norms) / 8 + per_layer_norms
        );
    }

    #[test]
    fn invalid_splits_say_why() {
        let m = presets::model("llama-3-70b").unwrap();
        let mut c = presets::cluster("h100-sxm").unwrap();
        let job = Job::Train(TrainJob::default());
        let e = lay(1, 8, 2).check(&m, &c, &job).unwrap_err().to_string();
        assert!(e.contains("16") && e.contains("8 GPUs"), "{e}");
        c.nodes = 3;
        let e = lay(1, 3, 8).check(&m, &c, &job).unwrap_err().to_string();
        assert!(e.contains("tp=3"), "{e}");
        let e = lay(3, 8, 1).check(&m, &c, &job).unwrap_err().to_string();
        assert!(e.contains("global batch 512"), "{e}");
    }
}

//! Communication per step: bytes each GPU sends on each link class, and the time that takes.
//!
//! Collectives are counted as ring algorithms send them: an all-reduce of M bytes over n ranks
//! sends 2(n − 1)/n · M from every rank, an all-gather or a reduce-scatter (n − 1)/n · M. So data
//! parallelism moves 2Ψ per step for DDP, ZeRO-1 and ZeRO-2, and 3Ψ for ZeRO-3 (ZeRO paper,
//! section 7), in 16-bit bytes; ZeRO-2 and ZeRO-3 repeat their per-micro-batch collectives for
//! every gradient-accumulation micro-batch. Tensor parallelism all-reduces the s·b·h activation
//! twice per layer forward and twice backward (Megatron-LM; sequence parallelism turns each into a
//! reduce-scatter plus an all-gather of the same volume), and again in a full recompute. Pipeline
//! stages send one s·b·h/t activation forward and one gradient back per micro-batch per boundary.
//!
//! A link is "intra_node" (NVLink) or "inter_node" (the network); each collective also pays a
//! fixed latency per call.

use serde::Serialize;

use crate::job::{InferJob, Recompute, TrainJob};
use crate::layout::Layout;
use crate::presets::Cluster;
use crate::shape::ModelShape;

/// Latency of one collective or send inside a node.
pub const INTRA_LATENCY_S: f64 = 10e-6;
/// Latency of one collective or send across nodes.
pub const INTER_LATENCY_S: f64 = 25e-6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    IntraNode,
    InterNode,
}

impl Link {
    pub fn name(self) -> &'static str {
        match self {
            Link::IntraNode => "intra_node",
            Link::InterNode => "inter_node",
        }
    }

    fn of(crosses: bool) -> Self {
        if crosses {
            Link::InterNode
        } else {
            Link::IntraNode
        }
    }

    fn bandwidth(self, c: &Cluster) -> f64 {
        match self {
            Link::IntraNode => c.intra_bw,
            Link::InterNode => c.inter_bw,
        }
    }

    fn latency(self) -> f64 {
        match self {
            Link::IntraNode => INTRA_LATENCY_S,
            Link::InterNode => INTER_LATENCY_S,
        }
    }
}

/// One kind of communication in a step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommItem {
    /// `tp_all_reduce`, `dp_all_reduce`, `dp_reduce_scatter`, `dp_all_gather`, `pp_send_recv`.
    pub what: &'static str,
    pub link: Link,
    /// Bytes one GPU sends per step.
    pub bytes: f64,
    /// Calls per step.
    pub calls: u64,
    /// Bandwidth time plus latency per call.
    pub seconds: f64,
}

fn item(what: &'static str, link: Link, bytes: f64, calls: u64, c: &Cluster) -> CommItem {
    CommItem {
        what,
        link,
        bytes,
        calls,
        seconds: bytes / link.bandwidth(c) + calls as f64 * link.latency(),
    }
}

fn max_stage_layers(model: &ModelShape, layout: &Layout) -> u64 {
    (0..layout.pp)
        .map(|s| layout.stage_layers(model, s).count() as u64)
        .max()
        .unwrap_or(0)
}

/// Communication of one training step on the busiest GPU.
pub fn train_comm(
    model: &ModelShape,
    layout: &Layout,
    job: &TrainJob,
    cluster: &Cluster,
    stage_params: u64,
) -> Vec<CommItem> {
    let mut items = vec![];
    let m = layout.micro_batches(job);
    let a = job.precision.bytes() as f64;
    let act = (job.seq * job.micro_batch * model.hidden) as f64 * a;
    let (d, t, p) = (layout.dp as f64, layout.tp as f64, layout.pp);
    if layout.tp > 1 {
        let per_layer = if job.recompute == Recompute::Full {
            6
        } else {
            4
        };
        let calls = per_layer * max_stage_layers(model, layout) * m;
        let bytes = calls as f64 * 2.0 * (t - 1.0) / t * act;
        items.push(item(
            "tp_all_reduce",
            Link::of(layout.tp_crosses_nodes(cluster)),
            bytes,
            calls,
            cluster,
        ));
    }
    if layout.dp > 1 {
        let link = Link::of(layout.dp_crosses_nodes(cluster));
        let full = stage_params as f64 * a;
        let part = (d - 1.0) / d * full;
        // One bucket per layer on the stage, plus the vocabulary slice.
        let buckets = max_stage_layers(model, layout) + 1;
        match layout.zero {
            0 => items.push(item("dp_all_reduce", link, 2.0 * part, buckets, cluster)),
            1 => {
                items.push(item("dp_reduce_scatter", link, part, buckets, cluster));
                items.push(item("dp_all_gather", link, part, buckets, cluster));
            }
            2 => {
                items.push(item(
                    "dp_reduce_scatter",
                    link,
                    m as f64 * part,
                    m * buckets,
                    cluster,
                ));
                items.push(item("dp_all_gather", link, part, buckets, cluster));
            }
            _ => {
                items.push(item(
                    "dp_all_gather",
                    link,
                    2.0 * m as f64 * part,
                    2 * m * buckets,
                    cluster,
                ));
                items.push(item(
                    "dp_reduce_scatter",
                    link,
                    m as f64 * part,
                    m * buckets,
                    cluster,
                ));
            }
        }
    }
    if p > 1 {
        let calls = 2 * m * job.interleave;
        let bytes = calls as f64 * act / t;
        items.push(item(
            "pp_send_recv",
            Link::of(layout.pp_crosses_nodes(cluster)),
            bytes,
            calls,
            cluster,
        ));
    }
    items
}

/// Communication of one decode step (every sequence of a replica advances one token).
pub fn infer_comm(
    model: &ModelShape,
    layout: &Layout,
    job: &InferJob,
    cluster: &Cluster,
) -> Vec<CommItem> {
    let mut items = vec![];
    let seqs = layout.seqs_per_replica(job);
    let a = job.precision.bytes().max(2) as f64;
    let act = (seqs * model.hidden) as f64 * a;
    let t = layout.tp as f64;
    let micro = layout.pp.min(seqs).max(1);
    if layout.tp > 1 {
        let calls = 2 * max_stage_layers(model, layout) * micro;
        let bytes = 2.0 * max_stage_layers(model, layout) as f64 * 2.0 * (t - 1.0) / t * act;
        items.push(item(
            "tp_all_reduce",
            Link::of(layout.tp_crosses_nodes(cluster)),
            bytes,
            calls,
            cluster,
        ));
    }
    if layout.pp > 1 {
        // Hidden states and the residual stream.
        items.push(item(
            "pp_send_recv",
            Link::of(layout.pp_crosses_nodes(cluster)),
            2.0 * act,
            micro,
            cluster,
        ));
    }
    items
}

/// Bytes per GPU per step summed by link class: (tp, dp, pp).
pub fn totals(items: &[CommItem]) -> (f64, f64, f64) {
    let sum = |p: &str| {
        items
            .iter()
            .filter(|i| i.what.starts_with(p))
            .map(|i| i.bytes)
            .sum::<f64>()
    };
    // An empty f64 sum is -0.0; adding 0.0 prints it as 0.
    (sum("tp_") + 0.0, sum("dp_") + 0.0, sum("pp_") + 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Offload;
    use crate::presets;

    #[test]
    fn zero3_moves_one_and_a_half_times_ddp() {
        let model = ModelShape::from_param_count(7_500_000_000, None, None, None, None).unwrap();
        let mut c = presets::cluster("h100-sxm").unwrap();
        c.nodes = 8;
        let job = TrainJob {
            global_batch: 64,
            ..TrainJob::default()
        };
        let psi = 7_500_000_000u64;
        let vol = |zero| {
            let l = Layout {
                dp: 64,
                tp: 1,
                pp: 1,
                zero,
                offload: Offload::None,
            };
            totals(&train_comm(&model, &l, &job, &c, psi)).1
        };
        let ddp = 2.0 * 63.0 / 64.0 * 2.0 * psi as f64;
        assert_eq!(vol(0), ddp);
        assert_eq!(vol(1), ddp);
        assert_eq!(vol(2), ddp);
        assert_eq!(vol(3), 1.5 * ddp);
    }

    #[test]
    fn tp_all_reduces_four_times_per_layer() {
        let model = presets::model("llama-3-8b").unwrap();
        let c = presets::cluster("h100-sxm").unwrap();
        let job = TrainJob {
            global_batch: 2,
            ..TrainJob::default()
        };
        let l = Layout {
            dp: 1,
            tp: 8,
            pp: 1,
            zero: 0,
            offload: Offload::None,
        };
        let items = train_comm(&model, &l, &job, &c, 0);
        let tp = &items[0];
        assert_eq!(tp.calls, 4 * 32 * 2);
        assert_eq!(tp.bytes, 256.0 * 2.0 * 7.0 / 8.0 * (4096.0 * 4096.0 * 2.0));
        assert_eq!(tp.link, Link::IntraNode);
    }
}

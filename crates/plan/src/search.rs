//! The planner: enumerate the layouts of a job on a cluster (or evaluate the one asked for),
//! compute memory, communication and time for each, and rank those that fit.
//!
//! The search keeps TP inside a node (tp divides the GPUs of a node) and lets PP and DP span
//! nodes, as Megatron-LM lays ranks out: tp fastest, then pp, then dp. Training layouts are ranked
//! by step time, serving layouts by decode throughput; ties go to the smaller footprint.

use serde::Serialize;

use crate::comm_volume::{self, CommItem};
use crate::job::Job;
use crate::layout::{Layout, Offload};
use crate::memory::{self, InferMemory, TrainMemory};
use crate::time::{self, InferTime, TrainTime};
use crate::PlanError;

pub use crate::request::{Fixed, Request};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Estimate {
    Train {
        memory: TrainMemory,
        time: TrainTime,
    },
    Infer {
        memory: InferMemory,
        time: InferTime,
    },
}

/// One evaluated layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluated {
    pub layout: Layout,
    pub fits: bool,
    /// 1 for the best layout that fits; none for those that do not.
    pub rank: Option<u64>,
    pub why_not: Option<String>,
    pub comm: Vec<CommItem>,
    pub estimate: Estimate,
}

impl Evaluated {
    pub fn memory_total(&self) -> u64 {
        match &self.estimate {
            Estimate::Train { memory, .. } => memory.bytes.total,
            Estimate::Infer { memory, .. } => memory.bytes.total,
        }
    }
}

/// A layout that is not a valid split, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejected {
    pub layout: Layout,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub request: Request,
    pub usable_bytes: u64,
    /// Fitting layouts best first, then the others by footprint.
    pub layouts: Vec<Evaluated>,
    pub rejected: Vec<Rejected>,
    pub notes: Vec<String>,
}

fn divisors(n: u64) -> Vec<u64> {
    let mut small = vec![];
    let mut large = vec![];
    let mut d = 1;
    while d * d <= n {
        if n % d == 0 {
            small.push(d);
            if d * d != n {
                large.push(n / d);
            }
        }
        d += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

pub const GIB: f64 = (1u64 << 30) as f64;

/// Plans `req`: every layout it allows, evaluated and ranked.
pub fn plan(req: Request) -> Result<Plan, PlanError> {
    crate::request::validate(&req)?;
    let c = &req.cluster;
    let g = c.gpus();
    let usable = (c.gpu_mem_bytes as f64 * req.mem_util) as u64;
    let f = req.fixed;
    let train = matches!(req.job, Job::Train(_));
    let zeros: Vec<u8> = match (f.zero, train) {
        (Some(z), _) => vec![z],
        (None, true) => vec![0, 1, 2, 3],
        (None, false) => vec![0],
    };
    let offloads: Vec<Offload> = match (f.offload, train) {
        (Some(o), _) => vec![o],
        (None, true) => vec![Offload::None, Offload::Cpu, Offload::Nvme],
        (None, false) => vec![Offload::None],
    };
    if let (Some(dp), Some(tp), Some(pp)) = (f.dp, f.tp, f.pp) {
        let product = dp.saturating_mul(tp).saturating_mul(pp);
        if product == u64::MAX {
            return Err(PlanError::Layout(format!(
                "dp × tp × pp = {dp} × {tp} × {pp} is not the {g} GPUs of the cluster"
            )));
        }
        if product != g {
            return Err(PlanError::Layout(format!(
                "dp × tp × pp = {dp} × {tp} × {pp} = {product} but the cluster has {g} GPUs"
            )));
        }
    }
    for (name, x) in [("dp", f.dp), ("tp", f.tp), ("pp", f.pp)] {
        match x {
            Some(0) => return Err(PlanError::Input(format!("--{name} must be > 0"))),
            Some(x) if g % x != 0 => {
                return Err(PlanError::Layout(format!(
                    "{name}={x} does not divide the {g} GPUs of the cluster"
                )))
            }
            _ => {}
        }
    }
    let fixed_product =
        f.dp.unwrap_or(1)
            .saturating_mul(f.tp.unwrap_or(1))
            .saturating_mul(f.pp.unwrap_or(1));
    if g % fixed_product != 0 {
        return Err(PlanError::Layout(format!(
            "the fixed dp × tp × pp = {fixed_product} does not divide the {g} GPUs of the cluster"
        )));
    }
    let mut layouts = vec![];
    let mut rejected = vec![];
    for tp in divisors(g) {
        for pp in divisors(g / tp) {
            let dp = g / tp / pp;
            if f.dp.is_some_and(|x| x != dp)
                || f.tp.is_some_and(|x| x != tp)
                || f.pp.is_some_and(|x| x != pp)
            {
                continue;
            }
            for &zero in &zeros {
                for &offload in &offloads {
                    // Offload without ZeRO is not a layout anyone asks for unless they do.
                    if offload != Offload::None
                        && zero == 0
                        && (f.zero.is_none() || f.offload.is_none())
                    {
                        continue;
                    }
                    // Without data parallelism, ZeRO stages are all the same layout.
                    let least_zero = u8::from(offload != Offload::None);
                    if dp == 1 && zero > least_zero && f.zero.is_none() {
                        continue;
                    }
                    let layout = Layout {
                        dp,
                        tp,
                        pp,
                        zero,
                        offload,
                    };
                    let mut check = layout.check(&req.model, c, &req.job);
                    if check.is_ok()
                        && f.tp.is_none()
                        && (tp > c.gpus_per_node || c.gpus_per_node % tp != 0)
                    {
                        check = Err(PlanError::Layout(format!(
                            "tp={tp} does not fit inside a node of {} GPUs (TP all-reduces twice per layer: it belongs on NVLink)",
                            c.gpus_per_node
                        )));
                    }
                    match check {
                        Ok(()) => layouts.push(evaluate(&req, layout, usable)),
                        Err(e) => rejected.push(Rejected {
                            layout,
                            reason: e.to_string(),
                        }),
                    }
                }
            }
        }
    }
    if layouts.is_empty() {
        let first = rejected
            .first()
            .map_or("the fixed parts of the layout admit none", |r| {
                r.reason.as_str()
            });
        return Err(if f.any() {
            PlanError::Layout(first.to_string())
        } else {
            PlanError::Layout(format!("no valid layout on {g} GPUs: {first}"))
        });
    }
    rank(&mut layouts);
    let notes = notes(&req);
    Ok(Plan {
        request: req,
        usable_bytes: usable,
        layouts,
        rejected,
        notes,
    })
}

fn evaluate(req: &Request, layout: Layout, usable: u64) -> Evaluated {
    let (m, c) = (&req.model, &req.cluster);
    let gib = |b: u64| b as f64 / GIB;
    match &req.job {
        Job::Train(job) => {
            let memory = memory::train_memory(m, &layout, job, c);
            let comm = comm_volume::train_comm(m, &layout, job, c, memory.params_per_gpu);
            let time = time::train_time(
                m,
                &layout,
                job,
                c,
                &comm,
                memory.params_per_gpu,
                req.efficiency,
            );
            let total = memory.bytes.total;
            let why_not = if total > usable {
                Some(format!(
                    "needs {:.1} GiB per GPU (stage {}), more than the {:.1} GiB usable",
                    gib(total),
                    memory.stage,
                    gib(usable)
                ))
            } else if memory.host.cpu_per_node > c.cpu_mem_bytes_per_node {
                Some(format!(
                    "offload needs {:.0} GiB of CPU memory per node, more than the {:.0} GiB there",
                    gib(memory.host.cpu_per_node),
                    gib(c.cpu_mem_bytes_per_node)
                ))
            } else if memory.host.nvme_per_node > c.nvme_bytes_per_node {
                Some(format!(
                    "offload needs {:.0} GiB of NVMe per node, more than the {:.0} GiB there",
                    gib(memory.host.nvme_per_node),
                    gib(c.nvme_bytes_per_node)
                ))
            } else {
                None
            };
            Evaluated {
                layout,
                fits: why_not.is_none(),
                rank: None,
                why_not,
                comm,
                estimate: Estimate::Train { memory, time },
            }
        }
        Job::Infer(job) => {
            let memory = memory::infer_memory(m, &layout, job, usable);
            let comm = comm_volume::infer_comm(m, &layout, job, c);
            let time = time::infer_time(
                m,
                &layout,
                job,
                c,
                &comm,
                memory.bytes.kv_cache,
                req.efficiency,
            );
            let b = memory.bytes;
            let fixed = b.weights + b.activations + b.buffers;
            let why_not = if fixed > usable {
                Some(format!(
                    "weights, activations and buffers need {:.1} GiB per GPU (stage {}), more than the {:.1} GiB usable",
                    gib(fixed),
                    memory.stage,
                    gib(usable)
                ))
            } else if b.total > usable {
                Some(format!(
                    "the KV cache of {} sequences × {} tokens per replica needs {:.1} GiB per GPU but {:.1} GiB is left (room for {} tokens)",
                    layout.seqs_per_replica(job),
                    job.context,
                    gib(b.kv_cache),
                    gib(memory.kv_free_bytes),
                    memory.max_concurrent_tokens
                ))
            } else {
                None
            };
            Evaluated {
                layout,
                fits: why_not.is_none(),
                rank: None,
                why_not,
                comm,
                estimate: Estimate::Infer { memory, time },
            }
        }
    }
}

/// Seconds per step (training) or per generated token over the cluster (serving): lower is better.
fn score(e: &Evaluated) -> f64 {
    match &e.estimate {
        Estimate::Train { time, .. } => time.step_s,
        Estimate::Infer { time, .. } => 1.0 / time.decode_tokens_per_s,
    }
}

/// How much slower than a group's fastest layout a layout may be and still tie with it: the
/// estimate is not that exact.
const TIE: f64 = 1.01;

/// Layouts that fit first, fastest first. Estimates within 1% are a tie: walking from the fastest,
/// each group holds the layouts within 1% of its own fastest, and inside a group the simpler
/// layout comes first (no offload, then no per-micro-batch ZeRO-2/3 traffic), then the smaller
/// footprint, then the faster. Then the layouts that do not fit, smallest footprint first (the
/// closest to fitting leads), the simpler on equal bytes.
fn rank(layouts: &mut [Evaluated]) {
    let simpler = |e: &Evaluated| (e.layout.offload != Offload::None, e.layout.zero >= 2);
    layouts.sort_by(|a, b| {
        b.fits
            .cmp(&a.fits)
            .then_with(|| match a.fits {
                true => score(a).total_cmp(&score(b)),
                false => a.memory_total().cmp(&b.memory_total()),
            })
            .then_with(|| simpler(a).cmp(&simpler(b)))
    });
    let fit = layouts.iter().filter(|e| e.fits).count();
    let mut start = 0;
    while start < fit {
        let limit = score(&layouts[start]) * TIE;
        let end = start
            + layouts[start..fit]
                .iter()
                .take_while(|e| score(e) <= limit)
                .count();
        layouts[start..end].sort_by(|a, b| {
            simpler(a)
                .cmp(&simpler(b))
                .then_with(|| a.memory_total().cmp(&b.memory_total()))
                .then_with(|| score(a).total_cmp(&score(b)))
        });
        start = end;
    }
    for (i, e) in layouts.iter_mut().enumerate() {
        if e.fits {
            e.rank = Some(i as u64 + 1);
        }
    }
}

fn notes(req: &Request) -> Vec<String> {
    let m = &req.model;
    let mut notes = vec![];
    if m.layer_params_override.is_some() {
        notes.push(format!(
            "shape guessed from --params: {} layers of width {} with {} heads, GPT-style (LayerNorm, 4h GeLU MLP, dropout); activations and FLOPs follow that shape",
            m.layers, m.hidden, m.heads
        ));
    }
    if m.moe.is_some() {
        notes.push("MoE experts are split by TP like dense MLPs (no expert parallelism); every DP rank holds all experts".into());
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{InferJob, TrainJob};
    use crate::presets;

    fn req(model: &str, nodes: u64, job: Job) -> Request {
        let mut cluster = presets::cluster("h100-sxm").unwrap();
        cluster.nodes = nodes;
        Request {
            model: presets::model(model).unwrap(),
            cluster,
            job,
            fixed: Fixed::default(),
            mem_util: 0.9,
            efficiency: 0.55,
        }
    }

    #[test]
    fn block_size_is_bounded_and_rounding_to_it_is_counted() {
        for block_size in [
            0,
            crate::job::MAX_BLOCK_SIZE + 1,
            1 << 40,
            1_000_000_000_000_000_000,
        ] {
            let job = InferJob {
                block_size,
                ..InferJob::default()
            };
            let e = plan(req("llama-3-8b", 1, Job::Infer(job)))
                .unwrap_err()
                .to_string();
            assert!(e.contains("--block-size"), "{block_size}: {e}");
        }
        // The largest block rounds a one-token context up to 65,536 tokens: counted, fits or not.
        for (context, seqs) in [(1, 64), (1, 1 << 20), (1 << 40, 1)] {
            let job = InferJob {
                block_size: crate::job::MAX_BLOCK_SIZE,
                context,
                seqs,
                ..InferJob::default()
            };
            let _ = plan(req("llama-3-8b", 1, Job::Infer(job)));
        }
    }

    #[test]
    fn llama_70b_training_on_16_gpus_ranks_fitting_layouts_first() {
        let p = plan(req("llama-3-70b", 2, Job::Train(TrainJob::default()))).unwrap();
        let best = &p.layouts[0];
        assert!(best.fits && best.rank == Some(1));
        assert!(best.layout.tp <= 8);
        // No ZeRO and no model parallelism cannot hold 70B × 16 bytes.
        let plain = p
            .layouts
            .iter()
            .find(|e| e.layout.dp == 16 && e.layout.zero == 0)
            .unwrap();
        assert!(!plain.fits && plain.why_not.as_ref().unwrap().contains("GiB usable"));
        // Ranked layouts come in order of step time, to 1%: none is more than 1% slower than
        // one ranked after it, and within 1% the simpler comes first.
        let fit: Vec<&Evaluated> = p.layouts.iter().filter(|e| e.fits).collect();
        for (i, a) in fit.iter().enumerate() {
            for b in &fit[i + 1..] {
                assert!(score(a) <= score(b) * TIE * TIE, "{a:?} before {b:?}");
                let within = score(a).max(score(b)) <= score(a).min(score(b)) * TIE;
                let simple =
                    |e: &Evaluated| (e.layout.offload != Offload::None, e.layout.zero >= 2);
                if within && score(a) > score(b) {
                    assert!(simple(a) <= simple(b), "{a:?} before {b:?}");
                }
            }
        }
        // tp = 16 spans nodes: rejected with a reason.
        assert!(p
            .rejected
            .iter()
            .any(|r| r.layout.tp == 16 && r.reason.contains("inside a node")));
    }

    #[test]
    fn fp16_weights_of_70b_do_not_fit_one_card() {
        let mut r = req("llama-3-70b", 1, Job::Infer(InferJob::default()));
        r.fixed = Fixed {
            dp: Some(8),
            tp: Some(1),
            pp: Some(1),
            ..Fixed::default()
        };
        let p = plan(r).unwrap();
        assert_eq!(p.layouts.len(), 1);
        let e = &p.layouts[0];
        assert!(!e.fits, "{e:?}");
        assert!(e.why_not.as_ref().unwrap().contains("weights"));
    }

    #[test]
    fn divisors_in_order() {
        assert_eq!(divisors(12), vec![1, 2, 3, 4, 6, 12]);
        assert_eq!(divisors(16), vec![1, 2, 4, 8, 16]);
        assert_eq!(divisors(1), vec![1]);
    }

    #[test]
    fn bad_fixed_layouts_are_errors() {
        let mut r = req("llama-3-70b", 1, Job::Train(TrainJob::default()));
        r.fixed.tp = Some(3);
        let e = plan(r.clone()).unwrap_err().to_string();
        assert!(e.contains("tp=3") || e.contains("GPUs"), "{e}");
        r.fixed = Fixed {
            dp: Some(2),
            tp: Some(8),
            pp: Some(1),
            ..Fixed::default()
        };
        let e = plan(r).unwrap_err().to_string();
        assert!(e.contains("16") && e.contains("8 GPUs"), "{e}");
    }
}

//! A [`Plan`] as a readable table or as one JSON object.
//!
//! The JSON holds the model, cluster and job, then `layouts` (best first: those that fit, ranked,
//! then the others by footprint), each with `dp`, `tp`, `pp`, `zero`, `offload`, `fits`, `rank`,
//! `why_not` and `memory_bytes` (`weights`, `gradients`, `optimizer`, `activations`, `buffers`,
//! `kv_cache`, `total`: bytes on the fullest GPU), plus communication and time; `rejected` lists
//! the splits that are not valid, with the reason.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{json, Value};

use crate::comm_volume;
use crate::job::{Job, Recompute};
use crate::search::{Estimate, Evaluated, Plan, GIB};

fn layout_json(e: &Evaluated) -> Value {
    let l = &e.layout;
    let (tp, dp, pp) = comm_volume::totals(&e.comm);
    let mut v = json!({
        "dp": l.dp, "tp": l.tp, "pp": l.pp, "zero": l.zero, "offload": l.offload,
        "fits": e.fits, "rank": e.rank, "why_not": e.why_not,
        "comm_bytes_per_step": {"tp": tp, "dp": dp, "pp": pp},
        "comm": e.comm,
    });
    let o = v.as_object_mut().expect("object");
    match &e.estimate {
        Estimate::Train { memory, time } => {
            o.insert("stage".into(), json!(memory.stage));
            o.insert("params_per_gpu".into(), json!(memory.params_per_gpu));
            o.insert("memory_bytes".into(), json!(memory.bytes));
            o.insert("buffers_bytes".into(), json!(memory.buffers));
            o.insert("activation_detail".into(), json!(memory.activations));
            o.insert("stage_total_bytes".into(), json!(memory.stage_totals));
            o.insert("host_bytes".into(), json!(memory.host));
            o.insert("bubble_fraction".into(), json!(time.bubble_fraction));
            o.insert("step_time_s".into(), json!(time.step_s));
            o.insert("pipeline_s".into(), json!(time.pipeline_s));
            o.insert("exposed_dp_s".into(), json!(time.exposed_dp_s));
            o.insert("optimizer_s".into(), json!(time.optimizer_s));
            o.insert("tokens_per_s".into(), json!(time.tokens_per_s));
            o.insert("model_flops_per_step".into(), json!(time.model_flops));
            o.insert("mfu".into(), json!(time.mfu));
        }
        Estimate::Infer { memory, time } => {
            o.insert("stage".into(), json!(memory.stage));
            o.insert("params_per_gpu".into(), json!(memory.params_per_gpu));
            o.insert("memory_bytes".into(), json!(memory.bytes));
            o.insert("stage_total_bytes".into(), json!(memory.stage_totals));
            o.insert(
                "kv_bytes_per_token_per_gpu".into(),
                json!(memory.kv_bytes_per_token),
            );
            o.insert("kv_free_bytes".into(), json!(memory.kv_free_bytes));
            o.insert("kv_blocks".into(), json!(memory.kv_blocks));
            o.insert(
                "max_concurrent_tokens".into(),
                json!(memory.max_concurrent_tokens),
            );
            o.insert("replicas".into(), json!(l.dp));
            o.insert(
                "decode_tokens_per_s".into(),
                json!(time.decode_tokens_per_s),
            );
            o.insert("inter_token_s".into(), json!(time.inter_token_s));
            o.insert(
                "prefill_tokens_per_s".into(),
                json!(time.prefill_tokens_per_s),
            );
            o.insert("bubble_fraction".into(), json!(time.bubble_fraction));
        }
    }
    v
}

/// The plan as one JSON object.
pub fn to_json(p: &Plan) -> Value {
    let r = &p.request;
    let m = &r.model;
    json!({
        "model": {
            "name": m.name,
            "params": m.total_params(),
            "active_params": m.active_params(),
            "layers": m.layers, "hidden": m.hidden, "heads": m.heads, "kv_heads": m.kv_heads,
            "head_dim": m.head_dim, "ffn": m.ffn, "vocab": m.vocab,
            "tied_embeddings": m.tied_embeddings,
            "moe": m.moe,
            "kv_bytes_per_token_bf16": m.kv_bytes_per_token(2),
            "shape_guessed": m.layer_params_override.is_some(),
        },
        "cluster": r.cluster,
        "job": r.job,
        "mem_util": r.mem_util,
        "efficiency": r.efficiency,
        "usable_bytes_per_gpu": p.usable_bytes,
        "recommended": p.layouts.first().filter(|e| e.fits).map(|e| e.layout.label()),
        "layouts": p.layouts.iter().map(layout_json).collect::<Vec<_>>(),
        "rejected": p.rejected.iter().map(|x| json!({
            "dp": x.layout.dp, "tp": x.layout.tp, "pp": x.layout.pp,
            "zero": x.layout.zero, "offload": x.layout.offload, "reason": x.reason,
        })).collect::<Vec<_>>(),
        "why_not": why_not_lines(p),
        "notes": p.notes,
    })
}

fn gib(b: u64) -> f64 {
    b as f64 / GIB
}

fn header(p: &Plan) -> String {
    let r = &p.request;
    let m = &r.model;
    let c = &r.cluster;
    let mut s = String::new();
    let params = if m.moe.is_some() {
        format!(
            "{:.1}B params ({:.1}B active)",
            m.total_params() as f64 / 1e9,
            m.active_params() as f64 / 1e9
        )
    } else {
        format!("{:.2}B params", m.total_params() as f64 / 1e9)
    };
    let _ = writeln!(s, "model    {} · {params}", m.name);
    let job = match &r.job {
        Job::Train(t) => format!(
            "train · seq {} · micro-batch {} · global batch {} · {} · {:?} · recompute {} · sequence parallel {}{}",
            t.seq,
            t.micro_batch,
            t.global_batch,
            t.precision.name(),
            t.optimizer,
            match t.recompute {
                Recompute::None => "none",
                Recompute::Selective => "selective",
                Recompute::Full => "full",
            },
            if t.sequence_parallel { "on" } else { "off" },
            if t.interleave > 1 {
                format!(" · interleave {}", t.interleave)
            } else {
                String::new()
            }
        )
        .replace("Adam", "adam")
        .replace("Sgd", "sgd"),
        Job::Infer(i) => format!(
            "infer · context {} · {} sequences · weights {} · KV {} · blocks of {} · {} tokens per step",
            i.context,
            i.seqs,
            i.precision.name(),
            i.kv_dtype.name(),
            i.block_size,
            i.max_batched_tokens
        ),
    };
    let _ = writeln!(s, "job      {job}");
    let _ = writeln!(
        s,
        "cluster  {} node{} × {} {} · {:.1} GiB per GPU, {:.1} GiB usable ({:.0}%) · NVLink {:.0} GB/s, network {:.0} GB/s per GPU",
        c.nodes,
        if c.nodes == 1 { "" } else { "s" },
        c.gpus_per_node,
        c.name,
        gib(c.gpu_mem_bytes),
        gib(p.usable_bytes),
        r.mem_util * 100.0,
        c.intra_bw / 1e9,
        c.inter_bw / 1e9
    );
    s
}

/// One line per reason the other layouts fail, with how many and the closest one.
pub fn why_not_lines(p: &Plan) -> Vec<String> {
    let mut lines = vec![];
    let over: Vec<&Evaluated> = p.layouts.iter().filter(|e| !e.fits).collect();
    if let Some(closest) = over.first() {
        lines.push(format!(
            "{} layout{} not fit; the closest, {}, {}",
            over.len(),
            if over.len() == 1 { " does" } else { "s do" },
            closest.layout.label(),
            closest.why_not.as_deref().unwrap_or("")
        ));
    }
    let mut by_reason: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for r in &p.rejected {
        // Group by the reason with its numbers for the layout's own dimensions left in.
        let e = by_reason
            .entry(r.reason.clone())
            .or_insert((0, r.layout.label()));
        e.0 += 1;
    }
    let mut grouped: Vec<_> = by_reason.into_iter().collect();
    grouped.sort_by_key(|g| std::cmp::Reverse(g.1 .0));
    for (reason, (n, example)) in grouped {
        lines.push(format!(
            "{n} split{} not valid: {reason} (e.g. {example})",
            if n == 1 { " is" } else { "s are" }
        ));
    }
    lines
}

/// The plan as a table, the best `top` layouts that fit and then why the others do not.
pub fn to_table(p: &Plan, top: usize) -> String {
    let mut s = header(p);
    s.push('\n');
    let train = matches!(p.request.job, Job::Train(_));
    let fitting = p.layouts.iter().filter(|e| e.fits).count();
    let shown: Vec<&Evaluated> = if fitting > 0 {
        p.layouts.iter().filter(|e| e.fits).take(top).collect()
    } else {
        p.layouts.iter().take(top.min(5)).collect()
    };
    if fitting == 0 {
        let _ = writeln!(s, "No layout fits. The smallest footprints:");
    } else {
        let _ = writeln!(
            s,
            "{fitting} layout{} fit{}; best first (memory in GiB per GPU, traffic in GB per GPU per step):",
            if fitting == 1 { "" } else { "s" },
            if fitting == 1 { "s" } else { "" }
        );
    }
    if train {
        let _ = writeln!(
            s,
            "{:>4} {:>4} {:>3} {:>3} {:>4} {:>7} | {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>8} {:>9} {:>5} {:>6} | {:>7} {:>7} {:>7}",
            "rank", "dp", "tp", "pp", "zero", "offload", "weights", "grads", "optim", "activ", "buffers", "total",
            "step s", "tok/s", "MFU", "bubble", "TP GB", "DP GB", "PP GB"
        );
    } else {
        let _ = writeln!(
            s,
            "{:>4} {:>4} {:>3} {:>3} | {:>7} {:>7} {:>7} {:>8} {:>7} {:>8} | {:>10} {:>10} {:>9} {:>8}",
            "rank", "dp", "tp", "pp", "weights", "activ", "buffers", "kv_cache", "total", "kv_free",
            "max tokens", "decode t/s", "ms/token", "TP GB"
        );
    }
    for e in &shown {
        let l = &e.layout;
        let rank = e.rank.map_or("-".to_string(), |r| r.to_string());
        let (tpb, dpb, ppb) = comm_volume::totals(&e.comm);
        match &e.estimate {
            Estimate::Train { memory, time } => {
                let b = memory.bytes;
                let _ = writeln!(
                    s,
                    "{:>4} {:>4} {:>3} {:>3} {:>4} {:>7} | {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} | {:>8.2} {:>9.0} {:>4.1}% {:>5.1}% | {:>7.1} {:>7.1} {:>7.1}",
                    rank, l.dp, l.tp, l.pp, l.zero, l.offload.name(),
                    gib(b.weights), gib(b.gradients), gib(b.optimizer), gib(b.activations), gib(b.buffers), gib(b.total),
                    time.step_s, time.tokens_per_s, time.mfu * 100.0, time.bubble_fraction * 100.0,
                    tpb / 1e9, dpb / 1e9, ppb / 1e9
                );
            }
            Estimate::Infer { memory, time } => {
                let b = memory.bytes;
                let _ = writeln!(
                    s,
                    "{:>4} {:>4} {:>3} {:>3} | {:>7.1} {:>7.1} {:>7.1} {:>8.1} {:>7.1} {:>8.1} | {:>10} {:>10.0} {:>9.1} {:>8.3}",
                    rank, l.dp, l.tp, l.pp,
                    gib(b.weights), gib(b.activations), gib(b.buffers), gib(b.kv_cache), gib(b.total), gib(memory.kv_free_bytes),
                    memory.max_concurrent_tokens, time.decode_tokens_per_s, time.inter_token_s * 1e3, tpb / 1e9
                );
                let _ = dpb;
                let _ = ppb;
            }
        }
    }
    if fitting > shown.len() {
        let _ = writeln!(
            s,
            "… and {} more that fit (--top N or --json shows them)",
            fitting - shown.len()
        );
    }
    if p.layouts.len() == 1 {
        s.push('\n');
        s.push_str(&detail(&p.layouts[0]));
    }
    let why = why_not_lines(p);
    if !why.is_empty() {
        let _ = writeln!(s, "\nWhy the others do not fit:");
        for w in why {
            let _ = writeln!(s, "  - {w}");
        }
    }
    for n in &p.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

/// The breakdown of one layout.
fn detail(e: &Evaluated) -> String {
    let mut s = String::new();
    let verdict = match &e.why_not {
        None => "fits".to_string(),
        Some(w) => format!("does not fit: {w}"),
    };
    let _ = writeln!(s, "{} — {verdict}", e.layout.label());
    match &e.estimate {
        Estimate::Train { memory, time } => {
            let b = memory.bytes;
            let _ = writeln!(
                s,
                "  memory of the fullest GPU (stage {}, {:.3}B params): weights {:.2} + gradients {:.2} + optimizer {:.2} + activations {:.2} + buffers {:.2} = {:.2} GiB",
                memory.stage,
                memory.params_per_gpu as f64 / 1e9,
                gib(b.weights), gib(b.gradients), gib(b.optimizer), gib(b.activations), gib(b.buffers), gib(b.total)
            );
            let a = memory.activations;
            let _ = writeln!(
                s,
                "  activations: {:.2} GiB per micro-batch × {} in flight + {:.2} GiB embedding/output",
                a.layers_bytes_per_micro_batch / GIB,
                a.in_flight,
                a.embedding_and_output_bytes / GIB
            );
            let bf = memory.buffers;
            let _ = writeln!(
                s,
                "  buffers: ZeRO-3 gathered {:.2} · gradient buckets {:.2} · pipeline p2p {:.2} · recompute workspace {:.2} GiB",
                gib(bf.zero3_gathered), gib(bf.gradient_buckets), gib(bf.pipeline_p2p), gib(bf.recompute_workspace)
            );
            if memory.host != Default::default() {
                let _ = writeln!(
                    s,
                    "  offload: {:.1} GiB CPU memory and {:.1} GiB NVMe per node",
                    gib(memory.host.cpu_per_node),
                    gib(memory.host.nvme_per_node)
                );
            }
            let _ = writeln!(
                s,
                "  step {:.3} s = pipeline {:.3} (bubble {:.1}%) + exposed DP {:.3} + optimizer {:.3} · {:.0} tokens/s · MFU {:.1}%",
                time.step_s, time.pipeline_s, time.bubble_fraction * 100.0, time.exposed_dp_s, time.optimizer_s,
                time.tokens_per_s, time.mfu * 100.0
            );
        }
        Estimate::Infer { memory, time } => {
            let b = memory.bytes;
            let _ = writeln!(
                s,
                "  memory of the fullest GPU (stage {}): weights {:.2} + activations {:.2} + buffers {:.2} + KV cache {:.2} = {:.2} GiB; {:.2} GiB left for KV blocks: {} blocks, {} tokens per replica",
                memory.stage, gib(b.weights), gib(b.activations), gib(b.buffers), gib(b.kv_cache), gib(b.total),
                gib(memory.kv_free_bytes), memory.kv_blocks, memory.max_concurrent_tokens
            );
            let _ = writeln!(
                s,
                "  decode {:.0} tokens/s over {} replica(s), {:.1} ms between tokens · prefill {:.0} tokens/s",
                time.decode_tokens_per_s, e.layout.dp, time.inter_token_s * 1e3, time.prefill_tokens_per_s
            );
        }
    }
    for c in &e.comm {
        let _ = writeln!(
            s,
            "  {}: {:.2} GB per GPU per step over {} links in {} calls, {:.4} s",
            c.what,
            c.bytes / 1e9,
            c.link.name(),
            c.calls,
            c.seconds
        );
    }
    s
}

//! `tessera plan`: will a model fit, and which split is fastest? Reads the model, job, cluster and
//! (optionally) part of the layout from flags, then prints the ranked layouts as a table, as JSON
//! (`--json`) or as an SVG of their memory (`--svg FILE`).
//!
//! Numbers are read here rather than by clap so that a bad one (negative, zero, not a number)
//! gets one line naming the flag.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tessera_model::ModelConfig;
use tessera_plan::job::{InferJob, Job, Optimizer, Precision, Recompute, TrainJob};
use tessera_plan::layout::Offload;
use tessera_plan::search::{self, Fixed, Request};
use tessera_plan::{presets, report, svg, ModelShape};

const EXAMPLES: &str = "Examples:
  tessera plan train --model llama-3-70b --cluster h100-sxm --nodes 2
  tessera plan train --params 7.5e9 --gpus 64 --dp 64 --zero 3 --json
  tessera plan infer --model llama-3.1-405b --cluster h200 --nodes 2 --context 8192 --seqs 128
  tessera plan train --model ./my-model/config.json --tp 8 --pp 2 --svg memory.svg

Leave out any of --dp/--tp/--pp/--zero/--offload to search it. Memory is in GiB per GPU,
traffic in GB (1e9 bytes) sent per GPU per step; --json gives bytes.";

/// Memory, communication and time of a parallel layout, and the best layouts for a job.
#[derive(clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct PlanArgs {
    // Boxed: forty flags would make `PlanArgs` the one large variant of the CLI's command enum.
    #[command(flatten)]
    flags: Box<PlanFlags>,
}

#[derive(clap::Args)]
struct PlanFlags {
    /// `train` or `infer`.
    #[arg(value_name = "JOB")]
    job: String,

    // Model.
    /// A preset (llama-3-8b, llama-3-70b, llama-3.1-405b, gpt-3-175b, deepseek-v3) or the path of an
    /// HF config.json (or of its directory).
    #[arg(long, short = 'm', help_heading = "Model")]
    model: Option<String>,
    /// Instead of --model: a parameter count (7.5e9, 70B, 175000000000); the shape is guessed
    /// GPT-style unless --layers/--hidden/--heads/--vocab give it.
    #[arg(long, allow_hyphen_values = true, help_heading = "Model")]
    params: Option<String>,
    /// With --params: number of layers.
    #[arg(long, allow_hyphen_values = true, help_heading = "Model")]
    layers: Option<String>,
    /// With --params: hidden size.
    #[arg(long, allow_hyphen_values = true, help_heading = "Model")]
    hidden: Option<String>,
    /// With --params: attention heads.
    #[arg(long, allow_hyphen_values = true, help_heading = "Model")]
    heads: Option<String>,
    /// With --params: vocabulary size (default 51200).
    #[arg(long, allow_hyphen_values = true, help_heading = "Model")]
    vocab: Option<String>,

    // Cluster.
    /// Cluster preset: h100-sxm, h200, a100-80g (8 GPUs per node).
    #[arg(long, default_value = "h100-sxm", help_heading = "Cluster")]
    cluster: String,
    /// Nodes (default 1).
    #[arg(long, allow_hyphen_values = true, help_heading = "Cluster")]
    nodes: Option<String>,
    /// GPUs per node (default: the preset's 8).
    #[arg(long, allow_hyphen_values = true, help_heading = "Cluster")]
    gpus_per_node: Option<String>,
    /// Total GPUs, instead of --nodes (fewer than a node means one partial node).
    #[arg(long, allow_hyphen_values = true, help_heading = "Cluster")]
    gpus: Option<String>,
    /// Memory per GPU: 80GiB, 141GB, or a bare number of GiB.
    #[arg(long, allow_hyphen_values = true, help_heading = "Cluster")]
    gpu_mem: Option<String>,
    /// Intra-node (NVLink) bandwidth per GPU per direction, GB/s.
    #[arg(long, allow_hyphen_values = true, help_heading = "Cluster")]
    intra_bw: Option<String>,
    /// Inter-node bandwidth per GPU per direction, GB/s.
    #[arg(long, allow_hyphen_values = true, help_heading = "Cluster")]
    inter_bw: Option<String>,
    /// Peak dense 16-bit TFLOP/s per GPU.
    #[arg(long, allow_hyphen_values = true, help_heading = "Cluster")]
    peak_tflops: Option<String>,
    /// CPU memory per node for offload: 2TB, 1024GiB, or a bare number of GiB.
    #[arg(long, allow_hyphen_values = true, help_heading = "Cluster")]
    cpu_mem: Option<String>,
    /// NVMe capacity per node for offload: 30TB, or a bare number of GiB.
    #[arg(long, allow_hyphen_values = true, help_heading = "Cluster")]
    nvme: Option<String>,

    // Training job.
    /// train: tokens per sequence (default 4096).
    #[arg(long, allow_hyphen_values = true, help_heading = "Train")]
    seq: Option<String>,
    /// train: sequences per micro-batch (default 1).
    #[arg(long, allow_hyphen_values = true, help_heading = "Train")]
    micro_batch: Option<String>,
    /// train: sequences per optimizer step (default 512).
    #[arg(long, allow_hyphen_values = true, help_heading = "Train")]
    global_batch: Option<String>,
    /// bf16 (default), fp16 or fp32; infer also takes fp8 (weights).
    #[arg(long, help_heading = "Train")]
    precision: Option<String>,
    /// train: adam (default) or sgd (with momentum).
    #[arg(long, help_heading = "Train")]
    optimizer: Option<String>,
    /// train: activation recomputation none, selective (default) or full.
    #[arg(long, help_heading = "Train")]
    recompute: Option<String>,
    /// train: turn Megatron sequence parallelism off.
    #[arg(long, help_heading = "Train")]
    no_sequence_parallel: bool,
    /// train: virtual pipeline stages per GPU (interleaved 1F1B; default 1).
    #[arg(long, allow_hyphen_values = true, help_heading = "Train")]
    interleave: Option<String>,

    // Serving job.
    /// infer: tokens per sequence, prompt and output (default 4096).
    #[arg(long, allow_hyphen_values = true, help_heading = "Infer")]
    context: Option<String>,
    /// infer: concurrent sequences over the cluster (default 64).
    #[arg(long, allow_hyphen_values = true, help_heading = "Infer")]
    seqs: Option<String>,
    /// infer: KV cache dtype bf16, fp16, fp32 or fp8 (default: as --precision).
    #[arg(long, help_heading = "Infer")]
    kv_dtype: Option<String>,
    /// infer: tokens per KV block (default 16).
    #[arg(long, allow_hyphen_values = true, help_heading = "Infer")]
    block_size: Option<String>,
    /// infer: tokens per scheduler step (default 8192).
    #[arg(long, allow_hyphen_values = true, help_heading = "Infer")]
    max_batched_tokens: Option<String>,

    // Layout.
    /// Data-parallel size (searched when left out).
    #[arg(long, allow_hyphen_values = true, help_heading = "Layout")]
    dp: Option<String>,
    /// Tensor-parallel size (searched when left out).
    #[arg(long, allow_hyphen_values = true, help_heading = "Layout")]
    tp: Option<String>,
    /// Pipeline-parallel size (searched when left out).
    #[arg(long, allow_hyphen_values = true, help_heading = "Layout")]
    pp: Option<String>,
    /// train: ZeRO stage 0..3 (searched when left out).
    #[arg(long, allow_hyphen_values = true, help_heading = "Layout")]
    zero: Option<String>,
    /// train: none, cpu or nvme (searched when left out).
    #[arg(long, help_heading = "Layout")]
    offload: Option<String>,

    // Output and assumptions.
    /// Print one JSON object instead of the table.
    #[arg(long, help_heading = "Output")]
    json: bool,
    /// Also write the memory breakdown of the candidate layouts as an SVG.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    svg: Option<PathBuf>,
    /// Layouts shown in the table and the SVG (default 10).
    #[arg(long, allow_hyphen_values = true, help_heading = "Output")]
    top: Option<String>,
    /// Share of GPU memory the job may use (default 0.9).
    #[arg(long, allow_hyphen_values = true, help_heading = "Output")]
    mem_util: Option<String>,
    /// Share of peak FLOP/s the kernels reach (default 0.55).
    #[arg(long, allow_hyphen_values = true, help_heading = "Output")]
    efficiency: Option<String>,
}

/// A positive count: `4096`, `7.5e9`, `70B`, `8k`.
fn count(flag: &str, v: &str) -> anyhow::Result<u64> {
    let t = v.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&t[..t.len() - 1], 1e3),
        Some('m') => (&t[..t.len() - 1], 1e6),
        Some('b') | Some('g') => (&t[..t.len() - 1], 1e9),
        Some('t') => (&t[..t.len() - 1], 1e12),
        _ => (t, 1.0),
    };
    let x: f64 = num
        .parse()
        .ok()
        .filter(|x: &f64| x.is_finite())
        .with_context(|| format!("--{flag} must be a positive number, got {v:?}"))?;
    let x = x * mult;
    if x <= 0.0 || x.fract() != 0.0 {
        bail!("--{flag} must be a positive whole number, got {v:?}");
    }
    if x > 1e18 {
        bail!("--{flag} must be at most 1e18, got {v:?}");
    }
    Ok(x as u64)
}

fn opt_count(flag: &str, v: &Option<String>) -> anyhow::Result<Option<u64>> {
    v.as_deref().map(|s| count(flag, s)).transpose()
}

/// A positive real number.
fn real(flag: &str, v: &str) -> anyhow::Result<f64> {
    match v.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => bail!("--{flag} must be a positive number, got {v:?}"),
    }
}

/// Bytes from `80GiB`, `141GB`, `2TB`, `512MiB` or a bare number of GiB.
fn size(flag: &str, v: &str) -> anyhow::Result<u64> {
    let t = v.trim();
    let lower = t.to_ascii_lowercase();
    let units: [(&str, f64); 6] = [
        ("tib", (1u64 << 40) as f64),
        ("gib", (1u64 << 30) as f64),
        ("mib", (1u64 << 20) as f64),
        ("tb", 1e12),
        ("gb", 1e9),
        ("mb", 1e6),
    ];
    let (num, mult) = units
        .iter()
        .find(|(u, _)| lower.ends_with(u))
        .map_or((t, (1u64 << 30) as f64), |(u, m)| {
            (&t[..t.len() - u.len()], *m)
        });
    let x = real(flag, num.trim()).map_err(|_| {
        anyhow::anyhow!("--{flag} must be a positive size such as 80GiB or 141GB, got {v:?}")
    })?;
    // At least a byte, and no more than the counts' bound: not rounded to 0 nor clamped.
    let bytes = x * mult;
    if !(1.0..=1e18).contains(&bytes) {
        bail!("--{flag} must be a size from 1 byte to 1e18 bytes, got {v:?}");
    }
    Ok(bytes as u64)
}

fn model_shape(a: &PlanFlags) -> anyhow::Result<ModelShape> {
    let shape_flags = [&a.layers, &a.hidden, &a.heads, &a.vocab];
    match (&a.model, &a.params) {
        (Some(_), Some(_)) => bail!("give --model or --params, not both"),
        (None, None) => bail!(
            "no model: give --model (a preset: {}, or a config.json path) or --params N",
            presets::MODEL_NAMES.join(", ")
        ),
        (Some(m), None) => {
            if shape_flags.iter().any(|f| f.is_some()) {
                bail!("--layers, --hidden, --heads and --vocab go with --params, not --model");
            }
            if presets::MODEL_NAMES.contains(&m.as_str()) {
                return Ok(presets::model(m)?);
            }
            let path = Path::new(m);
            if !path.exists() {
                bail!(
                    "unknown model {m:?}: not a preset ({}) nor an existing config.json path",
                    presets::MODEL_NAMES.join(", ")
                );
            }
            // ModelError's own message already names the path and the cause; flattening it to a
            // string keeps `{:#}` from printing the I/O cause twice.
            let cfg = if path.is_dir() {
                ModelConfig::from_dir(path).map_err(|e| anyhow::anyhow!("{e}"))?
            } else {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                ModelConfig::from_json_str(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            };
            let name = if path.is_dir() {
                path
            } else {
                path.parent().unwrap_or(path)
            };
            let name = name
                .file_name()
                .map_or_else(|| m.clone(), |n| n.to_string_lossy().into_owned());
            Ok(ModelShape::from_config(&name, &cfg))
        }
        (None, Some(p)) => Ok(ModelShape::from_param_count(
            count("params", p)?,
            opt_count("layers", &a.layers)?,
            opt_count("hidden", &a.hidden)?,
            opt_count("heads", &a.heads)?,
            opt_count("vocab", &a.vocab)?,
        )?),
    }
}

fn cluster(a: &PlanFlags) -> anyhow::Result<presets::Cluster> {
    let mut c = presets::cluster(&a.cluster)?;
    if let Some(n) = opt_count("gpus-per-node", &a.gpus_per_node)? {
        c.gpus_per_node = n;
    }
    let nodes = opt_count("nodes", &a.nodes)?;
    match (opt_count("gpus", &a.gpus)?, nodes) {
        (Some(g), Some(n)) if g != n.saturating_mul(c.gpus_per_node) => bail!(
            "--gpus {g} disagrees with --nodes {n} × {} GPUs per node",
            c.gpus_per_node
        ),
        (Some(g), _) if g <= c.gpus_per_node => {
            c.nodes = 1;
            c.gpus_per_node = g;
        }
        (Some(g), _) => {
            if g % c.gpus_per_node != 0 {
                bail!(
                    "--gpus {g} is not a whole number of {}-GPU nodes (set --gpus-per-node)",
                    c.gpus_per_node
                );
            }
            c.nodes = g / c.gpus_per_node;
        }
        (None, Some(n)) => c.nodes = n,
        (None, None) => {}
    }
    if let Some(v) = &a.gpu_mem {
        c.gpu_mem_bytes = size("gpu-mem", v)?;
    }
    if let Some(v) = &a.intra_bw {
        c.intra_bw = real("intra-bw", v)? * 1e9;
    }
    if let Some(v) = &a.inter_bw {
        c.inter_bw = real("inter-bw", v)? * 1e9;
    }
    if let Some(v) = &a.peak_tflops {
        let f = real("peak-tflops", v)? * 1e12;
        c.peak_flops_32 *= f / c.peak_flops_16;
        c.peak_flops_16 = f;
    }
    if let Some(v) = &a.cpu_mem {
        c.cpu_mem_bytes_per_node = size("cpu-mem", v)?;
    }
    if let Some(v) = &a.nvme {
        c.nvme_bytes_per_node = size("nvme", v)?;
    }
    Ok(c)
}

fn job(a: &PlanFlags) -> anyhow::Result<Job> {
    let precision = a.precision.as_deref().map(Precision::parse).transpose()?;
    let train_only = [
        ("seq", a.seq.is_some()),
        ("micro-batch", a.micro_batch.is_some()),
        ("global-batch", a.global_batch.is_some()),
        ("optimizer", a.optimizer.is_some()),
        ("recompute", a.recompute.is_some()),
        ("no-sequence-parallel", a.no_sequence_parallel),
        ("interleave", a.interleave.is_some()),
        ("zero", a.zero.is_some()),
        ("offload", a.offload.is_some()),
    ];
    let infer_only = [
        ("context", a.context.is_some()),
        ("seqs", a.seqs.is_some()),
        ("kv-dtype", a.kv_dtype.is_some()),
        ("block-size", a.block_size.is_some()),
        ("max-batched-tokens", a.max_batched_tokens.is_some()),
    ];
    let misplaced = |flags: &[(&str, bool)], kind: &str| -> anyhow::Result<()> {
        if let Some((f, _)) = flags.iter().find(|(_, set)| *set) {
            bail!("--{f} does not apply to `{kind}`");
        }
        Ok(())
    };
    match a.job.as_str() {
        "train" => {
            misplaced(&infer_only, "train")?;
            let d = TrainJob::default();
            let j = TrainJob {
                seq: opt_count("seq", &a.seq)?.unwrap_or(d.seq),
                micro_batch: opt_count("micro-batch", &a.micro_batch)?.unwrap_or(d.micro_batch),
                global_batch: opt_count("global-batch", &a.global_batch)?.unwrap_or(d.global_batch),
                precision: precision.unwrap_or(d.precision),
                optimizer: match a.optimizer.as_deref() {
                    None | Some("adam") | Some("adamw") => Optimizer::Adam,
                    Some("sgd") => Optimizer::Sgd,
                    Some(o) => bail!("unknown optimizer {o:?} (adam, sgd)"),
                },
                recompute: a
                    .recompute
                    .as_deref()
                    .map(Recompute::parse)
                    .transpose()?
                    .unwrap_or(d.recompute),
                sequence_parallel: !a.no_sequence_parallel,
                interleave: opt_count("interleave", &a.interleave)?.unwrap_or(d.interleave),
            };
            j.validate()?;
            Ok(Job::Train(j))
        }
        "infer" => {
            misplaced(&train_only, "infer")?;
            let d = InferJob::default();
            let precision = precision.unwrap_or(d.precision);
            let j = InferJob {
                context: opt_count("context", &a.context)?.unwrap_or(d.context),
                seqs: opt_count("seqs", &a.seqs)?.unwrap_or(d.seqs),
                precision,
                kv_dtype: a
                    .kv_dtype
                    .as_deref()
                    .map(Precision::parse)
                    .transpose()?
                    .unwrap_or(precision),
                block_size: opt_count("block-size", &a.block_size)?.unwrap_or(d.block_size),
                max_batched_tokens: opt_count("max-batched-tokens", &a.max_batched_tokens)?
                    .unwrap_or(d.max_batched_tokens),
            };
            j.validate()?;
            Ok(Job::Infer(j))
        }
        other => {
            bail!("unknown job {other:?}: use `tessera plan train ...` or `tessera plan infer ...`")
        }
    }
}

fn fixed(a: &PlanFlags) -> anyhow::Result<Fixed> {
    let zero = match a.zero.as_deref() {
        None => None,
        Some(z @ ("0" | "1" | "2" | "3")) => Some(z.parse::<u8>()?),
        Some(z) => bail!("--zero must be 0, 1, 2 or 3, got {z:?}"),
    };
    Ok(Fixed {
        dp: opt_count("dp", &a.dp)?,
        tp: opt_count("tp", &a.tp)?,
        pp: opt_count("pp", &a.pp)?,
        zero,
        offload: a.offload.as_deref().map(Offload::parse).transpose()?,
    })
}

fn fraction(flag: &str, v: &Option<String>, default: f64) -> anyhow::Result<f64> {
    match v {
        None => Ok(default),
        Some(s) => match real(flag, s) {
            Ok(x) if x <= 1.0 => Ok(x),
            _ => bail!("--{flag} must be a number in (0, 1], got {s:?}"),
        },
    }
}

pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    let a = a.flags;
    let job = job(&a)?;
    let req = Request {
        model: model_shape(&a)?,
        cluster: cluster(&a)?,
        job,
        fixed: fixed(&a)?,
        mem_util: fraction("mem-util", &a.mem_util, 0.9)?,
        efficiency: fraction("efficiency", &a.efficiency, 0.55)?,
    };
    let top = opt_count("top", &a.top)?.unwrap_or(10) as usize;
    let searched = !req.fixed.any();
    let plan = search::plan(req)?;
    if let Some(path) = &a.svg {
        // Atomic, so a full disk leaves an earlier image whole rather than a truncated one.
        tessera_train::checkpoint::write_atomic(path, svg::to_svg(&plan, top).as_bytes())
            .context("cannot write the --svg image")?;
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&report::to_json(&plan))?);
    } else {
        out!("{}", report::to_table(&plan, top));
    }
    // The report is printed either way. A search (no part of the layout given) that finds no
    // layout to hold the job is a failure for a script (exit 1), said in one line: how many do
    // not fit and the closest. A layout given is a question about that layout, answered.
    if searched && !plan.layouts.iter().any(|e| e.fits) {
        let why = report::why_not_lines(&plan).into_iter().next();
        anyhow::bail!(
            "no layout fits: {}",
            why.unwrap_or_else(|| "no valid layout".into())
        );
    }
    Ok(())
}

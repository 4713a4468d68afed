//! `tessera bench persistent`: what one persistent kernel a decode step could reach (see
//! `tessera_tensor::cuda::probe_persistent`): a step's weights streamed by one kernel with a grid
//! barrier at each dependency and, on two GPUs, the row-parallel outputs exchanged over NVLink,
//! beside the same stream with no synchronisation and the copy-bandwidth roofline.

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct PersistentArgs {
    #[command(flatten)]
    pub shapes: super::shapes::LayerShapes,
    #[arg(long, default_value_t = 32)]
    pub layers: usize,
    #[arg(long, default_value_t = 128256)]
    pub vocab: usize,
    /// GPUs: 1 (one rank, barriers only) or 2 (two ranks of tp 2 exchanging over NVLink).
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
    /// Steps timed a variant (after 3 untimed).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
}

pub fn run(a: PersistentArgs) -> Result<()> {
    a.shapes.check("persistent")?;
    if a.gpus == 0 || a.gpus > 2 || (a.gpus == 2 && a.shapes.tp != 2) {
        bail!("--gpus is 1, or 2 with --tp 2");
    }
    if !(1..=65_536).contains(&a.layers)
        || !(1..=100_000).contains(&a.steps)
        || !(1..=1 << 24).contains(&a.vocab)
    {
        bail!("--layers takes 1 to 65,536, --steps 1 to 100,000 and --vocab 1 to 2^24");
    }
    // The probe's kernel holds an input vector of at most 16,384 values.
    if a.shapes.hidden > 16384 || a.shapes.intermediate > 16384 * a.shapes.tp {
        bail!("the probe takes --hidden and --intermediate / --tp of at most 16,384");
    }
    run_cuda(a)
}

#[cfg(feature = "cuda")]
fn run_cuda(a: PersistentArgs) -> Result<()> {
    use tessera_tensor::cuda::{probe_persistent, StepShape};
    let s = &a.shapes;
    let shape = StepShape {
        hidden: s.hidden,
        intermediate: s.intermediate,
        kv_heads: s.kv_heads,
        layers: a.layers,
        vocab: a.vocab,
        tp: s.tp,
    };
    shape.check().map_err(|e| anyhow::anyhow!(e))?;
    let bytes = shape.bytes() as f64;
    let bw = super::shapes::copy_ceiling(&format!(
        "tp {}, {} GPU(s), {:.2} GB of weights a rank a step",
        s.tp,
        a.gpus,
        bytes / 1e9
    ))?;
    let roofline = bytes / bw * 1e3;
    outln!("roofline: {roofline:.3} ms a step (weights / copy bandwidth)");
    let ordinals: Vec<usize> = (0..a.gpus).collect();
    let rows = probe_persistent(&ordinals, shape, a.steps)?;
    outln!(
        "\n{:>24} {:>6} {:>9} {:>9} {:>8} {:>10} {:>10} {:>10}",
        "variant",
        "blocks",
        "ms/step",
        "GB/s",
        "% roof",
        "syncs",
        "µs/sync",
        "µs/exch"
    );
    for r in &rows {
        let syncs = r.barriers;
        // What the synchronisation costs: against the stream through the same ring.
        let stream = rows
            .iter()
            .find(|s| s.barriers == 0 && s.ring == r.ring)
            .map(|s| s.ms);
        let per_sync = match stream {
            Some(t) if syncs > 0 => format!("{:.2}", (r.ms - t) * 1e3 / syncs as f64),
            _ => "-".into(),
        };
        // An exchange's cost beyond the barrier it follows: against the barriers-only variant
        // of the same ring, running as far ahead.
        let barriers_only = rows
            .iter()
            .find(|b| b.barriers > 0 && b.exchanges == 0 && b.ring == r.ring && b.ahead == r.ahead);
        let per_exchange = match barriers_only {
            Some(b) if r.exchanges > 0 => {
                format!("{:.2}", (r.ms - b.ms) * 1e3 / r.exchanges as f64)
            }
            _ => "-".into(),
        };
        outln!(
            "{:>24} {:>6} {:>9.3} {:>9.1} {:>8.1} {:>10} {:>10} {:>10}",
            r.variant,
            r.blocks,
            r.ms,
            bytes / r.ms / 1e6,
            100.0 * roofline / r.ms,
            format!("{}+{}x", r.barriers, r.exchanges),
            per_sync,
            per_exchange
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: PersistentArgs) -> Result<()> {
    Err(super::shapes::built_without_cuda())
}

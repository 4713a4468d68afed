//! `tessera bench sample`: the time to sample one token from a vocabulary's logits on the host
//! (what `generate` does every step when it samples), beside the straightforward way measured in
//! the same run (what tessera's sampler did before, with its exponentials also over the host's
//! threads): a full sort of the vocabulary by probability, then the same cuts. Both must keep the
//! same tokens. With a top-k, also the draw from the row's candidates alone
//! (`Sampler::sample_top`, what a sampled decode step does once the devices have found them),
//! which must draw the whole row's tokens.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use tessera_tensor::{Sampler, SamplingParams};

use super::median_secs;

#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// Vocabulary size (Llama 3's by default).
    #[arg(long, default_value_t = 128_256)]
    pub vocab: usize,
    /// Timed samples of each setting (the median is printed).
    #[arg(long, default_value_t = 21)]
    pub runs: usize,
}

/// The largest vocabulary taken (published models stay under 2^18).
const MAX_VOCAB: usize = 1 << 24;

/// (name, logits): a flat step (normal logits, σ 2: the nucleus of top-p 0.9 holds most of the
/// vocabulary) and a confident one (the same with a few tokens far ahead, as most steps of a
/// trained model are).
fn profiles(vocab: usize) -> Vec<(&'static str, Vec<f32>)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let flat: Vec<f32> = (0..vocab)
        .map(|_| {
            // Box-Muller.
            let (u, v): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
            (2.0 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    let mut peaked = flat.clone();
    for (i, lead) in [(17usize, 16.0f32), (4242, 15.0), (99, 14.0), (31337, 13.0)] {
        if let Some(l) = peaked.get_mut(i % vocab) {
            *l += lead;
        }
    }
    vec![("flat", flat), ("confident", peaked)]
}

/// The same cuts after a full sort of the vocabulary
/// ([`tessera_tensor::sample::kept_by_full_sort`]), then a draw as the sampler's. Returns the ids
/// kept (in order) and the token drawn at `u` (in [0, 1)) of their mass.
fn full_sort(p: &SamplingParams, logits: &[f32], u: f64) -> (Vec<u32>, u32) {
    let probs = tessera_tensor::sample::kept_by_full_sort(p, logits);
    let mut left = u * probs.iter().map(|q| q.1).sum::<f64>();
    let mut drawn = probs.last().map_or(0, |q| q.0);
    for q in &probs {
        if left < q.1 {
            drawn = q.0;
            break;
        }
        left -= q.1;
    }
    let mut ids: Vec<u32> = probs.iter().map(|q| q.0).collect();
    ids.sort_unstable();
    (ids, drawn)
}

pub fn run(a: SampleArgs) -> Result<()> {
    if !(2..=MAX_VOCAB).contains(&a.vocab) {
        bail!("--vocab takes 2 to {MAX_VOCAB}, got {}", a.vocab);
    }
    if !(1..=10_000).contains(&a.runs) {
        bail!("--runs takes 1 to 10000, got {}", a.runs);
    }
    let settings: [(&str, SamplingParams); 5] = [
        ("temperature 1", params(1.0, 1.0, 0, 0.0)),
        ("top-k 50", params(1.0, 1.0, 50, 0.0)),
        ("T 0.6 top-p 0.9", params(0.6, 0.9, 0, 0.0)),
        ("top-p 0.95 top-k 50", params(1.0, 0.95, 50, 0.0)),
        ("min-p 0.05", params(1.0, 1.0, 0, 0.05)),
    ];
    outln!(
        "one token sampled from {} logits on the host, median of {} ({} threads here)",
        a.vocab,
        a.runs,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    outln!(
        "{:>10} {:>20} {:>8} {:>10} {:>14} {:>8} {:>17}",
        "logits",
        "setting",
        "kept",
        "ms",
        "full sort ms",
        "faster",
        "from top-k ms"
    );
    for (name, logits) in profiles(a.vocab) {
        for (what, p) in &settings {
            let s = Sampler::new(*p);
            let mut ids: Vec<u32> = s.kept(&logits).iter().map(|q| q.0).collect();
            ids.sort_unstable();
            let (sorted_ids, _) = full_sort(p, &logits, 0.5);
            if ids != sorted_ids {
                bail!(
                    "{name}, {what}: the sampler kept {} tokens, a full sort {} (not the same ones)",
                    ids.len(),
                    sorted_ids.len()
                );
            }
            let kept = ids.len();
            let mut sampler = Sampler::new(*p);
            let ours = median_secs(a.runs, || {
                std::hint::black_box(sampler.sample(&logits));
            });
            let peer = median_secs(a.runs, || {
                std::hint::black_box(full_sort(p, &logits, 0.5));
            });
            let from_top = match Sampler::new(*p).candidates_for(a.vocab) {
                Some(c) if p.temperature > 0.0 => format!(
                    "{:.4}",
                    from_top_k(p, c.k, &logits, a.runs, name, what)? * 1e3
                ),
                _ => "-".into(),
            };
            outln!(
                "{:>10} {:>20} {:>8} {:>10.3} {:>14.3} {:>7.1}x {:>17}",
                name,
                what,
                kept,
                ours * 1e3,
                peer * 1e3,
                peer / ours,
                from_top
            );
        }
    }
    Ok(())
}

/// Median seconds of a draw from the top-`k` candidates of `logits` (found once, as a device
/// would find them), after checking that 50 seeded draws from them are the whole row's.
fn from_top_k(
    p: &SamplingParams,
    k: usize,
    logits: &[f32],
    runs: usize,
    name: &str,
    what: &str,
) -> Result<f64> {
    use tessera_tensor::{ops, DType, Tensor};
    let row = Tensor::from_f32(vec![1, logits.len()], logits.to_vec(), DType::F32)?;
    let cap = tessera_model::layers::top_k_room(k);
    let got = ops::unpack_top_k(&ops::top_k_rows(&row, k, cap)?.to_f32_vec(), cap);
    let top = &got[0].entries;
    let (mut whole, mut from_top) = (Sampler::new(*p), Sampler::new(*p));
    for i in 0..50 {
        let (a, b) = (whole.sample(logits), from_top.sample_top(top));
        if a != b {
            bail!("{name}, {what}: draw {i} from the top-k candidates gave {b}, the row {a}");
        }
    }
    Ok(median_secs(runs, || {
        std::hint::black_box(from_top.sample_top(top));
    }))
}

fn params(temperature: f32, top_p: f32, top_k: usize, min_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p,
        top_k,
        min_p,
        ..Default::default()
    }
}

//! Token sampling from logits: greedy, temperature, top-k and nucleus (top-p), reproducible from a
//! seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens first (0 = all), then top-p over what is left, as
    /// transformers' warpers and vLLM apply them.
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// A sampler with its own seeded random stream (ChaCha8: the same on every platform and version).
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature as f64;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l as f64 - max) * inv_t).exp()))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // Top-k keeps every token as likely as the k-th (ties at the edge stay, as transformers'
        // TopKLogitsWarper and vLLM remove only those below it).
        if self.params.top_k > 0 && self.params.top_k < probs.len() {
            let kth = probs[self.params.top_k - 1].1;
            let keep = probs.iter().take_while(|p| p.1 >= kth).count();
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let top_p = self.params.top_p.clamp(0.0, 1.0) as f64;
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1 / total;
            if mass >= top_p {
                break;
            }
        }
        probs.truncate(kept.max(1));
        let kept_total: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.random::<f64>() * kept_total;
        for p in &probs {
            if u < p.1 {
                return p.0;
            }
            u -= p.1;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// Index of the largest logit; the lowest index wins a tie.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_p_and_seeds() {
        let logits = [0.0f32, 3.0, 2.9, -1.0];
        let mut g = Sampler::new(SamplingParams::default());
        assert_eq!(g.sample(&logits), 1);
        // top_p tiny keeps only the most likely token, whatever the temperature.
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_p: 0.01,
            top_k: 0,
            seed: 3,
        });
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // Same seed, same stream; the full distribution reaches every token.
        let p = SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            top_k: 0,
            seed: 9,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..400).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..400).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        for tok in 0..4 {
            assert!(a.contains(&tok), "token {tok} never sampled");
        }
    }

    /// top-k keeps the k most likely tokens, then top-p works over what is left (renormalised):
    /// with k = 2 the two likeliest only; with k = 3 and top-p 0.5, of [0.4, 0.35, 0.25] (after k)
    /// the first two reach 0.5.
    #[test]
    fn top_k_then_top_p() {
        let logits = [0.0f32, 3.0, 2.9, -1.0, 2.5];
        let draw = |top_k, top_p| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p,
                top_k,
                seed: 1,
            });
            let mut seen: Vec<u32> = (0..2000).map(|_| s.sample(&logits)).collect();
            seen.sort();
            seen.dedup();
            seen
        };
        assert_eq!(draw(2, 1.0), vec![1, 2]);
        assert_eq!(draw(1, 1.0), vec![1]);
        assert_eq!(draw(3, 1.0), vec![1, 2, 4]);
        // Renormalised over k = 3: e^3, e^2.9, e^2.5 are 0.39, 0.35, 0.26 of their sum.
        assert_eq!(draw(3, 0.5), vec![1, 2]);
        assert_eq!(draw(0, 1.0), vec![0, 1, 2, 3, 4]);
        assert_eq!(draw(99, 1.0), vec![0, 1, 2, 3, 4]);
        // Ties at the k-th value stay.
        let tied = [1.0f32, 1.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 1,
            seed: 2,
        });
        let mut seen: Vec<u32> = (0..300).map(|_| s.sample(&tied)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, vec![0, 1, 2]);
    }
}

//! Token sampling from logits: a repetition penalty, then greedy, or temperature, top-k, nucleus
//! (top-p) and min-p in transformers' order, reproducible from a seed.

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
    /// After top-p, drop the tokens less likely than `min_p` times the likeliest (0 = none), as
    /// transformers' `MinPLogitsWarper`.
    pub min_p: f32,
    /// Every token already seen (prompt and output, [`Sampler::observe`]) has its logit divided by
    /// this where positive, multiplied where negative (1 = off), before greedy or sampling, as
    /// transformers' `RepetitionPenaltyLogitsProcessor` and vLLM apply it.
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token the output already holds (0 = off), after the
    /// repetition penalty, as vLLM's `presence_penalty`.
    pub presence_penalty: f32,
    /// Subtracted from the logit of every token the output already holds, times its count there
    /// (0 = off), as vLLM's `frequency_penalty`.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding on the raw logits: the argmax needs no logits on the host.
    pub fn plain_greedy(&self) -> bool {
        self.temperature <= 0.0 && !self.penalised()
    }

    fn penalised(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// A sampler with its own seeded random stream (ChaCha8: the same on every platform and version).
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// The tokens seen so far (prompt and output), for the repetition penalty, and how often
    /// each is in the output, for the presence and frequency penalties (empty where they are off;
    /// by id, so an id past the vocabulary costs nothing but an entry).
    seen: std::collections::BTreeSet<u32>,
    output_counts: std::collections::BTreeMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            seen: Default::default(),
            output_counts: Default::default(),
        }
    }

    /// Marks the prompt's `tokens` as seen (the repetition penalty's context).
    pub fn observe(&mut self, tokens: &[u32]) {
        if self.params.repetition_penalty != 1.0 {
            self.seen.extend(tokens);
        }
    }

    /// Marks a token produced: seen, and counted in the output.
    pub fn observe_output(&mut self, token: u32) {
        if !self.params.penalised() {
            return;
        }
        self.observe(&[token]);
        *self.output_counts.entry(token).or_default() += 1;
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let penalized;
        let logits = if self.params.penalised() {
            let p = &self.params;
            let mut l = logits.to_vec();
            if p.repetition_penalty != 1.0 {
                let r = p.repetition_penalty;
                for &t in &self.seen {
                    if let Some(x) = l.get_mut(t as usize) {
                        *x = if *x < 0.0 { *x * r } else { *x / r };
                    }
                }
            }
            // As vLLM: the frequency term, then the presence term.
            for (&t, &c) in &self.output_counts {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= p.frequency_penalty * c as f32;
                    *x -= p.presence_penalty;
                }
            }
            penalized = l;
            &penalized
        } else {
            logits
        };
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
        if self.params.min_p > 0.0 {
            let floor = self.params.min_p as f64 * probs[0].1;
            let keep = probs.iter().take_while(|p| p.1 >= floor).count();
            probs.truncate(keep.max(1));
        }
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

    /// The distinct tokens of `n` draws, sorted.
    fn distinct(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<u32> {
        let mut seen: Vec<u32> = (0..n).map(|_| s.sample(logits)).collect();
        seen.sort();
        seen.dedup();
        seen
    }

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
            ..Default::default()
        });
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // Same seed, same stream; the full distribution reaches every token.
        let p = SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            top_k: 0,
            seed: 9,
            ..Default::default()
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
                ..Default::default()
            });
            distinct(&mut s, &logits, 2000)
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
            ..Default::default()
        });
        let seen = distinct(&mut s, &tied, 300);
        assert_eq!(seen, vec![0, 1, 2]);
    }

    /// min-p drops what is less likely than min_p times the likeliest, after top-k / top-p: of
    /// softmax([3, 2.9, 2.5, 0, -1]) = [0.39, 0.35, 0.24, 0.01, 0.005], min_p 0.5 keeps the first
    /// three (0.24 >= 0.195), 0.7 the first two; with top_k 2 first, 0.95 keeps one (0.35 < 0.37).
    #[test]
    fn min_p_after_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 2.9, -1.0, 2.5];
        let draw = |min_p, top_k| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                min_p,
                top_k,
                seed: 4,
                ..Default::default()
            });
            distinct(&mut s, &logits, 2000)
        };
        assert_eq!(draw(0.5, 0), vec![1, 2, 4]);
        assert_eq!(draw(0.7, 0), vec![1, 2]);
        assert_eq!(draw(0.95, 2), vec![1]);
        assert_eq!(draw(0.0, 0), vec![0, 1, 2, 3, 4]);
        // Temperature first: at T = 10 every token is within 0.5 of the likeliest.
        let mut s = Sampler::new(SamplingParams {
            temperature: 10.0,
            min_p: 0.5,
            seed: 5,
            ..Default::default()
        });
        let seen = distinct(&mut s, &logits, 2000);
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    }

    /// The repetition penalty divides seen tokens' positive logits and multiplies their negative
    /// ones, greedy or sampled; unseen tokens and a penalty of 1 leave the logits alone.
    #[test]
    fn repetition_penalty_as_transformers_applies_it() {
        let logits = [0.0f32, 3.0, 2.9, -1.0, 2.5];
        let greedy = |penalty, seen: &[u32]| {
            let mut s = Sampler::new(SamplingParams {
                repetition_penalty: penalty,
                ..Default::default()
            });
            s.observe(seen);
            s.sample(&logits)
        };
        assert_eq!(greedy(1.0, &[1]), 1);
        // 3.0 / 1.1 = 2.73 < 2.9.
        assert_eq!(greedy(1.1, &[1]), 2);
        // 3 / 1.5 = 2, 2.9 / 1.5 = 1.93: 4 (2.5, unseen) leads; ids past the logits are ignored.
        assert_eq!(greedy(1.5, &[1, 2, 99]), 4);
        // The largest id costs one entry (a dense table of seen ids would take 4 GiB).
        assert_eq!(greedy(1.5, &[1, 2, u32::MAX]), 4);
        // A penalty below 1 favours what was seen: 2.5 / 0.8 = 3.125.
        assert_eq!(greedy(0.8, &[4]), 4);
        // Negative logits are multiplied: -0.5 * 3 = -1.5 falls below the unseen -1.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 3.0,
            ..Default::default()
        });
        s.observe(&[1]);
        assert_eq!(s.sample(&[-1.0, -0.5]), 0);
        // Sampled: with tokens 1 and 2 penalised to ~0 and top_k 1, only 4 is drawn.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            repetition_penalty: 1e6,
            seed: 6,
            ..Default::default()
        });
        s.observe(&[1, 2]);
        assert!((0..200).all(|_| s.sample(&logits) == 4));
        assert!(SamplingParams::default().plain_greedy());
        assert!(!SamplingParams {
            repetition_penalty: 1.1,
            ..Default::default()
        }
        .plain_greedy());
    }

    /// Presence and frequency penalties (vLLM's): subtracted from the tokens of the output only
    /// (the prompt's are untouched), the frequency one per occurrence.
    #[test]
    fn presence_and_frequency_penalties_count_the_output_only() {
        let logits = [0.0f32, 3.0, 2.9, -1.0, 2.5];
        let greedy = |presence, frequency, prompt: &[u32], output: &[u32]| {
            let mut s = Sampler::new(SamplingParams {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..Default::default()
            });
            s.observe(prompt);
            for &t in output {
                s.observe_output(t);
            }
            s.sample(&logits)
        };
        assert_eq!(greedy(0.0, 0.0, &[], &[1, 1]), 1);
        // 3 - 0.2 = 2.8 < 2.9.
        assert_eq!(greedy(0.2, 0.0, &[], &[1]), 2);
        // In the prompt only: untouched.
        assert_eq!(greedy(0.2, 0.0, &[1], &[]), 1);
        // Frequency counts: 3 - 0.06 x 2 = 2.88 < 2.9, one occurrence (2.94) is not enough.
        assert_eq!(greedy(0.0, 0.06, &[], &[1, 1]), 2);
        assert_eq!(greedy(0.0, 0.06, &[], &[1]), 1);
        // Negative values reward repeats: 2.5 + 1 = 3.5 leads.
        assert_eq!(greedy(-1.0, 0.0, &[], &[4]), 4);
        assert!(!SamplingParams {
            presence_penalty: 0.5,
            ..Default::default()
        }
        .plain_greedy());
    }
}

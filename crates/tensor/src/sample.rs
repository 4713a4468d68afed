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
    /// Keep the `top_k` most likely tokens first (0 = all; every token whose logit equals the
    /// k-th largest stays, as transformers' `TopKLogitsWarper` compares logits), then top-p over
    /// what is left, as transformers' warpers and vLLM apply them.
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

/// What a draw needs of a row's logits where they lie ([`Sampler::candidates_for`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    /// Every logit at least the row's `k`-th largest.
    pub k: usize,
    /// And the logits of these tokens, by id, whatever their value (those a penalty moves).
    pub ids: Vec<u32>,
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
    /// The last draw's candidates, their memory reused by the next (a vocabulary's worth: asking
    /// the system for it afresh every token cost page faults).
    scratch: Vec<(u32, f64)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            seen: Default::default(),
            output_counts: Default::default(),
            scratch: Vec::new(),
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
            let mut l = logits.to_vec();
            for t in self.penalised_ids() {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = self.penalise(t, *x);
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
        let mut kept = std::mem::take(&mut self.scratch);
        self.kept_into(logits, &mut kept);
        let token = self.draw(&kept);
        // Kept for the next draw: its memory is not asked of the system again.
        self.scratch = kept;
        token
    }

    /// The tokens a penalty moves (seen, or in the output), by id: none where penalties are off.
    pub fn penalised_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.seen.iter().copied().collect();
        ids.extend(self.output_counts.keys().filter(|t| !self.seen.contains(t)));
        ids.sort_unstable();
        ids
    }

    /// `logit` of token `id` after the penalties, as [`Self::sample`] applies them: the
    /// repetition penalty where `id` was seen, then the frequency and presence terms where the
    /// output holds it.
    fn penalise(&self, id: u32, mut logit: f32) -> f32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 && self.seen.contains(&id) {
            let r = p.repetition_penalty;
            logit = if logit < 0.0 { logit * r } else { logit / r };
        }
        // As vLLM: the frequency term, then the presence term.
        if let Some(&c) = self.output_counts.get(&id) {
            logit -= p.frequency_penalty * c as f32;
            logit -= p.presence_penalty;
        }
        logit
    }

    /// What [`Self::sample_top`] needs of a row of a vocabulary of `vocab` to draw the token
    /// [`Self::sample`] draws from the whole row, where the logits lie: `None` where that is the
    /// whole row (no top-k at a temperature above 0, or a top-k near the vocabulary's size).
    ///
    /// With penalties, the row's raw logits of the `ids` the penalties move (their penalised
    /// values are known from those alone) and every logit at least the row's `k`-th largest, `k`
    /// the draw's top-k (1 when greedy) plus the count of those ids: at most that many of the
    /// tokens above an unpenalised token are penalised ones, so every unpenalised token the draw
    /// can keep is among them, whichever way a penalty moves a logit. `None` too where more than
    /// an eighth of the vocabulary is penalised (the candidates would outweigh the row).
    pub fn candidates_for(&self, vocab: usize) -> Option<Candidates> {
        let p = &self.params;
        let draw_k = if p.temperature <= 0.0 { 1 } else { p.top_k };
        if draw_k == 0 || draw_k >= vocab {
            return None;
        }
        let mut ids = self.penalised_ids();
        ids.retain(|&t| (t as usize) < vocab);
        // Past an eighth of the vocabulary the candidates (8 bytes each, in a room of twice
        // their count) would weigh more than the bf16 row they stand for at tp 1 (at tp N every
        // rank's room is gathered: the break-even is nearer an eighth over N; not measured).
        let k = draw_k + ids.len();
        (k < vocab && ids.len() <= vocab / 8).then_some(Candidates { k, ids })
    }

    /// The token [`Self::sample`] draws from a whole row (the same one, and the same random
    /// stream after it), from `top`: the row's raw (id, logit), by id, of every logit at least
    /// its k-th largest and of every id a penalty moves (k and the ids of
    /// [`Self::candidates_for`]), all finite or -inf (tokens below the k-th largest may be there
    /// too). The penalties are applied to those ids here; the sampler's top-k then keeps exactly
    /// what it keeps of the whole row, and the row's maximum is among them.
    pub fn sample_top(&mut self, top: &[(u32, f32)]) -> u32 {
        let penalised;
        let top = if self.params.penalised() {
            penalised = top
                .iter()
                .map(|&(t, l)| (t, self.penalise(t, l)))
                .collect::<Vec<_>>();
            &penalised[..]
        } else {
            top
        };
        if self.params.temperature <= 0.0 {
            // As [`argmax`] of the whole row: the first (lowest id) of the largest.
            let mut best: Option<(u32, f32)> = None;
            for &(t, l) in top {
                if best.is_none_or(|b| l > b.1) {
                    best = Some((t, l));
                }
            }
            return best.map_or(0, |b| b.0);
        }
        let values: Vec<f32> = top.iter().map(|p| p.1).collect();
        let k = self.params.top_k.clamp(1, values.len().max(1));
        let max = values.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut kept = std::mem::take(&mut self.scratch);
        kept.clear();
        if !values.is_empty() {
            let kth = kth_largest(&values, k);
            self.weigh_at_least(top.iter().copied(), kth, max, &mut kept);
        }
        self.cut(&mut kept);
        let token = self.draw(&kept);
        self.scratch = kept;
        token
    }

    /// A token of `kept`, each at its share of their weight.
    fn draw(&mut self, kept: &[(u32, f64)]) -> u32 {
        let kept_total: f64 = kept.iter().map(|p| p.1).sum();
        let mut u = self.rng.random::<f64>() * kept_total;
        for p in kept {
            if u < p.1 {
                return p.0;
            }
            u -= p.1;
        }
        // Rounding left u past the last weight: the last token of any weight.
        kept.iter()
            .rev()
            .find(|p| p.1 > 0.0)
            .or(kept.last())
            .map_or(0, |p| p.0)
    }

    /// The tokens a draw chooses among: those left after temperature, top-k, top-p and min-p
    /// (penalties are [`Self::sample`]'s, before this), each with its unnormalised probability
    /// `exp((logit - max) / T)`, in no particular order.
    ///
    /// Linear in the vocabulary, nothing sorted: top-k takes the k-th largest logit in one pass
    /// (a heap of k) and the exponentials of those tokens only; top-p
    /// finds the tokens surely in its nucleus by binning the probabilities by their bits, then
    /// how many of the bin on its edge it needs by selection. (A full sort of a 128k vocabulary,
    /// as this did before, took 8 ms on a GPU host, twice a decode step of an 8B model there, and
    /// a sort of a flat distribution's nucleus almost as long: `tessera bench sample`.)
    pub fn kept(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let mut probs = Vec::new();
        self.kept_into(logits, &mut probs);
        probs
    }

    /// [`Self::kept`] into `probs` (its memory reused).
    fn kept_into(&self, logits: &[f32], probs: &mut Vec<(u32, f64)>) {
        use rayon::prelude::*;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        probs.clear();
        let k = self.params.top_k;
        if k > 0 && k < logits.len() {
            // Top-k on the logits, as transformers' TopKLogitsWarper compares them: every token
            // at least as large as the k-th largest (ties at the edge stay); only those tokens'
            // exponentials are taken (50 instead of a vocabulary's).
            let kth = kth_largest(logits, k);
            let row = logits.iter().enumerate().map(|(i, &l)| (i as u32, l));
            self.weigh_at_least(row, kth, max, probs);
        } else {
            // The exponentials are most of the work: over the host's threads for a large
            // vocabulary.
            let weight = self.weight(max);
            probs.par_extend(
                logits
                    .par_iter()
                    .with_min_len(16_384)
                    .enumerate()
                    .map(|(i, &l)| (i as u32, weight(l))),
            );
        }
        self.cut(probs);
    }

    /// A logit's unnormalised probability `exp((logit - max) / T)`.
    fn weight(&self, max: f32) -> impl Fn(f32) -> f64 + Sync {
        let inv_t = 1.0 / self.params.temperature as f64;
        let max = max as f64;
        move |l: f32| ((l as f64 - max) * inv_t).exp()
    }

    /// Into `probs`, in `row`'s order, each (id, logit) of `row` whose logit is at least `kth`
    /// with its weight ([`Self::weight`] of the row's `max`).
    fn weigh_at_least(
        &self,
        row: impl Iterator<Item = (u32, f32)>,
        kth: f32,
        max: f32,
        probs: &mut Vec<(u32, f64)>,
    ) {
        let weight = self.weight(max);
        probs.extend(row.filter(|p| p.1 >= kth).map(|(i, l)| (i, weight(l))));
    }

    /// Top-p, then min-p, on the weighed tokens `probs`.
    fn cut(&self, probs: &mut Vec<(u32, f64)>) {
        // Top-p (skipped at 1, as transformers skips it): the fewest likeliest tokens whose share
        // of what is left reaches top_p.
        let top_p = self.params.top_p.clamp(0.0, 1.0) as f64;
        if top_p < 1.0 {
            nucleus(probs, top_p);
        }
        if self.params.min_p > 0.0 {
            let top = probs.iter().map(|p| p.1).fold(0.0, f64::max);
            // The likeliest always stays.
            let floor = (self.params.min_p as f64 * top).min(top);
            probs.retain(|p| p.1 >= floor);
        }
    }
}

/// The `k`-th largest of `logits` (`0 < k <= logits.len()`; in `f32::total_cmp`'s order), in one
/// pass keeping the k largest so far in a heap: linear in the vocabulary for any k far below it.
pub(crate) fn kth_largest(logits: &[f32], k: usize) -> f32 {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    /// A logit in `total_cmp`'s order.
    #[derive(Clone, Copy)]
    struct Total(f32);
    impl PartialEq for Total {
        fn eq(&self, o: &Self) -> bool {
            self.0.total_cmp(&o.0).is_eq()
        }
    }
    impl Eq for Total {}
    impl PartialOrd for Total {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Total {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&o.0)
        }
    }
    // The smallest of the k largest on top.
    let mut heap: BinaryHeap<Reverse<Total>> =
        logits[..k].iter().map(|&l| Reverse(Total(l))).collect();
    for &l in &logits[k..] {
        let mut top = heap.peek_mut().expect("k > 0");
        if l.total_cmp(&top.0 .0).is_gt() {
            *top = Reverse(Total(l));
        }
    }
    heap.peek().expect("k > 0").0 .0
}

/// Leaves in `probs` the smallest set of its likeliest tokens whose share of the whole mass
/// reaches `top_p` (ties at its edge taken lower id first).
///
/// Probabilities are positive finite f64s, whose bits order them: binned by exponent and the top
/// 8 bits of the mantissa, every token of a bin before the one where the mass is reached is in
/// the nucleus and none after it is. Of that edge bin (a few tokens, or a few thousandths of a
/// flat vocabulary) selection finds how many are needed.
fn nucleus(probs: &mut Vec<(u32, f64)>, top_p: f64) {
    if probs.is_empty() {
        return;
    }
    // The bins' masses, summed and walked from the first bin a token is in to the last: the bins
    // outside hold nothing, so the sums are those of all the bins, bit for bit. The bins' memory
    // stays with the thread and only the bins used are cleared (a top-k draw keeps ~50 tokens:
    // zeroing all 16k bins for them took most of its time).
    thread_local! {
        static MASS: std::cell::RefCell<Vec<f64>> = std::cell::RefCell::new(vec![0.0; BINS]);
    }
    // Whether `mass` of `total` reaches top_p. Some mass is needed: at top_p 0 the likeliest
    // token alone.
    let reaches = |mass: f64, total: f64| mass > 0.0 && mass / total >= top_p;
    let (total, edge) = MASS.with_borrow_mut(|mass_of| {
        let (mut first, mut last) = (BINS, 0);
        for p in probs.iter() {
            let b = bin(p.1);
            mass_of[b] += p.1;
            (first, last) = (first.min(b), last.max(b));
        }
        let used = &mass_of[first..=last];
        let total: f64 = used.iter().sum();
        let mut cum = 0.0;
        // Rounding may leave the running sum short of the total: then the last bin.
        let edge = used
            .iter()
            .position(|&m| {
                cum += m;
                reaches(cum, total)
            })
            .map_or(BINS - 1, |i| first + i);
        for p in probs.iter() {
            mass_of[bin(p.1)] = 0.0;
        }
        (total, edge)
    });
    let reached = |mass: f64| reaches(mass, total);
    let (mut kept, mut at_edge) = (Vec::new(), Vec::new());
    for &p in probs.iter() {
        match bin(p.1).cmp(&edge) {
            std::cmp::Ordering::Less => kept.push(p),
            std::cmp::Ordering::Equal => at_edge.push(p),
            std::cmp::Ordering::Greater => {}
        }
    }
    let mut below: f64 = kept.iter().map(|p| p.1).sum();
    let edge_mass: f64 = at_edge.iter().map(|p| p.1).sum();
    // Where rounding of the bins' sums left the edge bin short, the bins after it decide.
    if !reached(below + edge_mass) {
        below += edge_mass;
        kept.append(&mut at_edge);
        at_edge = probs.iter().filter(|p| bin(p.1) > edge).copied().collect();
    }
    let n = take_likeliest(&mut at_edge, below, &reached);
    kept.extend_from_slice(&at_edge[..n]);
    // In place: the caller's memory stays for its next draw.
    probs.clear();
    probs.extend_from_slice(&kept);
}

/// Bins of probabilities in (0, 1], in descending order: 256 for each binary order of magnitude
/// down to 2^-62, by the top 8 bits of the mantissa, then one for everything smaller (zero
/// included), whose mantissas do not order it.
const BINS: usize = 63 * 256 + 1;

fn bin(p: f64) -> usize {
    let bits = p.to_bits();
    let magnitude = 1023 - ((bits >> 52) & 0x7ff) as i64;
    if !(0..63).contains(&magnitude) {
        // Under 2^-62 (or 1 exactly, whose magnitude is 0: not here).
        return if magnitude < 0 { 0 } else { BINS - 1 };
    }
    magnitude as usize * 256 + 255 - ((bits >> 44) & 0xff) as usize
}

/// How many of the likeliest of `probs` reach `reached` beside a mass `below` of likelier tokens
/// (all of them where even all fall short), those first in `probs`: narrowed by halving the count,
/// each round selecting the likeliest half of the undecided ones (linear time in all).
fn take_likeliest(
    probs: &mut [(u32, f64)],
    mut below: f64,
    reached: &dyn Fn(f64) -> bool,
) -> usize {
    let (mut lo, mut hi) = (0, probs.len());
    if !reached(below + probs.iter().map(|p| p.1).sum::<f64>()) {
        return hi;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        probs[lo..hi].select_nth_unstable_by(mid - lo, likelier);
        let m: f64 = probs[lo..mid].iter().map(|p| p.1).sum();
        if reached(below + m) {
            hi = mid;
        } else {
            below += m;
            lo = mid;
        }
    }
    hi
}

/// Descending probability, the lower id first among equals (a total order).
fn likelier(a: &(u32, f64), b: &(u32, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The tokens [`Sampler::kept`] keeps, found the straightforward way (as the sampler did before):
/// every token's probability, a full sort (descending, the lower id first among equals), then
/// top-k (by a sorted copy of the logits), top-p (a running sum) and min-p cutting the sorted
/// list; in that order. The reference
/// of the sampler's tests and the peer of `tessera bench sample`, written apart from the sampler's
/// own ordering and binning.
pub fn kept_by_full_sort(p: &SamplingParams, logits: &[f32]) -> Vec<(u32, f64)> {
    use rayon::prelude::*;
    let inv_t = 1.0 / p.temperature as f64;
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    // As the sampler: the exponentials over the host's threads.
    let mut probs: Vec<(u32, f64)> = logits
        .par_iter()
        .with_min_len(16_384)
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) * inv_t).exp()))
        .collect();
    // A total order, so an unstable sort gives the one result.
    probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 && p.top_k < probs.len() {
        // On the logits, as transformers' TopKLogitsWarper: the k-th largest, ties kept.
        let mut sorted = logits.to_vec();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let kth = sorted[p.top_k - 1];
        probs.retain(|q| logits[q.0 as usize] >= kth);
    }
    if p.top_p < 1.0 {
        let total: f64 = probs.iter().map(|q| q.1).sum();
        let mut cum = 0.0;
        let kept = probs
            .iter()
            .position(|q| {
                cum += q.1;
                cum / total >= p.top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(kept);
    }
    let floor = p.min_p as f64 * probs[0].1;
    probs.retain(|q| q.1 >= floor);
    probs
}

/// Index of the largest logit; the lowest index wins a tie. A NaN counts as larger than any
/// number (as torch.argmax takes it): the first NaN's index, so a broken row is seen, not skipped.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            return i as u32;
        }
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
    fn argmax_takes_the_lowest_of_ties_and_the_first_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[1.0, 3.0, f32::NAN, 9.0, f32::NAN]), 2);
        assert_eq!(argmax(&[f32::NAN, 3.0]), 0);
        assert_eq!(
            argmax(&[f32::NEG_INFINITY, f32::INFINITY, f32::INFINITY]),
            1
        );
    }

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

    /// The sampler's kept tokens (by selection and a sorted prefix) are those of a full sort, with
    /// the same probabilities, over peaked, flat and tied logits and every kind of cut; and a draw
    /// lands on each kept token at its share of their mass.
    #[test]
    fn the_kept_tokens_are_those_of_a_full_sort_and_draws_follow_their_shares() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for vocab in [1usize, 2, 5, 200, 3000] {
            // Peaked, flat, tied, all equal, and far apart (most probabilities then underflow).
            for (spread, ties) in [
                (12.0f32, false),
                (0.05, false),
                (3.0, true),
                (0.0, false),
                (3000.0, false),
            ] {
                let logits: Vec<f32> = (0..vocab)
                    .map(|_| {
                        let l = (rng.random::<f32>() - 0.5) * spread;
                        if ties {
                            l.round()
                        } else {
                            l
                        }
                    })
                    .collect();
                for temperature in [0.3f32, 1.0, 2.5] {
                    for top_k in [0, 1, 3, 64, vocab.saturating_sub(1), vocab + 5] {
                        for top_p in [1.0f32, 0.95, 0.5, 0.01, 0.0] {
                            for min_p in [0.0f32, 0.05, 0.6] {
                                let p = SamplingParams {
                                    temperature,
                                    top_k,
                                    top_p,
                                    min_p,
                                    ..Default::default()
                                };
                                let mut kept = Sampler::new(p).kept(&logits);
                                kept.sort_by_key(|q| q.0);
                                let mut want = kept_by_full_sort(&p, &logits);
                                want.sort_by_key(|q| q.0);
                                assert_eq!(kept, want, "{p:?} {vocab}");
                            }
                        }
                    }
                }
            }
        }
        // exp(l) of [0, ln 2, ln 3, ln 4] is 1 : 2 : 3 : 4; with top-p 0.95 the walk is in
        // descending order, without in id order: the shares are the same.
        let logits = [0.0f32, 2f32.ln(), 3f32.ln(), 4f32.ln()];
        for top_p in [1.0, 0.95] {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p,
                seed: 12,
                ..Default::default()
            });
            let n = 40_000;
            let mut counts = [0usize; 4];
            for _ in 0..n {
                counts[s.sample(&logits) as usize] += 1;
            }
            for (i, &c) in counts.iter().enumerate() {
                let share = c as f64 / n as f64;
                let want = (i + 1) as f64 / 10.0;
                assert!((share - want).abs() < 0.01, "top_p {top_p}: {counts:?}");
            }
        }
    }

    /// A draw from a row's candidates (`ops::top_k_rows`, over the whole row or over uneven parts
    /// of it as tensor-parallel ranks hold a vocabulary, merged with the raw logits of the ids a
    /// penalty moves) is the draw from the whole row, token for token over a run of steps (the
    /// random streams stay together, the penalised set grows with the output), at bf16-rounded
    /// logits whose ties often sit at the k-th largest; with repetition penalties above and below
    /// 1, presence and frequency penalties of either sign, and greedy with a penalty; and where
    /// `candidates_for` says no, the row is needed.
    #[test]
    fn a_draw_from_the_top_k_candidates_is_the_draw_from_the_whole_row() {
        use crate::{ops, DType, Tensor};
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let vocab = 3001;
        // (temperature, top_p, top_k, min_p, repetition, presence, frequency)
        let settings = [
            (0.6f32, 0.9f32, 50usize, 0.0f32, 1.0f32, 0.0f32, 0.0f32),
            (1.0, 1.0, 5, 0.1, 1.0, 0.0, 0.0),
            (0.8, 0.5, 1, 0.0, 1.0, 0.0, 0.0),
            (1.3, 0.99, 200, 0.02, 1.0, 0.0, 0.0),
            (0.7, 0.8, 20, 0.0, 1.05, 0.0, 0.0),
            (1.0, 1.0, 3, 0.0, 2.5, 0.0, 0.0),
            (0.9, 0.95, 40, 0.0, 0.5, 0.0, 0.0),
            (1.0, 0.9, 30, 0.05, 1.0, 0.8, 0.3),
            (1.0, 1.0, 10, 0.0, 1.2, -2.0, -0.5),
            (0.0, 1.0, 0, 0.0, 1.3, 0.0, 0.0),
            (0.0, 1.0, 0, 0.0, 0.7, 0.5, 1.0),
        ];
        for (temperature, top_p, top_k, min_p, rep, presence, frequency) in settings {
            let p = SamplingParams {
                temperature,
                top_p,
                top_k,
                min_p,
                repetition_penalty: rep,
                presence_penalty: presence,
                frequency_penalty: frequency,
                seed: top_k as u64,
            };
            let (mut whole, mut from_top) = (Sampler::new(p), Sampler::new(p));
            // A prompt: some ids twice, one past the vocabulary (it costs nothing).
            let prompt: Vec<u32> = (0..40u32)
                .map(|i| (i * 97) % 1500)
                .chain([7, 7, 5000])
                .collect();
            whole.observe(&prompt);
            from_top.observe(&prompt);
            let mut distinct = std::collections::BTreeSet::new();
            for step in 0..40 {
                let ask = from_top.candidates_for(vocab).expect("candidates");
                let draw_k = if temperature > 0.0 { top_k } else { 1 };
                assert_eq!(ask.k, draw_k + ask.ids.len());
                assert!(ask.ids.windows(2).all(|w| w[0] < w[1]));
                assert!(ask.ids.iter().all(|&t| (t as usize) < vocab));
                // Coarse logits (bf16 of a few units): many equal values.
                let spread = [4.0f32, 30.0, 0.5][step % 3];
                let v: Vec<f32> = (0..vocab)
                    .map(|_| (rng.random::<f32>() - 0.5) * spread)
                    .collect();
                let row = Tensor::from_f32(vec![1, vocab], v, DType::BF16).unwrap();
                let logits = row.to_f32_vec();
                // Ranks' shares: the whole row, or three uneven parts.
                let parts: &[(usize, usize)] = if step % 2 == 0 {
                    &[(0, vocab)]
                } else {
                    &[(0, 1000), (1000, 2900), (2900, vocab)]
                };
                let mut top = std::collections::BTreeMap::new();
                for &(a, b) in parts {
                    let part = Tensor::from_f32(vec![1, b - a], logits[a..b].to_vec(), DType::F32)
                        .unwrap();
                    let cap = b - a;
                    let packed = ops::top_k_rows(&part, ask.k.min(b - a), cap).unwrap();
                    let r = &ops::unpack_top_k(&packed.to_f32_vec(), cap)[0];
                    assert!(r.complete());
                    top.extend(r.entries.iter().map(|&(j, l)| (j + a as u32, l)));
                }
                top.extend(ask.ids.iter().map(|&t| (t, logits[t as usize])));
                let top: Vec<(u32, f32)> = top.into_iter().collect();
                let t = from_top.sample_top(&top);
                assert_eq!(t, whole.sample(&logits), "{p:?} step {step}");
                distinct.insert(t);
                whole.observe_output(t);
                from_top.observe_output(t);
            }
            assert!(distinct.len() > 1 || top_k == 1, "{p:?}: one token drawn");
        }
        let needs_row = |p: SamplingParams| Sampler::new(p).candidates_for(100).is_none();
        let base = SamplingParams {
            temperature: 0.7,
            top_k: 10,
            ..Default::default()
        };
        assert!(!needs_row(base));
        assert!(needs_row(SamplingParams { top_k: 0, ..base }));
        assert!(needs_row(SamplingParams { top_k: 100, ..base }));
        // Greedy asks for the largest, penalised or not.
        let greedy = SamplingParams {
            temperature: 0.0,
            ..base
        };
        assert_eq!(
            Sampler::new(greedy).candidates_for(100),
            Some(Candidates { k: 1, ids: vec![] })
        );
        // A penalty adds its ids to the top-k; past the vocabulary, the row.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.1,
            presence_penalty: 0.5,
            ..base
        });
        s.observe(&[9, 3, 3, 400]);
        s.observe_output(5);
        assert_eq!(
            s.candidates_for(100),
            Some(Candidates {
                k: 13,
                ids: vec![3, 5, 9]
            })
        );
        s.observe(&(0..95).collect::<Vec<_>>());
        assert_eq!(s.candidates_for(100), None);
        // Penalised ids past an eighth of the vocabulary: the row.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.1,
            ..base
        });
        s.observe(&(0..125).collect::<Vec<_>>());
        assert_eq!(s.candidates_for(1000).map(|c| c.k), Some(135));
        s.observe(&[125]);
        assert_eq!(s.candidates_for(1000), None);
        // Presence alone: the output's ids only.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            ..base
        });
        s.observe(&[1, 2]);
        s.observe_output(8);
        s.observe_output(8);
        assert_eq!(
            s.candidates_for(100),
            Some(Candidates {
                k: 11,
                ids: vec![8]
            })
        );
    }

    /// Seeded draws over fixed logits at several settings are the tokens recorded here: those of
    /// the sampler before top-k moved to the logits (commit 1ac07fa gave the same), so a change of
    /// the cuts' semantics or of the walk's order shows (the full-sort reference changes with them).
    #[test]
    fn seeded_draws_are_those_recorded() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let logits: Vec<f32> = (0..1000)
            .map(|_| (rng.random::<f32>() - 0.5) * 8.0)
            .collect();
        // (temperature, top_p, top_k, min_p)
        let cases = [
            (1.0f32, 1.0f32, 0usize, 0.0f32),
            (0.7, 0.9, 0, 0.0),
            (1.0, 1.0, 40, 0.0),
            (0.6, 0.9, 50, 0.0),
            (1.2, 0.95, 20, 0.05),
            (0.3, 1.0, 3, 0.0),
        ];
        let got: Vec<Vec<u32>> = cases
            .iter()
            .enumerate()
            .map(|(i, &(temperature, top_p, top_k, min_p))| {
                let mut s = Sampler::new(SamplingParams {
                    temperature,
                    top_p,
                    top_k,
                    min_p,
                    seed: 100 + i as u64,
                    ..Default::default()
                });
                (0..24).map(|_| s.sample(&logits)).collect()
            })
            .collect();
        let recorded: Vec<Vec<u32>> = vec![
            vec![
                552, 691, 299, 950, 764, 181, 892, 691, 109, 269, 17, 670, 722, 295, 222, 886, 950,
                636, 972, 668, 918, 894, 697, 492,
            ],
            vec![
                264, 193, 562, 8, 439, 2, 892, 39, 338, 417, 141, 119, 491, 631, 491, 668, 39, 207,
                546, 77, 242, 704, 752, 668,
            ],
            vec![
                242, 727, 109, 748, 886, 972, 631, 295, 24, 248, 133, 918, 166, 24, 417, 295, 12,
                248, 24, 191, 439, 972, 191, 495,
            ],
            vec![
                901, 39, 592, 166, 727, 191, 691, 592, 141, 562, 119, 242, 748, 373, 373, 12, 24,
                449, 248, 631, 668, 495, 39, 727,
            ],
            vec![
                592, 242, 894, 495, 752, 668, 495, 901, 543, 39, 417, 166, 752, 894, 39, 191, 166,
                152, 752, 166, 439, 543, 295, 133,
            ],
            vec![
                894, 894, 894, 901, 901, 191, 894, 894, 191, 191, 191, 894, 191, 191, 894, 894,
                901, 901, 901, 894, 901, 191, 191, 894,
            ],
        ];
        assert_eq!(got, recorded);
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

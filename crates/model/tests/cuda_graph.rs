//! A decode step replayed as a CUDA graph gives exactly the eager step's tokens (or logits), at
//! tp 1 and (with two GPUs) tp 2. Built with `--features cuda`; run by `scripts/gpu_check.sh`.
#![cfg(feature = "cuda")]

use tessera_comm::{Communicator, LocalGroup, NcclComm};
use tessera_model::synthetic::llama_config_json;
use tessera_model::{KvCache, LlamaModel, LockstepGraph, ModelConfig, TpRank};
use tessera_tensor::{DType, Device};

fn gpus() -> usize {
    tessera_tensor::cuda::test_gpus(2)
}

/// Each step's tokens, for every sequence of the batch.
type Steps = Vec<Vec<u32>>;

#[test]
fn graph_replay_equals_eager_decode() {
    let n = gpus();
    // Head dim 64: every decode attention kernel applies, the tensor-core one included.
    let cfg =
        ModelConfig::from_json_str(&llama_config_json(1000, 512, 512, 3, 8, 2, false)).unwrap();
    // Every decode attention kernel: the one the shape picks, the grouped and one-head-a-block
    // forms of the vectorised kernel, the per-head kernel and the one-pass kernel on CUDA cores
    // and on tensor cores; captured splits cover the whole cache.
    use tessera_tensor::cuda::DecodeKernel;
    let kernels = [
        None,
        Some(DecodeKernel::Grouped),
        Some(DecodeKernel::ByHead),
        Some(DecodeKernel::PerHead),
        Some(DecodeKernel::Flash),
        Some(DecodeKernel::Mma),
    ];
    // Batch 1 (a chain of GEMVs), batch 4 (skinny GEMMs) and batch 20 (cuBLASLt GEMMs), all with
    // the intermediates in the graph's arena by default, and batch 4 from the pool (forced).
    use tessera_tensor::cuda::graph::{force_graph_arena, GraphArena};
    let layouts = [
        (1, GraphArena::Auto),
        (4, GraphArena::Auto),
        (4, GraphArena::Never),
        (20, GraphArena::Auto),
    ];
    let runs = (1..=n).flat_map(|tp| kernels.map(|k| (tp, k)));
    for ((tp, grouped), (batch, arena)) in runs.flat_map(|r| layouts.map(|l| (r, l))) {
        tessera_tensor::cuda::force_decode_kernel(grouped);
        force_graph_arena(Some(arena));
        let results: Vec<(Steps, Steps)> = on_gpu_ranks(tp, &cfg, 3, |_, m, comm| {
            let mut eager = m.new_cache_batch(32, batch).unwrap();
            // A cache of 600 positions: the captured decode attention covers it in
            // 3 splits joined by a second kernel; the empty ones add exact zeros, so
            // the tokens still equal the eager (one-split) ones bit for bit.
            let mut graphed = m.new_cache_batch(600, batch).unwrap();
            let prompt: Vec<u32> = (0..batch as u32).map(|i| (5 + 97 * i) % 1000).collect();
            let mut te = m
                .forward_lockstep_greedy(&prompt, &mut eager, comm)
                .unwrap();
            let mut tg = m
                .forward_lockstep_greedy(&prompt, &mut graphed, comm)
                .unwrap();
            let mut g = m.capture_lockstep_greedy(&mut graphed, comm).unwrap();
            // The intermediates are where the choice puts them: in an arena, no
            // allocation node between the kernels.
            let st = g.stats().unwrap();
            let in_arena = arena.used_for(batch);
            assert_eq!(st.arena_bytes > 0, in_arena, "{st}");
            assert_eq!(st.allocs == 0, in_arena, "{st}");
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..12 {
                te = m.forward_lockstep_greedy(&te, &mut eager, comm).unwrap();
                tg = m
                    .step_lockstep_graph(&mut g, &tg, &mut graphed, comm)
                    .unwrap();
                a.push(te.clone());
                b.push(tg.clone());
            }
            assert_eq!(eager.len(), graphed.len());
            (a, b)
        });
        for (rank, (eager, graphed)) in results.iter().enumerate() {
            assert_eq!(
                eager, graphed,
                "tp {tp} rank {rank}: graph and eager tokens differ"
            );
            // Not a constant sequence: the test would not notice a stuck graph otherwise.
            assert!(
                eager.windows(2).any(|w| w[0] != w[1]),
                "tp {tp}: degenerate decode"
            );
        }
        eprintln!(
            "tp {tp}, batch {batch}, arena {arena:?}, decode attention {grouped:?}: 12 graph steps equal the eager steps"
        );
    }
    tessera_tensor::cuda::force_decode_kernel(None);
    force_graph_arena(None);
}

/// Over a cache of 2,100 positions, a step outside a graph gives the captured step's logits bit
/// for bit: both plan the decode attention for the cache's capacity (at batch 32 the tensor-core
/// kernel, whole groups of 4 heads of 64, where a plan for the position, 2-7, takes the two-pass
/// kernel a head a block, which rounds differently), the step outside the graph launching only
/// the splits its position reaches. At tp 1 and (with two GPUs) tp 2.
#[test]
fn over_a_long_cache_eager_steps_give_the_graphs_logits() {
    const V: usize = 1001;
    let n = gpus();
    // Head dim 64, 8 / 2 heads (tp 2: 4 / 1 a rank).
    let cfg = ModelConfig::from_json_str(&llama_config_json(V, 512, 512, 3, 8, 2, false)).unwrap();
    let batch = 32;
    for tp in 1..=n {
        on_gpu_ranks(tp, &cfg, 9, |rank, m, comm| {
            let prompt: Vec<u32> = (0..batch as u32)
                .map(|i| (11 + 37 * i) % V as u32)
                .collect();
            let (mut eager, mut graphed, mut g, toks) =
                prompted_pair(m, comm, &prompt, (2100, 2100));
            let what = format!("tp {tp} rank {rank}");
            let steps = (&mut eager, &mut graphed, &mut g);
            logits_steps_agree(m, comm, steps, toks, V, 6, &what);
        });
        eprintln!(
            "tp {tp}, batch {batch} over a 2,100-position cache: 6 logits graph steps equal the eager steps"
        );
    }
}

/// Two lockstep caches of `prompt.len()` sequences (capacities `caps`: eager, graphed), each
/// after the greedy step of `prompt`, and a logits graph captured on the second: (eager cache,
/// graphed cache, graph, the step's tokens).
fn prompted_pair(
    m: &LlamaModel,
    comm: &dyn Communicator,
    prompt: &[u32],
    caps: (usize, usize),
) -> (KvCache, KvCache, LockstepGraph, Vec<u32>) {
    let mut eager = m.new_cache_batch(caps.0, prompt.len()).unwrap();
    let mut graphed = m.new_cache_batch(caps.1, prompt.len()).unwrap();
    let toks = m.forward_lockstep_greedy(prompt, &mut eager, comm).unwrap();
    m.forward_lockstep_greedy(prompt, &mut graphed, comm)
        .unwrap();
    let g = m.capture_lockstep_logits(&mut graphed, comm).unwrap();
    (eager, graphed, g, toks)
}

/// `steps` decode steps of `toks` (one a sequence), eagerly into `eager` and by replaying `g`
/// (captured for the logits) into `graphed`, each step's tokens the argmax of its logits (the
/// same on every rank): the two give the same `[batch, vocab]` logits bit for bit at every step,
/// and the tokens change. Returns the last step's tokens.
fn logits_steps_agree(
    m: &LlamaModel,
    comm: &dyn Communicator,
    (eager, graphed, g): (&mut KvCache, &mut KvCache, &mut LockstepGraph),
    mut toks: Vec<u32>,
    vocab: usize,
    steps: usize,
    what: &str,
) -> Vec<u32> {
    let mut distinct = std::collections::BTreeSet::new();
    for step in 0..steps {
        let want = m.forward_lockstep(&toks, eager, comm).unwrap();
        let got = m
            .step_lockstep_graph_logits(g, &toks, graphed, comm)
            .unwrap();
        assert_eq!(want.len(), toks.len() * vocab);
        assert!(want == got, "{what} step {step}: logits differ");
        toks = want
            .chunks(vocab)
            .map(tessera_tensor::sample::argmax)
            .collect();
        distinct.insert(toks.clone());
    }
    assert!(distinct.len() > 1, "{what}: degenerate decode");
    toks
}

/// A step captured up to each rank's logits (what sampled decoding replays) gives the eager step's
/// gathered logits bit for bit, at tp 1 and (with two GPUs) tp 2 over a vocabulary that does not
/// split evenly (501 / 500 rows), at batch 1 (GEMVs) and 4 (skinny GEMMs) with the intermediates
/// in the graph's arena, and at batch 4 from the pool; a graph of one kind replayed as the other
/// is refused.
#[test]
fn logits_graph_replay_equals_eager_logits() {
    use tessera_tensor::cuda::graph::{force_graph_arena, GraphArena};
    const V: usize = 1001;
    let n = gpus();
    let cfg = ModelConfig::from_json_str(&llama_config_json(V, 256, 512, 3, 8, 2, false)).unwrap();
    let layouts = [
        (1, GraphArena::Auto),
        (4, GraphArena::Auto),
        (4, GraphArena::Never),
    ];
    for (tp, (batch, arena)) in (1..=n).flat_map(|tp| layouts.map(|l| (tp, l))) {
        force_graph_arena(Some(arena));
        on_gpu_ranks(tp, &cfg, 5, |rank, m, comm| {
            let prompt: Vec<u32> = (0..batch as u32).map(|i| (7 + 31 * i) % V as u32).collect();
            let (mut eager, mut graphed, mut g, toks) = prompted_pair(m, comm, &prompt, (32, 300));
            let e = m
                .step_lockstep_graph(&mut g, &toks, &mut graphed, comm)
                .unwrap_err()
                .to_string();
            assert!(e.contains("captured for its logits"), "{e}");
            let what = format!("tp {tp} batch {batch} rank {rank}");
            let steps = (&mut eager, &mut graphed, &mut g);
            let toks = logits_steps_agree(m, comm, steps, toks, V, 8, &what);
            assert_eq!(eager.len(), graphed.len());
            let mut greedy = m.capture_lockstep_greedy(&mut graphed, comm).unwrap();
            let e = m
                .step_lockstep_graph_logits(&mut greedy, &toks, &mut graphed, comm)
                .unwrap_err()
                .to_string();
            assert!(e.contains("greedy step's graph"), "{e}");
        });
        eprintln!(
            "tp {tp}, batch {batch}, arena {arena:?}: 8 logits graph steps equal the eager steps"
        );
    }
    force_graph_arena(None);
}

/// A sampled step on the GPUs, its top-k candidates found on each rank's device and gathered
/// (`forward_for_draw`, and through a captured graph), draws the tokens a draw from the whole
/// gathered logits gives (seeded, step after step), at tp 1 and (with two GPUs) tp 2, batch 1 and
/// 3, k 1, 50 and 700 (past a shard's 500 rows), over bf16 logits whose ties sit at the k-th
/// largest; the graph's candidates are the eager step's. With a repetition penalty (and
/// presence / frequency terms) over each row's own prompt and output, the penalised tokens'
/// logits are read on the devices beside the candidates (`ops::gather_values`), and the
/// draws, sampled and greedy, are still the whole logits'.
#[test]
fn draws_from_the_gpus_top_k_candidates_are_those_from_the_whole_logits() {
    use tessera_model::DrawLogits;
    use tessera_tensor::{Candidates, Sampler, SamplingParams};
    const V: usize = 1001;
    let n = gpus();
    let cfg = ModelConfig::from_json_str(&llama_config_json(V, 256, 512, 3, 8, 2, false)).unwrap();
    // (tp, batch, top-k, temperature, repetition penalty, presence penalty)
    for (tp, batch, k, temperature, rep, presence) in (1..=n).flat_map(|tp| {
        [
            (tp, 1, 50, 1.1, 1.0, 0.0),
            (tp, 3, 1, 1.1, 1.0, 0.0),
            (tp, 3, 50, 1.1, 1.0, 0.0),
            (tp, 1, 700, 1.1, 1.0, 0.0),
            (tp, 3, 20, 1.1, 1.3, 0.0),
            (tp, 1, 40, 0.9, 0.7, 0.5),
            (tp, 3, 0, 0.0, 1.5, 0.0),
        ]
    }) {
        let out = on_gpu_ranks(tp, &cfg, 9, |_, m, comm| {
            let p = |seed| SamplingParams {
                temperature,
                top_p: 0.97,
                top_k: k,
                repetition_penalty: rep,
                presence_penalty: presence,
                frequency_penalty: presence / 2.0,
                seed,
                ..Default::default()
            };
            let mut whole: Vec<Sampler> = (0..batch as u64).map(|s| Sampler::new(p(s))).collect();
            let mut from_top: Vec<Sampler> =
                (0..batch as u64).map(|s| Sampler::new(p(s))).collect();
            // Each row's own "prompt" for the repetition penalty.
            for (r, (w, f)) in whole.iter_mut().zip(&mut from_top).enumerate() {
                let seen: Vec<u32> = (0..6 + 5 * r as u32)
                    .map(|i| (i * 389 + 2) % V as u32)
                    .collect();
                w.observe(&seen);
                f.observe(&seen);
            }
            let mut full = m.new_cache_batch(40, batch).unwrap();
            let mut eager = m.new_cache_batch(40, batch).unwrap();
            let mut graphed = m.new_cache_batch(40, batch).unwrap();
            let prompt: Vec<u32> = (0..batch as u32).map(|i| (3 + 17 * i) % V as u32).collect();
            let mut toks = m.forward_lockstep_greedy(&prompt, &mut full, comm).unwrap();
            m.forward_lockstep_greedy(&prompt, &mut eager, comm)
                .unwrap();
            m.forward_lockstep_greedy(&prompt, &mut graphed, comm)
                .unwrap();
            let mut g = m.capture_lockstep_logits(&mut graphed, comm).unwrap();
            let mut drawn = Vec::new();
            for step in 0..10 {
                let asks: Vec<Candidates> = from_top
                    .iter()
                    .map(|s| s.candidates_for(V).expect("candidates"))
                    .collect();
                assert_eq!(asks[0].ids.is_empty(), rep == 1.0 && presence == 0.0);
                let logits = m.forward_lockstep(&toks, &mut full, comm).unwrap();
                let DrawLogits::Top(top) = m
                    .forward_for_draw(&toks, &mut eager, Some(&asks), comm)
                    .unwrap()
                else {
                    panic!("tp {tp} batch {batch} k {k}: the whole logits where candidates fit")
                };
                let from_graph = m
                    .step_lockstep_graph_for_draw(&mut g, &toks, &mut graphed, Some(&asks), comm)
                    .unwrap();
                assert_eq!(from_graph, DrawLogits::Top(top.clone()), "step {step}");
                toks = (0..batch)
                    .map(|b| {
                        let row = &logits[b * V..(b + 1) * V];
                        // Every asked id, with its logit of the whole row.
                        for id in &asks[b].ids {
                            let at = top[b].binary_search_by_key(id, |p| p.0).expect("asked id");
                            assert_eq!(top[b][at].1.to_bits(), row[*id as usize].to_bits());
                        }
                        let t = from_top[b].sample_top(&top[b]);
                        let w = whole[b].sample(row);
                        assert_eq!(
                            t, w,
                            "tp {tp} batch {batch} k {k} rep {rep} step {step} row {b}"
                        );
                        from_top[b].observe_output(t);
                        whole[b].observe_output(t);
                        t
                    })
                    .collect();
                drawn.push(toks.clone());
            }
            drawn
        });
        assert!(
            out.iter().all(|d| *d == out[0]),
            "tp {tp}: the ranks' draws differ"
        );
        let distinct: std::collections::BTreeSet<_> = out[0].iter().collect();
        assert!(distinct.len() > 3, "tp {tp}: degenerate draws");
        eprintln!("tp {tp}, batch {batch}, top-k {k}, T {temperature}, repetition penalty {rep}, presence {presence}: 10 steps' draws from the candidates equal the whole logits'");
    }
}

/// `body`'s result on each rank of a tp-`tp` group (rank r on GPU r, all-reducing through NCCL at
/// tp 2 as the inference ranks do), each holding its shard of random bf16 weights of `cfg` made
/// from `seed`, in rank order; the ranks meet at a barrier after `body`.
fn on_gpu_ranks<R: Send>(
    tp: usize,
    cfg: &ModelConfig,
    seed: u64,
    body: impl Fn(usize, &LlamaModel, &dyn Communicator) -> R + Sync,
) -> Vec<R> {
    let ranks = tessera_comm::spmd::run_threads(
        LocalGroup::new(tp).into_comms(),
        |rank, host| {
            let nccl = (tp > 1).then(|| NcclComm::new(&host, rank).unwrap());
            let comm: &dyn Communicator = match &nccl {
                Some(n) => n,
                None => &host,
            };
            let shard = TpRank { rank, size: tp };
            let m = LlamaModel::random(cfg.clone(), shard, DType::BF16, Device::Cuda(rank), seed)
                .unwrap();
            let out = body(rank, &m, comm);
            comm.barrier().unwrap();
            Ok(out)
        },
        |rank, msg| format!("rank {rank} panicked: {msg}"),
    );
    ranks
        .into_iter()
        .map(|r| r.unwrap_or_else(|e: String| panic!("{e}")))
        .collect()
}

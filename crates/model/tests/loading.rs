//! Checkpoint loading: RoPE frequencies against HF's, sharded reads that hold 1/tp of the weights,
//! and bad checkpoints refused with a message that names the problem.

use std::path::{Path, PathBuf};

use tessera_comm::LocalGroup;
use tessera_model::synthetic::{llama_config_json, random_safetensors};
use tessera_model::{Checkpoint, LlamaModel, Logits, ModelConfig, RopeConfig, RopeScaling, TpRank};
use tessera_tensor::DType;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf")
}

#[test]
fn rope_frequencies_match_transformers() {
    let text = std::fs::read_to_string(fixtures().join("llama/reference.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let probe = &r["rope"]["probe"];
    let f = |k: &str| probe[k].as_f64().unwrap();
    let rope = RopeConfig {
        theta: f("rope_theta"),
        scaling: RopeScaling::Llama3 {
            factor: f("factor"),
            low_freq_factor: f("low_freq_factor"),
            high_freq_factor: f("high_freq_factor"),
            original_max_position_embeddings: f("original_max_position_embeddings"),
        },
    };
    let ours = tessera_model::rope::inv_freq(&rope, probe["head_dim"].as_u64().unwrap() as usize);
    let want: Vec<f64> = probe["inv_freq"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(ours.len(), want.len());
    for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
        assert!(
            ((*a as f64) - b).abs() <= 2e-6 * b.abs(),
            "inv_freq[{i}]: {a} vs {b}"
        );
    }
    let cfg = ModelConfig::from_dir(&fixtures().join("llama")).unwrap();
    let ours = tessera_model::rope::inv_freq(&cfg.rope, cfg.head_dim);
    let want = r["rope"]["inv_freq"].as_array().unwrap();
    for (a, b) in ours.iter().zip(want) {
        assert!(((*a as f64) - b.as_f64().unwrap()).abs() <= 1e-6 * b.as_f64().unwrap());
    }
}

/// YaRN as transformers 5 computes it: the fixture model's frequencies and attention factor, and
/// for each probe config of `make_hf_fixtures.py` (Qwen2.5's recipe, no original context,
/// DeepSeek-V3's mscales, gpt-oss's `truncate: false`, an explicit attention factor and betas, a
/// factor below 1) the config read by tessera gives HF's frequencies within 2e-6 and its
/// attention factor within 1e-12.
#[test]
fn yarn_frequencies_and_attention_factor_match_transformers() {
    let text = std::fs::read_to_string(fixtures().join("qwen2_yarn/reference.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |x: &serde_json::Value| -> Vec<f64> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let check = |what: &str, cfg: &ModelConfig, rope: &serde_json::Value| {
        let ours = tessera_model::rope::inv_freq(&cfg.rope, cfg.head_dim);
        let want = floats(&rope["inv_freq"]);
        assert_eq!(ours.len(), want.len(), "{what}");
        for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
            assert!(
                ((*a as f64) - b).abs() <= 2e-6 * b.abs(),
                "{what}: inv_freq[{i}] {a} vs HF's {b}"
            );
        }
        let m = tessera_model::rope::attention_scaling(&cfg.rope);
        let want = rope["attention_scaling"].as_f64().unwrap();
        assert!(
            (m - want).abs() <= 1e-12,
            "{what}: attention factor {m} vs HF's {want}"
        );
    };
    let model = ModelConfig::from_dir(&fixtures().join("qwen2_yarn")).unwrap();
    let default = floats(&r["rope"]["default_inv_freq"]);
    let ours = tessera_model::rope::inv_freq(&model.rope, model.head_dim);
    assert!(ours
        .iter()
        .zip(&default)
        .any(|(a, b)| (*a as f64 - b).abs() > 1e-3 * b));
    check("the fixture model", &model, &r["rope"]);
    // Past the original 256 positions, to factor x original.
    assert_eq!(model.max_position_embeddings, 1024);

    let probes = r["rope"]["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 8);
    for p in probes {
        assert!(p.get("error").is_none(), "HF refused a probe: {p}");
        let d = p["head_dim"].as_u64().unwrap();
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 320,
            "hidden_size": d * 4, "head_dim": d, "num_attention_heads": 4,
            "num_key_value_heads": 4, "intermediate_size": 64, "num_hidden_layers": 1,
            "max_position_embeddings": p["max_position_embeddings"],
            "rope_parameters": p["rope_parameters"],
        });
        let cfg = ModelConfig::from_json_str(&json.to_string()).unwrap();
        check(&p["rope_parameters"].to_string(), &cfg, p);
    }
}

/// Training's forward (its own attention, RoPE and softmax scale) on each HF fixture gives HF's
/// float64 log-probs within 1e-4: YaRN's attention factor and Qwen3's head norms reach the
/// training path too.
#[test]
fn training_forward_matches_hf_log_probs() {
    use tessera_model::grad::{load_checkpoint, BatchDims, FullParams, TrainModel};
    for name in ["llama", "qwen2", "qwen2_yarn", "qwen3"] {
        let dir = fixtures().join(name);
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cfg = ModelConfig::from_dir(&dir).unwrap();
        let vocab = cfg.vocab_size;
        let m = TrainModel::new(cfg);
        let ck = Checkpoint::open(&dir).unwrap();
        let mut params = FullParams::new(load_checkpoint(&m.layout, &ck).unwrap());
        for case in r["score"].as_array().unwrap() {
            let tokens: Vec<u32> = case["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect();
            let dims = BatchDims {
                batch: 1,
                seq: tokens.len(),
            };
            let logits = m.logits(&mut params, &tokens, dims, DType::F32).unwrap();
            for (i, want) in case["token_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
            {
                let row = &logits[i * vocab..(i + 1) * vocab];
                let got = tessera_tensor::ops::log_softmax(row)[tokens[i + 1] as usize];
                let want = want.as_f64().unwrap();
                assert!(
                    (got - want).abs() < 1e-4,
                    "{name} len {} position {i}: {got} vs HF's {want}",
                    tokens.len()
                );
            }
        }
    }
}

/// The config of `json` and random weights for it (`seed`), as a checkpoint held for the test's
/// whole run (`Checkpoint::from_static`).
fn random_model(json: &str, dtype: DType, seed: u64) -> (ModelConfig, &'static [u8]) {
    let cfg = ModelConfig::from_json_str(json).unwrap();
    let bytes = Box::leak(random_safetensors(&cfg, dtype, seed).into_boxed_slice());
    (cfg, bytes)
}

fn write_model(dir: &Path, cfg_json: &str, weights: &[u8]) {
    std::fs::write(dir.join("config.json"), cfg_json).unwrap();
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
}

#[test]
fn a_rank_holds_one_tp_th_of_the_weights() {
    let (cfg, bytes) = random_model(
        &llama_config_json(1000, 256, 688, 2, 8, 4, false),
        DType::BF16,
        1,
    );
    let ck = Checkpoint::from_static("mem", bytes).unwrap();
    let full = cfg.num_params() as f64 * 2.0;
    for tp in [1, 2, 4] {
        for rank in 0..tp {
            let m = LlamaModel::from_checkpoint(
                &ck,
                cfg.clone(),
                TpRank { rank, size: tp },
                DType::BF16,
            )
            .unwrap();
            let share = m.weight_bytes() as f64 / full;
            // Norms are replicated (0.3% here), everything else is split.
            assert!(
                (share - 1.0 / tp as f64).abs() < 0.01,
                "tp {tp} rank {rank}: {share}"
            );
        }
    }
}

/// The full logits the vocab-parallel head gathers (a prefill's every row, then a decode step's
/// last row) are the single rank's at tp 2 and 3, where the vocabulary of 1,001 does not split
/// evenly (shards of 501 / 500 and 334 / 334 / 333 rows): each in its place, none lost.
#[test]
fn gathered_logits_at_every_tp_are_the_single_ranks() {
    let (cfg, bytes) = random_model(
        &llama_config_json(1001, 48, 64, 2, 6, 6, false),
        DType::F32,
        3,
    );
    let logits = |tp: usize| -> Vec<Vec<f32>> {
        let out = on_ranks(tp, &cfg, bytes, |m, comm| {
            let mut c = m.new_cache(8).unwrap();
            let all = m.forward(&[5, 999, 1000, 0], &mut c, Logits::All, comm);
            let last = m.forward(&[500], &mut c, Logits::Last, comm);
            vec![all.unwrap(), last.unwrap()]
        });
        assert!(
            out.iter().all(|o| *o == out[0]),
            "tp {tp}: the ranks' logits differ"
        );
        out.into_iter().next().unwrap()
    };
    let one = logits(1);
    assert_eq!((one[0].len(), one[1].len()), (4 * 1001, 1001));
    for tp in [2, 3] {
        for (got, want) in logits(tp).iter().zip(&one) {
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "tp {tp} logit {i}: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn bad_checkpoints_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let json = llama_config_json(64, 32, 48, 1, 4, 2, false);
    let cfg = ModelConfig::from_json_str(&json).unwrap();
    let good = random_safetensors(&cfg, DType::F32, 2);
    let load = |d: &Path| {
        LlamaModel::load(d, TpRank::single(), DType::F32)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };

    // No weights at all.
    std::fs::write(dir.path().join("config.json"), &json).unwrap();
    assert!(
        load(dir.path()).contains("neither model.safetensors"),
        "{}",
        load(dir.path())
    );
    // A directory in the weights' place.
    std::fs::create_dir(dir.path().join("model.safetensors")).unwrap();
    let e = load(dir.path());
    assert!(e.contains("is a directory, not a safetensors file"), "{e}");
    std::fs::remove_dir(dir.path().join("model.safetensors")).unwrap();

    // Truncated file.
    write_model(dir.path(), &json, &good[..good.len() - 10]);
    let e = load(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );

    // Config disagrees with the weights' shapes.
    write_model(
        dir.path(),
        &json.replace("\"intermediate_size\":48", "\"intermediate_size\":40"),
        &good,
    );
    let e = load(dir.path());
    assert!(
        e.contains("mlp.gate_proj.weight has shape [48, 32], the config implies [40, 32]"),
        "{e}"
    );

    // A tensor missing (a tied checkpoint read as untied).
    let tied_json = llama_config_json(64, 32, 48, 1, 4, 2, true);
    let tied = random_safetensors(
        &ModelConfig::from_json_str(&tied_json).unwrap(),
        DType::F32,
        3,
    );
    write_model(dir.path(), &json, &tied);
    let e = load(dir.path());
    assert!(e.contains("tensor lm_head.weight is missing"), "{e}");

    // Unknown architecture, broken JSON.
    // (`model_type` decides, as in transformers' Auto classes; `architectures` without it.)
    write_model(
        dir.path(),
        &json
            .replace("LlamaForCausalLM", "FalconForCausalLM")
            .replace("\"llama\"", "\"falcon\""),
        &good,
    );
    assert!(load(dir.path()).contains("unsupported model_type \"falcon\""));
    write_model(
        dir.path(),
        &json
            .replace("LlamaForCausalLM", "FalconForCausalLM")
            .replace(",\"model_type\":\"llama\"", ""),
        &good,
    );
    assert!(load(dir.path()).contains("unsupported architecture \"FalconForCausalLM\""));
    write_model(dir.path(), "{\"vocab_size\": 3", &good);
    assert!(load(dir.path()).contains("not valid JSON"));

    // A sharded index naming a missing shard.
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    write_model(dir.path(), &json, &good);
    std::fs::rename(
        dir.path().join("model.safetensors"),
        dir.path().join("a.safetensors"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.norm.weight": "b.safetensors"}}"#,
    )
    .unwrap();
    let e = load(dir.path());
    assert!(e.contains("b.safetensors"), "{e}");
    // An index that names no shard at all: said with the index's path.
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {}}"#,
    )
    .unwrap();
    let e = load(dir.path());
    assert!(
        e.contains("model.safetensors.index.json") && e.contains("names no shard"),
        "{e}"
    );

    // And the good one loads: model.safetensors is read first, as transformers reads it, even
    // beside an index (here a broken one).
    std::fs::rename(
        dir.path().join("a.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    LlamaModel::load(dir.path(), TpRank::single(), DType::F32).unwrap();
}

#[test]
fn lockstep_batch_decode_equals_one_sequence_at_a_time() {
    use tessera_comm::LocalGroup;
    use tessera_model::Logits;
    let (cfg, bytes) = random_model(
        &llama_config_json(97, 48, 80, 2, 6, 2, false),
        DType::F32,
        4,
    );
    let ck = Checkpoint::from_static("mem", bytes).unwrap();
    let m = LlamaModel::from_checkpoint(&ck, cfg, TpRank::single(), DType::F32).unwrap();
    let comm = LocalGroup::new(1).into_comms().pop().unwrap();
    let seqs: [[u32; 5]; 3] = [[1, 5, 9, 2, 7], [3, 3, 3, 3, 3], [96, 0, 41, 8, 13]];
    // One at a time.
    let mut want = Vec::new();
    for s in &seqs {
        let mut c = m.new_cache(8).unwrap();
        want.push(m.forward(s, &mut c, Logits::All, &comm).unwrap());
    }
    // In lockstep: step t feeds token t of every sequence.
    let mut c = m.new_cache_batch(2, 3).unwrap();
    for t in 0..5 {
        let toks: Vec<u32> = seqs.iter().map(|s| s[t]).collect();
        let got = m.forward_lockstep(&toks, &mut c, &comm).unwrap();
        for (b, w) in want.iter().enumerate() {
            let (g, w) = (&got[b * 97..(b + 1) * 97], &w[t * 97..(t + 1) * 97]);
            let d = g
                .iter()
                .zip(w)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(d < 1e-4, "step {t} sequence {b}: {d}");
        }
    }
    assert!(m.forward_lockstep(&[1, 2], &mut c, &comm).is_err());
    // Greedy on the device picks each row's argmax of the same logits.
    let mut c1 = m.new_cache_batch(5, 3).unwrap();
    let mut c2 = m.new_cache_batch(5, 3).unwrap();
    let logits = m.forward_lockstep(&[4, 5, 6], &mut c1, &comm).unwrap();
    let toks = m
        .forward_lockstep_greedy(&[4, 5, 6], &mut c2, &comm)
        .unwrap();
    for (b, t) in toks.iter().enumerate() {
        assert_eq!(
            *t,
            tessera_tensor::sample::argmax(&logits[b * 97..(b + 1) * 97])
        );
    }
}

/// Scoring's log-probs, the LM head taken a few rows at a time (so a long sequence never holds
/// its whole `[tokens, vocab]` logits), equal those of the whole logits, at tp 1 and 2.
#[test]
fn log_probs_by_chunks_of_rows_equal_those_of_the_whole_logits() {
    let (cfg, bytes) = random_model(
        &llama_config_json(97, 48, 80, 2, 6, 2, false),
        DType::F32,
        5,
    );
    let toks: [u32; 9] = [1, 5, 9, 2, 7, 96, 0, 41, 8];
    for tp in [1, 2] {
        on_ranks(tp, &cfg, bytes, |m, comm| {
            let mut c = m.new_cache(9).unwrap();
            let logits = m.forward(&toks, &mut c, Logits::All, comm).unwrap();
            let want: Vec<f64> = (0..8)
                .map(|i| {
                    tessera_tensor::ops::log_softmax(&logits[i * 97..(i + 1) * 97])
                        [toks[i + 1] as usize]
                })
                .collect();
            for rows in [0, 1, 3, 8, 100] {
                let mut c = m.new_cache(9).unwrap();
                let got = m.forward_logprobs_by(&toks, &mut c, comm, rows).unwrap();
                assert_eq!(got.len(), 8);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5, "tp {tp} rows {rows}: {g} vs {w}");
                }
            }
            let mut c = m.new_cache(9).unwrap();
            assert_eq!(m.forward_logprobs(&toks, &mut c, comm).unwrap().len(), 8);
        });
    }
}

/// A sampled step's top-k candidates, found on each rank and gathered (`forward_for_draw`), are
/// every token of the whole logits at least the row's k-th largest, and a seeded draw from them
/// is the draw from the whole row, for one sequence (a prefill's last row, then decode steps) and
/// a lockstep batch, at tp 1, 2 and 3 over a vocabulary of 1,001 (uneven shards), k 1 to past a
/// shard's rows. Without a top-k the step gives the whole logits.
#[test]
fn draws_from_the_gathered_top_k_candidates_are_those_from_the_whole_logits() {
    use tessera_model::DrawLogits;
    use tessera_tensor::{Candidates, Sampler, SamplingParams};
    let (cfg, bytes) = random_model(
        &llama_config_json(1001, 48, 64, 2, 6, 6, false),
        DType::F32,
        6,
    );
    let v = 1001;
    // `top` holds every token of `row` at least its k-th largest, each with its logit, by id (at
    // tp > 1 other ranks' candidates below it too, at most k a rank).
    let check = |top: &[(u32, f32)], row: &[f32], k: usize, tp: usize| {
        let mut s = row.to_vec();
        s.sort_by(|a, b| b.total_cmp(a));
        let kth = s[k - 1];
        let kept: Vec<(u32, f32)> = top.iter().copied().filter(|p| p.1 >= kth).collect();
        let want: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .filter(|p| *p.1 >= kth)
            .map(|(j, &l)| (j as u32, l))
            .collect();
        assert_eq!(kept, want, "tp {tp} k {k}");
        assert!(top.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(top.iter().all(|&(j, l)| row[j as usize] == l));
        // Exactly each rank's own: every value of its shard at least the shard's k-th largest.
        let own: usize = (0..tp)
            .map(|r| {
                let shard = &row[tessera_model::tp::split_range(v, tp, r)];
                let mut s = shard.to_vec();
                s.sort_by(|a, b| b.total_cmp(a));
                let kth = s[k.min(s.len()) - 1];
                shard.iter().filter(|&&l| l >= kth).count()
            })
            .sum();
        assert_eq!(top.len(), own, "tp {tp} k {k}");
    };
    for tp in [1, 2, 3] {
        for k in [1, 50, 400] {
            let p = SamplingParams {
                temperature: 0.9,
                top_p: 0.95,
                top_k: k,
                seed: 7,
                ..Default::default()
            };
            let out = on_ranks(tp, &cfg, bytes, |m, comm| {
                let (mut whole, mut from_top) = (Sampler::new(p), Sampler::new(p));
                let ask = from_top.candidates_for(v).expect("candidates");
                assert_eq!(ask, Candidates { k, ids: vec![] });
                let asks = Some(std::slice::from_ref(&ask));
                // One sequence: the prompt, then steps fed the drawn tokens.
                let (mut c1, mut c2) = (m.new_cache(12).unwrap(), m.new_cache(12).unwrap());
                let mut input = vec![5u32, 999, 1000, 0];
                let mut drawn = Vec::new();
                for _ in 0..6 {
                    let logits = m.forward(&input, &mut c1, Logits::Last, comm).unwrap();
                    let DrawLogits::Top(top) =
                        m.forward_for_draw(&input, &mut c2, asks, comm).unwrap()
                    else {
                        panic!("tp {tp} k {k}: the whole logits where candidates fit");
                    };
                    assert_eq!(top.len(), 1);
                    check(&top[0], &logits, k, tp);
                    let t = from_top.sample_top(&top[0]);
                    assert_eq!(t, whole.sample(&logits), "tp {tp} k {k}");
                    drawn.push(t);
                    input = vec![t];
                }
                // A lockstep batch of 3: every row's candidates.
                let (mut b1, mut b2) = (
                    m.new_cache_batch(4, 3).unwrap(),
                    m.new_cache_batch(4, 3).unwrap(),
                );
                let three = vec![ask.clone(); 3];
                for toks in [[1u32, 500, 1000], [7, 7, 2]] {
                    let logits = m.forward_lockstep(&toks, &mut b1, comm).unwrap();
                    let DrawLogits::Top(top) = m
                        .forward_for_draw(&toks, &mut b2, Some(&three), comm)
                        .unwrap()
                    else {
                        panic!("tp {tp} k {k}: the whole logits of a batch");
                    };
                    for (r, row) in top.iter().enumerate() {
                        check(row, &logits[r * v..(r + 1) * v], k, tp);
                    }
                }
                // Without a top-k: the whole logits, as forward gives them.
                let mut c3 = m.new_cache(4).unwrap();
                let mut c4 = m.new_cache(4).unwrap();
                let want = m.forward(&[3, 4], &mut c3, Logits::Last, comm).unwrap();
                let got = m.forward_for_draw(&[3, 4], &mut c4, None, comm).unwrap();
                assert_eq!(got, DrawLogits::Full(want));
                drawn
            });
            assert!(
                out.iter().all(|d| *d == out[0]),
                "tp {tp} k {k}: ranks differ"
            );
        }
    }
}

/// Penalised draws from the devices' candidates (each row's top k + its penalised ids' count,
/// and the logits of those ids, gathered from the ranks that hold them) are the draws from the
/// whole logits with the penalties applied there: a sequence (prefill, then decode steps fed
/// the drawn tokens) and a lockstep batch of 3 whose rows saw different tokens, at tp 1, 2 and
/// 3 over a vocabulary of 1,001 (uneven shards), sampled with repetition penalties above and
/// below 1 and presence / frequency terms, and greedy with a repetition penalty; the candidates
/// hold every asked id with its raw logit. A row asked for an id past the vocabulary is an
/// error.
#[test]
fn penalised_draws_from_the_candidates_are_those_from_the_whole_logits() {
    use tessera_model::DrawLogits;
    use tessera_tensor::{Candidates, Sampler, SamplingParams};
    let (cfg, bytes) = random_model(
        &llama_config_json(1001, 48, 64, 2, 6, 6, false),
        DType::F32,
        8,
    );
    let v = 1001;
    // (temperature, top_k, repetition, presence, frequency)
    let settings = [
        (0.9f32, 20usize, 1.3f32, 0.0f32, 0.0f32),
        (1.1, 5, 0.6, 0.4, 0.2),
        (0.0, 0, 1.5, 0.0, 0.0),
    ];
    // Every asked id is in the row with its raw logit, and the row is by id.
    let holds = |top: &[(u32, f32)], row: &[f32], ask: &Candidates| {
        assert!(top.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(top
            .iter()
            .all(|&(j, l)| row[j as usize].to_bits() == l.to_bits()));
        let ids: std::collections::BTreeSet<u32> = top.iter().map(|p| p.0).collect();
        assert!(ask.ids.iter().all(|id| ids.contains(id)));
    };
    for tp in [1, 2, 3] {
        for (temperature, top_k, rep, presence, frequency) in settings {
            let p = |seed| SamplingParams {
                temperature,
                top_p: 0.95,
                top_k,
                repetition_penalty: rep,
                presence_penalty: presence,
                frequency_penalty: frequency,
                seed,
                ..Default::default()
            };
            let name = format!("tp {tp} {:?}", p(0));
            let out = on_ranks(tp, &cfg, bytes, |m, comm| {
                let (mut whole, mut from_top) = (Sampler::new(p(3)), Sampler::new(p(3)));
                let prompt = [5u32, 999, 1000, 0, 5, 77, 300];
                whole.observe(&prompt);
                from_top.observe(&prompt);
                let (mut c1, mut c2) = (m.new_cache(16).unwrap(), m.new_cache(16).unwrap());
                let mut input = prompt.to_vec();
                let mut drawn = Vec::new();
                for step in 0..8 {
                    let ask = from_top.candidates_for(v).expect("candidates");
                    assert!(ask.ids.len() >= 6, "{name}: {ask:?}");
                    let logits = m.forward(&input, &mut c1, Logits::Last, comm).unwrap();
                    let got = m
                        .forward_for_draw(&input, &mut c2, Some(std::slice::from_ref(&ask)), comm)
                        .unwrap();
                    let DrawLogits::Top(top) = got else {
                        panic!("{name}: the whole logits where candidates fit");
                    };
                    holds(&top[0], &logits, &ask);
                    let t = from_top.sample_top(&top[0]);
                    assert_eq!(t, whole.sample(&logits), "{name} step {step}");
                    whole.observe_output(t);
                    from_top.observe_output(t);
                    drawn.push(t);
                    input = vec![t];
                }
                // A lockstep batch of 3, each row its own sampler and seen tokens.
                let mut wholes: Vec<Sampler> = (0..3).map(|s| Sampler::new(p(s))).collect();
                let mut tops: Vec<Sampler> = (0..3).map(|s| Sampler::new(p(s))).collect();
                for (r, (w, f)) in wholes.iter_mut().zip(&mut tops).enumerate() {
                    let seen: Vec<u32> = (0..5 + 4 * r as u32)
                        .map(|i| (i * 131 + 9) % 1001)
                        .collect();
                    w.observe(&seen);
                    f.observe(&seen);
                }
                let (mut b1, mut b2) = (
                    m.new_cache_batch(6, 3).unwrap(),
                    m.new_cache_batch(6, 3).unwrap(),
                );
                let mut toks = vec![1u32, 500, 1000];
                for step in 0..4 {
                    let asks: Vec<Candidates> =
                        tops.iter().map(|s| s.candidates_for(v).unwrap()).collect();
                    let logits = m.forward_lockstep(&toks, &mut b1, comm).unwrap();
                    let DrawLogits::Top(top) = m
                        .forward_for_draw(&toks, &mut b2, Some(&asks), comm)
                        .unwrap()
                    else {
                        panic!("{name}: the whole logits of a batch");
                    };
                    for r in 0..3 {
                        let row = &logits[r * v..(r + 1) * v];
                        holds(&top[r], row, &asks[r]);
                        let t = tops[r].sample_top(&top[r]);
                        assert_eq!(t, wholes[r].sample(row), "{name} batch step {step} row {r}");
                        tops[r].observe_output(t);
                        wholes[r].observe_output(t);
                        toks[r] = t;
                    }
                    drawn.extend(&toks);
                }
                // An id past the vocabulary is refused (before any collective: every rank).
                let bad = [Candidates {
                    k: 3,
                    ids: vec![1001],
                }];
                let mut c3 = m.new_cache(4).unwrap();
                let err = m
                    .forward_for_draw(&[3], &mut c3, Some(&bad), comm)
                    .unwrap_err();
                assert!(err.to_string().contains("token 1001"), "{err}");
                let unordered = [Candidates {
                    k: 3,
                    ids: vec![9, 2],
                }];
                let err = m
                    .forward_for_draw(&[3], &mut c3, Some(&unordered), comm)
                    .unwrap_err();
                assert!(err.to_string().contains("ascending"), "{err}");
                // Refused before the step ran: the cache holds nothing yet.
                assert_eq!(c3.len(), 0);
                drawn
            });
            assert!(out.iter().all(|d| *d == out[0]), "{name}: ranks differ");
            let distinct: std::collections::BTreeSet<_> = out[0].iter().collect();
            assert!(distinct.len() > 2, "{name}: degenerate draws {:?}", out[0]);
        }
    }
}

/// Where a row's candidates pass their room (many equal logits at the k-th largest) or the row
/// holds a NaN or +inf, every rank falls back to the whole logits together, at tp 1 and 2, with
/// penalised ids asked for or not (their logits gathered first).
#[test]
fn rows_whose_candidates_do_not_fit_fall_back_to_the_whole_logits_on_every_rank() {
    use tessera_model::layers::{top_k_room, ParallelLmHead};
    use tessera_model::DrawLogits;
    use tessera_tensor::Tensor;
    let vocab = 400;
    let k = 3;
    assert!(top_k_room(k) < 150);
    let rows: Vec<Vec<f32>> = vec![
        // 300 equal logits at the top: all are candidates, more than the room of each rank.
        (0..vocab)
            .map(|j| if j < 300 { 1.0 } else { -(j as f32) })
            .collect(),
        (0..vocab)
            .map(|j| if j == 399 { f32::NAN } else { j as f32 })
            .collect(),
        (0..vocab)
            .map(|j| if j == 0 { f32::INFINITY } else { j as f32 })
            .collect(),
        (0..vocab).map(|j| (j % 37) as f32).collect(),
    ];
    for tp in [1, 2] {
        let comms = LocalGroup::new(tp).into_comms();
        std::thread::scope(|s| {
            for (rank, comm) in comms.into_iter().enumerate() {
                let rows = &rows;
                s.spawn(move || {
                    let range = tessera_model::tp::split_range(vocab, tp, rank);
                    let head = ParallelLmHead {
                        weight: std::sync::Arc::new(
                            Tensor::from_f32(
                                vec![range.len(), 4],
                                vec![0.0; range.len() * 4],
                                DType::F32,
                            )
                            .unwrap(),
                        ),
                        vocab,
                        padded: vocab.div_ceil(tp),
                        tp_size: tp,
                    };
                    // Without and with penalised ids asked for (their logits gathered from
                    // the ranks holding them before the fallback).
                    let cases = rows
                        .iter()
                        .enumerate()
                        .flat_map(|(i, row)| [(i, row, vec![]), (i, row, vec![5u32, 399])]);
                    for (i, row, asked) in cases {
                        let local = Tensor::from_f32(
                            vec![1, range.len()],
                            row[range.clone()].to_vec(),
                            DType::F32,
                        )
                        .unwrap();
                        let ask = [tessera_tensor::Candidates {
                            k: k + asked.len(),
                            ids: asked.clone(),
                        }];
                        let got = head.for_draw(&local, Some(&ask), &comm).unwrap();
                        if i == 3 {
                            // The 3 (or 5) largest are 36 (ids 36, 73, ...): 10 of them, all
                            // in, and the asked ids with their logits.
                            let DrawLogits::Top(top) = got else {
                                panic!("tp {tp}")
                            };
                            let mut ids: Vec<u32> = (0..10).map(|j| 36 + 37 * j).collect();
                            ids.extend(&asked);
                            ids.sort_unstable();
                            assert_eq!(top[0].iter().map(|p| p.0).collect::<Vec<_>>(), ids);
                            assert!(top[0].iter().all(|p| p.1 == row[p.0 as usize]));
                        } else {
                            let DrawLogits::Full(l) = got else {
                                panic!("tp {tp} row {i}: candidates")
                            };
                            let bits =
                                |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(bits(&l), bits(row), "tp {tp} row {i}");
                        }
                    }
                });
            }
        });
    }
}

/// `body`'s result on each rank of a tp-`tp` group of host threads, each holding its shard of
/// the f32 checkpoint `bytes` of `cfg`, in rank order.
fn on_ranks<R: Send>(
    tp: usize,
    cfg: &ModelConfig,
    bytes: &'static [u8],
    body: impl Fn(&LlamaModel, &dyn tessera_comm::Communicator) -> R + Sync,
) -> Vec<R> {
    let ranks = tessera_comm::spmd::run_threads(
        LocalGroup::new(tp).into_comms(),
        |rank, comm| {
            let ck = Checkpoint::from_static("mem", bytes).unwrap();
            let rank = TpRank { rank, size: tp };
            let m = LlamaModel::from_checkpoint(&ck, cfg.clone(), rank, DType::F32).unwrap();
            Ok(body(&m, &comm))
        },
        |rank, msg| format!("rank {rank} panicked: {msg}"),
    );
    ranks
        .into_iter()
        .map(|r| r.unwrap_or_else(|e: String| panic!("{e}")))
        .collect()
}

//! Every ZeRO stage at every dp in 1..=4 trains exactly as one rank does (f32): the same loss curve
//! (within 1e-5 relative over 20 steps) and the same final weights.

mod common;

use common::*;

#[test]
fn every_stage_and_dp_reproduces_the_single_rank_run() {
    let model = tiny_model(false);
    let reference = run(1, &config(0, ""), &model, 20).unwrap();
    let first = reference.stats[0].loss;
    let last = reference.stats.last().unwrap().loss;
    assert!(
        last < first - 0.5,
        "the reference run learns: {first} -> {last}"
    );
    for dp in 1..=4 {
        for stage in 0..=3u8 {
            if dp == 1 && stage == 0 {
                continue;
            }
            let r = run(dp, &config(stage, ""), &model, 20).unwrap();
            assert_same_run(&reference, &r, &format!("dp {dp} stage {stage}"));
        }
    }
}

#[test]
fn tied_embeddings_and_recomputation_keep_the_equivalence() {
    let model = tiny_model(true);
    let reference = run(1, &config(0, ""), &model, 20).unwrap();
    for (dp, stage) in [(2, 3), (3, 2), (4, 1)] {
        let r = run(
            dp,
            &config(stage, r#","activation_checkpointing": {}"#),
            &model,
            20,
        )
        .unwrap();
        assert_same_run(
            &reference,
            &r,
            &format!("tied dp {dp} stage {stage} recompute"),
        );
    }
    // Stage 3 without prefetch (overlap_comm off) too.
    let cfg = config(3, "").clone();
    let mut cfg = cfg;
    cfg.zero.overlap_comm = false;
    assert_same_run(
        &reference,
        &run(2, &cfg, &model, 20).unwrap(),
        "stage 3 no overlap",
    );
}

#[test]
fn zero_shrinks_per_rank_state_as_promised() {
    use tessera_model::grad::{random_init, ParamLayout};
    use tessera_train::{run_dp, Trainer};
    let model = tiny_model(false);
    let n = ParamLayout::new(&model).num_params();
    let mem = |dp: usize, stage: u8| {
        run_dp(dp, |comm| {
            let init = random_init(&ParamLayout::new(&model), 0);
            Ok(Trainer::new(comm, model.clone(), config(stage, ""), SEQ, init)?.memory())
        })
        .unwrap()[0]
    };
    let m0 = mem(4, 0);
    // f32 training: the f32 weights are the master copy, so the optimizer holds the two Adam
    // moments only (8 bytes a parameter, as `tessera plan` counts), not a second f32 copy.
    assert!(
        m0.optimizer >= 8 * n && m0.optimizer < 12 * n,
        "{m0:?} for {n}"
    );
    assert!(m0.grads >= 4 * n && m0.weights >= 4 * n);
    let m1 = mem(4, 1);
    assert!(m1.optimizer * 4 <= m0.optimizer + 8 * 4 * 64 && m1.grads == m0.grads);
    let m2 = mem(4, 2);
    assert!(m2.grads * 4 <= m0.grads + 4 * 4 * 64 && m2.weights == m0.weights);
    let m3 = mem(4, 3);
    assert!(m3.weights * 4 <= m0.weights + 4 * 4 * 64);
}

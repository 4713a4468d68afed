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

/// The engine's communication counters are training's: at ZeRO-3 over 2 ranks a step gathers
/// the weights (forward and backward) and an evaluation, which gathers them again, adds nothing
/// to the counters, so the per-step figures `tessera train` prints do not depend on how often
/// or on how much it evaluates.
#[test]
fn evaluation_traffic_is_not_counted_as_training_communication() {
    let model = common::tiny_model(false);
    let cfg = common::config(3, "");
    let data = common::tokens(4000);
    let out = tessera_train::run_dp(2, |comm| {
        let layout = tessera_model::ParamLayout::new(&model);
        let init = tessera_model::grad::random_init(&layout, 0);
        let mut t =
            tessera_train::Trainer::new(comm, model.clone(), cfg.clone(), common::SEQ, init)?;
        let mut loader = tessera_train::Loader::new(data.clone(), common::SEQ, 0)?;
        let eval_set = loader.eval_batches(t.micro_batch, 4, t.dp(), t.rank());
        common::train_steps(&mut t, &mut loader, 1)?;
        let one = t.engine.comm_stats.clone();
        let loss = t.eval(&eval_set)?;
        let after_eval = t.engine.comm_stats.clone();
        common::train_steps(&mut t, &mut loader, 1)?;
        let two = t.engine.comm_stats.clone();
        Ok((one, after_eval, two, loss))
    })
    .unwrap();
    for (one, after_eval, two, loss) in out {
        assert!(loss.is_finite());
        assert!(one.all_gather_bytes > 0 && one.calls > 0, "{one:?}");
        assert_eq!(after_eval.all_gather_bytes, one.all_gather_bytes);
        assert_eq!(after_eval.calls, one.calls);
        assert_eq!(two.all_gather_bytes, 2 * one.all_gather_bytes);
        assert_eq!(two.calls, 2 * one.calls);
    }
}

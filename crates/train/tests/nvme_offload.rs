//! ZeRO-Infinity's optimizer offload to NVMe (`offload_optimizer.device: nvme`): the same training,
//! to the bit, as with the optimizer state in memory, at every stage, in f32 and bf16, while a rank
//! holds at most three units' optimizer state at a time (reading the next, updating one, writing
//! the last) and the swap file is gone when training ends.

mod common;

use std::path::Path;

use common::*;
use tessera_model::grad::{random_init, ParamLayout};
use tessera_train::{run_dp, TrainConfig, Trainer};

fn cfg(stage: u8, bf16: bool, nvme: Option<&Path>) -> TrainConfig {
    let offload = nvme.map_or(String::new(), |p| {
        format!(
            r#", "offload_optimizer": {{"device": "nvme", "nvme_path": {:?}}}"#,
            p.to_str().unwrap()
        )
    });
    let precision = if bf16 {
        r#", "bf16": {"enabled": true}"#
    } else {
        ""
    };
    TrainConfig::from_json_str(&format!(
        r#"{{"train_batch_size": 24, "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 1.0,
        "optimizer": {{"type": "AdamW", "params": {{"lr": 0.01, "betas": [0.9, 0.95],
                      "eps": 1e-8, "weight_decay": 0.1}}}},
        "zero_optimization": {{"stage": {stage}{offload}}}{precision}}}"#
    ))
    .unwrap()
}

#[test]
fn nvme_offload_trains_exactly_as_in_memory() {
    let model = tiny_model(false);
    let dir = tempfile::tempdir().unwrap();
    for (dp, stage, bf16) in [
        (1, 0, false),
        (2, 1, false),
        (2, 2, true),
        (2, 3, false),
        (2, 3, true),
    ] {
        let mem = run(dp, &cfg(stage, bf16, None), &model, 6).unwrap();
        let off = run(dp, &cfg(stage, bf16, Some(dir.path())), &model, 6).unwrap();
        let what = format!("dp {dp} stage {stage} bf16 {bf16}");
        for (a, b) in mem.stats.iter().zip(&off.stats) {
            assert_eq!(
                (a.loss, a.grad_norm, a.lr),
                (b.loss, b.grad_norm, b.lr),
                "{what}"
            );
        }
        assert!(mem.master == off.master, "{what}: final weights differ");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{what}: swap files left behind"
        );
    }
}

#[test]
fn a_rank_holds_three_units_of_optimizer_state_and_the_file_lives_while_training() {
    // Eight layers: the three largest units are a small part of the state.
    let json = tessera_model::synthetic::llama_config_json(48, 32, 64, 8, 4, 2, false);
    let model = tessera_model::ModelConfig::from_json_str(&json).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let n = ParamLayout::new(&model).num_params();
    let stats = run_dp(2, |comm| {
        let init = random_init(&ParamLayout::new(&model), 0);
        let c = cfg(1, true, Some(dir.path()));
        let t = Trainer::new(comm, model.clone(), c, SEQ, init)?;
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        Ok((t.memory(), files))
    })
    .unwrap();
    let (m, files) = stats[0];
    assert!(files >= 1, "no swap file while training");
    // bf16: the master shard and both moments (12 bytes a parameter over 2 ranks) are on NVMe.
    assert!(m.nvme >= 6 * n && m.nvme < 7 * n, "{m:?} for {n}");
    assert!(m.optimizer > 0 && m.optimizer < m.nvme / 2, "{m:?}");
    let model = tiny_model(false);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // A missing directory is one clear error.
    let missing = dir.path().join("nope");
    let e = run(1, &cfg(0, false, Some(&missing)), &model, 1)
        .err()
        .expect("a missing nvme_path must fail")
        .to_string();
    assert!(e.contains("nope"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    let e = TrainConfig::from_json_str(
        r#"{"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("nvme_path"), "{e}");
}

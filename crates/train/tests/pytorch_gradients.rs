//! tessera's explicit backward against PyTorch autograd on the same model and batch (fixture made
//! by scripts/make_train_fixtures.py): the loss, and every parameter's gradient, per tensor.

use std::path::Path;

use safetensors::SafeTensors;
use tessera_model::grad::{load_checkpoint, BatchDims, FullParams, TrainModel, TrainOptions};
use tessera_model::{Checkpoint, ModelConfig};
use tessera_tensor::DType;

#[test]
fn loss_and_every_gradient_match_pytorch() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train/pytorch_grads");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let model = TrainModel::new(cfg);
    let weights = load_checkpoint(&model.layout, &Checkpoint::open(&dir).unwrap()).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let rows: Vec<Vec<u32>> = serde_json::from_value(reference["tokens"].clone()).unwrap();
    let want_loss = reference["loss"].as_f64().unwrap();
    let dims = BatchDims {
        batch: rows.len(),
        seq: rows[0].len() - 1,
    };
    let tokens: Vec<u32> = rows.concat();
    let mut src = FullParams::new(weights);
    let opts = TrainOptions {
        dtype: DType::F32,
        recompute: false,
        grad_scale: 1.0 / dims.tokens() as f32,
    };
    let loss = model
        .forward_backward(&mut src, &tokens, dims, opts)
        .unwrap()
        / dims.tokens() as f64;
    assert!(
        (loss - want_loss).abs() < 1e-5,
        "loss {loss} vs torch {want_loss}"
    );

    let bytes = std::fs::read(dir.join("grads.safetensors")).unwrap();
    let grads = SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for (u, unit) in model.layout.units.iter().enumerate() {
        for p in &unit.params {
            let t = grads.tensor(&p.name).unwrap();
            assert_eq!(t.shape(), p.shape.as_slice(), "{}", p.name);
            let want: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let got = &src.grads[u][p.offset..p.offset + p.len];
            let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-4 * scale + 1e-7,
                "{}: max error {err:e} (max |grad| {scale:e})",
                p.name
            );
            checked += 1;
        }
    }
    assert_eq!(checked, grads.len());
}

//! Every op on the GPU against the CPU kernel, on random inputs (never zeros), f32 and bf16.
//! Built with `--features cuda`; run on a machine with a GPU (`scripts/gpu_check.sh`). Without a
//! GPU the tests say so and pass, unless `TESSERA_REQUIRE_GPU=1` (the GPU script sets it).
#![cfg(feature = "cuda")]

use rand::{Rng, SeedableRng};
use tessera_tensor::ops::{self, AttentionShape};
use tessera_tensor::{DType, Device, Storage, Tensor};

fn gpu() -> Option<Device> {
    match Device::Cuda(0).ensure_available() {
        Ok(()) => Some(Device::Cuda(0)),
        Err(e) => {
            assert!(std::env::var("TESSERA_REQUIRE_GPU").is_err(), "no GPU: {e}");
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn rand_t(shape: Vec<usize>, dt: DType, seed: u64) -> Tensor {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    Tensor::from_f32(
        shape,
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect(),
        dt,
    )
    .unwrap()
}

/// ‖a − b‖ / ‖b‖ (b the CPU result), asserted under `tol`.
fn close(name: &str, gpu: &Tensor, cpu: &Tensor, tol: f64) {
    assert_eq!(gpu.shape(), cpu.shape(), "{name}");
    assert!(
        matches!(gpu.storage(), Storage::Cuda(_)),
        "{name}: result left the GPU"
    );
    let (a, b) = (gpu.to_f32_vec(), cpu.to_f32_vec());
    assert!(a.iter().all(|x| x.is_finite()), "{name}: non-finite output");
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    let rel = (num / den.max(1e-30)).sqrt();
    eprintln!("{name}: relative error {rel:.2e}");
    assert!(rel < tol, "{name}: relative error {rel} >= {tol}");
}

fn tol(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

#[test]
fn every_op_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    for dt in [DType::F32, DType::BF16] {
        let g = |t: &Tensor| t.to_device(dev).unwrap();
        let (x, w, b) = (
            rand_t(vec![5, 96], dt, 1),
            rand_t(vec![40, 96], dt, 2),
            rand_t(vec![40], dt, 3),
        );
        close(
            "matmul",
            &ops::matmul_t(&g(&x), &g(&w), Some(&g(&b))).unwrap(),
            &ops::matmul_t(&x, &w, Some(&b)).unwrap(),
            tol(dt),
        );
        // The decode GEMV path (bf16, 1..=8 rows) against the CPU, odd sizes included.
        for m in [1, 3, 8] {
            let (xs, ws) = (
                rand_t(vec![m, 200], dt, 20 + m as u64),
                rand_t(vec![77, 200], dt, 30),
            );
            close(
                &format!("matmul {m} rows"),
                &ops::matmul_t(&g(&xs), &g(&ws), Some(&g(&rand_t(vec![77], dt, 40)))).unwrap(),
                &ops::matmul_t(&xs, &ws, Some(&rand_t(vec![77], dt, 40))).unwrap(),
                tol(dt),
            );
        }
        let xl = rand_t(vec![300, 256], dt, 4);
        let wl = rand_t(vec![512, 256], dt, 5);
        close(
            "matmul large",
            &ops::matmul_t(&g(&xl), &g(&wl), None).unwrap(),
            &ops::matmul_t(&xl, &wl, None).unwrap(),
            tol(dt),
        );
        let nw = rand_t(vec![96], dt, 6);
        close(
            "rms_norm",
            &ops::rms_norm(&g(&x), &g(&nw), 1e-5).unwrap(),
            &ops::rms_norm(&x, &nw, 1e-5).unwrap(),
            tol(dt),
        );
        let inv: Vec<f32> = (0..8)
            .map(|i| 1.0 / 10000f32.powf(i as f32 / 8.0))
            .collect();
        let q = rand_t(vec![3, 4, 16], dt, 7);
        let (mut qc, mut qg) = (q.clone(), g(&q));
        ops::apply_rope(&mut qc, &[7, 8, 9], &inv).unwrap();
        ops::apply_rope(&mut qg, &[7, 8, 9], &inv).unwrap();
        close("rope", &qg, &qc, tol(dt));
        let u = rand_t(vec![5, 96], dt, 8);
        close(
            "silu_mul",
            &ops::silu_mul(&g(&x), &g(&u)).unwrap(),
            &ops::silu_mul(&x, &u).unwrap(),
            tol(dt),
        );
        let (mut ac, mut ag) = (x.clone(), g(&x));
        ops::add_inplace(&mut ac, &u).unwrap();
        ops::add_inplace(&mut ag, &g(&u)).unwrap();
        close("add", &ag, &ac, tol(dt));
        let table = rand_t(vec![10, 96], dt, 9);
        let toks = [3u32, 12, 10, 19, 0];
        close(
            "embedding",
            &ops::embedding(&g(&table), &toks, 10, dt).unwrap(),
            &ops::embedding(&table, &toks, 10, dt).unwrap(),
            tol(dt),
        );
        // Attention: 6 query heads over 2 kv heads, a cache of 40 positions of which the last 3
        // are the queries; with and without a window.
        let shape = AttentionShape {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 32,
        };
        let kc = rand_t(vec![40, 2, 32], dt, 10);
        let vc = rand_t(vec![40, 2, 32], dt, 11);
        let q = rand_t(vec![3, 6, 32], dt, 12);
        for window in [None, Some(5)] {
            let cpu = ops::causal_attention(
                &q,
                kc.storage(),
                vc.storage(),
                40,
                shape,
                &[37, 38, 39],
                window,
                0.17,
            )
            .unwrap();
            let gpu = ops::causal_attention(
                &g(&q),
                g(&kc).storage(),
                g(&vc).storage(),
                40,
                shape,
                &[37, 38, 39],
                window,
                0.17,
            )
            .unwrap();
            close(&format!("attention window {window:?}"), &gpu, &cpu, tol(dt));
        }
        // RoPE on q and k with K/V appended to caches, fused on the GPU.
        let (q, k, v) = (
            rand_t(vec![2, 4, 16], dt, 13),
            rand_t(vec![2, 2, 16], dt, 14),
            rand_t(vec![2, 2, 16], dt, 15),
        );
        let (mut qc, mut kcc, mut vcc) = (
            q.clone(),
            rand_t(vec![9, 2, 16], dt, 16),
            rand_t(vec![9, 2, 16], dt, 17),
        );
        let (mut qg, mut kcg, mut vcg) = (g(&q), g(&kcc), g(&vcc));
        ops::rope_append(
            &mut qc,
            &k,
            &v,
            kcc.storage_mut(),
            vcc.storage_mut(),
            &[5, 6],
            &inv,
        )
        .unwrap();
        ops::rope_append(
            &mut qg,
            &g(&k),
            &g(&v),
            kcg.storage_mut(),
            vcg.storage_mut(),
            &[5, 6],
            &inv,
        )
        .unwrap();
        close("rope_append q", &qg, &qc, tol(dt));
        close("rope_append k cache", &kcg, &kcc, tol(dt));
        close("rope_append v cache", &vcg, &vcc, tol(dt));
        // Rows of a device tensor stay on the device.
        close(
            "rows",
            &g(&xl).rows(10, 20).unwrap(),
            &xl.rows(10, 20).unwrap(),
            1e-7,
        );
    }
}

#[test]
fn random_weights_on_the_device_are_random() {
    let Some(dev) = gpu() else { return };
    let t = Tensor::random_on(vec![1000, 100], DType::BF16, dev, 3, 0.5, 1.0).unwrap();
    let v = t.to_f32_vec();
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
    assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
    assert!((var - 0.25 / 3.0).abs() < 0.005, "variance {var}");
    assert!(v.iter().all(|x| (0.49..=1.51).contains(x)));
}

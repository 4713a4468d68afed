//! Every op on the GPU against the CPU kernel, on random inputs (never zeros), f32 and bf16.
//! Built with `--features cuda`; run on a machine with a GPU (`scripts/gpu_check.sh`). Without a
//! GPU the tests say so and pass, unless `TESSERA_REQUIRE_GPU=1` (the GPU script sets it).
#![cfg(feature = "cuda")]

use rand::{Rng, SeedableRng};
use tessera_tensor::ops::{self, AttentionShape};
use tessera_tensor::{DType, Device, Storage, Tensor};

/// The GPU, held by one test at a time: a test that captures a CUDA graph records the device's
/// one stream, so another test's work on it meanwhile would land in the graph (or fail).
fn gpu() -> Option<(Device, std::sync::MutexGuard<'static, ()>)> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let held = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    (tessera_tensor::cuda::test_gpus(1) > 0).then_some((Device::Cuda(0), held))
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
/// The GPU's and the CPU's values (as f32) after the checks, for callers that check more.
fn close(name: &str, gpu: &Tensor, cpu: &Tensor, tol: f64) -> (Vec<f32>, Vec<f32>) {
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
    (a, b)
}

/// As `close`, and each row of `len` values within `row_tol` of the CPU's too (relative L2 over
/// the row): a fault confined to a few rows (a mask letting one key through) hides in the whole
/// tensor's error but not in its row's.
fn close_rows(name: &str, gpu: &Tensor, cpu: &Tensor, len: usize, tol: f64, row_tol: f64) {
    let (a, b) = close(name, gpu, cpu, tol);
    let (worst, row) = a
        .chunks(len)
        .zip(b.chunks(len))
        .map(|(x, y)| {
            let num: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
            let den: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
            (num / den.max(1e-30)).sqrt()
        })
        .enumerate()
        .fold(
            (0.0, 0),
            |(w, r), (i, e)| if e > w { (e, i) } else { (w, r) },
        );
    eprintln!("{name}: worst row {row}, relative error {worst:.2e}");
    assert!(
        worst < row_tol,
        "{name}: row {row} relative error {worst} >= {row_tol}"
    );
}

fn tol(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// The logits a penalised draw needs beside its candidates (`ops::gather_values`) are the CPU's,
/// at f32 and bf16, over 3 rows of a vocabulary of 128,256 (384,768 values), repeated and
/// out-of-order picks; a pick past the tensor is an error, not a read (in `ops` and in the
/// CUDA wrapper's own check).
#[test]
fn gathered_values_on_the_gpu_are_the_cpus() {
    let Some((dev, _held)) = gpu() else { return };
    let (rows, n) = (3, 128_256);
    let v: Vec<f32> = rand_t(vec![rows, n], DType::F32, 71)
        .to_f32_vec()
        .iter()
        .map(|x| x * 12.0 - 2.0)
        .collect();
    let picks: Vec<(usize, usize)> = (0..700)
        .map(|i| ((i * 7) % rows, (i * 7919 + 13) % n))
        .chain([(2, n - 1), (0, 0), (2, n - 1)])
        .collect();
    for dt in [DType::F32, DType::BF16] {
        let x = Tensor::from_f32(vec![rows, n], v.clone(), dt).unwrap();
        let xg = x.to_device(dev).unwrap();
        let got = ops::gather_values(&xg, &picks).unwrap();
        let want = ops::gather_values(&x, &picks).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{dt}");
        assert!(ops::gather_values(&xg, &[]).unwrap().is_empty());
        assert!(ops::gather_values(&xg, &[(rows, 0)]).is_err());
        let Storage::Cuda(b) = xg.storage() else {
            panic!("on the device")
        };
        let len = (rows * n) as i64;
        assert!(tessera_tensor::cuda::gather_values(b, &[len]).is_err());
        assert!(tessera_tensor::cuda::gather_values(b, &[-1]).is_err());
        assert_eq!(
            tessera_tensor::cuda::gather_values(b, &[len - 1]).unwrap(),
            want[want.len() - 1..]
        );
    }
}

/// A draw's top-k candidates found on the GPU (`ops::top_k_rows`: radix selection of the k-th
/// largest, one block a row) are the CPU's, read back: the same count, flags and (column, value)
/// pairs, at f32 and bf16 (whose rounding puts many ties at the k-th largest), over a vocabulary
/// of 128,256 and of a tp-2 shard, k from 1 to past the room (the count then says so), negative
/// and positive values, -inf, and rows with a NaN or +inf flagged.
#[test]
fn top_k_candidates_on_the_gpu_are_the_cpus() {
    let Some((dev, _held)) = gpu() else { return };
    for dt in [DType::F32, DType::BF16] {
        for (rows, n) in [(1, 128_256), (3, 64_128), (2, 1000), (4, 7)] {
            let mut v: Vec<f32> = rand_t(vec![rows, n], DType::F32, 90 + n as u64)
                .to_f32_vec()
                .iter()
                .map(|x| x * 12.0 - 2.0)
                .collect();
            if n > 1000 {
                v[5] = f32::NEG_INFINITY;
                v[n / 2] = 0.0;
            }
            if rows >= 3 {
                v[2 * n + n / 2] = f32::NAN;
                v[n + 3] = f32::INFINITY;
            }
            let x = Tensor::from_f32(vec![rows, n], v, dt).unwrap();
            let xg = x.to_device(dev).unwrap();
            for k in [1, 5, 50, 64, 300] {
                let k = k.min(n);
                let cap = 2 * k + 64;
                let got = ops::top_k_rows(&xg, k, cap).unwrap();
                assert!(matches!(got.storage(), Storage::Cuda(_)));
                let got = ops::unpack_top_k(&got.to_f32_vec(), cap);
                let want =
                    ops::unpack_top_k(&ops::top_k_rows(&x, k, cap).unwrap().to_f32_vec(), cap);
                for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                    let name = format!("{dt} [{rows}, {n}] k {k} row {r}");
                    assert_eq!((g.count, g.non_finite), (w.count, w.non_finite), "{name}");
                    if w.complete() {
                        assert_eq!(g.entries, w.entries, "{name}");
                    } else {
                        // Past the room either keeps some `cap` of them.
                        assert_eq!(g.entries.len(), w.entries.len().min(cap), "{name}");
                    }
                }
            }
        }
    }
    // Rows whose k-th largest is negative (keys with the top bit clear), ±0 tied at the edge,
    // -inf (most of a row), and k = n over a long row.
    let n = 40_000;
    let negative: Vec<f32> = rand_t(vec![n], DType::F32, 97)
        .to_f32_vec()
        .iter()
        .map(|x| x * 5.0 - 6.0)
        .collect();
    let mut zeros = negative.clone();
    for (j, z) in zeros.iter_mut().enumerate().filter(|(j, _)| j % 997 == 0) {
        *z = if j % 2 == 0 { 0.0 } else { -0.0 };
    }
    let mut infs = vec![f32::NEG_INFINITY; n];
    infs[..30].copy_from_slice(&negative[..30]);
    let rows = [negative, zeros, infs].concat();
    for dt in [DType::F32, DType::BF16] {
        let x = Tensor::from_f32(vec![3, n], rows.clone(), dt).unwrap();
        let xg = x.to_device(dev).unwrap();
        for (k, cap) in [(1, 64), (20, 104), (41, 146), (50, 164), (n, n)] {
            let got = ops::top_k_rows(&xg, k, cap).unwrap();
            let got = ops::unpack_top_k(&got.to_f32_vec(), cap);
            let want = ops::unpack_top_k(&ops::top_k_rows(&x, k, cap).unwrap().to_f32_vec(), cap);
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                let name = format!("{dt} edge rows, k {k}, row {r}");
                assert_eq!((g.count, g.non_finite), (w.count, w.non_finite), "{name}");
                if w.complete() {
                    let bits = |e: &[(u32, f32)]| {
                        e.iter().map(|p| (p.0, p.1.to_bits())).collect::<Vec<_>>()
                    };
                    assert_eq!(bits(&g.entries), bits(&w.entries), "{name}");
                }
            }
        }
    }
    // Every value equal: all n are candidates; past the room, the count says so.
    let x = Tensor::from_f32(vec![1, 5000], vec![0.5; 5000], DType::BF16).unwrap();
    let got = ops::top_k_rows(&x.to_device(dev).unwrap(), 50, 164).unwrap();
    let got = &ops::unpack_top_k(&got.to_f32_vec(), 164)[0];
    assert_eq!(
        (got.count, got.entries.len(), got.complete()),
        (5000, 164, false)
    );
}

#[test]
fn every_op_matches_the_cpu() {
    let Some((dev, _held)) = gpu() else { return };
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
        for m in [1, 3, 8, 64] {
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
        // Every decode GEMV kernel (bf16), whichever a shape would pick: odd row counts, rows
        // whose 16-byte chunks do not fill the lanes evenly (k = 2056), splits included.
        if dt == DType::BF16 {
            for v in tessera_tensor::cuda::GEMV_VARIANTS {
                for (n, k) in [(77, 2056), (1030, 512), (3, 4096)] {
                    let rows = if v.gated { 2 * n } else { n };
                    let (xs, ws) = (
                        rand_t(vec![1, k], dt, 70 + n as u64),
                        rand_t(vec![rows, k], dt, 71 + k as u64),
                    );
                    let want = if v.gated {
                        ops::matmul_t_gated(&xs, &ws, None).unwrap()
                    } else {
                        ops::matmul_t(&xs, &ws, None).unwrap()
                    };
                    let (Storage::Cuda(xb), Storage::Cuda(wb)) =
                        (g(&xs).storage().clone(), g(&ws).storage().clone())
                    else {
                        unreachable!("moved to the GPU")
                    };
                    let y = tessera_tensor::cuda::gemv_with(v.name, &xb, &wb, n, k).unwrap();
                    let got = Tensor::new(vec![1, n], Storage::Cuda(y)).unwrap();
                    close(
                        &format!("gemv {} n {n} k {k}", v.name),
                        &got,
                        &want,
                        tol(dt),
                    );
                }
            }
        }
        // The norm fused into the decode GEMV after it (bf16, one row: one kernel; else the ops
        // one after another), with and without the residual add, plain and gated, against the CPU.
        for (m, k, n) in [(1, 4096, 1000), (1, 8192, 300), (1, 200, 77), (2, 64, 33)] {
            for gated in [false, true] {
                for add in [false, true] {
                    let x = rand_t(vec![m, k], dt, 80 + k as u64);
                    let d = rand_t(vec![m, k], dt, 81);
                    let nw = rand_t(vec![k], dt, 82);
                    let w = rand_t(vec![if gated { 2 * n } else { n }, k], dt, 83);
                    let (mut xc, mut xg) = (x.clone(), g(&x));
                    let dg = g(&d);
                    let yc =
                        ops::norm_matmul_t(&mut xc, add.then_some(&d), &nw, 1e-5, &w, None, gated)
                            .unwrap();
                    let yg = ops::norm_matmul_t(
                        &mut xg,
                        add.then_some(&dg),
                        &g(&nw),
                        1e-5,
                        &g(&w),
                        None,
                        gated,
                    )
                    .unwrap();
                    let name = format!("norm_matmul {m}x{k} -> {n}, gated {gated}, add {add}");
                    close(&name, &yg, &yc, tol(dt));
                    close(&format!("{name}: x"), &xg, &xc, tol(dt));
                    // Against the unfused ops on the GPU: the same within a bf16 ulp here and
                    // there (the norm's sum of squares is added in another order).
                    let mut xu = g(&x);
                    let xn = if add {
                        ops::add_rms_norm(&mut xu, &dg, &g(&nw), 1e-5).unwrap()
                    } else {
                        ops::rms_norm(&xu, &g(&nw), 1e-5).unwrap()
                    };
                    let yu = if gated {
                        ops::matmul_t_gated(&xn, &g(&w), None).unwrap()
                    } else {
                        ops::matmul_t(&xn, &g(&w), None).unwrap()
                    };
                    close(&format!("{name}: fused vs unfused"), &yg, &yu, 1e-2);
                    assert_eq!(xg.to_f32_vec(), xu.to_f32_vec(), "{name}: x");
                }
            }
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
        // Qwen3's per-head q/k norm: rows of 4 q + 2 k + 2 v heads of 128 (v copied), and of
        // heads of 48 (not a multiple of 32 threads) and of 320 (more than a block of 256 threads).
        for (hd, rows) in [(128, 3), (48, 2), (320, 1)] {
            let qkv = rand_t(vec![rows, 8 * hd], dt, 40);
            let (qw, kw) = (rand_t(vec![hd], dt, 41), rand_t(vec![hd], dt, 42));
            close(
                &format!("head_rms_norm {hd}"),
                &ops::head_rms_norm(&g(&qkv), (4, 2), hd, &g(&qw), &g(&kw), 1e-6).unwrap(),
                &ops::head_rms_norm(&qkv, (4, 2), hd, &qw, &kw, 1e-6).unwrap(),
                tol(dt),
            );
        }
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
        // The fused q/k/v projection's RoPE and K/V append, one kernel on the GPU: a prefill of 3
        // tokens of one sequence, and one step of 2 sequences in lockstep.
        let shape = AttentionShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
        };
        for (rows, batch) in [(3, 1), (2, 2)] {
            let qkv = rand_t(vec![rows, 8 * 16], dt, 13);
            let (mut kcc, mut vcc) = (
                rand_t(vec![9, batch * 2, 16], dt, 16),
                rand_t(vec![9, batch * 2, 16], dt, 17),
            );
            let (mut kcg, mut vcg) = (g(&kcc), g(&vcc));
            let qc = ops::qkv_rope_append(
                &qkv,
                batch,
                shape,
                kcc.storage_mut(),
                vcc.storage_mut(),
                5,
                &inv,
            )
            .unwrap();
            let qg = ops::qkv_rope_append(
                &g(&qkv),
                batch,
                shape,
                kcg.storage_mut(),
                vcg.storage_mut(),
                5,
                &inv,
            )
            .unwrap();
            close(
                &format!("qkv_rope_append q, batch {batch}"),
                &qg,
                &qc,
                tol(dt),
            );
            close(
                &format!("qkv_rope_append k cache, batch {batch}"),
                &kcg,
                &kcc,
                tol(dt),
            );
            close(
                &format!("qkv_rope_append v cache, batch {batch}"),
                &vcg,
                &vcc,
                tol(dt),
            );
        }
        // A decode step's RoPE + K/V append + attention in one kernel, against the two CPU ops.
        for (batch, window) in [(1, None), (2, Some(3))] {
            let qkv = rand_t(vec![batch, 8 * 16], dt, 70);
            let (mut kcc, mut vcc) = (
                rand_t(vec![7, batch * 2, 16], dt, 71),
                rand_t(vec![7, batch * 2, 16], dt, 72),
            );
            let (mut kcg, mut vcg) = (g(&kcc), g(&vcc));
            let args = |k: &mut Tensor, v: &mut Tensor, x: &Tensor| {
                ops::decode_attention(
                    x,
                    batch,
                    shape,
                    k.storage_mut(),
                    v.storage_mut(),
                    5,
                    &inv,
                    window,
                    0.25,
                )
                .unwrap()
            };
            let oc = args(&mut kcc, &mut vcc, &qkv);
            let og = args(&mut kcg, &mut vcg, &g(&qkv));
            close(
                &format!("decode_attention, batch {batch}"),
                &og,
                &oc,
                tol(dt),
            );
            close(
                &format!("decode_attention k cache, batch {batch}"),
                &kcg,
                &kcc,
                tol(dt),
            );
            close(
                &format!("decode_attention v cache, batch {batch}"),
                &vcg,
                &vcc,
                tol(dt),
            );
        }
        // Long ranges: prefill attention walks 2,500 keys in chunks (online softmax), decode
        // attention splits 700 positions over blocks and joins them (flash decoding), with and
        // without a window.
        let long = AttentionShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
        };
        let (kl, vl) = (
            rand_t(vec![2500, 2, 64], dt, 80),
            rand_t(vec![2500, 2, 64], dt, 81),
        );
        let ql = rand_t(vec![2, 4, 64], dt, 82);
        let pos = [2498, 2499];
        let cpu = ops::causal_attention(
            &ql,
            kl.storage(),
            vl.storage(),
            2500,
            long,
            &pos,
            None,
            0.125,
        )
        .unwrap();
        let gpu = ops::causal_attention(
            &g(&ql),
            g(&kl).storage(),
            g(&vl).storage(),
            2500,
            long,
            &pos,
            None,
            0.125,
        )
        .unwrap();
        close("attention over 2500 keys", &gpu, &cpu, tol(dt));
        // Prefills of 16 queries or more run the tiled kernels (in bf16 at head dims 64 and 128 on
        // tensor cores): head dims that fill 8, 16 and 32 dims a thread (72: not a multiple of
        // 8), query counts off the 64 of a tile, several key tiles, the queries at the end of a
        // longer cache or the whole of it, with and without a window (the tensor-core kernel's
        // ring of key tiles over 9 tiles, its unmasked and skipped tiles).
        for (hq, hkv, hd, t, kv_len, window) in [
            (6, 2, 32, 100, 300, None),
            (6, 2, 32, 100, 300, Some(37)),
            (4, 1, 128, 70, 70, None),
            (4, 1, 128, 70, 70, Some(20)),
            (2, 2, 256, 20, 45, None),
            (8, 2, 64, 150, 200, None),
            (8, 2, 64, 150, 200, Some(100)),
            (4, 2, 128, 300, 300, None),
            (3, 3, 72, 33, 33, Some(64)),
            // Key tiles off the query tiles (a cache of 320 before the queries), whole tiles
            // unmasked beside masked ones, tiles before a warp's window skipped, and a last block
            // of 8 queries (warps with none).
            (4, 2, 128, 200, 520, Some(130)),
            (8, 2, 128, 264, 264, None),
            (4, 1, 64, 130, 451, Some(70)),
        ] {
            let shape = AttentionShape {
                num_heads: hq,
                num_kv_heads: hkv,
                head_dim: hd,
            };
            let seed = (hd + t + window.unwrap_or(0)) as u64;
            let kc = rand_t(vec![kv_len, hkv, hd], dt, seed);
            let vc = rand_t(vec![kv_len, hkv, hd], dt, seed + 1);
            let q = rand_t(vec![t, hq, hd], dt, seed + 2);
            let pos: Vec<usize> = (kv_len - t..kv_len).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let run = |q: &Tensor, k: &Tensor, v: &Tensor| {
                ops::causal_attention(
                    q,
                    k.storage(),
                    v.storage(),
                    kv_len,
                    shape,
                    &pos,
                    window,
                    scale,
                )
                .unwrap()
            };
            let cpu = run(&q, &kc, &vc);
            // On tensor cores (bf16 at head dims 64 and 128), 16 and 32 queries a warp, each
            // forced (the length alone would take 16 at these sizes), and asked which kernel
            // ran; each row checked too.
            // The forms this device loaded: 32 a warp runs where its form loaded, else 16 (on
            // sm_86 / sm_89 at head dim 128), else CUDA cores (before sm_80, or switched off).
            let forms = tessera_tensor::cuda::prefill_attention_forms(0).unwrap();
            let col = match (dt, hd) {
                (DType::BF16, 64) => Some(0),
                (DType::BF16, 128) => Some(1),
                _ => None,
            };
            // 3 and 4: the warpgroup kernel's 64 and 128 queries a block where it loaded (head
            // dims 64 and 128 on sm_90), else as 1 and 2.
            let wg = tessera_tensor::cuda::prefill_attention_wg(0).unwrap();
            for mt in [1, 2, 3, 4] {
                tessera_tensor::cuda::force_prefill_tiles(Some(mt));
                let plan = tessera_tensor::cuda::prefill_attention_plan(0, t, hq, hd, dt);
                let gpu = run(&g(&q), &g(&kc), &g(&vc));
                tessera_tensor::cuda::force_prefill_tiles(None);
                let plan = plan.unwrap();
                let (forced, mt) = (mt, [0, 1, 2, 1, 2][mt]);
                let ran = col.and_then(|c| {
                    [(mt, 2 * (mt - 1) + c), (1, c)]
                        .into_iter()
                        .find(|&(_, form)| forms[form])
                });
                match ran {
                    _ if wg && col.is_some() && forced > 2 => assert_eq!(
                        plan,
                        format!("warpgroup tensor cores, {} queries a block", 64 * mt)
                    ),
                    Some((m, _)) => {
                        assert_eq!(plan, format!("tensor cores, {} queries a warp", 16 * m))
                    }
                    None => assert!(!plan.contains("tensor cores"), "{plan}"),
                }
                let row_tol = if dt == DType::F32 { 1e-4 } else { 5e-2 };
                close_rows(
                    &format!(
                        "tiled attention {hq}/{hkv} heads of {hd}, {t} of {kv_len}, window {window:?}, {plan}"
                    ),
                    &gpu,
                    &cpu,
                    hd,
                    tol(dt),
                    row_tol,
                );
            }
        }
        // Decode attention over 700 positions, split over blocks and joined (flash decoding), with
        // and without a window, and over 30 (one split): the vectorised kernel with every query
        // head of a KV head in a block (g = 2, g = 8 with g hd at its limit of 1024, g = 12 in
        // blocks of 6), with one a block, and as the shape picks, and the per-query-head kernel it
        // falls back to (hd 48: hd / 8 not a power of two), at batch 1 and 3.
        // The one-pass kernel over the same shapes (at most 4 heads a block: g = 8 and 12 in
        // blocks of 4, g = 3 with one masked off), and on tensor cores (bf16 at head dims 64 and
        // 128: g = 1, 2, 3, 4, 7 and 8 as rows 0-7 of its m16 tiles, g = 12 at head dim 64 and
        // g = 16 at 128 as rows 0-15 (the wide forms, for more than 8 heads); elsewhere the
        // one-pass kernel;
        // g = 4 at head dim 128 is Llama 3 8B's and Qwen3's shape).
        // Also: one query head a KV head (g = 1), g = 3 and 7 (heads masked off in the 4- and
        // 8-head kernels), head dims 256 and 16 (256 and 16 lanes a row), and batch 16, where the
        // grouped kernel's splits grow to 128 (2 KV heads) or 256 positions (8 KV heads).
        for (hq, hkv, hd) in [
            (4, 2, 64),
            (8, 1, 128),
            (6, 2, 48),
            (12, 1, 32),
            (8, 8, 64),
            (6, 2, 128),
            (7, 1, 128),
            (16, 4, 128),
            (12, 1, 64),
            (16, 1, 128),
            (8, 2, 256),
            (4, 2, 16),
        ] {
            let shape = AttentionShape {
                num_heads: hq,
                num_kv_heads: hkv,
                head_dim: hd,
            };
            let inv: Vec<f32> = (0..hd / 2)
                .map(|i| 1.0 / 10000f32.powf(i as f32 / (hd / 2) as f32))
                .collect();
            for (batch, window, at) in [
                (1, None, 700),
                (1, Some(300), 700),
                (3, Some(500), 700),
                (16, None, 700),
                (2, None, 30),
                (64, None, 30),
                // Past 2,048 positions: where the shape picks the tensor-core kernel (bf16, head
                // dims 64 and 128, whole groups of 2-8).
                (4, None, 2100),
            ] {
                let qkv = rand_t(vec![batch, (hq + 2 * hkv) * hd], dt, 83);
                let (mut kcc, mut vcc) = (
                    rand_t(vec![at + 1, batch * hkv, hd], dt, 84),
                    rand_t(vec![at + 1, batch * hkv, hd], dt, 85),
                );
                let (kcg, vcg) = (g(&kcc), g(&vcc));
                let run = |k: &mut Tensor, v: &mut Tensor, x: &Tensor| {
                    ops::decode_attention(
                        x,
                        batch,
                        shape,
                        k.storage_mut(),
                        v.storage_mut(),
                        at,
                        &inv,
                        window,
                        1.0 / (hd as f32).sqrt(),
                    )
                    .unwrap()
                };
                let oc = run(&mut kcc, &mut vcc, &qkv);
                // Each kernel where it applies (forced), and the one the shape picks.
                use tessera_tensor::cuda::DecodeKernel;
                for choice in [
                    Some(DecodeKernel::Grouped),
                    Some(DecodeKernel::ByHead),
                    Some(DecodeKernel::PerHead),
                    Some(DecodeKernel::Flash),
                    Some(DecodeKernel::Mma),
                    None,
                ] {
                    tessera_tensor::cuda::force_decode_kernel(choice);
                    let (mut kcg, mut vcg) = (kcg.clone(), vcg.clone());
                    let og = run(&mut kcg, &mut vcg, &g(&qkv));
                    let what = format!(
                        "decode_attention at {at}, {hq}/{hkv} heads of {hd}, batch {batch}, \
                         window {window:?}, kernel {choice:?}"
                    );
                    close(&what, &og, &oc, tol(dt));
                    close(&format!("{what}: k cache"), &kcg, &kcc, tol(dt));
                    close(&format!("{what}: v cache"), &vcg, &vcc, tol(dt));
                }
                tessera_tensor::cuda::force_decode_kernel(None);
            }
        }
        // Residual add + RMSNorm in one kernel: rows of 4096 (16-byte loads) and of 100 (one
        // element at a time); the sum is written back to x.
        for h in [4096, 100] {
            let (x, d, w) = (
                rand_t(vec![3, h], dt, 50),
                rand_t(vec![3, h], dt, 51),
                rand_t(vec![h], dt, 52),
            );
            let (mut xc, mut xg) = (x.clone(), g(&x));
            let yc = ops::add_rms_norm(&mut xc, &d, &w, 1e-5).unwrap();
            let yg = ops::add_rms_norm(&mut xg, &g(&d), &g(&w), 1e-5).unwrap();
            close(&format!("add_rms_norm {h}"), &yg, &yc, tol(dt));
            close(&format!("add_rms_norm {h}: x + delta"), &xg, &xc, tol(dt));
            close(
                &format!("rms_norm {h}"),
                &ops::rms_norm(&g(&x), &g(&w), 1e-5).unwrap(),
                &ops::rms_norm(&x, &w, 1e-5).unwrap(),
                tol(dt),
            );
        }
        // The gated MLP on fused gate/up weights: one row (the one-pass GEMV for bf16), 3 rows
        // (GEMM + kernel), and a bias.
        let wgu = rand_t(vec![2 * 72, 128], dt, 60);
        for (m, bias) in [(1, false), (3, false), (1, true)] {
            let xg = rand_t(vec![m, 128], dt, 61);
            let b = bias.then(|| rand_t(vec![2 * 72], dt, 62));
            let bg = b.as_ref().map(g);
            close(
                &format!("matmul_gated {m} rows, bias {bias}"),
                &ops::matmul_t_gated(&g(&xg), &g(&wgu), bg.as_ref()).unwrap(),
                &ops::matmul_t_gated(&xg, &wgu, b.as_ref()).unwrap(),
                tol(dt),
            );
        }
        for n in [40, 13] {
            let gu = rand_t(vec![4, 2 * n], dt, 63);
            close(
                &format!("silu_mul_halves {n}"),
                &ops::silu_mul_halves(&g(&gu)).unwrap(),
                &ops::silu_mul_halves(&gu).unwrap(),
                tol(dt),
            );
        }
        // Greedy over a vocabulary row of many column slices, a tie included: indices exact.
        let mut v = rand_t(vec![3, 70001], DType::F32, 64).to_f32_vec();
        v[70001 + 123] = 5.0;
        v[70001 + 60000] = 5.0;
        let logits = Tensor::from_f32(vec![3, 70001], v.clone(), dt).unwrap();
        assert_eq!(
            ops::argmax_rows(&g(&logits)).unwrap(),
            ops::argmax_rows(&logits).unwrap(),
            "argmax_rows"
        );
        // A NaN counts as larger than any number (as torch.argmax): the row's first NaN, in
        // another column slice than the maximum, so that a broken row is seen, not skipped.
        v[2 * 70001 + 65000] = f32::NAN;
        v[2 * 70001 + 50000] = f32::NAN;
        let broken = Tensor::from_f32(vec![3, 70001], v, dt).unwrap();
        let (on_gpu, on_cpu) = (
            ops::argmax_rows(&g(&broken)).unwrap(),
            ops::argmax_rows(&broken).unwrap(),
        );
        let bits = |r: &[(f32, u32)]| -> Vec<(bool, u32, u32)> {
            r.iter()
                .map(|p| {
                    (
                        p.0.is_nan(),
                        if p.0.is_nan() { 0 } else { p.0.to_bits() },
                        p.1,
                    )
                })
                .collect()
        };
        assert_eq!(bits(&on_gpu), bits(&on_cpu), "argmax_rows with NaN");
        assert!(
            on_cpu[2].0.is_nan() && on_cpu[2].1 == 50000,
            "{:?}",
            on_cpu[2]
        );
        // The log-sum-exp of each row on the device (f32, one block a row) against the CPU's
        // f64, and the target's value exactly; a row with no target gets none.
        let targets = [Some(70000), None, Some(123)];
        let on_gpu = ops::logsumexp_rows(&g(&logits), &targets).unwrap();
        let on_cpu = ops::logsumexp_rows(&logits, &targets).unwrap();
        for (r, (a, b)) in on_gpu.iter().zip(&on_cpu).enumerate() {
            assert!(
                (a.0 - b.0).abs() < 2e-6 * b.0.abs().max(1.0),
                "lse row {r}: {a:?} {b:?}"
            );
            assert_eq!(a.1, b.1, "target row {r}");
        }
        // A NaN anywhere in a row makes its log-sum-exp NaN (here one of a thread's columns, in
        // a row shorter than a block: no other lane's merge may drop it), as on the CPU.
        let mut nan_row = rand_t(vec![2, 1000], DType::F32, 65).to_f32_vec();
        nan_row[16] = f32::NAN;
        let nan_row = Tensor::from_f32(vec![2, 1000], nan_row, dt).unwrap();
        for x in [g(&nan_row), nan_row.clone()] {
            let got = ops::logsumexp_rows(&x, &[None, Some(3)]).unwrap();
            assert!(
                got[0].0.is_nan() && got[1].0.is_finite(),
                "NaN row: {got:?}"
            );
        }
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
    let Some((dev, _held)) = gpu() else { return };
    let t = Tensor::random_on(vec![1000, 100], DType::BF16, dev, 3, 0.5, 1.0).unwrap();
    let v = t.to_f32_vec();
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
    assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
    assert!((var - 0.25 / 3.0).abs() < 0.005, "variance {var}");
    assert!(v.iter().all(|x| (0.49..=1.51).contains(x)));
}

/// The probe behind `tessera bench gemm --probe-pdl` tells a kernel that waits for the one before
/// it from one that does not: run on this crate's copy kernel both ways, on a programmatic edge
/// behind a kernel that writes the copy's input 200 µs after letting it start.
#[test]
fn the_programmatic_edge_probe_tells_a_waiting_kernel_from_one_that_does_not() {
    let Some((_dev, _held)) = gpu() else { return };
    if !tessera_tensor::cuda::device_has_pdl(0).unwrap() {
        eprintln!("no programmatic dependent launch before sm_90: nothing to probe");
        return;
    }
    for _ in 0..2 {
        let waits = tessera_tensor::cuda::probe_own_copy(0, true).unwrap();
        assert_eq!(waits, Some(true), "the copy that waits");
        let early = tessera_tensor::cuda::probe_own_copy(0, false).unwrap();
        assert_eq!(early, Some(false), "the copy that does not wait");
    }
}

/// A device tensor's buffer (the P2P calls take buffers).
fn buf(t: &Tensor) -> &tessera_tensor::cuda::CudaBuf {
    match t.storage() {
        Storage::Cuda(b) => b,
        _ => unreachable!("on the GPU"),
    }
}

/// Two ranks of the NVLink paths on GPU 0, each on its own stream, connected to each other (a
/// peer later than `deadline` ends a call).
fn two_ranks_on_gpu_0(
    deadline: std::time::Duration,
) -> Vec<tessera_tensor::cuda::p2p::P2pAllReduce> {
    use tessera_tensor::cuda::p2p::P2pAllReduce;
    let mut ranks: Vec<P2pAllReduce> = (0..2)
        .map(|r| {
            P2pAllReduce::new(0, r, 2, deadline)
                .and_then(|p| p.with_own_stream())
                .unwrap()
        })
        .collect();
    let table: Vec<(usize, u64)> = ranks.iter().map(|r| (0, r.address())).collect();
    for r in &mut ranks {
        r.connect(&table).unwrap();
    }
    ranks
}

/// The fused all-reduce + residual add + RMSNorm (`all_reduce_add_rms_norm`: each rank pushes its
/// values into the other's receive slots as 16-byte lines carrying the call's number) between two
/// ranks on one GPU, each on its own stream: every rank gets bit for bit what the sum rounded to
/// the dtype followed by `add_rms_norm` gives, call after call (slots alternating by parity, rows
/// changing between calls); shapes it does not take are refused, and a missing peer ends the call
/// at the deadline with x as it was.
#[test]
fn fused_all_reduce_and_norm_between_two_streams_of_one_gpu_is_exact() {
    use std::time::Duration;
    use tessera_tensor::cuda::p2p::{FUSED_MAX_ROWS, P2P_MAX_BYTES};
    let Some((dev, _held)) = gpu() else { return };
    let pair = two_ranks_on_gpu_0;
    let sync = || {
        tessera_tensor::cuda::GpuDevice::get(0)
            .unwrap()
            .synchronize()
            .unwrap()
    };
    let eps = 1e-5;
    let mut calls = 0;
    // A slot takes one row size: a pair for each dtype and hidden size. 4096 is the 8B model's
    // (one chunk of 8 a thread), 8192 the 70B's, 64 a tiny model's, 4104 not a multiple of 32.
    for (pi, (dt, h, rows_seq)) in [
        (DType::BF16, 4096, vec![1usize, 1, 8, 64, 2, 63]),
        (DType::F32, 4096, vec![1, 3, 32, 1]),
        (DType::BF16, 8192, vec![1, 32, 1]),
        (DType::BF16, 64, vec![1, 5, 1000, 2]),
        (DType::F32, 4104, vec![2, 1, 7]),
    ]
    .into_iter()
    .enumerate()
    {
        // With the kernel's own account of where its time goes (`P2pStats`); the f32 pairs with
        // a system-scope fence after the pushes (`with_fence`), and the kernel after released
        // at each of its three places in turn (`with_trigger`): neither changes a value.
        let ranks: Vec<_> = pair(Duration::from_secs(10))
            .into_iter()
            .map(|p| {
                p.with_stats()
                    .unwrap()
                    .with_fence(dt == DType::F32)
                    .with_trigger((pi % 3) as u8)
            })
            .collect();
        let w = rand_t(vec![h], dt, 5).to_device(dev).unwrap();
        let row_calls: usize = rows_seq.iter().sum();
        for (i, rows) in rows_seq.into_iter().enumerate() {
            calls += 1;
            let seed = 100 * calls as u64;
            let parts = [
                rand_t(vec![rows, h], dt, seed),
                rand_t(vec![rows, h], dt, seed + 1),
            ];
            let x0 = rand_t(vec![rows, h], dt, seed + 2);
            // NCCL's sum of two, rounded once to the dtype, then add_rms_norm on the GPU.
            let (a, b) = (parts[0].to_f32_vec(), parts[1].to_f32_vec());
            let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| dt.round(x + y)).collect();
            let delta = Tensor::from_f32(vec![rows, h], sum, dt)
                .unwrap()
                .to_device(dev)
                .unwrap();
            let mut want_x = x0.to_device(dev).unwrap();
            let want_y = ops::add_rms_norm(&mut want_x, &delta, &w, eps).unwrap();
            let gp: Vec<Tensor> = parts.iter().map(|p| p.to_device(dev).unwrap()).collect();
            let gx: Vec<Tensor> = (0..2).map(|_| x0.to_device(dev).unwrap()).collect();
            sync();
            let ys: Vec<tessera_tensor::cuda::CudaBuf> = ranks
                .iter()
                .enumerate()
                .map(|(r, p)| {
                    p.all_reduce_add_rms_norm(
                        buf(&gp[r]),
                        buf(&gx[r]),
                        buf(&w),
                        rows,
                        h,
                        eps as f32,
                    )
                    .unwrap()
                    .unwrap_or_else(|| panic!("{dt:?} {rows} x {h}: not taken"))
                })
                .collect();
            for p in &ranks {
                p.synchronize().unwrap();
                assert_eq!(p.failed(), None);
            }
            for (r, y) in ys.into_iter().enumerate() {
                let y = Tensor::new(vec![rows, h], Storage::Cuda(y)).unwrap();
                let what = format!("call {i} of {dt:?} {rows} x {h}, rank {r}");
                assert_eq!(gx[r].to_f32_vec(), want_x.to_f32_vec(), "x: {what}");
                assert_eq!(y.to_f32_vec(), want_y.to_f32_vec(), "y: {what}");
            }
        }
        // Every row of every call counted once, with its time.
        for (r, p) in ranks.iter().enumerate() {
            let st = p.stats().unwrap().expect("asked for");
            assert_eq!(
                st.row_calls, row_calls as u64,
                "{dt:?} {h}, rank {r}: {st:?}"
            );
            assert!(
                st.total_ns > 0,
                "{dt:?} {h}, rank {r}: no time kept: {st:?}"
            );
            // All of them eager: nothing in the captured calls' account.
            let (eager, captured) = p.stats_by_kind().unwrap().expect("asked for");
            assert_eq!((eager, captured.row_calls), (st, 0), "rank {r}");
        }
        // Not taken (the caller falls back): another row size than the first call's, too many
        // rows or values for a slot.
        let refused = |rows: usize, h: usize| {
            let t = rand_t(vec![rows, h], dt, 1).to_device(dev).unwrap();
            let wt = rand_t(vec![h], dt, 2).to_device(dev).unwrap();
            ranks[0]
                .all_reduce_add_rms_norm(buf(&t), buf(&t), buf(&wt), rows, h, 1e-5)
                .unwrap()
                .is_none()
        };
        assert!(refused(1, h + 8), "{dt:?} {h}: another row size taken");
        let too_many = (FUSED_MAX_ROWS + 1).max(P2P_MAX_BYTES / (h * dt.size_in_bytes()) + 1);
        assert!(refused(too_many, h), "{dt:?} {h}: {too_many} rows taken");
    }
    // A row that is not whole chunks of 8 values: refused by a fresh pair too.
    let odd = pair(Duration::from_secs(10));
    let t = rand_t(vec![2, 12], DType::BF16, 3).to_device(dev).unwrap();
    let wt = rand_t(vec![12], DType::BF16, 4).to_device(dev).unwrap();
    assert!(odd[0]
        .all_reduce_add_rms_norm(buf(&t), buf(&t), buf(&wt), 2, 12, 1e-5)
        .unwrap()
        .is_none());
    // Nor a row longer than 512 threads of 4 chunks of 8 take.
    let long = 16392;
    let t = rand_t(vec![1, long], DType::F32, 3).to_device(dev).unwrap();
    let wt = rand_t(vec![long], DType::F32, 4).to_device(dev).unwrap();
    assert!(odd[0]
        .all_reduce_add_rms_norm(buf(&t), buf(&t), buf(&wt), 1, long, 1e-5)
        .unwrap()
        .is_none());
    eprintln!("fused all-reduce + norm on one GPU: {calls} calls exact");
    // What a call costs on one GPU (no NVLink: the peer's stores land in the same memory), beside
    // add_rms_norm alone; printed, not asserted.
    for rows in [1, 16, 64] {
        let (h, dt, n) = (4096, DType::BF16, 200);
        let ranks = pair(Duration::from_secs(10));
        let g = |seed| rand_t(vec![rows, h], dt, seed).to_device(dev).unwrap();
        let (p, xs, d) = ([g(1), g(2)], [g(3), g(4)], g(5));
        let w = rand_t(vec![h], dt, 6).to_device(dev).unwrap();
        let time = |f: &mut dyn FnMut()| {
            f();
            sync();
            for r in &ranks {
                r.synchronize().unwrap();
            }
            let t = std::time::Instant::now();
            for _ in 0..n {
                f();
            }
            sync();
            for r in &ranks {
                r.synchronize().unwrap();
            }
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        };
        let fused = time(&mut || {
            for (r, rank) in ranks.iter().enumerate() {
                rank.all_reduce_add_rms_norm(buf(&p[r]), buf(&xs[r]), buf(&w), rows, h, 1e-5)
                    .unwrap()
                    .unwrap();
            }
        });
        let mut x = g(7);
        let alone = time(&mut || {
            ops::add_rms_norm(&mut x, &d, &w, 1e-5).unwrap();
        });
        eprintln!(
            "one GPU, {rows} x {h} bf16: fused all-reduce + norm {fused:.2} µs a call (both ranks), add_rms_norm alone {alone:.2} µs (eager, launch included)"
        );
    }
    // A peer that never comes: the call returns at the deadline, x stays as it was, the rank
    // reports it and refuses later calls.
    let late = pair(Duration::from_millis(200));
    let (h, dt) = (4096, DType::BF16);
    let x0 = rand_t(vec![1, h], dt, 7);
    let (p, x, w) = (
        rand_t(vec![1, h], dt, 8).to_device(dev).unwrap(),
        x0.to_device(dev).unwrap(),
        rand_t(vec![h], dt, 9).to_device(dev).unwrap(),
    );
    sync();
    let t = std::time::Instant::now();
    let y = late[0]
        .all_reduce_add_rms_norm(buf(&p), buf(&x), buf(&w), 1, h, 1e-5)
        .unwrap();
    assert!(y.is_some());
    late[0].synchronize().unwrap();
    let waited = t.elapsed();
    assert!(
        late[0].failed().is_some(),
        "a missing peer was not reported"
    );
    assert_eq!(x.to_f32_vec(), x0.to_f32_vec());
    assert!(late[0]
        .all_reduce_add_rms_norm(buf(&p), buf(&x), buf(&w), 1, h, 1e-5)
        .is_err());
    eprintln!(
        "fused all-reduce + norm: a missing peer ends the call after {waited:?} (deadline 200 ms)"
    );
    // The host's abort ends a call whose peer never comes long before its deadline: the
    // waiting threads look at the abort word (a few at a time, from 2 ms on every ~1 ms), and
    // 64 rows of waiting threads do not keep the word from being seen.
    let stuck = pair(Duration::from_secs(60));
    let rows = 64;
    let x0 = rand_t(vec![rows, h], dt, 10);
    let (p, x) = (
        rand_t(vec![rows, h], dt, 11).to_device(dev).unwrap(),
        x0.to_device(dev).unwrap(),
    );
    sync();
    let y = stuck[0]
        .all_reduce_add_rms_norm(buf(&p), buf(&x), buf(&w), rows, h, 1e-5)
        .unwrap();
    assert!(y.is_some());
    std::thread::sleep(Duration::from_millis(50));
    stuck[0].abort();
    stuck[0].synchronize().unwrap();
    assert_eq!(
        stuck[0].failed(),
        Some("the NVLink all-reduce + norm was aborted"),
        "the abort did not end the call (the deadline did)"
    );
    assert_eq!(x.to_f32_vec(), x0.to_f32_vec());
    eprintln!(
        "fused all-reduce + norm: the host's abort ends a call of {rows} rows waiting for a peer"
    );
}

/// The decode GEMV that pushes its outputs into the peers' receive slots (`matmul_pushing`), then
/// the fused all-reduce + norm that only waits for the peers' (`pushed`), between two ranks on one
/// GPU, each on its own stream: the GEMV's outputs are the plain GEMV's, and x and y bit for bit
/// the rounded sum + `add_rms_norm`, call after call, interleaved with fused calls that push
/// themselves (one call in three).
#[test]
fn pushed_gemv_then_fused_norm_between_two_streams_of_one_gpu_is_exact() {
    use std::time::Duration;
    let Some((dev, _held)) = gpu() else { return };
    let ranks: Vec<_> = two_ranks_on_gpu_0(Duration::from_secs(10))
        .into_iter()
        .map(|r| r.with_push(true))
        .collect();
    let (k, h, dt, eps) = (1024, 4096, DType::BF16, 1e-5f32);
    let on = |t: Tensor| t.to_device(dev).unwrap();
    let w = [1, 2].map(|seed| on(rand_t(vec![h, k], dt, seed)));
    let nw = on(rand_t(vec![h], dt, 3));
    let x0 = rand_t(vec![1, h], dt, 4);
    let xs = [on(x0.clone()), on(x0.clone())];
    let mut want_x = on(x0);
    for call in 0..9u64 {
        let a = [0, 1].map(|r| on(rand_t(vec![1, k], dt, 10 + 2 * call + r)));
        let parts: Vec<Tensor> = (0..2)
            .map(|r| ops::matmul_t(&a[r], &w[r], None).unwrap())
            .collect();
        let (p0, p1) = (parts[0].to_f32_vec(), parts[1].to_f32_vec());
        let sum: Vec<f32> = p0.iter().zip(&p1).map(|(x, y)| dt.round(x + y)).collect();
        let delta = on(Tensor::from_f32(vec![1, h], sum, dt).unwrap());
        let want_y = ops::add_rms_norm(&mut want_x, &delta, &nw, eps as f64).unwrap();
        let pushing = call % 3 != 2;
        let mut mine = Vec::new();
        for r in 0..2 {
            let p = if pushing {
                let y = ranks[r]
                    .matmul_pushing(buf(&a[r]), buf(&w[r]), h, k)
                    .unwrap()
                    .expect("one bf16 row of 4,096 is pushed");
                Tensor::new(vec![1, h], Storage::Cuda(y)).unwrap()
            } else {
                parts[r].clone()
            };
            let y = ranks[r]
                .all_reduce_add_rms_norm(buf(&p), buf(&xs[r]), buf(&nw), 1, h, eps)
                .unwrap()
                .expect("taken");
            mine.push((p, y));
        }
        for r in &ranks {
            r.synchronize().unwrap();
        }
        for (r, (p, y)) in mine.iter().enumerate() {
            assert_eq!(
                p.to_f32_vec(),
                parts[r].to_f32_vec(),
                "call {call}: GEMV of rank {r}"
            );
            assert_eq!(
                xs[r].to_f32_vec(),
                want_x.to_f32_vec(),
                "call {call}: x of rank {r}"
            );
            assert_eq!(
                y.to_f32_vec().unwrap(),
                want_y.to_f32_vec(),
                "call {call}: y of rank {r}"
            );
        }
    }
    // Not one bf16 row, or a row the fused kernel would not take (another size than its first
    // call's): not pushed.
    let a2 = on(rand_t(vec![2, k], dt, 50));
    assert!(ranks[0]
        .matmul_pushing(buf(&a2), buf(&w[0]), h, k)
        .unwrap()
        .is_none());
    let w_half = on(rand_t(vec![h / 2, k], dt, 51));
    let a1 = on(rand_t(vec![1, k], dt, 52));
    assert!(ranks[0]
        .matmul_pushing(buf(&a1), buf(&w_half), h / 2, k)
        .unwrap()
        .is_none());
    // A broken contract is an error, never a sum of the wrong values: a push followed by a call
    // the kernel does not take, or by a second push.
    let fresh = || {
        two_ranks_on_gpu_0(Duration::from_secs(10))
            .into_iter()
            .map(|r| r.with_push(true))
            .collect::<Vec<_>>()
    };
    let broken = fresh();
    let y = broken[0]
        .matmul_pushing(buf(&a1), buf(&w[0]), h, k)
        .unwrap()
        .expect("pushed");
    let y2 = on(rand_t(vec![2, h], dt, 53));
    let x2 = on(rand_t(vec![2, h], dt, 54));
    assert!(broken[0]
        .all_reduce_add_rms_norm(buf(&y2), buf(&x2), buf(&nw), 2, h, eps)
        .is_err());
    assert!(broken[0].failed().is_some(), "the path is aborted");
    drop(y);
    let twice = fresh();
    let _y = twice[0]
        .matmul_pushing(buf(&a1), buf(&w[0]), h, k)
        .unwrap()
        .expect("pushed");
    assert!(twice[0].matmul_pushing(buf(&a1), buf(&w[0]), h, k).is_err());
    for r in broken.iter().chain(&twice) {
        r.synchronize().unwrap();
    }
    eprintln!(
        "pushed GEMV + fused all-reduce + norm on one GPU: 9 calls exact, broken contracts refused"
    );
}

/// A captured step (`DecodeGraph`) replays what it recorded, with its intermediates in the
/// graph's arena (no allocation node) or from the pool, as the choice says.
#[test]
fn a_captured_step_keeps_its_intermediates_where_the_choice_says() {
    use tessera_tensor::cuda::graph::{force_graph_arena, DecodeGraph, GraphArena};
    use tessera_tensor::TensorError;
    let Some((dev, _held)) = gpu() else { return };
    let (rows, k, n) = (3, 256, 300);
    let g = |t: Tensor| t.to_device(dev).unwrap();
    let (x, w, nw) = (
        g(rand_t(vec![rows, k], DType::BF16, 41)),
        g(rand_t(vec![n, k], DType::BF16, 42)),
        g(rand_t(vec![n], DType::BF16, 43)),
    );
    // argmax over rms_norm(x w^T) a row: eager (which also tunes the GEMM), then captured.
    let step = || -> Result<Vec<(f32, u32)>, TensorError> {
        let h = ops::matmul_t(&x, &w, None)?;
        let y = ops::rms_norm(&h, &nw, 1e-5)?;
        let Storage::Cuda(buf) = y.storage() else {
            unreachable!("on the GPU")
        };
        tessera_tensor::cuda::argmax_rows(buf, rows, n)
    };
    let want = step().unwrap();
    assert_eq!(want.len(), rows);
    for (choice, in_arena) in [(GraphArena::Always, true), (GraphArena::Never, false)] {
        force_graph_arena(Some(choice));
        let mut graph = DecodeGraph::capture(0, rows, || step().map(|_| ())).unwrap();
        let st = graph.stats().unwrap();
        assert_eq!(st.arena_bytes > 0, in_arena, "{choice:?}: {st}");
        assert_eq!(st.allocs == 0, in_arena, "{choice:?}: {st}");
        for _ in 0..3 {
            let got = graph.replay(&vec![0; rows], 0).unwrap();
            let idx = |v: &[(f32, u32)]| v.iter().map(|p| p.1).collect::<Vec<_>>();
            assert_eq!(idx(&got), idx(&want), "{choice:?}");
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a.0 - b.0).abs() <= 1e-6 * b.0.abs().max(1.0),
                    "{a:?} vs {b:?}"
                );
            }
        }
        eprintln!("captured step, arena {choice:?}: {st}");
    }
    // A step that panics while it is being captured: the panic goes on, and the capture is ended
    // and its slots cleared on the way, so the device works on: eagerly, and the same step
    // captures and replays again.
    let idx = |v: &[(f32, u32)]| v.iter().map(|p| p.1).collect::<Vec<_>>();
    for choice in [GraphArena::Always, GraphArena::Never] {
        force_graph_arena(Some(choice));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            DecodeGraph::capture(0, rows, || -> Result<(), TensorError> {
                step()?;
                panic!("a step that panics inside the capture");
            })
        }));
        assert!(panicked.is_err(), "{choice:?}: the panic went on");
        assert_eq!(idx(&step().unwrap()), idx(&want), "{choice:?}: eager after");
        let mut graph = DecodeGraph::capture(0, rows, || step().map(|_| ())).unwrap();
        let got = graph.replay(&vec![0; rows], 0).unwrap();
        assert_eq!(idx(&got), idx(&want), "{choice:?}: captured again");
    }
    force_graph_arena(None);
}

/// The fused kernel's account of its time (`TESSERA_P2P_STATS`) keeps the calls of captured
/// graphs apart from the eager ones: a group of one (its residual add + norm alone), 3 eager calls
/// of 2 rows, then a graph of 2 calls of 2 rows replayed 5 times, then 1 more eager call.
#[test]
fn the_fused_kernels_account_keeps_captured_calls_apart_from_eager_ones() {
    use tessera_tensor::cuda::graph::{force_graph_arena, DecodeGraph, GraphArena};
    use tessera_tensor::cuda::p2p::P2pAllReduce;
    use tessera_tensor::TensorError;
    let Some((dev, _held)) = gpu() else { return };
    let (rows, h) = (2, 4096);
    let mut p = P2pAllReduce::new(0, 0, 1, std::time::Duration::from_secs(10))
        .and_then(|p| p.with_stats())
        .unwrap();
    let me = p.address();
    p.connect(&[(0, me)]).unwrap();
    let g = |t: Tensor| t.to_device(dev).unwrap();
    let part = g(rand_t(vec![rows, h], DType::BF16, 61));
    let x = g(rand_t(vec![rows, h], DType::BF16, 62));
    let w = g(rand_t(vec![h], DType::BF16, 63));
    let call = || -> Result<(), TensorError> {
        p.all_reduce_add_rms_norm(buf(&part), buf(&x), buf(&w), rows, h, 1e-5)?
            .expect("taken");
        Ok(())
    };
    for _ in 0..3 {
        call().unwrap();
    }
    force_graph_arena(Some(GraphArena::Always));
    let mut graph = DecodeGraph::capture(0, 1, || {
        call()?;
        call()
    })
    .unwrap();
    force_graph_arena(None);
    for _ in 0..5 {
        graph.replay(&[0], 0).unwrap();
    }
    call().unwrap();
    p.synchronize().unwrap();
    assert_eq!(p.failed(), None);
    let (eager, captured) = p.stats_by_kind().unwrap().expect("asked for");
    // The capture counted first (with the arena), then recorded: neither runs a call.
    assert_eq!(eager.row_calls, 4 * rows as u64, "eager: {eager:?}");
    assert_eq!(
        captured.row_calls,
        5 * 2 * rows as u64,
        "captured: {captured:?}"
    );
    assert!(eager.total_ns > 0 && captured.total_ns > 0);
    let all = p.stats().unwrap().expect("asked for");
    assert_eq!(all.row_calls, eager.row_calls + captured.row_calls);
    assert_eq!(all.total_ns, eager.total_ns + captured.total_ns);
}

/// The tensor-core GEMM for decode batches (`skinny_matmul`) against the CPU: every variant at
/// every batch tile size (1-8, 9-16, 17-32, 33-64 rows, tiles partly filled), weight rows that do
/// not fill a block, k walked whole and split as `SKINNY_SPLITS` (partial sums added by the
/// second kernel).
#[test]
fn the_skinny_gemm_matches_the_cpu() {
    use tessera_tensor::cuda::{
        skinny_matmul, skinny_resources, skinny_takes, SKINNY_SPLITS, SKINNY_VARIANTS,
    };
    let Some((dev, _held)) = gpu() else { return };
    let resources = skinny_resources(0).unwrap();
    for (var, res) in SKINNY_VARIANTS.iter().zip(&resources) {
        match res {
            Some((regs, local)) => eprintln!(
                "skinny {}: {regs} registers, {local} bytes of local memory",
                var.name
            ),
            None => eprintln!("skinny {}: not run by this device", var.name),
        }
    }
    let dt = DType::BF16;
    for (m, n, k) in [
        (1, 64, 1024),
        (5, 100, 1024),
        (8, 128, 1024),
        (13, 130, 2048),
        (32, 257, 1024),
        (33, 64, 1024),
        (64, 300, 2048),
    ] {
        let (xs, ws) = (
            rand_t(vec![m, k], dt, 90 + m as u64),
            rand_t(vec![n, k], dt, 91),
        );
        let want = ops::matmul_t(&xs, &ws, None).unwrap();
        let (xg, wg) = (xs.to_device(dev).unwrap(), ws.to_device(dev).unwrap());
        let (Storage::Cuda(xb), Storage::Cuda(wb)) = (xg.storage(), wg.storage()) else {
            unreachable!("moved to the GPU")
        };
        let (mut ran, mut runnable) = (0, false);
        for (v, var) in SKINNY_VARIANTS.iter().enumerate() {
            for splits in SKINNY_SPLITS {
                if !skinny_takes((m, n, k), v, splits) {
                    continue;
                }
                if resources[v].is_none() {
                    // The device does not run it: an error, not a launch.
                    assert!(skinny_matmul(xb, wb, (m, n, k), v, splits).is_err());
                    continue;
                }
                runnable = true;
                let y = skinny_matmul(xb, wb, (m, n, k), v, splits).unwrap();
                let got = Tensor::new(vec![m, n], Storage::Cuda(y)).unwrap();
                close(
                    &format!(
                        "skinny gemm {} {m}x{k} @ {n}x{k}^T, k in {splits}",
                        var.name
                    ),
                    &got,
                    &want,
                    tol(dt),
                );
                ran += 1;
            }
        }
        assert!(
            ran >= 4 || !runnable,
            "{m}x{k} @ {n}x{k}^T: only {ran} skinny GEMMs fit"
        );
    }
    // A shape it does not take is an error, not a launch.
    let (xs, ws) = (rand_t(vec![4, 96], dt, 1), rand_t(vec![8, 96], dt, 2));
    let (xg, wg) = (xs.to_device(dev).unwrap(), ws.to_device(dev).unwrap());
    let (Storage::Cuda(xb), Storage::Cuda(wb)) = (xg.storage(), wg.storage()) else {
        unreachable!("moved to the GPU")
    };
    assert!(skinny_matmul(xb, wb, (4, 8, 96), 0, 1).is_err());
}

/// The persistent-step probe (`tessera bench persistent`) computes what its reference does: each
/// segment's outputs from the one before, so a grid barrier that let a block start early, a
/// line read from the wrong slot of its ring or, on two GPUs, an exchange that took a stale
/// value would show. Two layers of a small shape, on one GPU and (where there are two) two.
#[test]
fn the_persistent_probe_computes_its_chain_of_projections() {
    let Some((_, _held)) = gpu() else { return };
    let gpus = tessera_tensor::cuda::test_gpus(2);
    for n in 1..=gpus {
        let shape = tessera_tensor::cuda::StepShape {
            hidden: 512,
            intermediate: 1024,
            kv_heads: 2,
            layers: 2,
            vocab: 1000,
            tp: n,
        };
        let ordinals: Vec<usize> = (0..n).collect();
        let want = tessera_tensor::cuda::probe_reference(&ordinals, shape);
        use tessera_tensor::cuda::Ahead;
        for (ring, ahead) in [
            (8, Ahead::No),
            (8, Ahead::Always),
            (8, Ahead::ToExchange),
            (24, Ahead::Always),
        ] {
            let got = tessera_tensor::cuda::probe_outputs(&ordinals, shape, ring, ahead).unwrap();
            for (rank, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.len(), w.len());
                let worst = g
                    .iter()
                    .zip(w)
                    .map(|(a, b)| (a - b).abs() / (1e-3 + b.abs()))
                    .fold(0.0f32, f32::max);
                assert!(
                    worst < 1e-3,
                    "{n} GPU(s), ring {ring}, {ahead:?}, rank {rank}: relative error {worst}"
                );
                println!("persistent probe, {n} GPU(s), ring {ring}, {ahead:?}, rank {rank}: relative error {worst:.2e} over {} outputs", g.len());
            }
        }
    }
}

//! `tessera bench gemv` and `tessera bench gemm`: the decode GEMV kernels against cuBLAS, and
//! cuBLAS's GEMM against the cuBLASLt candidates, at the shapes of a decode step. Weights rotate
//! through copies larger than L2, as in a real step where every weight is read once.

use super::{dev_err, CudaBuf, GpuDevice, GEMV_VARIANTS};
use crate::{DType, TensorError};

/// One kernel at one shape: mean microseconds per call and the weight bytes it read per second.
pub struct GemvTiming {
    pub kernel: String,
    /// The kernel a decode step uses at this shape.
    pub chosen: bool,
    pub n: usize,
    pub k: usize,
    pub gated: bool,
    pub micros: f64,
    pub bytes_per_sec: f64,
    /// Blocks of the kernel a multiprocessor holds at once (the occupancy API, with the kernel's
    /// shared memory); none for cuBLAS.
    pub blocks_per_sm: Option<u32>,
}

/// Weight copies that hold 4 x 50 MB of L2 between two reads of the same one.
fn copies_for(bytes: usize) -> usize {
    (200_000_000usize).div_ceil(bytes).max(2)
}

/// Mean seconds per call of `launch(copy)` over the rotating weight copies, after one untimed
/// round.
fn mean_secs(
    dev: &GpuDevice,
    copies: usize,
    launch: &mut dyn FnMut(usize) -> Result<(), TensorError>,
) -> Result<f64, TensorError> {
    let e = |x| dev_err(dev.ordinal, x);
    let reps = 3 * copies.max(10);
    for c in 0..copies {
        launch(c)?;
    }
    let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = dev.ctx.new_event(timed).map_err(e)?;
    let end = dev.ctx.new_event(timed).map_err(e)?;
    start.record(&dev.stream).map_err(e)?;
    for r in 0..reps {
        launch(r % copies)?;
    }
    end.record(&dev.stream).map_err(e)?;
    end.synchronize().map_err(e)?;
    Ok(start.elapsed_ms(&end).map_err(e)? as f64 / 1e3 / reps as f64)
}

/// Times every GEMV variant (and cuBLAS) for each `(n, k, gated)`: `y[n] = x[k] W[n, k]^T`, or
/// for gated shapes the gated MLP over `W[2n, k]`.
pub fn bench_gemv(
    ordinal: usize,
    shapes: &[(usize, usize, bool)],
) -> Result<Vec<GemvTiming>, TensorError> {
    let dev = GpuDevice::get(ordinal)?;
    let mut out = Vec::new();
    for &(n, k, gated) in shapes {
        let rows = if gated { 2 * n } else { n };
        let bytes = rows * k * 2;
        let copies = copies_for(bytes);
        let ws: Vec<CudaBuf> = (0..copies)
            .map(|c| super::random(&dev, DType::BF16, rows * k, 11 + c as u64, 0.03, 0.0))
            .collect::<Result<_, _>>()?;
        let x = super::random(&dev, DType::BF16, k, 5, 1.0, 0.0)?;
        let y = CudaBuf::alloc(&dev, DType::BF16, rows)?;
        let chosen = dev.gemv(gated).v.name;
        let mut time =
            |name: String,
             blocks_per_sm: Option<u32>,
             launch: &mut dyn FnMut(&CudaBuf) -> Result<(), TensorError>| {
                let secs = mean_secs(&dev, copies, &mut |c| launch(&ws[c]))?;
                out.push(GemvTiming {
                    chosen: name == chosen,
                    kernel: name,
                    n,
                    k,
                    gated,
                    micros: secs * 1e6,
                    bytes_per_sec: bytes as f64 / secs,
                    blocks_per_sm,
                });
                Ok::<(), TensorError>(())
            };
        for v in GEMV_VARIANTS.iter().filter(|v| v.gated == gated) {
            let kern = &dev.gemv[v.name];
            let cfg = kern.config(n);
            let occupancy = kern
                .f
                .occupancy_max_active_blocks_per_multiprocessor(
                    cfg.block_dim.0,
                    cfg.shared_mem_bytes as usize,
                    None,
                )
                .map_err(|e| dev_err(dev.ordinal, e))?;
            time(v.name.to_string(), Some(occupancy), &mut |w| {
                super::ops::launch_gemv_kernel(&dev, kern, &x, w, &y, (n, k), None)
            })?;
        }
        let mut ybig = CudaBuf::alloc(&dev, DType::BF16, rows)?;
        time("cublas".to_string(), None, &mut |w| {
            super::ops::cublas_gemm(&dev, &x, w, &mut ybig, (1, rows, k))
        })?;
    }
    Ok(out)
}

/// One GEMM kernel at one shape `y[m, n] = x[m, k] w[n, k]^T`: mean microseconds per call and the
/// weight bytes read per second.
pub struct GemmTiming {
    /// `cublas` (cublasGemmEx, its heuristic's kernel), `<variant> sN` (the skinny tensor-core GEMM
    /// of `kernels.cu`, k split in N) or `lt N` (cuBLASLt's candidate N); `lt N from L2` for the
    /// fastest candidate timed again with its weights resident in L2 (`l2_resident`).
    pub kernel: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub micros: f64,
    pub bytes_per_sec: f64,
    /// Timed on one copy of the weights, which stays in L2 where it fits: a bound on what the
    /// kernel does without waiting for memory, not a contender.
    pub l2_resident: bool,
}

/// Times cuBLAS's GEMM and every cuBLASLt candidate for each bf16 shape `(m, n, k)`.
pub fn bench_gemm(
    ordinal: usize,
    shapes: &[(usize, usize, usize)],
) -> Result<Vec<GemmTiming>, TensorError> {
    let dev = GpuDevice::get(ordinal)?;
    let mut lt = super::lt::Lt::new(dev.stream.clone()).map_err(|x| dev_err(ordinal, x))?;
    let mut out = Vec::new();
    for &(m, n, k) in shapes {
        let bytes = n * k * 2;
        let copies = copies_for(bytes);
        let ws: Vec<CudaBuf> = (0..copies)
            .map(|c| super::random(&dev, DType::BF16, n * k, 11 + c as u64, 0.03, 0.0))
            .collect::<Result<_, _>>()?;
        let x = super::random(&dev, DType::BF16, m * k, 5, 1.0, 0.0)?;
        let mut y = CudaBuf::alloc(&dev, DType::BF16, m * n)?;
        let mut push = |kernel: String, secs: f64, l2_resident: bool| {
            out.push(GemmTiming {
                kernel,
                m,
                n,
                k,
                micros: secs * 1e6,
                bytes_per_sec: bytes as f64 / secs,
                l2_resident,
            })
        };
        let secs = mean_secs(&dev, copies, &mut |c| {
            super::ops::cublas_gemm(&dev, &x, &ws[c], &mut y, (m, n, k))
        })?;
        push("cublas".into(), secs, false);
        for (v, var) in super::SKINNY_VARIANTS.iter().enumerate() {
            for splits in super::SKINNY_SPLITS {
                if !super::ops::skinny_takes((m, n, k), v, splits) || dev.skinny_fns[v].is_none() {
                    continue;
                }
                let secs = mean_secs(&dev, copies, &mut |c| {
                    super::ops::skinny_gemm(&dev, &x, &ws[c], &y, (m, n, k), v, splits)
                })?;
                push(format!("{} s{splits}", var.name), secs, false);
            }
        }
        let candidates = lt
            .plan(m, n, k)
            .map_err(|x| dev_err(ordinal, x))?
            .algos
            .len();
        let (xp, yp) = (super::ops::dptr(&x), super::ops::dptr(&y));
        let wp: Vec<u64> = ws.iter().map(super::ops::dptr).collect();
        let mut best: Option<(usize, f64)> = None;
        for a in 0..candidates {
            // A candidate that fails to run is left out (as the tuner leaves it out).
            let Ok(secs) = mean_secs(&dev, copies, &mut |c| {
                lt.run((m, n, k), a, wp[c], xp, yp)
                    .map_err(|x| dev_err(ordinal, x))
            }) else {
                continue;
            };
            push(format!("lt {a}"), secs, false);
            if best.is_none_or(|(_, s)| secs < s) {
                best = Some((a, secs));
            }
        }
        // The fastest candidate again on one copy of the weights, which stay in L2 where they
        // fit: little or no faster means the GEMM is not waiting for memory (at 64 rows of tp
        // 2's qkv and o on an H200: 9.6-9.7 and 6.9-9.9 µs from L2 against 10.5-10.6 and
        // 7.7-8.2 from memory).
        if let Some((a, _)) = best {
            let secs = mean_secs(&dev, 1, &mut |_| {
                lt.run((m, n, k), a, wp[0], xp, yp)
                    .map_err(|x| dev_err(ordinal, x))
            })?;
            push(format!("lt {a} from L2"), secs, true);
        }
    }
    Ok(out)
}

/// Whether the first kernel of one cuBLASLt candidate waits for the kernel before it
/// ([`probe_gemm_kernels`]).
pub struct GemmProbe {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The candidate's place in cuBLASLt's list (its heuristic's first is 0).
    pub candidate: usize,
    /// The first kernel's name (`None`: the probe could not tell, e.g. the GEMM's first node is
    /// not a kernel).
    pub kernel: Option<String>,
    /// Whether it read its input as written after it started (it waits for the kernel before
    /// it): only such a kernel may be given a programmatic edge in a captured step.
    pub waits: bool,
}

/// Probes, for each bf16 shape `(m, n, k)`, the first kernel of every cuBLASLt candidate: does it
/// wait for the kernel before it (`griddepcontrol.wait`) before it reads its input? (The module
/// notes of `pdl_probe` say how; a candidate that fails to run is left out.)
pub fn probe_gemm_kernels(
    ordinal: usize,
    shapes: &[(usize, usize, usize)],
) -> Result<Vec<GemmProbe>, TensorError> {
    let dev = GpuDevice::get(ordinal)?;
    let mut lt = super::lt::Lt::new(dev.stream.clone()).map_err(|x| dev_err(ordinal, x))?;
    let mut out = Vec::new();
    for &(m, n, k) in shapes {
        if !k.is_multiple_of(8) {
            return Err(dev_err(ordinal, "the probe takes k a multiple of 8"));
        }
        let w = super::random(&dev, DType::BF16, n * k, 11, 0.03, 0.0)?;
        let candidates = lt
            .plan(m, n, k)
            .map_err(|x| dev_err(ordinal, x))?
            .algos
            .len();
        for candidate in 0..candidates {
            let Ok(found) =
                super::pdl_probe::probe(&dev, &lt, (m, n, k), candidate, super::ops::dptr(&w))
            else {
                continue;
            };
            out.push(GemmProbe {
                m,
                n,
                k,
                candidate,
                waits: found.as_ref().is_some_and(|p| p.waits),
                kernel: found.map(|p| p.name),
            });
        }
    }
    Ok(out)
}

/// One decode attention kernel at one shape: the plan it ran (heads a block, split length), mean
/// microseconds per call and the K/V cache bytes read per second.
pub struct AttentionTiming {
    /// `auto` (the shape's choice), `grouped`, `by_head` or `per_head` (forced).
    pub kernel: &'static str,
    pub plan: String,
    pub micros: f64,
    pub bytes_per_sec: f64,
}

/// Times the decode attention of `batch` sequences with `hq` query and `hkv` KV heads of `hd`
/// over `keys` cached positions (bf16), as the shape picks it and with each kernel forced. The
/// caches rotate through copies larger than L2, as in a step where every layer's cache is read
/// once.
pub fn bench_decode_attention(
    ordinal: usize,
    (batch, hq, hkv, hd, keys): (usize, usize, usize, usize, usize),
) -> Result<Vec<AttentionTiming>, TensorError> {
    use super::ops::{device_decode_plan, force_decode_kernel, DecodeKernel, DecodeRun};
    let dev = GpuDevice::get(ordinal)?;
    if keys == 0 || hkv == 0 || !hq.is_multiple_of(hkv) {
        return Err(dev_err(
            ordinal,
            "bench attention: keys >= 1, hq a multiple of hkv",
        ));
    }
    let cache = keys * batch * hkv * hd;
    let bytes = 2 * cache * 2;
    let copies = copies_for(bytes);
    let caches: Vec<(CudaBuf, CudaBuf)> = (0..copies)
        .map(|c| {
            Ok((
                super::random(&dev, DType::BF16, cache, 21 + c as u64, 1.0, 0.0)?,
                super::random(&dev, DType::BF16, cache, 51 + c as u64, 1.0, 0.0)?,
            ))
        })
        .collect::<Result<_, TensorError>>()?;
    let qkv = super::random(&dev, DType::BF16, batch * (hq + 2 * hkv) * hd, 7, 1.0, 0.0)?;
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 500000f32.powf(i as f32 / (hd / 2) as f32))
        .collect();
    let scale = 1.0 / (hd as f32).sqrt();
    let kernels = std::iter::once(None).chain(DecodeKernel::ALL.map(Some));
    let mut out = Vec::new();
    for forced in kernels {
        let kernel = forced.map_or("auto", DecodeKernel::name);
        force_decode_kernel(forced);
        // The plan the call below runs (a forced kernel that does not apply falls back).
        let (p, _) = device_decode_plan(&dev, DType::BF16, keys, batch, hq, hkv, hd);
        let mut plan = format!("{}, {} split(s)", p.run.label(), keys.div_ceil(p.per));
        let resident = match p.run {
            DecodeRun::TensorCores(gb) => dev.mma_decode_resident(hd, gb),
            _ => None,
        };
        if let Some((r, by_driver)) = resident {
            let by = match by_driver {
                true => "driver",
                false => "shared memory",
            };
            plan.push_str(&format!(", {r} blocks/SM ({by})"));
        }
        let secs = mean_secs(&dev, copies, &mut |c| {
            let (k, v) = &caches[c];
            super::ops::decode_attention(
                &qkv,
                k,
                v,
                batch,
                hq,
                hkv,
                hd,
                keys - 1,
                &inv,
                None,
                scale,
            )
            .map(drop)
        });
        force_decode_kernel(None);
        let secs = secs?;
        out.push(AttentionTiming {
            kernel,
            plan,
            micros: secs * 1e6,
            bytes_per_sec: bytes as f64 / secs,
        });
    }
    Ok(out)
}

/// The prefill attention of one sequence at one length, and the GPU's bf16 GEMM rate beside it.
pub struct PrefillTiming {
    /// Queries (and keys: a prompt attends causally to itself).
    pub tokens: usize,
    /// The kernel: `auto` (as the length takes it), or on tensor cores with 16 or 32 queries a
    /// warp forced (`16 queries a warp`; where the 32 form is not loaded it runs 16).
    pub kernel: String,
    /// What `auto` ran (`ops::prefill_attention_plan`): `tensor cores, N queries a warp`, `CUDA
    /// cores` (the tiled kernel) or `a query at a time`.
    pub plan: String,
    pub micros: f64,
    /// FLOPs of causal attention a second: 4 hd per query-key pair a query head (q·k and p·v),
    /// over the pairs the causal mask keeps (t (t + 1) / 2 a head), as flash attention counts.
    pub flops_per_sec: f64,
}

/// Times the prefill attention (`ops::attention`, bf16, causal from position 0) of `t` tokens
/// with `hq` query and `hkv` KV heads of `hd`, for each `t` of `tokens`: as the length takes it,
/// then with the tensor-core kernel's 16 and 32 queries a warp forced (where it runs), and the
/// warpgroup kernel's 64 and 128 queries a block where it loaded (sm_90); each row with the plan
/// that ran.
pub fn bench_prefill_attention(
    ordinal: usize,
    tokens: &[usize],
    (hq, hkv, hd): (usize, usize, usize),
) -> Result<Vec<PrefillTiming>, TensorError> {
    use super::ops::force_prefill_tiles;
    let dev = GpuDevice::get(ordinal)?;
    if hkv == 0 || !hq.is_multiple_of(hkv) || hd > super::ops::ATTN_MAX_HD {
        return Err(dev_err(
            ordinal,
            "bench attention --prefill: hq a multiple of hkv, head dim at most 256",
        ));
    }
    let mut out = Vec::new();
    for &t in tokens {
        let q = super::random(&dev, DType::BF16, t * hq * hd, 3, 1.0, 0.0)?;
        let k = super::random(&dev, DType::BF16, t * hkv * hd, 5, 1.0, 0.0)?;
        let v = super::random(&dev, DType::BF16, t * hkv * hd, 9, 1.0, 0.0)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let plan = super::ops::prefill_attention_plan(ordinal, t, hq, hd, DType::BF16)?;
        let wg = dev.wg_attention.is_some() && (hd == 64 || hd == 128);
        let forced = match (plan.contains("tensor cores"), wg) {
            (true, true) => vec![None, Some(1), Some(2), Some(3), Some(4)],
            (true, false) => vec![None, Some(1), Some(2)],
            (false, _) => vec![None],
        };
        let pairs = (t * (t + 1) / 2) as f64;
        for mt in forced {
            force_prefill_tiles(mt);
            // The plan that runs under the force (the row's own, not the length's).
            let plan = super::ops::prefill_attention_plan(ordinal, t, hq, hd, DType::BF16);
            let secs = mean_secs(&dev, 2, &mut |_| {
                super::ops::attention(&q, &k, &v, t, hq, hkv, hd, 0, None, scale).map(drop)
            });
            force_prefill_tiles(None);
            let (plan, secs) = (plan?, secs?);
            out.push(PrefillTiming {
                tokens: t,
                kernel: match mt {
                    None => "auto".into(),
                    Some(m @ (3 | 4)) => format!("warpgroup, {} a block", 64 * (m - 2)),
                    Some(m) => format!("{} queries a warp", 16 * m),
                },
                plan,
                micros: secs * 1e6,
                flops_per_sec: 4.0 * (hd * hq) as f64 * pairs / secs,
            });
        }
    }
    Ok(out)
}

/// The GPU's bf16 GEMM rate (FLOP/s): cuBLAS at `m = n = k = size` over random values, the
/// ceiling of a compute-bound kernel in the same run.
pub fn gemm_rate(ordinal: usize, size: usize) -> Result<f64, TensorError> {
    let dev = GpuDevice::get(ordinal)?;
    let a = super::random(&dev, DType::BF16, size * size, 13, 1.0, 0.0)?;
    let b = super::random(&dev, DType::BF16, size * size, 17, 0.03, 0.0)?;
    let mut c = CudaBuf::alloc(&dev, DType::BF16, size * size)?;
    let secs = mean_secs(&dev, 1, &mut |_| {
        super::ops::cublas_gemm(&dev, &a, &b, &mut c, (size, size, size))
    })?;
    Ok(2.0 * (size as f64).powi(3) / secs)
}

//! `tessera bench gemv`: the decode GEMV kernels against cuBLAS and the copy bandwidth, at the
//! shapes of a decode step. Weights rotate through copies larger than L2, as in a real step where
//! every weight is read once.

use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use half::bf16;

use super::{dev_err, CudaBuf, CudaData, GpuDevice, GEMV_VARIANTS};
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
}

/// Times every GEMV variant (and cuBLAS) for each `(n, k, gated)`: `y[n] = x[k] W[n, k]^T`, or
/// for gated shapes the gated MLP over `W[2n, k]`.
pub fn bench_gemv(
    ordinal: usize,
    shapes: &[(usize, usize, bool)],
) -> Result<Vec<GemvTiming>, TensorError> {
    let dev = GpuDevice::get(ordinal)?;
    let e = |x| dev_err(ordinal, x);
    let mut out = Vec::new();
    for &(n, k, gated) in shapes {
        let rows = if gated { 2 * n } else { n };
        let bytes = rows * k * 2;
        // Copies enough to hold 4 x 50 MB of L2 between two reads of the same one.
        let copies = (200_000_000usize).div_ceil(bytes).max(2);
        let ws: Vec<CudaBuf> = (0..copies)
            .map(|c| super::random(&dev, DType::BF16, rows * k, 11 + c as u64, 0.03, 0.0))
            .collect::<Result<_, _>>()?;
        let x = super::random(&dev, DType::BF16, k, 5, 1.0, 0.0)?;
        let y = CudaBuf::alloc(&dev, DType::BF16, rows)?;
        let chosen = dev.gemv(gated).v.name;
        let mut time =
            |name: String, launch: &mut dyn FnMut(&CudaBuf) -> Result<(), TensorError>| {
                let reps = 3 * copies.max(10);
                for w in &ws {
                    launch(w)?;
                }
                let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
                let start = dev.ctx.new_event(timed).map_err(e)?;
                let end = dev.ctx.new_event(timed).map_err(e)?;
                start.record(&dev.stream).map_err(e)?;
                for r in 0..reps {
                    launch(&ws[r % copies])?;
                }
                end.record(&dev.stream).map_err(e)?;
                end.synchronize().map_err(e)?;
                let secs = start.elapsed_ms(&end).map_err(e)? as f64 / 1e3 / reps as f64;
                out.push(GemvTiming {
                    chosen: name == chosen,
                    kernel: name,
                    n,
                    k,
                    gated,
                    micros: secs * 1e6,
                    bytes_per_sec: bytes as f64 / secs,
                });
                Ok::<(), TensorError>(())
            };
        for v in GEMV_VARIANTS.iter().filter(|v| v.gated == gated) {
            let kern = &dev.gemv[v.name];
            time(v.name.to_string(), &mut |w| {
                super::ops::launch_gemv_kernel(&dev, kern, &x, w, &y, (n, k), None)
            })?;
        }
        let mut ybig = CudaBuf::alloc(&dev, DType::BF16, rows)?;
        time("cublas".to_string(), &mut |w| {
            let blas = dev.blas.lock().unwrap_or_else(|p| p.into_inner());
            let (CudaData::BF16(a), CudaData::BF16(b), CudaData::BF16(c)) =
                (&w.data, &x.data, &mut ybig.data)
            else {
                unreachable!("bf16 buffers")
            };
            unsafe {
                blas.gemm(
                    GemmConfig {
                        transa: cublasOperation_t::CUBLAS_OP_T,
                        transb: cublasOperation_t::CUBLAS_OP_N,
                        m: rows as i32,
                        n: 1,
                        k: k as i32,
                        alpha: bf16::ONE,
                        lda: k as i32,
                        ldb: k as i32,
                        beta: bf16::ZERO,
                        ldc: rows as i32,
                    },
                    a,
                    b,
                    c,
                )
            }
            .map_err(|err| dev_err(ordinal, format!("cuBLAS: {err:?}")))
        })?;
    }
    Ok(out)
}

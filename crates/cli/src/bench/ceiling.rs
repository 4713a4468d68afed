//! Ceilings measured on this machine: the FMA peak of every core (a register-only loop of
//! independent fused multiply-adds, AVX-512 and AVX2 where the CPU has them) and memory read
//! bandwidth (a parallel sum over a buffer far larger than the caches).

use rayon::prelude::*;

use super::median_secs;

/// Peak f32 FLOP/s with all rayon threads, per vector width: `(name, flop_per_s)`.
pub fn fma_peaks() -> Vec<(&'static str, f64)> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            out.push(("avx512 fma", measure(x86::fma512)));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            out.push(("avx2 fma", measure(x86::fma256)));
        }
    }
    out
}

/// FLOP/s of `kernel(iters) -> flops` run on every thread at once.
fn measure(kernel: fn(u64) -> f64) -> f64 {
    let threads = rayon::current_num_threads();
    let iters = 20_000_000;
    let mut flops = 0.0;
    let secs = median_secs(3, || {
        flops = (0..threads).into_par_iter().map(|_| kernel(iters)).sum();
    });
    flops / secs
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub fn fma512(iters: u64) -> f64 {
        // SAFETY: called only after avx512f was detected.
        unsafe { fma512_inner(iters) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn fma512_inner(iters: u64) -> f64 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(1.0); 12];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_fmadd_ps(*r, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for r in acc {
            s = _mm512_add_ps(s, r);
        }
        std::hint::black_box(_mm512_reduce_add_ps(s));
        (iters * 12 * 16 * 2) as f64
    }

    pub fn fma256(iters: u64) -> f64 {
        // SAFETY: called only after avx2 and fma were detected.
        unsafe { fma256_inner(iters) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma256_inner(iters: u64) -> f64 {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(1.0); 12];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm256_fmadd_ps(*r, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for r in acc {
            s = _mm256_add_ps(s, r);
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        std::hint::black_box(lanes);
        (iters * 12 * 8 * 2) as f64
    }
}

/// Sum with 16 independent accumulators, so that the loop is bound by loads, not by the latency of
/// one chain of adds.
fn lane_sum(c: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    for chunk in c.chunks_exact(16) {
        for (l, x) in lanes.iter_mut().zip(chunk) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + c.chunks_exact(16).remainder().iter().sum::<f32>()
}

/// Memory read bandwidth in bytes/s (parallel sum over 1 GiB, twice the last-level cache here).
pub fn read_bandwidth() -> f64 {
    let n = 1 << 28; // 256 Mi f32 = 1 GiB
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i & 7) as f32).collect();
    let secs = median_secs(3, || {
        let s: f32 = buf.par_chunks(1 << 16).map(lane_sum).sum();
        std::hint::black_box(s);
    });
    (n * 4) as f64 / secs
}

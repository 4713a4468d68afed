//! GPU implementations of the ops, called by `crate::ops` when their inputs live on a GPU.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{dev_err, CudaBuf, CudaData, GpuDevice};
use crate::TensorError;

fn push<'a>(b: &mut LaunchArgs<'a>, buf: &'a CudaBuf) {
    match &buf.data {
        CudaData::F32(s) => b.arg(s),
        CudaData::BF16(s) => b.arg(s),
    };
}

fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 132 * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn launched(
    dev: &GpuDevice,
    r: Result<
        Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
        cudarc::driver::DriverError,
    >,
) -> Result<(), TensorError> {
    r.map(|_| ()).map_err(|e| dev_err(dev.ordinal, e))
}

fn same_dev(a: &CudaBuf, b: &CudaBuf) -> Result<(), TensorError> {
    if a.dev.ordinal != b.dev.ordinal || a.dtype() != b.dtype() {
        return Err(dev_err(
            a.dev.ordinal,
            format!(
                "operands on cuda:{} ({}) and cuda:{} ({})",
                a.dev.ordinal,
                a.dtype(),
                b.dev.ordinal,
                b.dtype()
            ),
        ));
    }
    Ok(())
}

/// `y[m, n] = x[m, k] @ w[n, k]^T (+ b)` through cuBLAS (f32 accumulation).
pub fn matmul_t(
    x: &CudaBuf,
    m: usize,
    k: usize,
    w: &CudaBuf,
    n: usize,
    bias: Option<&CudaBuf>,
) -> Result<CudaBuf, TensorError> {
    same_dev(x, w)?;
    let dev = x.dev.clone();
    let mut y = CudaBuf::alloc(&dev, x.dtype(), m * n)?;
    if x.dtype() == crate::DType::BF16
        && (1..=super::GEMV_MAX_ROWS).contains(&m)
        && k.is_multiple_of(8)
    {
        let (nn, kk) = (n as i32, k as i32);
        let mut l = dev.stream.launch_builder(dev.gemv(m));
        push(&mut l, x);
        push(&mut l, w);
        push(&mut l, &y);
        l.arg(&nn).arg(&kk);
        // One warp per output feature, 8 warps a block.
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launched(&dev, unsafe { l.launch(cfg) })?;
        if let Some(b) = bias {
            add_bias(&dev, &y, b, m, n)?;
        }
        return Ok(y);
    }
    // Row-major y = x w^T is column-major y^T = w^T(col) ... : C(n x m) = op(A) B with A = w viewed
    // column-major as k x n (so transposed), B = x viewed column-major as k x m.
    let blas = dev.blas.lock().unwrap_or_else(|e| e.into_inner());
    let r = match (&w.data, &x.data, &mut y.data) {
        (CudaData::F32(a), CudaData::F32(b), CudaData::F32(c)) => unsafe {
            blas.gemm(
                GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: n as i32,
                    n: m as i32,
                    k: k as i32,
                    alpha: 1.0f32,
                    lda: k as i32,
                    ldb: k as i32,
                    beta: 0.0f32,
                    ldc: n as i32,
                },
                a,
                b,
                c,
            )
        },
        (CudaData::BF16(a), CudaData::BF16(b), CudaData::BF16(c)) => unsafe {
            blas.gemm(
                GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: n as i32,
                    n: m as i32,
                    k: k as i32,
                    alpha: bf16::ONE,
                    lda: k as i32,
                    ldb: k as i32,
                    beta: bf16::ZERO,
                    ldc: n as i32,
                },
                a,
                b,
                c,
            )
        },
        _ => return Err(dev_err(dev.ordinal, "matmul operands differ in dtype")),
    };
    drop(blas);
    r.map_err(|e| dev_err(dev.ordinal, format!("cuBLAS: {e:?}")))?;
    if let Some(b) = bias {
        add_bias(&dev, &y, b, m, n)?;
    }
    Ok(y)
}

fn add_bias(
    dev: &GpuDevice,
    y: &CudaBuf,
    b: &CudaBuf,
    m: usize,
    n: usize,
) -> Result<(), TensorError> {
    same_dev(y, b)?;
    let (rows, cols) = (m as i64, n as i32);
    let mut l = dev.stream.launch_builder(dev.func("add_bias", y.dtype()));
    push(&mut l, y);
    push(&mut l, b);
    l.arg(&rows).arg(&cols);
    launched(dev, unsafe { l.launch(grid_1d(m * n)) })
}

pub fn rms_norm(
    x: &CudaBuf,
    w: &CudaBuf,
    rows: usize,
    h: usize,
    eps: f32,
) -> Result<CudaBuf, TensorError> {
    same_dev(x, w)?;
    let dev = x.dev.clone();
    let y = CudaBuf::alloc(&dev, x.dtype(), rows * h)?;
    let hh = h as i32;
    let mut l = dev.stream.launch_builder(dev.func("rms_norm", x.dtype()));
    push(&mut l, x);
    push(&mut l, w);
    push(&mut l, &y);
    l.arg(&hh).arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    launched(&dev, unsafe { l.launch(cfg) })?;
    Ok(y)
}

/// Rotates `x` `[t, heads, hd]` in place; token i at position `start + i`.
pub fn rope(
    x: &CudaBuf,
    t: usize,
    heads: usize,
    hd: usize,
    start: usize,
    inv_freq: &[f32],
) -> Result<(), TensorError> {
    let dev = x.dev.clone();
    let f = dev.table(inv_freq)?;
    let (h, d, s) = (heads as i32, hd as i32, start as i32);
    let io = dev.capturing();
    let null = 0u64;
    let mut l = dev.stream.launch_builder(dev.func("rope", x.dtype()));
    push(&mut l, x);
    l.arg(f.as_ref()).arg(&h).arg(&d).arg(&s);
    match &io {
        Some(io) => l.arg(&io.pos),
        None => l.arg(&null),
    };
    let cfg = LaunchConfig {
        grid_dim: (t as u32, heads as u32, 1),
        block_dim: ((hd / 2).clamp(32, 256) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    launched(&dev, unsafe { l.launch(cfg) })
}

pub fn silu_mul(g: &CudaBuf, u: &CudaBuf) -> Result<CudaBuf, TensorError> {
    same_dev(g, u)?;
    let dev = g.dev.clone();
    let out = CudaBuf::alloc(&dev, g.dtype(), g.len())?;
    let n = g.len() as i64;
    let mut l = dev.stream.launch_builder(dev.func("silu_mul", g.dtype()));
    push(&mut l, g);
    push(&mut l, u);
    push(&mut l, &out);
    l.arg(&n);
    launched(&dev, unsafe { l.launch(grid_1d(g.len())) })?;
    Ok(out)
}

pub fn add_inplace(a: &CudaBuf, b: &CudaBuf) -> Result<(), TensorError> {
    same_dev(a, b)?;
    let dev = a.dev.clone();
    let n = a.len() as i64;
    let mut l = dev
        .stream
        .launch_builder(dev.func("add_inplace", a.dtype()));
    push(&mut l, a);
    push(&mut l, b);
    l.arg(&n);
    launched(&dev, unsafe { l.launch(grid_1d(a.len())) })
}

pub fn embedding(
    table: &CudaBuf,
    rows: usize,
    h: usize,
    tokens: &[u32],
    vstart: usize,
) -> Result<CudaBuf, TensorError> {
    let dev = table.dev.clone();
    let io = dev.capturing();
    let uploaded;
    let tok = match &io {
        // Captured steps read their tokens from the graph's input buffer.
        Some(io) if io.tokens.len() == tokens.len() => &io.tokens,
        Some(_) => {
            return Err(dev_err(
                dev.ordinal,
                "captured step got a different batch size",
            ))
        }
        None => {
            uploaded = dev
                .stream
                .clone_htod(tokens)
                .map_err(|e| dev_err(dev.ordinal, e))?;
            &uploaded
        }
    };
    let out = CudaBuf::alloc(&dev, table.dtype(), tokens.len() * h)?;
    let (hh, vs, r) = (h as i32, vstart as i32, rows as i32);
    let mut l = dev
        .stream
        .launch_builder(dev.func("embedding", table.dtype()));
    push(&mut l, table);
    l.arg(tok);
    push(&mut l, &out);
    l.arg(&hh).arg(&vs).arg(&r);
    let cfg = LaunchConfig {
        grid_dim: (tokens.len() as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    launched(&dev, unsafe { l.launch(cfg) })?;
    Ok(out)
}

/// Largest number of keys one attention block holds scores for (dynamic shared memory, 48 KiB).
pub const MAX_ATTENTION_KEYS: usize = 12 * 1024 - 64;

#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    t: usize,
    hq: usize,
    hkv: usize,
    hd: usize,
    start: usize,
    window: Option<usize>,
    scale: f32,
) -> Result<CudaBuf, TensorError> {
    same_dev(q, k)?;
    same_dev(q, v)?;
    let dev = q.dev.clone();
    let io = dev.capturing();
    // A captured step reads its position on the device, so its scores buffer must hold the whole
    // cache.
    let keys = if io.is_some() {
        k.len() / (hkv * hd)
    } else {
        start + t
    };
    if keys > MAX_ATTENTION_KEYS {
        return Err(dev_err(dev.ordinal, format!("the CUDA attention kernel holds at most {MAX_ATTENTION_KEYS} positions, {keys} asked")));
    }
    let out = CudaBuf::alloc(&dev, q.dtype(), t * hq * hd)?;
    let (a, b, c, s, w) = (
        hq as i32,
        hkv as i32,
        hd as i32,
        start as i32,
        window.unwrap_or(0) as i32,
    );
    let mut l = dev.stream.launch_builder(dev.func("attention", q.dtype()));
    push(&mut l, q);
    push(&mut l, k);
    push(&mut l, v);
    push(&mut l, &out);
    l.arg(&a).arg(&b).arg(&c).arg(&s).arg(&w).arg(&scale);
    let null = 0u64;
    match &io {
        Some(io) => l.arg(&io.pos),
        None => l.arg(&null),
    };
    let cfg = LaunchConfig {
        grid_dim: (t as u32, hq as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: (keys * 4) as u32,
    };
    launched(&dev, unsafe { l.launch(cfg) })?;
    Ok(out)
}

/// Random values `offset + uniform(-scale, scale)`, made on the device from `seed`.
pub fn random(
    dev: &Arc<GpuDevice>,
    dtype: crate::DType,
    n: usize,
    seed: u64,
    scale: f32,
    offset: f32,
) -> Result<CudaBuf, TensorError> {
    let out = CudaBuf::alloc(dev, dtype, n)?;
    let nn = n as i64;
    let mut l = dev.stream.launch_builder(dev.func("fill_random", dtype));
    push(&mut l, &out);
    l.arg(&nn).arg(&seed).arg(&scale).arg(&offset);
    launched(dev, unsafe { l.launch(grid_1d(n)) })?;
    Ok(out)
}

/// Per row of `x` `[rows, n]`: (largest value, its index), the lowest index winning a tie.
/// While a step is captured, the pairs go to the graph's output buffers and this returns nothing.
pub fn argmax_rows(x: &CudaBuf, rows: usize, n: usize) -> Result<Vec<(f32, u32)>, TensorError> {
    let dev = x.dev.clone();
    let e = |err| dev_err(dev.ordinal, err);
    let nn = n as i32;
    if let Some(io) = dev.capturing() {
        if io.vals.len() != rows {
            return Err(dev_err(
                dev.ordinal,
                "captured step got a different batch size",
            ));
        }
        let mut l = dev
            .stream
            .launch_builder(dev.func("argmax_rows", x.dtype()));
        push(&mut l, x);
        l.arg(&nn).arg(&io.vals).arg(&io.idx);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        launched(&dev, unsafe { l.launch(cfg) })?;
        return Ok(Vec::new());
    }
    let vals = dev.stream.alloc_zeros::<f32>(rows).map_err(e)?;
    let idx = dev.stream.alloc_zeros::<i32>(rows).map_err(e)?;
    let mut l = dev
        .stream
        .launch_builder(dev.func("argmax_rows", x.dtype()));
    push(&mut l, x);
    l.arg(&nn).arg(&vals).arg(&idx);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    launched(&dev, unsafe { l.launch(cfg) })?;
    let v = dev.stream.clone_dtoh(&vals).map_err(e)?;
    let i = dev.stream.clone_dtoh(&idx).map_err(e)?;
    dev.stream.synchronize().map_err(e)?;
    Ok(v.into_iter().zip(i).map(|(v, i)| (v, i as u32)).collect())
}

/// RoPE on `q` `[t, hq, hd]` in place, and on `k` `[t, hkv, hd]` into the K cache, `v` into the V
/// cache, at positions `start..` (during a capture, at the graph's position): one kernel.
#[allow(clippy::too_many_arguments)]
pub fn rope_append(
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    kc: &CudaBuf,
    vc: &CudaBuf,
    t: usize,
    hq: usize,
    hkv: usize,
    hd: usize,
    start: usize,
    inv_freq: &[f32],
) -> Result<(), TensorError> {
    for b in [k, v, kc, vc] {
        same_dev(q, b)?;
    }
    let dev = q.dev.clone();
    let f = dev.table(inv_freq)?;
    let io = dev.capturing();
    let (a, b, c, s) = (hq as i32, hkv as i32, hd as i32, start as i32);
    let null = 0u64;
    let mut l = dev
        .stream
        .launch_builder(dev.func("rope_append", q.dtype()));
    for buf in [q, k, v, kc, vc] {
        push(&mut l, buf);
    }
    l.arg(f.as_ref()).arg(&a).arg(&b).arg(&c).arg(&s);
    match &io {
        Some(io) => l.arg(&io.pos),
        None => l.arg(&null),
    };
    let cfg = LaunchConfig {
        grid_dim: (t as u32, (hq + hkv) as u32, 1),
        block_dim: ((hd / 2).clamp(32, 256) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    launched(&dev, unsafe { l.launch(cfg) })
}

//! GPU implementations of the ops, called by `crate::ops` when their inputs live on a GPU.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaFunction, LaunchArgs, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{dev_err, CudaBuf, CudaData, GpuDevice};
use crate::TensorError;

/// A null device pointer argument.
static NULL: u64 = 0;

/// The position argument of the kernels that need it: while a step is captured, the graph's
/// position buffer (the kernel reads the position from it), else a null pointer (the kernel takes
/// its `start` argument).
fn push_pos<'a>(l: &mut LaunchArgs<'a>, io: &'a Option<Arc<super::graph::GraphIo>>) {
    match io {
        Some(io) => l.arg(&io.pos),
        None => l.arg(&NULL),
    };
}

fn push<'a>(b: &mut LaunchArgs<'a>, buf: &'a CudaBuf) {
    match &buf.data {
        CudaData::F32(s) => b.arg(&**s),
        CudaData::BF16(s) => b.arg(&**s),
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

/// The raw device address of a buffer (for launches cudarc's builder cannot make).
pub(crate) fn dptr(buf: &CudaBuf) -> u64 {
    use cudarc::driver::DevicePtr;
    let s = &buf.dev.stream;
    match &buf.data {
        CudaData::F32(x) => x.device_ptr(s).0,
        CudaData::BF16(x) => x.device_ptr(s).0,
    }
}

/// Launches a decode GEMV `y[n] = x[k] W^T` with programmatic dependent launch when the device
/// has it on: the kernel starts streaming its weights while the kernel before it finishes.
fn launch_gemv(
    dev: &GpuDevice,
    gated: bool,
    x: &CudaBuf,
    w: &CudaBuf,
    y: &CudaBuf,
    n: usize,
    k: usize,
) -> Result<(), TensorError> {
    launch_gemv_kernel(dev, dev.gemv(gated), x, w, y, (n, k), None)
}

/// One row of bf16 `x[k]` through the named decode GEMV kernel of `GEMV_VARIANTS` (whichever
/// the shape would pick or not): `y[n] = x W[n, k]^T`, or for a gated kernel the gated MLP over
/// `W[2n, k]`. For `tessera bench gemv` and the tests that compare every kernel with the CPU.
pub fn gemv_with(
    variant: &str,
    x: &CudaBuf,
    w: &CudaBuf,
    n: usize,
    k: usize,
) -> Result<CudaBuf, TensorError> {
    same_dev(x, w)?;
    let dev = x.dev.clone();
    let g = dev
        .gemv
        .get(variant)
        .ok_or_else(|| dev_err(dev.ordinal, format!("no GEMV kernel named {variant}")))?;
    let rows = if g.v.gated { 2 * n } else { n };
    if x.dtype() != crate::DType::BF16
        || !k.is_multiple_of(8)
        || x.len() != k
        || w.len() != rows * k
    {
        return Err(dev_err(
            dev.ordinal,
            format!("GEMV {variant} takes bf16 x[{k}] and W[{rows}, {k}], k a multiple of 8"),
        ));
    }
    let y = CudaBuf::alloc(&dev, x.dtype(), n)?;
    launch_gemv_kernel(&dev, g, x, w, &y, (n, k), None)?;
    Ok(y)
}

/// The RMSNorm a fused decode GEMV applies to its input row first: with `add`, `x + delta` is
/// normalised and written to `xo` (the new residual stream).
pub(crate) struct GemvNorm<'a> {
    pub(crate) weight: &'a CudaBuf,
    pub(crate) eps: f32,
    pub(crate) add: Option<(&'a CudaBuf, &'a CudaBuf)>,
}

pub(crate) fn launch_gemv_kernel(
    dev: &GpuDevice,
    g: &super::Gemv,
    x: &CudaBuf,
    w: &CudaBuf,
    y: &CudaBuf,
    (n, k): (usize, usize),
    norm: Option<&GemvNorm>,
) -> Result<(), TensorError> {
    let mut cfg = g.config(n);
    let mut ints = [n as i32, k as i32];
    // Device addresses in the kernel's order: x [, delta, norm weight, xo], w, y.
    let mut ptrs = vec![dptr(x)];
    let mut eps = 0f32;
    let f = match norm {
        None => &g.f,
        Some(nm) => {
            let (d, xo) = nm.add.map_or((0, 0), |(d, xo)| (dptr(d), dptr(xo)));
            ptrs.extend([d, dptr(nm.weight), xo]);
            eps = nm.eps;
            cfg.shared_mem_bytes = (k * 2) as u32;
            if nm.add.is_some() {
                &g.add_norm
            } else {
                &g.norm
            }
        }
    };
    ptrs.extend([dptr(w), dptr(y)]);
    // The fused norm's eps comes between xo and w.
    let at_w = ptrs.len() - 2;
    let (before_w, w_y) = ptrs.split_at_mut(at_w);
    let mut params = raw_params(before_w);
    if norm.is_some() {
        params.push((&mut eps as *mut f32).cast());
    }
    params.extend(raw_params(w_y));
    params.extend(raw_params(&mut ints));
    // SAFETY: the parameters match the GEMV kernels' signatures (x, w, y, n, k, or x, delta,
    // nw, xo, eps, w, y, n, k for the fused norm) and outlive the call; the buffers are live
    // device memory of this context, the shared memory holds the normalised row.
    unsafe { launch_pdl(dev, f, cfg, &mut params) }
}

/// Launches `f` on the device's stream with programmatic dependent launch when the device has it
/// on: the kernel may start while the one before it finishes (and, as most kernels let the next
/// start at once, while the ones before that finish too; the fused all-reduce + norm lets it
/// start only after its own wait). So before its `pdl_wait` it may read
/// only memory no recent kernel writes (weights, constant tables, KV rows of earlier steps) and
/// write nothing: intermediates are reused in stream order (the pool's, a graph's arena), so an
/// early write could land on a buffer a running kernel still reads.
///
/// # Safety
/// `params` point at the kernel's arguments, in its order and of its types, valid for the call.
unsafe fn launch_pdl(
    dev: &GpuDevice,
    f: &cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut std::ffi::c_void],
) -> Result<(), TensorError> {
    // SAFETY: as the caller vouches.
    unsafe { launch_pdl_on(dev, &dev.stream, f, cfg, params) }
}

/// [`launch_pdl`] on another stream of the device's context (a rank's own, where two ranks share
/// a GPU in a test).
///
/// # Safety
/// As [`launch_pdl`]; `stream` belongs to `dev`'s context.
pub(crate) unsafe fn launch_pdl_on(
    dev: &GpuDevice,
    stream: &cudarc::driver::CudaStream,
    f: &cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut std::ffi::c_void],
) -> Result<(), TensorError> {
    use cudarc::driver::sys;
    // SAFETY: a zeroed attribute is valid; id and value are set below as the driver expects.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let conf = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        // Programmatic dependent launch when the device has it on.
        numAttrs: dev.pdl as u32,
    };
    dev.ctx
        .bind_to_thread()
        .map_err(|e| dev_err(dev.ordinal, e))?;
    // SAFETY: the caller vouches for the parameters; the configuration is complete.
    unsafe {
        sys::cuLaunchKernelEx(
            &conf,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(|e| dev_err(dev.ordinal, e))
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

/// Whether `x[m, k]` goes through the decode GEMV kernels rather than cuBLAS.
fn gemv_fits(x: &CudaBuf, m: usize, k: usize) -> bool {
    x.dtype() == crate::DType::BF16
        && (1..=super::GEMV_MAX_ROWS).contains(&m)
        && k.is_multiple_of(8)
}

/// `y[m, n] = x[m, k] @ w[n, k]^T (+ b)` (f32 accumulation): cuBLAS, or for a decode batch the
/// GEMV, the skinny GEMM or cuBLASLt. `w` must not be written by the kernels just queued before
/// (a model's weights): the GEMV and the skinny GEMM start reading it before they wait for them
/// (programmatic dependent launch).
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
    let bf16_operands = x.dtype() == crate::DType::BF16
        && w.dtype() == crate::DType::BF16
        && bias.is_none_or(|b| b.dtype() == crate::DType::BF16);
    if gemv_fits(x, m, k) {
        launch_gemv(&dev, false, x, w, &y, n, k)?;
    } else if let (Some(lt), true, 2..=super::lt::LT_MAX_ROWS) = (&dev.lt, bf16_operands, m) {
        let tune = dev.capturing().is_none();
        // A few rows: the skinny tensor-core GEMM instead of cuBLASLt, k whole or split.
        let skinny = skinny_choices(&dev, (m, n, k));
        let run = |i: usize| {
            let (v, splits) = skinny[i];
            skinny_gemm(&dev, x, w, &y, (m, n, k), v, splits).map_err(|e| e.to_string())
        };
        let mut lt = lt.lock().unwrap_or_else(|e| e.into_inner());
        let done = lt.matmul(
            (m, n, k),
            tune,
            (dptr(w), dptr(x), dptr(&y)),
            (skinny.len(), &run),
        );
        drop(lt);
        // A shape cuBLASLt refuses, or a skinny GEMM that fails to launch, goes to cuBLAS's GEMM
        // (which reports a real failure).
        if done.is_err() {
            cublas_gemm(&dev, x, w, &mut y, (m, n, k))?;
        }
    } else {
        cublas_gemm(&dev, x, w, &mut y, (m, n, k))?;
    }
    if let Some(b) = bias {
        add_bias(&dev, &y, b, m, n)?;
    }
    Ok(y)
}

/// Whether device `ordinal` has programmatic dependent launch (sm_90 and later).
pub fn device_has_pdl(ordinal: usize) -> Result<bool, TensorError> {
    Ok(GpuDevice::get(ordinal)?.has_pdl)
}

/// The probe of `tessera bench gemm --probe-pdl` run on this crate's own copy kernel in the GEMM's place, which
/// waits for the kernel before it (`wait`) or not: what the probe says of it (`None`: it could
/// not tell). A check of the probe itself, for the GPU tests.
pub fn probe_own_copy(ordinal: usize, wait: bool) -> Result<Option<bool>, TensorError> {
    let dev = GpuDevice::get(ordinal)?;
    super::pdl_probe::probe_copy(&dev, wait).map_err(|e| dev_err(ordinal, e))
}

/// `y[m, n] = x[m, k] @ w[n, k]^T` through cuBLAS's GEMM (f32 accumulation), f32 or bf16.
pub(crate) fn cublas_gemm(
    dev: &GpuDevice,
    x: &CudaBuf,
    w: &CudaBuf,
    y: &mut CudaBuf,
    (m, n, k): (usize, usize, usize),
) -> Result<(), TensorError> {
    // Row-major y = x w^T is column-major y^T = w^T(col) ... : C(n x m) = op(A) B with A = w viewed
    // column-major as k x n (so transposed), B = x viewed column-major as k x m.
    fn config<T>(m: usize, n: usize, k: usize, alpha: T, beta: T) -> GemmConfig<T> {
        GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha,
            lda: k as i32,
            ldb: k as i32,
            beta,
            ldc: n as i32,
        }
    }
    let blas = dev.blas.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: the buffers hold n x k, m x k and m x n values (the callers' shapes).
    let r = match (&w.data, &x.data, &mut y.data) {
        (CudaData::F32(a), CudaData::F32(b), CudaData::F32(c)) => unsafe {
            blas.gemm(
                config(m, n, k, 1.0f32, 0.0f32),
                &**a,
                &**b,
                &mut c.view_mut(),
            )
        },
        (CudaData::BF16(a), CudaData::BF16(b), CudaData::BF16(c)) => unsafe {
            blas.gemm(
                config(m, n, k, bf16::ONE, bf16::ZERO),
                &**a,
                &**b,
                &mut c.view_mut(),
            )
        },
        _ => return Err(dev_err(dev.ordinal, "matmul operands differ in dtype")),
    };
    r.map_err(|e| dev_err(dev.ordinal, format!("cuBLAS: {e:?}")))
}

/// The batch tiles (of 8 rows) a skinny GEMM of `m` rows takes: 1, 2, 4 or 8.
pub fn skinny_tiles(m: usize) -> usize {
    m.div_ceil(8).next_power_of_two()
}

/// Whether skinny GEMM variant `v` (an index of `SKINNY_VARIANTS`) takes the bf16 product
/// `x[m, k] w[n, k]^T` with k split in `splits`: the variant's batch tiles for m (1 to 64 rows),
/// each split a whole number of the variant's steps.
pub fn skinny_takes((m, n, k): (usize, usize, usize), v: usize, splits: usize) -> bool {
    let Some(var) = super::SKINNY_VARIANTS.get(v) else {
        return false;
    };
    let int = |x: usize| i32::try_from(x).is_ok();
    (1..=64).contains(&m)
        && var.tiles == skinny_tiles(m)
        && n > 0
        && int(n)
        && int(k)
        && k > 0
        && var
            .kc
            .checked_mul(splits)
            .is_some_and(|step| step > 0 && k.is_multiple_of(step))
}

/// Whether device `dev` can run skinny GEMM variant `v` (see `GpuDevice::skinny_fns`).
fn skinny_runs(dev: &GpuDevice, v: usize) -> bool {
    dev.skinny_fns.get(v).is_some_and(Option::is_some)
}

/// Registers a thread and bytes of local memory (spills) of each skinny GEMM variant as the
/// driver compiled it for device `ordinal`, in `SKINNY_VARIANTS`' order (`None`: the device does
/// not run that variant).
pub fn skinny_resources(ordinal: usize) -> Result<Vec<Option<(i32, i32)>>, TensorError> {
    use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES;
    let dev = GpuDevice::get(ordinal)?;
    dev.skinny_fns
        .iter()
        .map(|f| {
            let Some(f) = f else { return Ok(None) };
            let regs = f.num_regs().map_err(|e| dev_err(ordinal, e))?;
            let local = f
                .get_attribute(CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)
                .map_err(|e| dev_err(ordinal, e))?;
            Ok(Some((regs, local)))
        })
        .collect()
}

/// The skinny GEMMs (variant, splits of k) a bf16 product of `shape` runs on instead of
/// cuBLASLt: the variant for m's batch tiles, k whole or split (`SKINNY_SPLITS`); none above
/// `SKINNY_MAX_ROWS` rows (`TESSERA_SKINNY=0`: none, `all`: up to 64 rows).
fn skinny_choices(dev: &GpuDevice, shape: (usize, usize, usize)) -> Vec<(usize, usize)> {
    let rows = match dev.skinny {
        super::SkinnyUse::Auto => super::SKINNY_MAX_ROWS,
        super::SkinnyUse::Never => 0,
        super::SkinnyUse::All => usize::MAX,
    };
    if shape.0 > rows {
        return Vec::new();
    }
    (0..super::SKINNY_VARIANTS.len())
        .filter(|&v| skinny_runs(dev, v))
        .flat_map(|v| super::SKINNY_SPLITS.map(|s| (v, s)))
        .filter(|&(v, s)| skinny_takes(shape, v, s))
        .collect()
}

/// A GEMM shape `(m, n, k)` and the kernel measured fastest for it.
pub type GemmChoice = ((usize, usize, usize), String);

/// The kernel each bf16 GEMM shape measured so far on device `ordinal` runs: `lt N`
/// (cuBLASLt's candidate N) or `skinny <variant> sS` (k in S splits); for the benchmarks.
pub fn gemm_choices(ordinal: usize) -> Result<Vec<GemmChoice>, TensorError> {
    let dev = GpuDevice::get(ordinal)?;
    let Some(lt) = &dev.lt else {
        return Ok(Vec::new());
    };
    let lt = lt.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<_> = lt
        .chosen()
        .into_iter()
        .map(|(shape, a, lt_count)| {
            let name = match a.checked_sub(lt_count) {
                None => format!("lt {a}"),
                Some(i) => match skinny_choices(&dev, shape).get(i) {
                    Some(&(v, s)) => format!("skinny {} s{s}", super::SKINNY_VARIANTS[v].name),
                    None => format!("other {i}"),
                },
            };
            (shape, name)
        })
        .collect();
    out.sort();
    Ok(out)
}

/// `y[m, n] = x[m, k] w[n, k]^T` through skinny GEMM variant `v`, k split in `splits` (see
/// `skinny_gemm`): for `tessera bench gemm` and the tests against the CPU.
pub fn skinny_matmul(
    x: &CudaBuf,
    w: &CudaBuf,
    (m, n, k): (usize, usize, usize),
    v: usize,
    splits: usize,
) -> Result<CudaBuf, TensorError> {
    same_dev(x, w)?;
    if !skinny_takes((m, n, k), v, splits) {
        return Err(skinny_refuses(&x.dev, (m, n, k), v, splits));
    }
    let y = CudaBuf::alloc(&x.dev, x.dtype(), m * n)?;
    skinny_gemm(&x.dev, x, w, &y, (m, n, k), v, splits)?;
    Ok(y)
}

fn skinny_refuses(
    dev: &GpuDevice,
    (m, n, k): (usize, usize, usize),
    v: usize,
    splits: usize,
) -> TensorError {
    dev_err(
        dev.ordinal,
        format!(
            "skinny GEMM variant {v} does not take bf16 x[{m}, {k}], w[{n}, {k}] with k in {splits} \
             splits on this device"
        ),
    )
}

/// Raw kernel parameters: the addresses of `args`' elements, in order (for `launch_pdl`).
pub(crate) fn raw_params<T>(args: &mut [T]) -> Vec<*mut std::ffi::c_void> {
    args.iter_mut().map(|a| (a as *mut T).cast()).collect()
}

/// `y[m, n] = x[m, k] w[n, k]^T` through `skinny_<variant>` of `kernels.cu`: `rows x warps`
/// weight rows a block, k in `splits` ranges over `grid.y` (their partial sums, f32, added in
/// order by `skinny_reduce`).
pub(crate) fn skinny_gemm(
    dev: &GpuDevice,
    x: &CudaBuf,
    w: &CudaBuf,
    y: &CudaBuf,
    (m, n, k): (usize, usize, usize),
    v: usize,
    splits: usize,
) -> Result<(), TensorError> {
    let bf16 = [x, w, y].iter().all(|b| b.dtype() == crate::DType::BF16);
    // Sizes compared only once the shape is known to be small enough (skinny_takes).
    let fits = skinny_takes((m, n, k), v, splits) && skinny_runs(dev, v);
    if !fits || !bf16 || x.len() != m * k || w.len() != n * k || y.len() != m * n {
        return Err(skinny_refuses(dev, (m, n, k), v, splits));
    }
    let var = super::SKINNY_VARIANTS[v];
    let part = if splits > 1 {
        Some(CudaBuf::alloc(&x.dev, crate::DType::F32, splits * m * n)?)
    } else {
        None
    };
    // In range of i32: skinny_takes.
    let mut ints = [m, n, k, k / splits].map(|v| v as i32);
    let mut ptrs = [dptr(x), dptr(w), dptr(y), part.as_ref().map_or(0, dptr)];
    let mut params = raw_params(&mut ptrs);
    params.extend(raw_params(&mut ints));
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(var.rows * var.warps) as u32, splits as u32, 1),
        block_dim: (32 * var.warps as u32, 1, 1),
        shared_mem_bytes: var.smem() as u32,
    };
    // SAFETY: the parameters match skinny_*(x, w, y, part, m, n, k, kper) and outlive the call;
    // the buffers hold m x k, n x k, m x n and splits x m x n values (checked above).
    let f = dev.skinny_fns[v].as_ref().expect("skinny_runs");
    unsafe { launch_pdl(dev, f, cfg, &mut params)? };
    if let Some(p) = &part {
        let (mut sp, mut len) = (splits as i32, (m * n) as i64);
        let mut ptrs = [dptr(p), dptr(y)];
        let mut params = raw_params(&mut ptrs);
        params.push((&mut sp as *mut i32).cast());
        params.push((&mut len as *mut i64).cast());
        // SAFETY: skinny_reduce(part, y, splits, len) over the buffers above.
        unsafe { launch_pdl(dev, &dev.skinny_reduce, grid_1d(m * n), &mut params)? };
    }
    Ok(())
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

/// A norm block over rows of `h`: chunks of 8 values a thread (1, 2 or 4, the fewest that 512
/// threads cover; a kernel each: `rms_norm1`, ...) and threads (a multiple of 32, 512 at most;
/// longer rows go value by value).
pub(crate) fn norm_shape(h: usize) -> (usize, u32) {
    let chunks = h.div_ceil(8);
    let per = [1, 2, 4]
        .into_iter()
        .find(|c| chunks <= 512 * c)
        .unwrap_or(4);
    let threads = chunks.div_ceil(per).next_multiple_of(32).clamp(32, 512);
    (per, threads as u32)
}

/// Threads for a block over rows of `h` (a norm's, [`norm_shape`]).
pub(crate) fn norm_threads(h: usize) -> u32 {
    norm_shape(h).1
}

pub fn rms_norm(
    x: &CudaBuf,
    w: &CudaBuf,
    rows: usize,
    h: usize,
    eps: f32,
) -> Result<CudaBuf, TensorError> {
    norm(x, None, w, rows, h, eps)
}

/// `x += delta` (rounded to x's dtype), then the RMSNorm of the new `x`: one kernel.
pub fn add_rms_norm(
    x: &CudaBuf,
    delta: &CudaBuf,
    w: &CudaBuf,
    rows: usize,
    h: usize,
    eps: f32,
) -> Result<CudaBuf, TensorError> {
    same_dev(x, delta)?;
    norm(x, Some(delta), w, rows, h, eps)
}

/// One block a row: `rms_norm`, or `add_rms_norm` with a `delta`.
fn norm(
    x: &CudaBuf,
    delta: Option<&CudaBuf>,
    w: &CudaBuf,
    rows: usize,
    h: usize,
    eps: f32,
) -> Result<CudaBuf, TensorError> {
    same_dev(x, w)?;
    let dev = x.dev.clone();
    let y = CudaBuf::alloc(&dev, x.dtype(), rows * h)?;
    let (mut hh, mut eps) = (h as i32, eps);
    let (per, threads) = norm_shape(h);
    let name = match (delta.is_some(), per) {
        (true, 1) => "add_rms_norm1",
        (true, 2) => "add_rms_norm2",
        (true, _) => "add_rms_norm4",
        (false, 1) => "rms_norm1",
        (false, 2) => "rms_norm2",
        (false, _) => "rms_norm4",
    };
    let mut ptrs: Vec<u64> = [Some(x), delta, Some(w), Some(&y)]
        .into_iter()
        .flatten()
        .map(dptr)
        .collect();
    let mut params = raw_params(&mut ptrs);
    params.push((&mut hh as *mut i32).cast());
    params.push((&mut eps as *mut f32).cast());
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the parameters match (add_)rms_norm(x, [delta,] w, y, h, eps) and outlive the call;
    // the buffers hold rows x h values (x, delta, y) and h (w), of one dtype (same_dev).
    unsafe { launch_pdl(&dev, dev.func(name, x.dtype()), cfg, &mut params)? };
    Ok(y)
}

/// Qwen3's per-head RMSNorm of q and k: `x` is `rows` rows of `heads` heads of `hd`; heads
/// `[0, hq)` normalised with `qw`, `[hq, hq + hk)` with `kw`, the rest copied. One kernel.
#[allow(clippy::too_many_arguments)]
pub fn head_rms_norm(
    x: &CudaBuf,
    qw: &CudaBuf,
    kw: &CudaBuf,
    rows: usize,
    (hq, hk, heads): (usize, usize, usize),
    hd: usize,
    eps: f32,
) -> Result<CudaBuf, TensorError> {
    same_dev(x, qw)?;
    same_dev(x, kw)?;
    let dev = x.dev.clone();
    let y = CudaBuf::alloc(&dev, x.dtype(), rows * heads * hd)?;
    if rows == 0 {
        return Ok(y);
    }
    let (mut q, mut k, mut n, mut d, mut eps) =
        (hq as i32, hk as i32, heads as i32, hd as i32, eps);
    let mut ptrs: Vec<u64> = [x, qw, kw, &y].into_iter().map(dptr).collect();
    let mut params = raw_params(&mut ptrs);
    for v in [&mut q, &mut k, &mut n, &mut d] {
        params.push((v as *mut i32).cast());
    }
    params.push((&mut eps as *mut f32).cast());
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, heads as u32, 1),
        block_dim: (hd.div_ceil(32).clamp(1, 8) as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the parameters match head_rms_norm(x, qw, kw, y, hq, hk, heads, hd, eps) and outlive
    // the call; x and y hold rows x heads x hd values, qw and kw hd (checked by the caller), of one
    // dtype (same_dev).
    unsafe { launch_pdl(&dev, dev.func("head_rms_norm", x.dtype()), cfg, &mut params)? };
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
    let mut l = dev.stream.launch_builder(dev.func("rope", x.dtype()));
    push(&mut l, x);
    l.arg(f.as_ref()).arg(&h).arg(&d).arg(&s);
    push_pos(&mut l, &io);
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
    if g.len() != u.len() {
        return Err(dev_err(
            dev.ordinal,
            "silu_mul: gate and up differ in length",
        ));
    }
    let out = CudaBuf::alloc(&dev, g.dtype(), g.len())?;
    let mut n = g.len() as i64;
    let mut ptrs = [dptr(g), dptr(u), dptr(&out)];
    let mut params = raw_params(&mut ptrs);
    params.push((&mut n as *mut i64).cast());
    // SAFETY: the parameters match silu_mul(g, u, out, n) and outlive the call; the three
    // buffers hold n values of one dtype.
    let f = dev.func("silu_mul", g.dtype());
    unsafe { launch_pdl(&dev, f, grid_1d(g.len()), &mut params)? };
    Ok(out)
}

/// `out[r, c] = silu(gu[r, c]) * gu[r, n + c]` for `gu` `[rows, 2n]`.
pub fn silu_mul_halves(gu: &CudaBuf, rows: usize, n: usize) -> Result<CudaBuf, TensorError> {
    let dev = gu.dev.clone();
    if gu.len() != rows * 2 * n {
        return Err(dev_err(
            dev.ordinal,
            format!(
                "silu_mul_halves: {} values are not [{rows}, 2 x {n}]",
                gu.len()
            ),
        ));
    }
    let out = CudaBuf::alloc(&dev, gu.dtype(), rows * n)?;
    let (mut r, mut nn) = (rows as i64, n as i32);
    let mut ptrs = [dptr(gu), dptr(&out)];
    let mut params = raw_params(&mut ptrs);
    params.push((&mut r as *mut i64).cast());
    params.push((&mut nn as *mut i32).cast());
    // SAFETY: the parameters match silu_mul_halves(gu, out, rows, n) and outlive the call; gu
    // holds rows x 2n values (checked above), out rows x n, of one dtype.
    let f = dev.func("silu_mul_halves", gu.dtype());
    unsafe { launch_pdl(&dev, f, grid_1d((rows * n).div_ceil(8)), &mut params)? };
    Ok(out)
}

/// The gated MLP's first half, `silu(x Wg^T + bg) * (x Wu^T + bu)`, for `w` `[2n, k]` (gate rows,
/// then up rows): one pass over the weights for one bf16 row without bias, else a GEMM and a
/// kernel.
pub fn matmul_t_gated(
    x: &CudaBuf,
    m: usize,
    k: usize,
    w: &CudaBuf,
    n: usize,
    bias: Option<&CudaBuf>,
) -> Result<CudaBuf, TensorError> {
    same_dev(x, w)?;
    if bias.is_none() && gemv_fits(x, m, k) {
        let dev = x.dev.clone();
        let y = CudaBuf::alloc(&dev, x.dtype(), n)?;
        launch_gemv(&dev, true, x, w, &y, n, k)?;
        return Ok(y);
    }
    let gu = matmul_t(x, m, k, w, 2 * n, bias)?;
    silu_mul_halves(&gu, m, n)
}

/// Rows up to which the fused norm + GEMV holds the normalised row in shared memory (32 KB).
const NORM_GEMV_MAX_K: usize = 16384;

/// Whether one row `x[k]` takes the fused RMSNorm + decode GEMV (`norm_gemv`).
pub fn norm_gemv_fits(x: &CudaBuf, k: usize) -> bool {
    x.dev.fused_norm && gemv_fits(x, 1, k) && k <= NORM_GEMV_MAX_K
}

/// `y = rms_norm(x) W^T` for one bf16 row `x[k]` (gated: the gated MLP's `silu(g) * u` over
/// `W[2n, k]`), after `x += delta` when `delta` is given: one kernel, which also returns the new
/// `x` (a new buffer) in that case. Results as `add_rms_norm` then the GEMV, up to the order of
/// the norm's sum of squares. `norm` is the norm's weights and epsilon.
pub fn norm_gemv(
    x: &CudaBuf,
    delta: Option<&CudaBuf>,
    norm: (&CudaBuf, f32),
    w: &CudaBuf,
    n: usize,
    k: usize,
    gated: bool,
) -> Result<(CudaBuf, Option<CudaBuf>), TensorError> {
    same_dev(x, w)?;
    same_dev(x, norm.0)?;
    let rows = if gated { 2 * n } else { n };
    let d_ok = delta.is_none_or(|d| d.len() == k && same_dev(x, d).is_ok());
    if !norm_gemv_fits(x, k) || x.len() != k || norm.0.len() != k || w.len() != rows * k || !d_ok {
        return Err(dev_err(
            x.dev.ordinal,
            format!("fused norm + GEMV takes bf16 x[{k}] (k a multiple of 8, at most {NORM_GEMV_MAX_K}), delta[{k}], norm[{k}] and W[{rows}, {k}]"),
        ));
    }
    let dev = x.dev.clone();
    let y = CudaBuf::alloc(&dev, x.dtype(), n)?;
    let xo = match delta {
        Some(_) => Some(CudaBuf::alloc(&dev, x.dtype(), k)?),
        None => None,
    };
    let nm = GemvNorm {
        weight: norm.0,
        eps: norm.1,
        add: delta.zip(xo.as_ref()),
    };
    launch_gemv_kernel(&dev, dev.gemv(gated), x, w, &y, (n, k), Some(&nm))?;
    Ok((y, xo))
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
        block_dim: (norm_threads(h), 1, 1),
        shared_mem_bytes: 0,
    };
    launched(&dev, unsafe { l.launch(cfg) })?;
    Ok(out)
}

/// Keys an attention block scores at once (`ATTN_CHUNK` of `kernels.cu`); longer ranges are
/// walked in chunks with an online softmax, so there is no limit on positions.
const ATTN_CHUNK: usize = 1024;
/// Positions one split of the decode attention takes (flash decoding: a long cache is spread
/// over many blocks, each scoring at most this many keys).
const DECODE_SPLIT: usize = 256;
/// The decode attention kernels (`TESSERA_DECODE_ATTENTION=grouped|by_head|per_head|flash|mma`
/// forces one at start-up, for measuring them against each other; by default the shape decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeKernel {
    /// The vectorised kernel with all query heads of a KV head in one block (each cached K/V row
    /// read once per split).
    Grouped,
    /// The vectorised kernel with one query head a block (g times more blocks).
    ByHead,
    /// The first kernel: one query head a block, one position at a time.
    PerHead,
    /// The vectorised kernel in one pass over the cache (a running softmax, each position's K
    /// and V rows loaded together): forced, whole groups of at most `FLASH_MAX_G` heads a block
    /// at every shape, as `Grouped` takes them; the shape chooses it for groups of 2-4.
    Flash,
    /// The one-pass kernel on tensor cores (bf16, head dims 64 and 128, sm_80 and later; else
    /// `Flash`): a KV head's query heads (up to 16) as the rows of an mma product. The shape
    /// chooses it over caches of at least 2,048 positions (`mma_decode_pays`) in place of the
    /// whole groups it would run on CUDA cores, and for groups of 5-8 in place of one head a
    /// block (`with_tensor_cores`).
    Mma,
}

impl DecodeKernel {
    pub const ALL: [DecodeKernel; 5] = [
        Self::Grouped,
        Self::ByHead,
        Self::PerHead,
        Self::Flash,
        Self::Mma,
    ];

    /// Its name in `TESSERA_DECODE_ATTENTION` and `tessera bench attention`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Grouped => "grouped",
            Self::ByHead => "by_head",
            Self::PerHead => "per_head",
            Self::Flash => "flash",
            Self::Mma => "mma",
        }
    }
}

/// 0 = chosen by shape, 1 + the index in `DecodeKernel::ALL` of the one forced; `u8::MAX` = not
/// read from the environment.
static DECODE_ATTENTION: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

fn decode_kernel_code(choice: Option<DecodeKernel>) -> u8 {
    choice.map_or(0, |k| {
        1 + DecodeKernel::ALL.iter().position(|&x| x == k).unwrap_or(0) as u8
    })
}

/// Forces a decode attention kernel for this process (where it applies: the vectorised kernel
/// needs hd / 8 a power of two and hd <= 256); `None` lets the shape decide.
pub fn force_decode_kernel(choice: Option<DecodeKernel>) {
    DECODE_ATTENTION.store(
        decode_kernel_code(choice),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// `TESSERA_DECODE_ATTENTION=auto|grouped|by_head|per_head|flash|mma` (unset: `auto`, the shape
/// decides).
pub(crate) fn parse_decode_kernel(v: Option<&str>) -> Result<Option<DecodeKernel>, String> {
    let names = [
        ("auto", None),
        ("grouped", Some(DecodeKernel::Grouped)),
        ("by_head", Some(DecodeKernel::ByHead)),
        ("per_head", Some(DecodeKernel::PerHead)),
        ("flash", Some(DecodeKernel::Flash)),
        ("mma", Some(DecodeKernel::Mma)),
    ];
    super::env_choice("TESSERA_DECODE_ATTENTION", v, &names)
}

pub(crate) fn decode_kernel_choice() -> Option<DecodeKernel> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut v = DECODE_ATTENTION.load(Relaxed);
    if v == u8::MAX {
        // An unknown name stopped the device's set-up (`check_switches`): none is forced then.
        let env = std::env::var("TESSERA_DECODE_ATTENTION").ok();
        let named = parse_decode_kernel(env.as_deref()).unwrap_or(None);
        let _ =
            DECODE_ATTENTION.compare_exchange(u8::MAX, decode_kernel_code(named), Relaxed, Relaxed);
        v = DECODE_ATTENTION.load(Relaxed);
    }
    (v as usize)
        .checked_sub(1)
        .and_then(|i| DecodeKernel::ALL.get(i).copied())
}

/// Query heads a block of the vectorised decode attention may take (the largest `GM` of
/// `decode_attention_gqa` in `kernels.cu`).
const GQA_MAX_G: usize = 8;
/// Query heads a block of the one-pass kernel may take (the largest `GM` of
/// `decode_attention_flash`: its running state a head is held in registers).
const FLASH_MAX_G: usize = 4;
/// Query heads a block of the tensor-core kernel may take (the rows of an m16 tile).
const MMA_MAX_G: usize = 16;

/// Which decode attention kernel a call runs, and with how many query heads a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DecodeRun {
    /// `decode_attention`: one query head a block, a position at a time.
    PerHead,
    /// `decode_attention_gqa*`: the vectorised kernel, scores then P V, with this many heads.
    TwoPass(usize),
    /// `decode_attention_flash*`: one pass on CUDA cores.
    OnePass(usize),
    /// `decode_attention_mma*`: one pass on tensor cores (bf16, head dims 64 and 128, sm_80+).
    TensorCores(usize),
}

impl DecodeRun {
    /// Query heads a block of the vectorised kernels takes (`None`: the per-head kernel).
    pub fn heads_per_block(self) -> Option<usize> {
        match self {
            Self::PerHead => None,
            Self::TwoPass(gb) | Self::OnePass(gb) | Self::TensorCores(gb) => Some(gb),
        }
    }

    /// In words, for `tessera bench attention`'s table.
    pub fn label(self) -> String {
        match self {
            Self::PerHead => "per head".into(),
            Self::TwoPass(gb) => format!("two-pass, {gb} heads/block"),
            Self::OnePass(gb) => format!("one pass, {gb} heads/block"),
            Self::TensorCores(gb) => format!("tensor cores, {gb} heads/block"),
        }
    }

    /// The `kernels.cu` instance it launches (before the dtype's suffix; the tensor-core
    /// kernel's instance is the head dim's, `decode_attention_mma64` / `128`, with a `w` for more
    /// than 8 heads, loaded apart: `GpuDevice::mma_decode_fn`): the
    /// vectorised kernels' GM, the most heads a block, rounded up to an instance (3 heads run in
    /// the 4-head one with the fourth masked off).
    pub fn kernel(self) -> &'static str {
        match self {
            Self::PerHead => "decode_attention",
            Self::TwoPass(1) => "decode_attention_gqa1",
            Self::TwoPass(2) => "decode_attention_gqa2",
            Self::TwoPass(3 | 4) => "decode_attention_gqa4",
            Self::TwoPass(_) => "decode_attention_gqa8",
            Self::OnePass(1) => "decode_attention_flash1",
            Self::OnePass(2) => "decode_attention_flash2",
            Self::OnePass(_) => "decode_attention_flash4",
            Self::TensorCores(_) => "decode_attention_mma",
        }
    }
}

/// How one decode attention call runs: the kernel (and heads a block), each split taking `per`
/// positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DecodePlan {
    pub run: DecodeRun,
    pub per: usize,
}

/// Picks the decode attention kernel for `keys` cached positions of `batch` sequences with `hq`
/// query and `hkv` KV heads of `hd` on a GPU of `sms` multiprocessors. The vectorised kernel
/// keeps every block's K and V loads in flight at once, where the per-head kernel waits for
/// each position in turn (3-3.5x faster from 512 positions, `tessera bench attention`). A block
/// is a chain of dependent steps (RoPE, scores, softmax, P V), so the kernel is latency-bound
/// until the cache is long: it takes the most query heads a block (KV rows read once) and the
/// longest splits (no join) that still give every multiprocessor a block (two, for a cache one
/// split holds: there the chains, not the KV rows, are the cost), preferring long splits, and
/// else one query head a block with 64-position splits. (8B shape, one H200, decode steps through
/// graphs over ~50 positions, 2026-11-29 11:25 UTC: one rank of tp 2 at batch 64, 256 blocks of 4
/// heads against 1,024 of 1, 3.02 / 3.02 against 2.95 / 2.92 ms; tp 1 batch 32, 256 against
/// 1,024, 4.90 / 4.85 against 4.80 / 4.84; tp 1 batch 64, 512 of 4 heads against 2,048 of 1,
/// 5.00 / 5.01 against 5.19 / 5.19.) Whole groups of 2-4 heads then run in one pass
/// (`decode_attention_flash`), unless a kernel is forced.
pub(crate) fn decode_plan(
    keys: usize,
    batch: usize,
    hq: usize,
    hkv: usize,
    hd: usize,
    sms: usize,
    forced: Option<DecodeKernel>,
) -> DecodePlan {
    let g = hq / hkv;
    let per_head = DecodePlan {
        run: DecodeRun::PerHead,
        per: DECODE_SPLIT,
    };
    let tensor_cores = forced == Some(DecodeKernel::Mma);
    let one_pass = forced == Some(DecodeKernel::Flash) || tensor_cores;
    let max_g = match forced {
        Some(DecodeKernel::Mma) => MMA_MAX_G,
        Some(DecodeKernel::Flash) => FLASH_MAX_G,
        _ => GQA_MAX_G,
    };
    let vectorised = hd.is_multiple_of(8) && (hd / 8).is_power_of_two() && hd <= ATTN_MAX_HD;
    // Heads a block may take: the largest divisor of g (every block the same) within the
    // accumulators and the shared-memory partial sums (gb hd <= 1024), or one. (Two heads a block
    // measured slower than both, alone and in a batch-32 step.)
    let most = (1..=g.min(max_g))
        .rev()
        .find(|&d| g.is_multiple_of(d) && (tensor_cores || d * hd <= 1024))
        .unwrap_or(1);
    let candidates: Vec<usize> = match forced {
        Some(DecodeKernel::PerHead) => return per_head,
        // Forced, the grouped kernels take whole groups at every shape (what they are measured
        // and tested on); chosen by the shape, whole groups only where they fill the GPU.
        Some(DecodeKernel::Grouped | DecodeKernel::Flash | DecodeKernel::Mma) => vec![most],
        Some(DecodeKernel::ByHead) => vec![1],
        None if most > 1 => vec![most, 1],
        None => vec![1],
    };
    if !vectorised || candidates.is_empty() {
        return per_head;
    }
    let blocks = |gb: usize, per: usize| keys.div_ceil(per) * batch * hkv * (g / gb);
    // Blocks a choice must give: two a multiprocessor for whole groups over a short cache (when
    // the shape decides), else one.
    let need = |gb: usize| {
        if forced.is_none() && gb > 1 && keys <= DECODE_SPLIT {
            2 * sms
        } else {
            sms
        }
    };
    // Chosen by the shape, whole groups of 2-4 heads run in one pass (`decode_attention_flash`):
    // faster than the two-pass kernel at every grouped shape measured, 1.2-1.8x from 512 positions
    // (`tessera bench attention`, BENCHMARKS.md). One head a block keeps the two-pass kernel (the
    // two are within ~1 µs of each other there), and so do groups of more than 4 (the one-pass
    // kernel holds at most 4 heads' running state in registers).
    let plan = |gb: usize, per| DecodePlan {
        run: if tensor_cores {
            DecodeRun::TensorCores(gb)
        } else if one_pass || (forced.is_none() && (2..=FLASH_MAX_G).contains(&gb)) {
            DecodeRun::OnePass(gb)
        } else {
            DecodeRun::TwoPass(gb)
        },
        per,
    };
    for per in [DECODE_SPLIT, DECODE_SPLIT / 2, DECODE_SPLIT / 4] {
        if let Some(&gb) = candidates.iter().find(|&&gb| blocks(gb, per) >= need(gb)) {
            return plan(gb, per);
        }
    }
    plan(candidates.last().copied().unwrap_or(1), DECODE_SPLIT / 4)
}

/// Shared memory a block of the one-pass decode attention takes (`decode_attention_flash`): q, k
/// and v of its heads as floats (rounded up to 16 bytes), then a ring of two stages of 16 KB (K
/// and V chunks) that the join of its lane groups reuses
/// (`(2 + hd) gb` floats for each of `128 / (hd / 8)` groups: at most 20 KB).
pub(crate) fn flash_smem(gb: usize, hd: usize) -> usize {
    const RING: usize = 2 * 16 * 1024;
    let groups = 128 / (hd / 8);
    (gb * hd + 2 * hd).next_multiple_of(4) * 4 + RING.max(groups * gb * (hd + 2) * 4)
}

/// Whether the shape's choice of whole groups in one pass runs on tensor cores
/// (`decode_attention_mma`) rather than CUDA cores (`decode_attention_flash`): over caches of at
/// least 2,048 positions, at any grid. `tessera bench attention` on one H200, 8B heads at tp 1
/// (µs, one pass on CUDA cores / on tensor cores, BENCHMARKS.md, since the kernel reads K and V
/// through `ldmatrix`): over 2,048 positions batch 6 (one wave of its 3 blocks a multiprocessor)
/// 29.8 / 21.4, batch 7, 8, 10 and 12 (1.1-1.9 waves) 33.9 / 32.2, 36.8 / 32.8, 54.7 / 35.1 and
/// 56.5 / 40.4, batch 64 236 / 167; over 4,096 batch 4 and 5 (1.3, 1.6 waves) 39.9 / 33.5 and
/// 55.4 / 37.5; over 8,192 batch 64 890 / 614. (Before, a grid of 1-2 waves waited on its last
/// and the rule left those to CUDA cores.) At g = 8 (70B heads, tp 1 and 2, batch 2-32 over
/// 2,048 positions and 2-8 over 4,096) tensor cores were the fastest or within 0.4% of it at
/// every grid (2026-12-01); head dim 64 follows the rule unmeasured at 1-2 waves.
pub(crate) fn mma_decode_pays(keys: usize) -> bool {
    keys >= 2048
}

/// Blocks of the tensor-core decode attention (`gb` heads of `hd`) a multiprocessor of
/// `smem_per_sm` bytes of shared memory holds by shared memory alone (the driver keeps 1 KB a
/// block for itself): the device's figure where the driver's occupancy query (which counts
/// registers too) does not answer. `tessera bench attention` prints the figure.
pub(crate) fn mma_resident_by_smem(smem_per_sm: usize, gb: usize, hd: usize) -> usize {
    (smem_per_sm / (mma_decode_smem(gb, hd) + 1024)).max(1)
}

/// The shape's plan with the tensor-core kernel chosen where it pays (`mma_decode_pays`): where
/// the shape took whole groups of 2-8 query heads a KV head (Llama 3 8B's 4, 70B's 8), the same
/// split on tensor cores; and for groups of 5-8, where the shape took one head a block (a grid of
/// whole groups too small for the GPU at its longest splits: batch 1-4), whole groups on tensor
/// cores split as a forced run splits (the longest splits that give every multiprocessor a block).
/// Measured (one H200, BENCHMARKS.md, 2026-12-01): alone (`tessera bench attention`, µs, one head
/// a block / tensor cores) 70B heads at tp 2, batch 1 over 2,048 17.98 / 15.01, over 8,192 40.92 /
/// 24.68, batch 4 over 2,048 35.86 / 15.50; in decode steps through graphs, one rank of 70B tp 2
/// batch 1 over 6,000 positions 19.04 / 17.78 ms. Groups of up to 4 stay with one head a block
/// there: alone tensor cores were faster too (8B heads, batch 1 over 2,048 18.49 / 15.16 µs), but
/// not in steps (8B tp 1 batch 1 over 4,000 positions 4.41 / 4.46 ms, over 2,048 4.32-4.34 /
/// 4.32), where the next GEMV's early weight stream (PDL) covers the attention. Groups of more
/// than 8 keep the shape's plan (a group split over blocks: the forms the wide instances were not
/// measured against). (Where the shape took whole groups: 70B at tp 2 over a 2,048-position cache,
/// decode steps through graphs, two-pass / tensor cores: batch 8 25.17 / 20.40 ms, batch 32 34.15
/// / 25.81; since the kernel reads K and V through `ldmatrix`, 20.16 and 24.80.)
pub(crate) fn with_tensor_cores(
    plan: DecodePlan,
    keys: usize,
    batch: usize,
    (hq, hkv, hd): (usize, usize, usize),
    sms: usize,
) -> DecodePlan {
    let g = hq / hkv;
    if !hq.is_multiple_of(hkv) || !mma_decode_pays(keys) {
        return plan;
    }
    match plan.run {
        // Whole groups, as the shape chose them.
        DecodeRun::TwoPass(gb) | DecodeRun::OnePass(gb) if gb > 1 && gb == g => DecodePlan {
            run: DecodeRun::TensorCores(gb),
            ..plan
        },
        // One head a block, for groups of 5-8 (more than the one-pass CUDA-core kernel holds):
        // whole groups over shorter splits instead.
        _ if (FLASH_MAX_G + 1..=GQA_MAX_G).contains(&g) => {
            decode_plan(keys, batch, hq, hkv, hd, sms, Some(DecodeKernel::Mma))
        }
        _ => plan,
    }
}

/// Shared memory a block of the tensor-core decode attention takes (`decode_attention_mma`): q, k
/// and v of its `gb` heads as floats (rounded up to 16 bytes), then each of 4 warps' two stages
/// of a K and a V tile of 16 rows of `hd + 8` bf16 values.
pub(crate) fn mma_decode_smem(gb: usize, hd: usize) -> usize {
    (gb * hd + 2 * hd).next_multiple_of(4) * 4 + 4 * 2 * 2 * 16 * (hd + 8) * 2
}

/// Shared memory a block of the tensor-core prefill attention takes (`attention_mma`, `mt` m16
/// tiles of queries a warp): its 64 `mt` queries, then two stages of a K and a V tile of 64 rows,
/// rows of `hd + 8` bf16 values (104,448 bytes at head dim 128 and `mt` 2).
pub(crate) fn mma_prefill_smem(hd: usize, mt: usize) -> usize {
    (64 * mt + 2 * 2 * 64) * (hd + 8) * 2
}

/// Shared memory a block of `nwg` warpgroups of the warpgroup prefill attention at head dim `hd`
/// takes (`attention_wg{hd}_q64` / `_q128`): 1 KB to align its tiles to the 128-byte swizzle's
/// 1 KB atoms, its 64 `nwg` queries, then two stages of a K and a V tile of 64 rows, each tile 64
/// x `hd` bf16 (82,944 and 99,328 bytes at head dim 128).
pub(crate) fn wg_prefill_smem(hd: usize, nwg: usize) -> usize {
    1024 + (nwg + 4) * 64 * hd * 2
}

/// m16 tiles of queries a warp of the tensor-core prefill attention takes: 2 (a block of 128
/// queries; each K and V fragment read from shared memory serves two tiles) where there are
/// blocks of 128 for at least half the multiprocessors, else 1 (blocks of 64: twice the blocks
/// for a short prompt). Measured on an H200 (132 multiprocessors, Llama-3-8B's heads, one prompt,
/// `bench attention --prefill`): 32 queries a warp 1.09-1.42x faster from 1,024 tokens at tp 1
/// and tp 2 (128 blocks of 128 at tp 2), even at 512 at tp 1 (128 blocks), 16 a warp 1.15x
/// faster at 512 at tp 2 (64 blocks); measured before the grid put every head's longest blocks
/// first, not since. `force_prefill_tiles` overrides it.
pub(crate) fn prefill_tiles(t: usize, hq: usize, sms: usize) -> usize {
    match PREFILL_TILES.load(std::sync::atomic::Ordering::Relaxed) {
        1 | 3 => 1,
        2 | 4 => 2,
        _ if 2 * t.div_ceil(128) * hq >= sms => 2,
        _ => 1,
    }
}

static PREFILL_TILES: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Warpgroups of 64 queries a block of the warpgroup prefill attention: 2 (blocks of 128, each K
/// and V tile serving both) where those blocks are at least 2 a multiprocessor (the blocks two
/// fit), else 1 (twice the blocks). Measured on an H200 (132 multiprocessors, Llama-3-8B's heads,
/// `bench attention --prefill`, three calls): 128 a block 1.3x faster from 2,048 tokens at tp 1
/// (512 blocks) and at 8,192 at tp 2; 64 a block 5% faster at 2,048 at tp 2 (256 blocks of 128)
/// and 10% at 512 (64). `force_prefill_tiles(Some(3 | 4))` overrides it.
pub(crate) fn prefill_warpgroups(t: usize, hq: usize, sms: usize) -> usize {
    match PREFILL_TILES.load(std::sync::atomic::Ordering::Relaxed) {
        3 => 1,
        4 => 2,
        _ if t.div_ceil(128) * hq >= 2 * sms => 2,
        _ => 1,
    }
}

/// Forces the tensor-core prefill attention's m16 tiles of queries a warp (1 or 2) for this
/// process, or with 3 and 4 the warpgroup kernel's 64 and 128 queries a block where it loaded
/// (else as 1 and 2); `None` lets the shape decide (`bench attention --prefill` times each).
pub fn force_prefill_tiles(mt: Option<usize>) {
    let code = match mt {
        Some(1) => 1,
        Some(2) => 2,
        Some(3) => 3,
        Some(4) => 4,
        _ => 0,
    };
    PREFILL_TILES.store(code, std::sync::atomic::Ordering::Relaxed);
}

/// The prefill attention kernel a prompt of `t` queries takes (outside a captured step).
pub(crate) enum PrefillKernel {
    /// On warpgroup tensor cores (`wgmma`: bf16 at head dims 64 and 128, sm_90), `nwg`
    /// warpgroups of 64 queries a block, at head dim `hd`.
    Warpgroup(CudaFunction, usize, usize),
    /// On tensor cores (bf16 at head dims 64 and 128, sm_80+), `mt` m16 tiles of queries a warp.
    TensorCores(CudaFunction, usize),
    /// Tiled on CUDA cores.
    CudaCores(CudaFunction),
    /// A query at a time (fewer than `TILED_MIN_QUERIES`, or the tiles do not fit).
    QueryAtATime,
}

/// The prefill attention kernel a prompt of `t` queries with `hq` heads of `hd` in `dt` takes on
/// `dev` (outside a captured step): tensor cores where a form for the head dim loaded (32 queries
/// a warp where `prefill_tiles` takes it and that form loaded, else 16) and its grid's query tiles
/// fit CUDA's 65,535 rows; else the CUDA-core tiled kernel where its tiles fit the shared memory;
/// else a query at a time.
pub(crate) fn prefill_kernel(
    dev: &GpuDevice,
    t: usize,
    hq: usize,
    hd: usize,
    dt: crate::DType,
) -> PrefillKernel {
    if t < TILED_MIN_QUERIES {
        return PrefillKernel::QueryAtATime;
    }
    // `mma_attention`: [hd 64, 16 a warp; hd 128, 16; hd 64, 32; hd 128, 32], each where the
    // device lends a block its shared memory; 32 a warp where the rule takes it and it loaded.
    let col = match (hd, dt) {
        (64, crate::DType::BF16) => Some(0),
        (128, crate::DType::BF16) => Some(1),
        _ => None,
    };
    // The warpgroup kernel where it loaded ([`prefill_warpgroups`] a block), unless 16 or 32
    // queries a warp are forced.
    let forced = PREFILL_TILES.load(std::sync::atomic::Ordering::Relaxed);
    if let (Some(col), Some(fs), 0 | 3 | 4) = (col, &dev.wg_attention, forced) {
        let nwg = prefill_warpgroups(t, hq, dev.sms);
        if prefill_grid_fits(t, nwg) {
            return PrefillKernel::Warpgroup(fs[2 * col + nwg - 1].clone(), nwg, hd);
        }
    }
    if let Some(col) = col {
        let loaded = dev.mma_attention.each_ref().map(Option::is_some);
        if let Some(mt) = prefill_form(loaded, col, prefill_tiles(t, hq, dev.sms), t) {
            if let Some(f) = &dev.mma_attention[2 * (mt - 1) + col] {
                return PrefillKernel::TensorCores(f.clone(), mt);
            }
        }
    }
    if attention_tiled_smem(hd) <= dev.tiled_attention_smem {
        let name = match hd.div_ceil(8) {
            0..=8 => "attention_tiled8",
            9..=16 => "attention_tiled16",
            _ => "attention_tiled32",
        };
        return PrefillKernel::CudaCores(dev.func(name, dt).clone());
    }
    PrefillKernel::QueryAtATime
}

/// Which forms of the tensor-core prefill attention GPU `ordinal` loaded: [head dim 64, 16 queries
/// a warp; 128, 16; 64, 32; 128, 32] (a form is left out where the device cannot lend a block its
/// shared memory, before sm_80, or under `TESSERA_MMA_ATTENTION=0` / `TESSERA_TILED_ATTENTION=0`).
pub fn prefill_attention_forms(ordinal: usize) -> Result<[bool; 4], TensorError> {
    let dev = GpuDevice::get(ordinal)?;
    Ok(dev.mma_attention.each_ref().map(Option::is_some))
}

/// Whether GPU `ordinal` loaded the warpgroup prefill attention (`attention_wg*`: an sm_90
/// device, bf16 at head dims 64 and 128, unless `TESSERA_WG_ATTENTION=0` or the tensor-core
/// switches).
pub fn prefill_attention_wg(ordinal: usize) -> Result<bool, TensorError> {
    Ok(GpuDevice::get(ordinal)?.wg_attention.is_some())
}

/// The m16 tiles of queries a warp the tensor-core prefill attention runs with, of the `loaded`
/// forms ([hd 64, 16 a warp; 128, 16; 64, 32; 128, 32]) at head-dim column `col` (0: 64, 1: 128),
/// where the rule asked for `mt`: 32 a warp where asked and loaded, else 16 where loaded; none
/// (CUDA cores) where neither loaded or the grid cannot hold `t` queries.
pub(crate) fn prefill_form(loaded: [bool; 4], col: usize, mt: usize, t: usize) -> Option<usize> {
    [2, 1]
        .into_iter()
        .filter(|&m| m <= mt)
        .find(|&m| loaded[2 * (m - 1) + col])
        .filter(|&m| prefill_grid_fits(t, m))
}

/// Whether the tensor-core prefill attention's grid holds `t` queries at `mt` m16 tiles a warp:
/// its query tiles are the grid's rows, at most 65,535 (4,194,240 queries at 16 a warp; past that
/// the CUDA-core tiled kernel, whose tiles are the grid's columns, takes the prompt).
pub(crate) fn prefill_grid_fits(t: usize, mt: usize) -> bool {
    t.div_ceil(64 * mt) <= 65_535
}

/// What the prefill attention of `t` queries with `hq` heads of `hd` in `dt` runs on GPU
/// `ordinal` (outside a captured step): `tensor cores, N queries a warp`, `CUDA cores` or `a query
/// at a time` (`bench attention --prefill` prints it; the GPU tests assert it).
pub fn prefill_attention_plan(
    ordinal: usize,
    t: usize,
    hq: usize,
    hd: usize,
    dt: crate::DType,
) -> Result<String, TensorError> {
    let dev = GpuDevice::get(ordinal)?;
    Ok(match prefill_kernel(&dev, t, hq, hd, dt) {
        PrefillKernel::Warpgroup(_, nwg, _) => {
            format!("warpgroup tensor cores, {} queries a block", 64 * nwg)
        }
        PrefillKernel::TensorCores(_, mt) => format!("tensor cores, {} queries a warp", 16 * mt),
        PrefillKernel::CudaCores(_) => "CUDA cores".into(),
        PrefillKernel::QueryAtATime => "a query at a time".into(),
    })
}

/// The largest head_dim the attention kernels hold (`ATTN_MAX_HD`).
pub(crate) const ATTN_MAX_HD: usize = 256;

fn check_head_dim(dev: &GpuDevice, hd: usize) -> Result<(), TensorError> {
    if hd > ATTN_MAX_HD {
        return Err(dev_err(
            dev.ordinal,
            format!("the CUDA attention kernels take head_dim up to {ATTN_MAX_HD}, not {hd}"),
        ));
    }
    Ok(())
}

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
    check_head_dim(&dev, hd)?;
    let io = dev.capturing();
    let out = CudaBuf::alloc(&dev, q.dtype(), t * hq * hd)?;
    let (a, b, c, s, w) = (
        hq as i32,
        hkv as i32,
        hd as i32,
        start as i32,
        window.unwrap_or(0) as i32,
    );
    // A prefill (not a captured decode step) of enough queries to fill a tile: a tiled kernel,
    // with its grid, threads and shared memory. Grids: on tensor cores (heads, query tiles), the
    // latest tiles of every head first; on CUDA cores (query tiles, heads).
    let tiled = match io
        .is_none()
        .then(|| prefill_kernel(&dev, t, hq, hd, q.dtype()))
    {
        Some(PrefillKernel::Warpgroup(f, nwg, hd)) => {
            let grid = (hq as u32, t.div_ceil(64 * nwg) as u32, 1);
            Some((f, grid, 128 * nwg as u32, wg_prefill_smem(hd, nwg)))
        }
        Some(PrefillKernel::TensorCores(f, mt)) => {
            let grid = (hq as u32, t.div_ceil(64 * mt) as u32, 1);
            Some((f, grid, 128, mma_prefill_smem(hd, mt)))
        }
        Some(PrefillKernel::CudaCores(f)) => {
            let grid = (t.div_ceil(FA_BQ) as u32, hq as u32, 1);
            Some((f, grid, 256, attention_tiled_smem(hd)))
        }
        Some(PrefillKernel::QueryAtATime) | None => None,
    };
    if let Some((f, grid_dim, threads, smem)) = tiled {
        let tt = t as i32;
        let mut l = dev.stream.launch_builder(&f);
        push(&mut l, q);
        push(&mut l, k);
        push(&mut l, v);
        push(&mut l, &out);
        l.arg(&tt)
            .arg(&a)
            .arg(&b)
            .arg(&c)
            .arg(&s)
            .arg(&w)
            .arg(&scale);
        let cfg = LaunchConfig {
            grid_dim,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        launched(&dev, unsafe { l.launch(cfg) })?;
        return Ok(out);
    }
    let mut l = dev.stream.launch_builder(dev.func("attention", q.dtype()));
    push(&mut l, q);
    push(&mut l, k);
    push(&mut l, v);
    push(&mut l, &out);
    l.arg(&a).arg(&b).arg(&c).arg(&s).arg(&w).arg(&scale);
    push_pos(&mut l, &io);
    let cfg = LaunchConfig {
        grid_dim: (t as u32, hq as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: (ATTN_CHUNK * 4) as u32,
    };
    launched(&dev, unsafe { l.launch(cfg) })?;
    Ok(out)
}

/// Queries a block of the tiled prefill attention takes, and keys a tile (`FA_BQ`, `FA_BK` in
/// `kernels.cu`).
const FA_BQ: usize = 64;
const FA_BK: usize = 32;
/// Queries from which a prefill's attention runs tiled (fewer fill too little of a tile: the
/// kernel a query at a time).
pub const TILED_MIN_QUERIES: usize = 16;

/// Bytes of shared memory a block of the tiled prefill attention takes at head dim `hd`: the
/// query tile and the key tile in padded rows, the value tile, the tile's weights.
pub(crate) fn attention_tiled_smem(hd: usize) -> usize {
    4 * (FA_BQ * (hd + 1) + FA_BK * (hd + 1) + FA_BK * hd + FA_BQ * (FA_BK + 1))
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
/// Two passes: blocks over column slices, then one block a row over their pairs (one block over a
/// whole vocabulary row is latency-bound: 50 µs for 128k columns on an H200).
/// While a step is captured, the pairs go to the graph's output buffers and this returns nothing.
pub fn argmax_rows(x: &CudaBuf, rows: usize, n: usize) -> Result<Vec<(f32, u32)>, TensorError> {
    let dev = x.dev.clone();
    let e = |err| dev_err(dev.ordinal, err);
    let slices = n.div_ceil(2048).clamp(1, 128);
    let per = n.div_ceil(slices) as i32;
    let part_v = dev.temp::<f32>(rows * slices)?;
    let part_i = dev.temp::<i32>(rows * slices)?;
    let nn = n as i32;
    let f = dev.func("argmax_rows", x.dtype());
    let mut l = dev.stream.launch_builder(f);
    push(&mut l, x);
    l.arg(&NULL).arg(&NULL).arg(&nn).arg(&per);
    l.arg(&*part_v).arg(&*part_i);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, slices as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    launched(&dev, unsafe { l.launch(cfg) })?;
    let captured = dev.capturing();
    let owned;
    let (vals, idx) = match &captured {
        Some(io) => {
            if io.vals.len() != rows {
                return Err(dev_err(
                    dev.ordinal,
                    "captured step got a different batch size",
                ));
            }
            (&io.vals, &io.idx)
        }
        None => {
            owned = (
                dev.stream.alloc_zeros::<f32>(rows).map_err(e)?,
                dev.stream.alloc_zeros::<i32>(rows).map_err(e)?,
            );
            (&owned.0, &owned.1)
        }
    };
    let ns = slices as i32;
    let mut l = dev.stream.launch_builder(f);
    push(&mut l, x);
    l.arg(&*part_v).arg(&*part_i).arg(&ns).arg(&ns);
    l.arg(vals).arg(idx);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (slices.next_multiple_of(32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    launched(&dev, unsafe { l.launch(cfg) })?;
    if captured.is_some() {
        return Ok(Vec::new());
    }
    let v = dev.stream.clone_dtoh(vals).map_err(e)?;
    let i = dev.stream.clone_dtoh(idx).map_err(e)?;
    dev.stream.synchronize().map_err(e)?;
    Ok(v.into_iter().zip(i).map(|(v, i)| (v, i as u32)).collect())
}

/// `ops::top_k_rows` on the GPU: one block of 1024 threads a row (see `top_k_rows` in
/// `kernels.cu`), its output `[rows, 2 + 2 cap]` f32 on the device.
pub fn top_k_rows(
    x: &CudaBuf,
    rows: usize,
    n: usize,
    k: usize,
    cap: usize,
) -> Result<CudaBuf, TensorError> {
    let dev = x.dev.clone();
    if x.len() != rows * n || k == 0 || k > n || n > 1 << 24 {
        return Err(dev_err(
            dev.ordinal,
            format!("top_k_rows: k {k} of {} values as [{rows}, {n}]", x.len()),
        ));
    }
    let out = CudaBuf::alloc(&dev, crate::DType::F32, rows * (2 + 2 * cap))?;
    let (nn, kk, cc) = (n as i32, k as i32, cap as i32);
    let mut l = dev.stream.launch_builder(dev.func("top_k_rows", x.dtype()));
    push(&mut l, x);
    l.arg(&nn).arg(&kk).arg(&cc);
    push(&mut l, &out);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match top_k_rows(x, n, k, cap, out); x holds rows x n values (checked
    // above), out rows x (2 + 2 cap) f32.
    launched(&dev, unsafe { l.launch(cfg) })?;
    Ok(out)
}

/// `ops::gather_values` on the GPU: the values of `x` at the flat indices `at` (checked here
/// against its length), as f32 on the host; one thread an index.
pub fn gather_values(x: &CudaBuf, at: &[i64]) -> Result<Vec<f32>, TensorError> {
    let dev = x.dev.clone();
    let e = |err| dev_err(dev.ordinal, err);
    if at.iter().any(|&i| i < 0 || i as usize >= x.len()) || at.len() >= 1 << 31 {
        return Err(dev_err(
            dev.ordinal,
            format!("gather_values: an index past {} values", x.len()),
        ));
    }
    if at.is_empty() {
        return Ok(Vec::new());
    }
    let idx = dev.stream.clone_htod(at).map_err(e)?;
    let out = dev.stream.alloc_zeros::<f32>(at.len()).map_err(e)?;
    let m = at.len() as i32;
    let mut l = dev
        .stream
        .launch_builder(dev.func("gather_values", x.dtype()));
    push(&mut l, x);
    l.arg(&idx).arg(&m).arg(&out);
    let cfg = LaunchConfig {
        grid_dim: (at.len().div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match gather_values(x, at, m, out); every index is within x (checked
    // above), out holds m f32.
    launched(&dev, unsafe { l.launch(cfg) })?;
    let v = dev.stream.clone_dtoh(&out).map_err(e)?;
    dev.stream.synchronize().map_err(e)?;
    Ok(v)
}

/// Per row of `x` `[rows, n]`: (largest value m, sum of exp(x - m), the value at column
/// `targets[row]`, NaN where that is outside `[0, n)`), in f32, one block a row: only these
/// leave the device.
pub fn lse_rows(
    x: &CudaBuf,
    rows: usize,
    n: usize,
    targets: &[i32],
) -> Result<Vec<(f32, f32, f32)>, TensorError> {
    let dev = x.dev.clone();
    let e = |err| dev_err(dev.ordinal, err);
    if targets.len() != rows || rows == 0 {
        return Err(dev_err(dev.ordinal, "lse_rows: one target a row"));
    }
    let t = dev.stream.clone_htod(targets).map_err(e)?;
    let m = dev.stream.alloc_zeros::<f32>(rows).map_err(e)?;
    let s = dev.stream.alloc_zeros::<f32>(rows).map_err(e)?;
    let v = dev.stream.alloc_zeros::<f32>(rows).map_err(e)?;
    let nn = n as i32;
    let mut l = dev.stream.launch_builder(dev.func("lse_rows", x.dtype()));
    push(&mut l, x);
    l.arg(&t).arg(&nn).arg(&m).arg(&s).arg(&v);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    launched(&dev, unsafe { l.launch(cfg) })?;
    let m = dev.stream.clone_dtoh(&m).map_err(e)?;
    let s = dev.stream.clone_dtoh(&s).map_err(e)?;
    let v = dev.stream.clone_dtoh(&v).map_err(e)?;
    dev.stream.synchronize().map_err(e)?;
    Ok(m.into_iter()
        .zip(s)
        .zip(v)
        .map(|((m, s), v)| (m, s, v))
        .collect())
}

/// The attention inputs of a step from the fused projection `qkv` `[rows, hq + 2 hkv, hd]` (row r:
/// token r / batch of sequence r % batch): RoPE on q into a new `[rows, hq, hd]`, RoPE on k into the
/// K cache and v into the V cache (`[position, batch, hkv, hd]`) at positions `start..` (during a
/// capture, at the graph's position): one kernel.
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_append(
    qkv: &CudaBuf,
    kc: &CudaBuf,
    vc: &CudaBuf,
    rows: usize,
    batch: usize,
    hq: usize,
    hkv: usize,
    hd: usize,
    start: usize,
    inv_freq: &[f32],
) -> Result<CudaBuf, TensorError> {
    for b in [kc, vc] {
        same_dev(qkv, b)?;
    }
    let dev = qkv.dev.clone();
    let q = CudaBuf::alloc(&dev, qkv.dtype(), rows * hq * hd)?;
    let f = dev.table(inv_freq)?;
    let io = dev.capturing();
    let (bb, a, b, c, s) = (batch as i32, hq as i32, hkv as i32, hd as i32, start as i32);
    let mut l = dev
        .stream
        .launch_builder(dev.func("qkv_rope_append", qkv.dtype()));
    for buf in [qkv, &q, kc, vc] {
        push(&mut l, buf);
    }
    l.arg(f.as_ref()).arg(&bb).arg(&a).arg(&b).arg(&c).arg(&s);
    push_pos(&mut l, &io);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, (hq + hkv) as u32, 1),
        block_dim: ((hd / 2).clamp(32, 256) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    launched(&dev, unsafe { l.launch(cfg) })?;
    Ok(q)
}

/// The plan `decode_attention` runs on `dev` for `keys` positions in `dtype`: the forced kernel's
/// (`TESSERA_DECODE_ATTENTION`; the tensor-core kernel where none is loaded for this dtype, head
/// dim or device: the one-pass one), else the shape's (`decode_plan`, then `with_tensor_cores`
/// where the kernel is loaded); with the tensor-core kernel's function when the plan takes it.
pub(crate) fn device_decode_plan(
    dev: &GpuDevice,
    dtype: crate::DType,
    keys: usize,
    batch: usize,
    hq: usize,
    hkv: usize,
    hd: usize,
) -> (DecodePlan, Option<&cudarc::driver::CudaFunction>) {
    let mma = dtype == crate::DType::BF16 && dev.mma_decode_fn(hd, 1).is_some();
    let forced = match decode_kernel_choice() {
        Some(DecodeKernel::Mma) if !mma => Some(DecodeKernel::Flash),
        f => f,
    };
    let mut plan = decode_plan(keys, batch, hq, hkv, hd, dev.sms, forced);
    if forced.is_none() && mma {
        plan = with_tensor_cores(plan, keys, batch, (hq, hkv, hd), dev.sms);
    }
    let f = match plan.run {
        DecodeRun::TensorCores(gb) => dev.mma_decode_fn(hd, gb),
        _ => None,
    };
    (plan, f)
}

/// The splits of `per` positions a decode attention call launches over a cache of `capacity`
/// positions (within the window): in a captured step (`keys` None) all of them; outside one,
/// those its `keys` positions reach, and at least two where the captured step has several. A
/// split past the position adds exact zeros to the join (`attention_combine`: a maximum of -inf,
/// a sum and an output of 0), and a call of one split writes its output without the join, so a
/// step outside a graph then joins too: the same values as the captured step, bit for bit.
pub(crate) fn decode_splits(capacity: usize, keys: Option<usize>, per: usize) -> usize {
    let all = capacity.div_ceil(per).max(1);
    match keys {
        None => all,
        Some(_) if all == 1 => 1,
        Some(k) => k.div_ceil(per).clamp(2, all),
    }
}

/// One decode step's attention from the fused projection `qkv` `[batch, hq + 2 hkv, hd]` (`hq`,
/// `hkv`: one sequence's heads) at position `start` (during a capture, the graph's position):
/// RoPE, the K/V append and attention in one kernel. Returns `[batch hq, hd]`.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    qkv: &CudaBuf,
    kc: &CudaBuf,
    vc: &CudaBuf,
    batch: usize,
    hq: usize,
    hkv: usize,
    hd: usize,
    start: usize,
    inv_freq: &[f32],
    window: Option<usize>,
    scale: f32,
) -> Result<CudaBuf, TensorError> {
    for b in [kc, vc] {
        same_dev(qkv, b)?;
    }
    let dev = qkv.dev.clone();
    check_head_dim(&dev, hd)?;
    let io = dev.capturing();
    // The plan is the cache's (its capacity, within the window), in a captured step and outside
    // one alike: a captured step reads its position on the device, so its splits cover the whole
    // cache; a step outside a graph runs the same kernel and split boundaries over the splits its
    // position reaches (`decode_splits`), so both give the same values bit for bit.
    let capacity = kc.len() / (batch * hkv * hd);
    let capacity = window.map_or(capacity, |w| capacity.min(w));
    let keys = window.map_or(start + 1, |w| (start + 1).min(w));
    let g = hq / hkv;
    let (plan, mma) = device_decode_plan(&dev, qkv.dtype(), capacity, batch, hq, hkv, hd);
    let per = plan.per;
    let splits = decode_splits(capacity, (io.is_none()).then_some(keys), per);
    if batch * hq > 65535 {
        return Err(dev_err(
            dev.ordinal,
            format!(
                "the CUDA decode attention takes at most 65535 query heads a step, {batch} x {hq} asked"
            ),
        ));
    }
    let smem = match plan.run {
        DecodeRun::TensorCores(gb) => mma_decode_smem(gb, hd),
        DecodeRun::OnePass(gb) => flash_smem(gb, hd),
        DecodeRun::TwoPass(gb) => (gb * hd + 2 * hd + gb * per + 4 * gb * hd + 2 * gb) * 4,
        DecodeRun::PerHead => (3 * hd + per) * 4,
    };
    let out = CudaBuf::alloc(&dev, qkv.dtype(), batch * hq * hd)?;
    let f = dev.table(inv_freq)?;
    // Kernel arguments batch, hq, hkv, hd, start, window (mutable: the PDL launch passes their
    // addresses).
    let mut ints = [batch, hq, hkv, hd, start, window.unwrap_or(0)].map(|v| v as i32);
    let heads = batch * hq;
    // Split partials (running max, sum, unnormalised output), only when there are several splits.
    // Every split writes its slots before attention_combine reads them.
    let parts = if splits > 1 {
        Some((
            dev.temp::<f32>(splits * heads)?,
            dev.temp::<f32>(splits * heads)?,
            dev.temp::<f32>(splits * heads * hd)?,
        ))
    } else {
        None
    };
    let rows = match plan.run.heads_per_block() {
        Some(gb) => batch * hkv * (g / gb),
        None => heads,
    };
    let cfg = LaunchConfig {
        grid_dim: (splits as u32, rows as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let f_kernel = match mma {
        Some(f) => f,
        None => dev.func(plan.run.kernel(), qkv.dtype()),
    };
    // Both kernels start with programmatic dependent launch: the vectorised one loads its cached
    // K/V rows and computes its RoPE angles while the QKV projection before it finishes, and
    // waits for that kernel (`pdl_wait`) only before it reads this step's q, k, v; the per-head
    // one waits at its start.
    use cudarc::driver::DevicePtr;
    let st = &dev.stream;
    let slice_ptr = |x: &cudarc::driver::CudaSlice<f32>| x.device_ptr(st).0;
    let mut ptrs = [
        dptr(qkv),
        dptr(kc),
        dptr(vc),
        dptr(&out),
        0,
        0,
        0,
        slice_ptr(f.as_ref()),
    ];
    if let Some((m, sums, acc)) = &parts {
        ptrs[4..7].copy_from_slice(&[slice_ptr(m), slice_ptr(sums), slice_ptr(acc)]);
    }
    let mut pos = io.as_ref().map_or(0, |io| io.pos.device_ptr(st).0);
    let mut scale = scale;
    let mut per = per as i32;
    let mut gb = plan.run.heads_per_block().map(|g| g as i32);
    let mut params = raw_params(&mut ptrs);
    params.extend(raw_params(&mut ints));
    params.push((&mut scale as *mut f32).cast());
    params.push((&mut per as *mut i32).cast());
    if let Some(gb) = &mut gb {
        params.push((gb as *mut i32).cast());
    }
    params.push((&mut pos as *mut u64).cast());
    // SAFETY: the parameters match the kernels' signatures (qkv, kc, vc, out, part_m, part_l,
    // part_acc, inv_freq, batch, hq, hkv, hd, start, window, scale, per, [gb for the vectorised
    // kernel,] pos_ptr) and outlive the call; the buffers are live device memory of this context.
    unsafe { launch_pdl(&dev, f_kernel, cfg, &mut params)? };
    if parts.is_some() {
        let (mut ns, mut hdd) = (splits as i32, hd as i32);
        let mut ptrs = [ptrs[4], ptrs[5], ptrs[6], dptr(&out)];
        let mut params = raw_params(&mut ptrs);
        params.push((&mut ns as *mut i32).cast());
        params.push((&mut hdd as *mut i32).cast());
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the parameters match attention_combine(part_m, part_l, part_acc, out, splits,
        // hd) over the split buffers above and `out`, and outlive the call.
        let f = dev.func("attention_combine", qkv.dtype());
        unsafe { launch_pdl(&dev, f, cfg, &mut params)? };
    }
    Ok(out)
}

//! The CUDA backend: devices, device storage and the GPU kernel of every op.
//!
//! GEMMs go through cuBLAS (bf16 or f32 in, f32 accumulate); every other op is a kernel of
//! `kernels.cu`, compiled once per process and device with NVRTC for the device's architecture.
//! cudarc loads the CUDA libraries at run time, so this builds on machines without CUDA; where the
//! driver is missing, [`GpuDevice::get`] returns a clear error instead of panicking.

mod bench;
pub mod graph;
mod lt;
pub mod nccl;
mod ops;
pub mod p2p;

pub use bench::{
    bench_decode_attention, bench_gemm, bench_gemv, AttentionTiming, GemmTiming, GemvTiming,
};
pub use ops::*;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};
use half::bf16;

use crate::{DType, TensorError};

const KERNELS: &str = include_str!("kernels.cu");
const KERNEL_NAMES: [&str; 19] = [
    "rms_norm",
    "add_rms_norm",
    "rope",
    "silu_mul",
    "silu_mul_halves",
    "add_inplace",
    "add_bias",
    "embedding",
    "attention",
    "fill_random",
    "argmax_rows",
    "qkv_rope_append",
    "decode_attention",
    "decode_attention_gqa1",
    "decode_attention_gqa2",
    "decode_attention_gqa4",
    "decode_attention_gqa8",
    "attention_combine",
    "one_shot_all_reduce",
];

/// Rows of `x` up to which bf16 matmuls use the decode GEMV kernel instead of cuBLAS (see
/// `kernels.cu` for the measurement behind the limit).
pub const GEMV_MAX_ROWS: usize = 1;

/// A decode GEMV kernel of `kernels.cu`: its name, the weight rows a warp takes (gated: the gate
/// and up rows of half as many outputs), whether it is gated, and how many warps share a row group
/// (split-K).
#[derive(Clone, Copy, Debug)]
pub struct GemvVariant {
    pub name: &'static str,
    pub rows_per_warp: usize,
    pub gated: bool,
    pub splits: usize,
}

const fn gv(name: &'static str, rows_per_warp: usize, gated: bool, splits: usize) -> GemvVariant {
    GemvVariant {
        name,
        rows_per_warp,
        gated,
        splits,
    }
}

/// Every decode GEMV kernel, for `tessera bench gemv`; `GpuDevice::gemv` picks among them.
pub const GEMV_VARIANTS: &[GemvVariant] = &[
    gv("r2u2", 2, false, 1),
    gv("r2u2s4", 2, false, 4),
    gv("r4u1", 4, false, 1),
    gv("r4u1s2", 4, false, 2),
    gv("r4u1s4", 4, false, 4),
    gv("r4u1s8", 4, false, 8),
    gv("r8u1s4", 8, false, 4),
    gv("gated_u2", 2, true, 1),
    gv("gated_u2s4", 2, true, 4),
    gv("gated_r4u1", 4, true, 1),
    gv("gated_r4u1s2", 4, true, 2),
    gv("gated_r4u1s4", 4, true, 4),
];

/// A decode GEMV kernel and its shape of work: the plain kernel `f`, and the same GEMV after an
/// RMSNorm of its input (`norm`) or after a residual add and an RMSNorm (`add_norm`).
pub(crate) struct Gemv {
    pub(crate) f: CudaFunction,
    pub(crate) norm: CudaFunction,
    pub(crate) add_norm: CudaFunction,
    pub(crate) v: GemvVariant,
}

impl Gemv {
    /// `splits` warps per group of `rows_per_warp` outputs (gated: half as many), 8 warps a block.
    pub(crate) fn config(&self, n: usize) -> cudarc::driver::LaunchConfig {
        let outs = if self.v.gated {
            self.v.rows_per_warp / 2
        } else {
            self.v.rows_per_warp
        };
        let groups = n.div_ceil(outs);
        cudarc::driver::LaunchConfig {
            grid_dim: ((groups * self.v.splits).div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// The decode GEMV kernels a step uses (`tessera bench gemv`, H200, Llama-3-8B shapes at tp 1
/// and 2, BENCHMARKS.md): four rows a warp with one load each in flight, and four warps sharing
/// each row (split-K), fastest or within 2% of it at every plain shape; the gated kernel with
/// two outputs a warp (their gate and up rows) likewise.
const GEMV_PLAIN: &str = "r4u1s4";
const GEMV_GATED: &str = "gated_r4u1s4";

/// `TESSERA_GEMV=<plain>,<gated>`, checked against `GEMV_VARIANTS`.
fn gemv_choice() -> Result<[&'static str; 2], String> {
    parse_gemv_choice(std::env::var("TESSERA_GEMV").ok().as_deref())
}

fn parse_gemv_choice(v: Option<&str>) -> Result<[&'static str; 2], String> {
    let Some(v) = v else {
        return Ok([GEMV_PLAIN, GEMV_GATED]);
    };
    let find = |name: &str, gated: bool| {
        GEMV_VARIANTS
            .iter()
            .find(|g| g.name == name && g.gated == gated)
            .map(|g| g.name)
    };
    match v.split_once(',') {
        Some((p, g)) => match (find(p.trim(), false), find(g.trim(), true)) {
            (Some(p), Some(g)) => Ok([p, g]),
            _ => Err(format!(
                "TESSERA_GEMV={v}: expected <plain>,<gated> kernel names of GEMV_VARIANTS"
            )),
        },
        None => Err(format!("TESSERA_GEMV={v}: expected <plain>,<gated>")),
    }
}

/// One GPU: its context, the stream every op of this process runs on, cuBLAS and the kernels.
pub struct GpuDevice {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub(crate) blas: Mutex<CudaBlas>,
    /// cuBLASLt with measured kernel choices, for the bf16 GEMMs of a decode batch
    /// (`TESSERA_CUBLASLT=0`: cuBLAS's GEMM instead, for measurements).
    pub(crate) lt: Option<Mutex<lt::Lt>>,
    funcs: HashMap<(&'static str, DType), CudaFunction>,
    /// Every decode GEMV kernel of `GEMV_VARIANTS`, by name.
    pub(crate) gemv: HashMap<&'static str, Gemv>,
    /// The plain and the gated decode GEMV kernel a step uses.
    gemv_used: [&'static str; 2],
    /// Decode GEMVs compute the RMSNorm before them themselves (`ops::norm_gemv`);
    /// `TESSERA_FUSED_NORM=0` runs the norm kernel instead (for measurements).
    pub(crate) fused_norm: bool,

    /// GEMV launches use programmatic dependent launch (sm_90+).
    pub(crate) pdl: bool,
    /// Streaming multiprocessors (sizes the splits of decode attention).
    pub(crate) sms: usize,
    /// Small constant tables (RoPE inverse frequencies) uploaded once, keyed by their contents.
    tables: Mutex<HashMap<Vec<u32>, Arc<CudaSlice<f32>>>>,
    /// While a decode step is being captured: the device buffers its kernels read their inputs
    /// from and write their outputs to.
    pub(crate) capture: Mutex<Option<Arc<graph::GraphIo>>>,
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{}", self.ordinal)
    }
}

pub(crate) fn dev_err(ordinal: usize, e: impl std::fmt::Display) -> TensorError {
    TensorError::Device(format!("cuda:{ordinal}"), e.to_string())
}

static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<GpuDevice>>>> = OnceLock::new();

impl GpuDevice {
    /// The device `ordinal`, initialised (kernels compiled) on first use and shared afterwards.
    pub fn get(ordinal: usize) -> Result<Arc<GpuDevice>, TensorError> {
        let map = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let d = Arc::new(Self::init(ordinal)?);
        map.insert(ordinal, d.clone());
        Ok(d)
    }

    fn init(ordinal: usize) -> Result<Self, TensorError> {
        let err = |e: &dyn std::fmt::Display| dev_err(ordinal, e);
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(err(
                &"the CUDA driver library (libcuda.so) was not found on this machine",
            ));
        }
        let n =
            CudaContext::device_count().map_err(|e| err(&format!("cannot count devices: {e}")))?;
        if ordinal >= n as usize {
            return Err(err(&format!("this machine has {n} CUDA device(s)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| err(&e))?;
        // One stream per device: ordering comes from the stream, so per-buffer events are waste.
        // SAFETY: all work of this process on this device is issued on `stream` below.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| err(&e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| err(&e))?;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            options: vec!["--std=c++17".into()],
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts)
            .map_err(|e| err(&format!("NVRTC could not compile the kernels: {e}")))?;
        let module = ctx.load_module(ptx).map_err(|e| err(&e))?;
        let mut funcs = HashMap::new();
        for name in KERNEL_NAMES {
            for dtype in [DType::F32, DType::BF16] {
                let full = format!("{name}_{}", dtype.name());
                let f = module
                    .load_function(&full)
                    .map_err(|e| err(&format!("{full}: {e}")))?;
                funcs.insert((name, dtype), f);
            }
        }
        let mut gemv = HashMap::new();
        for &v in GEMV_VARIANTS {
            let load = |prefix: &str| {
                let full = format!("{prefix}{}", v.name);
                module
                    .load_function(&full)
                    .map_err(|e| err(&format!("{full}: {e}")))
            };
            let g = Gemv {
                f: load("gemv_")?,
                norm: load("gemv_norm_")?,
                add_norm: load("gemv_addnorm_")?,
                v,
            };
            gemv.insert(v.name, g);
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| err(&e))?;
        let lt = match std::env::var("TESSERA_CUBLASLT").as_deref() {
            Ok("0") => None,
            _ => Some(Mutex::new(
                lt::Lt::new(stream.clone()).map_err(|e| err(&e))?,
            )),
        };
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| err(&e))?
            .max(1) as usize;
        Ok(GpuDevice {
            sms,
            ordinal,
            ctx,
            stream,
            blas: Mutex::new(blas),
            lt,
            funcs,
            gemv,
            gemv_used: gemv_choice().map_err(|e| err(&e))?,
            fused_norm: std::env::var("TESSERA_FUSED_NORM").map_or(true, |v| v != "0"),
            // TESSERA_PDL=0 turns programmatic dependent launch off (a debugging aid).
            pdl: major >= 9 && std::env::var("TESSERA_PDL").map_or(true, |v| v != "0"),
            tables: Mutex::new(HashMap::new()),
            capture: Mutex::new(None),
        })
    }

    pub(crate) fn func(&self, name: &'static str, dtype: DType) -> &CudaFunction {
        self.funcs
            .get(&(name, dtype))
            .unwrap_or_else(|| panic!("kernel {name} ({dtype}) is compiled at init"))
    }

    /// The decode GEMV kernel, plain or gated (`silu(x Wg^T) * (x Wu^T)` in one pass): see
    /// `GEMV_PLAIN` and `GEMV_GATED`, or `TESSERA_GEMV=<plain>,<gated>` (names of
    /// `GEMV_VARIANTS`; for measurements).
    pub(crate) fn gemv(&self, gated: bool) -> &Gemv {
        &self.gemv[self.gemv_used[gated as usize]]
    }

    /// The capture in progress on this device, if any.
    pub(crate) fn capturing(&self) -> Option<Arc<graph::GraphIo>> {
        self.capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `v` on the device, uploaded on first use only.
    pub(crate) fn table(&self, v: &[f32]) -> Result<Arc<CudaSlice<f32>>, TensorError> {
        let key: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = t.get(&key) {
            return Ok(s.clone());
        }
        let s = Arc::new(
            self.stream
                .clone_htod(v)
                .map_err(|e| dev_err(self.ordinal, e))?,
        );
        t.insert(key, s.clone());
        Ok(s)
    }

    pub fn synchronize(&self) -> Result<(), TensorError> {
        self.stream
            .synchronize()
            .map_err(|e| dev_err(self.ordinal, e))
    }
}

/// f16 has no GPU kernels yet: the one refusal of every GPU allocation.
fn no_f16(dev: &GpuDevice) -> TensorError {
    dev_err(
        dev.ordinal,
        "f16 is not supported on CUDA yet; use bf16 or f32",
    )
}

/// Typed device memory.
pub enum CudaData {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
}

/// A buffer on a GPU.
pub struct CudaBuf {
    pub data: CudaData,
    pub dev: Arc<GpuDevice>,
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBuf({:?}, {} x {})",
            self.dev,
            self.len(),
            self.dtype()
        )
    }
}

impl Clone for CudaBuf {
    fn clone(&self) -> Self {
        let data = match &self.data {
            CudaData::F32(s) => CudaData::F32(self.dev.stream.clone_dtod(s).expect("device copy")),
            CudaData::BF16(s) => {
                CudaData::BF16(self.dev.stream.clone_dtod(s).expect("device copy"))
            }
        };
        CudaBuf {
            data,
            dev: self.dev.clone(),
        }
    }
}

impl PartialEq for CudaBuf {
    fn eq(&self, other: &Self) -> bool {
        self.dtype() == other.dtype() && self.to_f32_vec().ok() == other.to_f32_vec().ok()
    }
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        match &self.data {
            CudaData::F32(s) => s.len(),
            CudaData::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match &self.data {
            CudaData::F32(_) => DType::F32,
            CudaData::BF16(_) => DType::BF16,
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> TensorError {
        dev_err(self.dev.ordinal, e)
    }

    pub fn zeros(dev: &Arc<GpuDevice>, dtype: DType, n: usize) -> Result<Self, TensorError> {
        let e = |e| dev_err(dev.ordinal, e);
        let data = match dtype {
            DType::F32 => CudaData::F32(dev.stream.alloc_zeros(n).map_err(e)?),
            DType::BF16 => CudaData::BF16(dev.stream.alloc_zeros(n).map_err(e)?),
            DType::F16 => return Err(no_f16(dev)),
        };
        Ok(CudaBuf {
            data,
            dev: dev.clone(),
        })
    }

    /// Uninitialised memory, for outputs every element of which a kernel writes.
    pub(crate) fn alloc(dev: &Arc<GpuDevice>, dtype: DType, n: usize) -> Result<Self, TensorError> {
        let e = |e| dev_err(dev.ordinal, e);
        // SAFETY: callers write every element before it is read.
        let data = unsafe {
            match dtype {
                DType::F32 => CudaData::F32(dev.stream.alloc(n).map_err(e)?),
                DType::BF16 => CudaData::BF16(dev.stream.alloc(n).map_err(e)?),
                DType::F16 => return Err(no_f16(dev)),
            }
        };
        Ok(CudaBuf {
            data,
            dev: dev.clone(),
        })
    }

    /// Uploads f32 values, converted on the host to `dtype`.
    pub fn from_f32(dev: &Arc<GpuDevice>, dtype: DType, v: &[f32]) -> Result<Self, TensorError> {
        let mut b = Self::alloc(dev, dtype, v.len())?;
        b.write_f32(0, v)?;
        Ok(b)
    }

    pub fn write_f32(&mut self, offset: usize, src: &[f32]) -> Result<(), TensorError> {
        let n = src.len();
        let stream = self.dev.stream.clone();
        let r = match &mut self.data {
            CudaData::F32(s) => stream.memcpy_htod(src, &mut s.slice_mut(offset..offset + n)),
            CudaData::BF16(s) => {
                let h: Vec<bf16> = src.iter().map(|&x| bf16::from_f32(x)).collect();
                stream.memcpy_htod(&h, &mut s.slice_mut(offset..offset + n))
            }
        };
        r.map_err(|e| self.err(e))
    }

    pub fn read_f32(&self, offset: usize, dst: &mut [f32]) -> Result<(), TensorError> {
        let n = dst.len();
        let stream = &self.dev.stream;
        match &self.data {
            CudaData::F32(s) => stream.memcpy_dtoh(&s.slice(offset..offset + n), dst),
            CudaData::BF16(s) => {
                let mut h = vec![bf16::ZERO; n];
                stream
                    .memcpy_dtoh(&s.slice(offset..offset + n), &mut h)
                    .and_then(|_| stream.synchronize())
                    .map(|_| {
                        for (d, x) in dst.iter_mut().zip(&h) {
                            *d = x.to_f32();
                        }
                    })
            }
        }
        .and_then(|_| stream.synchronize())
        .map_err(|e| self.err(e))
    }

    pub fn to_f32_vec(&self) -> Result<Vec<f32>, TensorError> {
        let mut v = vec![0.0; self.len()];
        self.read_f32(0, &mut v)?;
        Ok(v)
    }

    /// Copies `src` (same dtype and device) into elements `offset..`.
    pub fn copy_from(&mut self, offset: usize, src: &CudaBuf) -> Result<(), TensorError> {
        let n = src.len();
        let stream = self.dev.stream.clone();
        match (&mut self.data, &src.data) {
            (CudaData::F32(d), CudaData::F32(s)) => {
                stream.memcpy_dtod(s, &mut d.slice_mut(offset..offset + n))
            }
            (CudaData::BF16(d), CudaData::BF16(s)) => {
                stream.memcpy_dtod(s, &mut d.slice_mut(offset..offset + n))
            }
            _ => return Err(self.err("copy between device buffers of different dtypes")),
        }
        .map_err(|e| self.err(e))
    }

    /// Elements `lo..hi` as a new buffer.
    pub fn slice_copy(&self, lo: usize, hi: usize) -> Result<CudaBuf, TensorError> {
        let mut out = Self::alloc(&self.dev, self.dtype(), hi - lo)?;
        let stream = self.dev.stream.clone();
        match (&mut out.data, &self.data) {
            (CudaData::F32(d), CudaData::F32(s)) => stream.memcpy_dtod(&s.slice(lo..hi), d),
            (CudaData::BF16(d), CudaData::BF16(s)) => stream.memcpy_dtod(&s.slice(lo..hi), d),
            _ => unreachable!("same dtype"),
        }
        .map_err(|e| self.err(e))?;
        Ok(out)
    }
}

/// Checks that `cuda:ordinal` can be used.
/// For GPU test binaries: how many of the GPUs `0..max` this machine has. Having none is a skip,
/// said on stderr, unless `TESSERA_REQUIRE_GPU` is set (the GPU check script sets it): then it
/// panics, so that a GPU run that found no GPU fails instead of passing empty.
pub fn test_gpus(max: usize) -> usize {
    let n = (0..max)
        .take_while(|&i| crate::Device::Cuda(i).ensure_available().is_ok())
        .count();
    if n == 0 {
        let why = crate::Device::Cuda(0)
            .ensure_available()
            .err()
            .map_or_else(|| "no GPU".to_string(), |e| e.to_string());
        assert!(
            std::env::var("TESSERA_REQUIRE_GPU").is_err(),
            "no GPU: {why}"
        );
        eprintln!("skipped: {why}");
    }
    n
}

pub fn ensure_device(ordinal: usize) -> Result<(), TensorError> {
    GpuDevice::get(ordinal).map(|_| ())
}

/// Device-to-device copy bandwidth of `ordinal` in bytes/s (bytes read + written), median of 10
/// copies of 1 GiB after a warm-up: the ceiling of memory-bound kernels.
pub fn copy_bandwidth(ordinal: usize) -> Result<f64, TensorError> {
    let dev = GpuDevice::get(ordinal)?;
    let e = |x| dev_err(ordinal, x);
    let n = 1usize << 28; // f32 elements: 1 GiB
    let src: CudaSlice<f32> = dev.stream.alloc_zeros(n).map_err(e)?;
    let mut dst: CudaSlice<f32> = dev.stream.alloc_zeros(n).map_err(e)?;
    dev.stream.memcpy_dtod(&src, &mut dst).map_err(e)?;
    let mut times = Vec::new();
    for _ in 0..10 {
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = dev.ctx.new_event(timed).map_err(e)?;
        let end = dev.ctx.new_event(timed).map_err(e)?;
        start.record(&dev.stream).map_err(e)?;
        dev.stream.memcpy_dtod(&src, &mut dst).map_err(e)?;
        end.record(&dev.stream).map_err(e)?;
        end.synchronize().map_err(e)?;
        times.push(start.elapsed_ms(&end).map_err(e)? as f64 / 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * (n * 4) as f64 / times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemv_choice_takes_known_plain_and_gated_names_only() {
        assert_eq!(parse_gemv_choice(None).unwrap(), [GEMV_PLAIN, GEMV_GATED]);
        assert_eq!(
            parse_gemv_choice(Some("r2u2, gated_u2")).unwrap(),
            ["r2u2", "gated_u2"]
        );
        for bad in ["r2u2", "gated_u2,r2u2", "r2u2,nope", "", ","] {
            let e = parse_gemv_choice(Some(bad)).unwrap_err();
            assert!(e.starts_with("TESSERA_GEMV="), "{e}");
        }
        // Every variant's kernel name is unique, and the defaults are variants.
        let mut names: Vec<_> = GEMV_VARIANTS.iter().map(|v| v.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), GEMV_VARIANTS.len());
        assert!(names.contains(&GEMV_PLAIN) && names.contains(&GEMV_GATED));
    }

    #[test]
    fn decode_attention_takes_the_most_heads_a_block_that_still_fills_the_gpu() {
        use super::ops::{decode_plan, DecodeKernel, DecodePlan};
        let plan =
            |keys, batch, hq, hkv, hd, forced| decode_plan(keys, batch, hq, hkv, hd, 132, forced);
        let p = |gb, per| DecodePlan {
            heads_per_block: gb,
            per,
        };
        // Llama-3-8B at tp 1 (32 / 8 heads of 128): batch 32 and 64 fill 132 SMs with whole
        // groups, batch 8 only with one query head a block, batch 1 never (one head a block, one
        // split for a short cache, 256-position splits for a long one).
        assert_eq!(plan(48, 64, 32, 8, 128, None), p(Some(4), 256));
        assert_eq!(plan(48, 32, 32, 8, 128, None), p(Some(4), 256));
        assert_eq!(plan(48, 8, 32, 8, 128, None), p(Some(1), 256));
        assert_eq!(plan(512, 8, 32, 8, 128, None), p(Some(1), 256));
        assert_eq!(plan(48, 1, 32, 8, 128, None), p(Some(1), 64));
        assert_eq!(plan(200, 1, 32, 8, 128, None), p(Some(1), 64));
        assert_eq!(plan(2048, 1, 32, 8, 128, None), p(Some(1), 256));
        assert_eq!(plan(2048, 32, 32, 8, 128, None), p(Some(4), 256));
        // Forced: whole groups take shorter splits first; the per-head kernel keeps its 256.
        let grouped = Some(DecodeKernel::Grouped);
        assert_eq!(plan(2048, 1, 32, 8, 128, grouped), p(Some(4), 64));
        assert_eq!(
            plan(48, 64, 32, 8, 128, Some(DecodeKernel::ByHead)),
            p(Some(1), 256)
        );
        assert_eq!(
            plan(48, 64, 32, 8, 128, Some(DecodeKernel::PerHead)),
            p(None, 256)
        );
        // g = 12: blocks of 6 (a divisor within the 8 accumulators), else of 1; g = 8 at hd 256: 4
        // (gb hd <= 1024); hd 48 (hd / 8 not a power of two): the per-head kernel.
        assert_eq!(plan(700, 8, 12, 1, 32, None), p(Some(1), 256));
        assert_eq!(plan(700, 64, 12, 1, 32, grouped), p(Some(6), 256));
        assert_eq!(plan(700, 64, 8, 1, 256, grouped), p(Some(4), 256));
        assert_eq!(plan(700, 64, 6, 2, 48, None), p(None, 256));
    }

    #[test]
    fn a_forced_decode_kernel_is_the_one_in_use() {
        use super::ops::{decode_kernel_choice, force_decode_kernel, DecodeKernel};
        for k in DecodeKernel::ALL {
            force_decode_kernel(Some(k));
            assert_eq!(decode_kernel_choice(), Some(k), "{}", k.name());
        }
        force_decode_kernel(None);
        assert_eq!(decode_kernel_choice(), None);
    }
}

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
mod pdl_probe;
mod persistent_probe;

pub use bench::{
    bench_decode_attention, bench_gemm, bench_gemv, bench_prefill_attention, gemm_rate,
    probe_gemm_kernels, AttentionTiming, GemmProbe, GemmTiming, GemvTiming, PrefillTiming,
};
pub use ops::*;
pub use persistent_probe::{
    probe_outputs, probe_persistent, probe_reference, Ahead, PersistentTiming, StepShape,
};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};
use half::bf16;

use crate::{DType, TensorError};

const KERNELS: &str = include_str!("kernels.cu");
const KERNEL_NAMES: [&str; 35] = [
    "rms_norm1",
    "rms_norm2",
    "rms_norm4",
    "add_rms_norm1",
    "add_rms_norm2",
    "add_rms_norm4",
    "rope",
    "head_rms_norm",
    "silu_mul",
    "silu_mul_halves",
    "add_inplace",
    "add_bias",
    "embedding",
    "attention",
    "attention_tiled8",
    "attention_tiled16",
    "attention_tiled32",
    "fill_random",
    "argmax_rows",
    "top_k_rows",
    "gather_values",
    "lse_rows",
    "qkv_rope_append",
    "decode_attention",
    "decode_attention_gqa1",
    "decode_attention_gqa2",
    "decode_attention_gqa4",
    "decode_attention_gqa8",
    "decode_attention_flash1",
    "decode_attention_flash2",
    "decode_attention_flash4",
    "attention_combine",
    "all_reduce_add_rms_norm1",
    "all_reduce_add_rms_norm2",
    "all_reduce_add_rms_norm4",
];

/// Rows of `x` up to which bf16 matmuls use the decode GEMV kernel instead of cuBLAS (see
/// `kernels.cu` for the measurement behind the limit).
pub const GEMV_MAX_ROWS: usize = 1;

/// Rows of `x` above `GEMV_MAX_ROWS` up to which bf16 matmuls run on the skinny tensor-core GEMM
/// (`skinny_gemm` in `kernels.cu`, k split as measured per shape) instead of cuBLASLt. In a
/// captured decode step whose intermediates are in the graph's arena, programmatic dependent
/// launch lets it stream its weights while the kernel before it finishes, and the step is faster
/// with it (one H200, batch 2-16: 1-9%, BENCHMARKS.md); timed alone, cuBLASLt's best is faster
/// on most shapes, so the tuner does not pit the two against each other. An eager step, which
/// launches with PDL too, gains as well (batch 2-16: 3-9%). The split of k is chosen by the
/// cuBLASLt path's tuner, so `TESSERA_CUBLASLT=0` turns both off.
pub const SKINNY_MAX_ROWS: usize = 16;

/// Which bf16 GEMMs run on the skinny GEMM: `Auto` those of 2 to `SKINNY_MAX_ROWS` rows, `Never`
/// none, `All` every one of up to 64 rows (`TESSERA_SKINNY=auto|0|all`; for measurements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkinnyUse {
    Auto,
    Never,
    All,
}

impl SkinnyUse {
    fn from_env() -> Result<Self, String> {
        Self::parse(std::env::var("TESSERA_SKINNY").ok().as_deref())
    }

    fn parse(v: Option<&str>) -> Result<Self, String> {
        let names = [("auto", Self::Auto), ("0", Self::Never), ("all", Self::All)];
        env_choice("TESSERA_SKINNY", v, &names)
    }
}

/// The value an environment switch `var` names among `names` (name, value): its value `v`
/// trimmed, unset or empty the first name's. Anything else is an error that lists the names.
pub(crate) fn env_choice<T: Copy>(
    var: &str,
    v: Option<&str>,
    names: &[(&str, T)],
) -> Result<T, String> {
    let v = v.map_or("", str::trim);
    let v = if v.is_empty() { names[0].0 } else { v };
    if let Some(&(_, value)) = names.iter().find(|(name, _)| *name == v) {
        return Ok(value);
    }
    let listed: Vec<&str> = names.iter().map(|(name, _)| *name).collect();
    let (last, rest) = listed.split_last().expect("at least one name");
    Err(format!("{var}={v}: expected {} or {last}", rest.join(", ")))
}

/// A 1/0 switch of the environment: `var`'s value `v`, unset or empty `default`; anything else
/// is an error naming the variable.
pub(crate) fn env_flag(var: &str, v: Option<&str>, default: bool) -> Result<bool, String> {
    let names = if default {
        [("1", true), ("0", false)]
    } else {
        [("0", false), ("1", true)]
    };
    env_choice(var, v, &names)
}

/// The 1/0 switches this backend reads, with their defaults: cuBLASLt's tuned GEMMs, the norm
/// inside the GEMV, programmatic dependent launch, the fused NVLink all-reduce + norm between
/// in-process tp ranks, and that path's measurement aids (pushing GEMVs, a fence, its stats), the
/// prefill attention kernels, and whether NCCL ranks move small host bytes through their host
/// communicator.
pub const FLAG_SWITCHES: [(&str, bool); 11] = [
    ("TESSERA_CUBLASLT", true),
    ("TESSERA_FUSED_NORM", true),
    ("TESSERA_PDL", true),
    ("TESSERA_P2P_ALLREDUCE", true),
    ("TESSERA_P2P_PUSH", false),
    ("TESSERA_P2P_FENCE", false),
    ("TESSERA_P2P_STATS", false),
    ("TESSERA_TILED_ATTENTION", true),
    ("TESSERA_MMA_ATTENTION", true),
    ("TESSERA_WG_ATTENTION", true),
    ("TESSERA_NCCL_HOST_BYTES", true),
];

/// A 1/0 switch of [`FLAG_SWITCHES`] as the environment sets it (unset: its default).
pub fn flag_switch(var: &str) -> Result<bool, String> {
    let default = FLAG_SWITCHES
        .iter()
        .find(|(name, _)| *name == var)
        .map(|&(_, d)| d)
        .ok_or_else(|| format!("{var} is not a switch of the CUDA backend"))?;
    env_flag(var, std::env::var(var).ok().as_deref(), default)
}

/// Every `TESSERA_*` switch this backend reads, checked with `get` (the environment's value of
/// a variable): the first value it does not accept as a one-line error naming the variable and
/// the values it takes. [`GpuDevice::get`] runs it on the environment before anything else, so
/// a misspelt switch stops the first use of a GPU instead of silently measuring the default.
pub fn check_switches(get: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
    for (var, default) in FLAG_SWITCHES {
        env_flag(var, get(var).as_deref(), default)?;
    }
    SkinnyUse::parse(get("TESSERA_SKINNY").as_deref())?;
    parse_gemv_choice(get("TESSERA_GEMV").as_deref())?;
    graph::GraphArena::parse(get("TESSERA_GRAPH_ARENA").as_deref())?;
    ops::parse_decode_kernel(get("TESSERA_DECODE_ATTENTION").as_deref())?;
    p2p::parse_trigger(get("TESSERA_P2P_TRIGGER").as_deref())?;
    Ok(())
}

/// A decode GEMV kernel of `kernels.cu`: its name, the weight rows a warp takes (gated: the gate
/// and up rows of half as many outputs), whether it is gated, how many warps share a row group
/// (split-K), and how many 512-byte stretches of each row a warp copies into shared memory
/// before it waits for the kernel before it (`prefetch`, the plain and pushing kernels only).
#[derive(Clone, Copy, Debug)]
pub struct GemvVariant {
    pub name: &'static str,
    pub rows_per_warp: usize,
    pub gated: bool,
    pub splits: usize,
    pub prefetch: usize,
}

impl GemvVariant {
    /// The variant whose fused-norm kernels this one uses: itself, or for a prefetching variant
    /// (`<base>p<N>`, `GEMV_PREFETCH` in `kernels.cu`) its base, whose are the same code.
    fn fused_norm_base(&self) -> &'static str {
        let suffix = format!("p{}", self.prefetch);
        match self.name.strip_suffix(suffix.as_str()) {
            Some(base) if self.prefetch > 0 => base,
            _ => self.name,
        }
    }
}

const fn gv(name: &'static str, rows_per_warp: usize, gated: bool, splits: usize) -> GemvVariant {
    gvp(name, rows_per_warp, gated, splits, 0)
}

const fn gvp(
    name: &'static str,
    rows_per_warp: usize,
    gated: bool,
    splits: usize,
    prefetch: usize,
) -> GemvVariant {
    GemvVariant {
        name,
        rows_per_warp,
        gated,
        splits,
        prefetch,
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
    gvp("r4u1s4p1", 4, false, 4, 1),
    gvp("r4u1s4p2", 4, false, 4, 2),
    gvp("gated_r4u1s4p1", 4, true, 4, 1),
    gvp("gated_r4u1s4p2", 4, true, 4, 2),
];

/// The plain GEMV variants that have a pushing form (`gemv_push_*` in `kernels.cu`: four outputs
/// a warp or a multiple of four).
const GEMV_PUSH: &[&str] = &["r4u1s4", "r8u1s4", "r4u1", "r4u1s4p2"];

/// A decode GEMV kernel and its shape of work: the plain kernel `f`, and the same GEMV after an
/// RMSNorm of its input (`norm`) or after a residual add and an RMSNorm (`add_norm`).
pub(crate) struct Gemv {
    pub(crate) f: CudaFunction,
    pub(crate) norm: CudaFunction,
    pub(crate) add_norm: CudaFunction,
    /// The plain GEMV that also pushes its outputs to the peers of the fused NVLink all-reduce +
    /// norm after it (`GEMV_PUSH` variants only).
    pub(crate) push: Option<CudaFunction>,
    pub(crate) v: GemvVariant,
}

impl Gemv {
    /// `splits` warps per group of `rows_per_warp` outputs (gated: half as many), 8 warps a block;
    /// the plain and pushing kernels' shared memory for their prefetched stretches (the fused-norm
    /// kernels set their own).
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
            shared_mem_bytes: (self.v.prefetch * self.v.rows_per_warp * 512 * 8) as u32,
        }
    }
}

/// The decode GEMV kernels a step uses (`tessera bench gemv`, H200, Llama-3-8B shapes at tp 1
/// and 2, BENCHMARKS.md): four rows a warp with one load each in flight, and four warps sharing
/// each row (split-K), fastest or within 2% of it at every plain shape; the gated kernel with
/// two outputs a warp (their gate and up rows) likewise. Both copy two more stretches of their
/// rows into shared memory before they wait for the kernel before (`p2`): alone within 2% of
/// the kernels without; on one H200 one rank of tp 2 at batch 1 2.13-2.17 against 2.17 ms, the
/// 70B shape's 16.45 against 16.63, and with each exchange held 5 µs 2.22 against 2.44 (one
/// stretch 2.40-2.43, three 2.34-2.37: fewer blocks fit); tp 1 unchanged; on two H200s at tp 2
/// no measurable change (BENCHMARKS.md).
const GEMV_PLAIN: &str = "r4u1s4p2";
const GEMV_GATED: &str = "gated_r4u1s4p2";

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

/// One instance of the tensor-core GEMM for decode batches (`skinny_gemm` in `kernels.cu`,
/// instantiated from this table by `kernel_source`): up to `8 tiles` batch rows, `rows` weight
/// rows a warp, `warps` warps a block, `stages` steps of `kc` k in flight.
#[derive(Clone, Copy, Debug)]
pub struct SkinnyVariant {
    pub name: &'static str,
    pub tiles: usize,
    pub rows: usize,
    pub warps: usize,
    pub stages: usize,
    pub kc: usize,
}

/// `kernels.cu` and one instance of the skinny GEMM for each of `SKINNY_VARIANTS` (so the
/// kernels and the shared memory the host gives them come from the same table).
fn kernel_source() -> String {
    let mut src = String::from(KERNELS);
    for v in SKINNY_VARIANTS {
        src.push_str(&format!(
            "SKINNY({}, {}, {}, {}, {}, {})\n",
            v.name, v.tiles, v.rows, v.warps, v.stages, v.kc
        ));
    }
    src
}

impl SkinnyVariant {
    /// Bytes of dynamic shared memory a block takes: `stages` steps of every warp's weights and of
    /// the batch's x (rows padded by 32 values).
    pub(crate) fn smem(&self) -> usize {
        self.stages * (self.warps * self.rows * self.kc + 8 * self.tiles * (self.kc + 32)) * 2
    }
}

const fn sk(
    name: &'static str,
    tiles: usize,
    rows: usize,
    warps: usize,
    stages: usize,
    kc: usize,
) -> SkinnyVariant {
    SkinnyVariant {
        name,
        tiles,
        rows,
        warps,
        stages,
        kc,
    }
}

/// The splits of k every skinny GEMM variant is tried with (each split a whole number of its
/// steps): by the tuner, `tessera bench gemm` and the tests against the CPU.
pub const SKINNY_SPLITS: [usize; 4] = [1, 2, 4, 8];

/// Every instance of the skinny GEMM (see `SkinnyVariant`): one for each batch tile size. Measured
/// slower on an H200 and left out (BENCHMARKS.md): 64 rows a warp, steps of 64 k, 8 warps a block.
pub const SKINNY_VARIANTS: &[SkinnyVariant] = &[
    sk("t1", 1, 32, 4, 4, 128),
    sk("t2", 2, 32, 4, 4, 128),
    sk("t4", 4, 32, 4, 4, 128),
    sk("t8", 8, 32, 4, 4, 128),
];

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
    /// The tensor-core GEMM for decode batches: every variant of `SKINNY_VARIANTS`, in its
    /// order (`None` where the device cannot run it: before sm_80, or too little shared memory
    /// a block), and the kernel that adds its split-K partial sums.
    pub(crate) skinny_fns: Vec<Option<CudaFunction>>,
    pub(crate) skinny_reduce: CudaFunction,
    /// The dynamic shared memory the tiled prefill attention may take a block (0: not used, the
    /// kernel a query at a time runs instead).
    pub(crate) tiled_attention_smem: usize,
    /// The tensor-core prefill attention (bf16): head dim 64 and 128 with 16 queries a warp, then both
    /// with 32; each where the device lends a block its shared memory (`ops::prefill_kernel`).
    pub(crate) mma_attention: [Option<CudaFunction>; 4],
    /// The prefill attention on warpgroup tensor cores (bf16, sm_90 compiled as sm_90a): head dim
    /// 64 with 64 and 128 queries a block, then 128 (`attention_wg64_q64`, `_q128`,
    /// `attention_wg128_q64`, `_q128`), where the device lends a block its shared memory.
    pub(crate) wg_attention: Option<[CudaFunction; 4]>,
    /// The tensor-core decode attention at head dims 64 and 128 (bf16) for at most 8 heads a
    /// block, then for 9-16 (`decode_attention_mma64`, `128`, `64w`, `128w`), where the device
    /// has bf16 mma (sm_80) and lends the shared memory 16 heads a block take.
    pub(crate) mma_decode: Option<[CudaFunction; 4]>,
    /// The first kernel of the probe of cuBLASLt's kernels (`pdl_probe`).
    pub(crate) pdl_probe: CudaFunction,
    /// Which bf16 GEMMs run on the skinny GEMM (`TESSERA_SKINNY`).
    pub(crate) skinny: SkinnyUse,
    /// Every decode GEMV kernel of `GEMV_VARIANTS`, by name.
    pub(crate) gemv: HashMap<&'static str, Gemv>,
    /// The plain and the gated decode GEMV kernel a step uses.
    gemv_used: [&'static str; 2],
    /// Decode GEMVs compute the RMSNorm before them themselves (`ops::norm_gemv`);
    /// `TESSERA_FUSED_NORM=0` runs the norm kernel instead (for measurements).
    pub(crate) fused_norm: bool,

    /// GEMV launches use programmatic dependent launch (sm_90+).
    pub(crate) pdl: bool,
    /// The device can launch programmatically dependent kernels (sm_90+), used or not.
    pub(crate) has_pdl: bool,
    /// Streaming multiprocessors (sizes the splits of decode attention).
    pub(crate) sms: usize,
    /// Small constant tables (RoPE inverse frequencies) uploaded once, keyed by their contents.
    tables: Mutex<HashMap<Vec<u32>, Arc<CudaSlice<f32>>>>,
    /// While a decode step is being captured: the device buffers its kernels read their inputs
    /// from and write their outputs to.
    pub(crate) capture: Mutex<Option<Arc<graph::GraphIo>>>,
    /// While a decode step is being captured: where its intermediates come from.
    /// (Only for the capturing thread: another thread's work on this device never takes from it.)
    pub(crate) arena: Mutex<Option<(std::thread::ThreadId, Arc<Mutex<Arena>>)>>,
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{}", self.ordinal)
    }
}

pub(crate) fn dev_err(ordinal: usize, e: impl std::fmt::Display) -> TensorError {
    TensorError::Device(format!("cuda:{ordinal}"), e.to_string())
}

/// Where the tensor-core decode attention for `gb` heads of `hd` a block sits in
/// `GpuDevice::mma_decode`: head dim 64 or 128, at most 8 heads or more.
fn mma_decode_index(hd: usize, gb: usize) -> Option<usize> {
    debug_assert!(
        gb <= 16,
        "the tensor-core decode attention holds at most 16 heads a block"
    );
    let wide = if gb > 8 { 2 } else { 0 };
    match hd {
        64 => Some(wide),
        128 => Some(1 + wide),
        _ => None,
    }
}

static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<GpuDevice>>>> = OnceLock::new();

impl GpuDevice {
    /// The tensor-core decode attention kernel for `gb` heads of `hd` a block (None without it,
    /// or for other head dims).
    pub(crate) fn mma_decode_fn(&self, hd: usize, gb: usize) -> Option<&CudaFunction> {
        let fs = self.mma_decode.as_ref()?;
        mma_decode_index(hd, gb).map(|i| &fs[i])
    }

    /// Blocks of the tensor-core decode attention with `gb` heads of `hd` a block that a
    /// multiprocessor holds at once, and whether the driver's occupancy query (registers too)
    /// gave the figure, else shared memory alone (`ops::mma_resident_by_smem`); None without the
    /// kernel. For `tessera bench attention`'s plan column: the plan does not count waves
    /// (`ops::mma_decode_pays`), so nothing asks for it at start-up.
    pub(crate) fn mma_decode_resident(&self, hd: usize, gb: usize) -> Option<(usize, bool)> {
        let f = self.mma_decode_fn(hd, gb)?;
        let smem = ops::mma_decode_smem(gb, hd);
        let by_driver = self
            .ctx
            .bind_to_thread()
            .and_then(|()| f.occupancy_max_active_blocks_per_multiprocessor(128, smem, None));
        Some(match by_driver {
            Ok(n) if n > 0 => (n as usize, true),
            _ => {
                use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR as SMEM;
                let per_sm = self.ctx.attribute(SMEM).map_or(0, |v| v.max(0) as usize);
                (ops::mma_resident_by_smem(per_sm, gb, hd), false)
            }
        })
    }

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
        check_switches(&|var| std::env::var(var).ok()).map_err(|e| err(&e))?;
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
        // sm_90 as sm_90a: its architecture-specific instructions (`wgmma`, for the prefill
        // attention) run only on sm_90 devices, which this is.
        let feat = if (major, minor) == (9, 0) { "a" } else { "" };
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}{feat}").into_boxed_str());
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            options: vec!["--std=c++17".into()],
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(kernel_source(), opts)
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
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| err(&format!("{name}: {e}")))
        };
        let mut gemv = HashMap::new();
        for &v in GEMV_VARIANTS {
            let g = Gemv {
                f: load(&format!("gemv_{}", v.name))?,
                norm: load(&format!("gemv_norm_{}", v.fused_norm_base()))?,
                add_norm: load(&format!("gemv_addnorm_{}", v.fused_norm_base()))?,
                push: GEMV_PUSH
                    .contains(&v.name)
                    .then(|| load(&format!("gemv_push_{}", v.name)))
                    .transpose()?,
                v,
            };
            let smem = g.config(1).shared_mem_bytes;
            if smem > 0 {
                // Prefetching kernels: their stretches may pass the 48 KiB a block gets unasked.
                for f in [Some(&g.f), g.push.as_ref()].into_iter().flatten() {
                    f.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem as i32,
                    )
                    .map_err(|e| err(&format!("gemv_{}: {e}", v.name)))?;
                }
            }
            gemv.insert(v.name, g);
        }
        // The skinny GEMM where the device has what it needs: cp.async and bf16 mma (sm_80), and
        // the variant's shared memory a block.
        let smem_optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| err(&e))?
            .max(0) as usize;
        let mut skinny_fns = Vec::new();
        for v in SKINNY_VARIANTS {
            let f = load(&format!("skinny_{}", v.name))?;
            let set = major >= 8 && lend_smem(&f, v.smem(), smem_optin);
            skinny_fns.push(set.then_some(f));
        }
        // The tiled prefill attention with the shared memory the device lends a block (each call
        // checks its head dim's need against it: 140 KB at head dim 256, 74 KB at 128), and the
        // tensor-core one (102 KB at most) from sm_80; `TESSERA_TILED_ATTENTION=0` turns both off
        // (the kernel a query at a time), `TESSERA_MMA_ATTENTION=0` the tensor-core one.
        let tiled = flag_switch("TESSERA_TILED_ATTENTION").map_err(|e| err(&e))?;
        let tiled_attention_smem = if tiled {
            let want = ops::attention_tiled_smem(ops::ATTN_MAX_HD).min(smem_optin);
            let set = ["attention_tiled8", "attention_tiled16", "attention_tiled32"]
                .iter()
                .flat_map(|&n| [DType::F32, DType::BF16].map(|dt| (n, dt)))
                .all(|key| lend_smem(&funcs[&key], want, smem_optin));
            // Without the opt-in, what every block gets.
            if set {
                want
            } else {
                48 << 10
            }
        } else {
            0
        };
        // The tensor-core prefill attention, each form where the device lends a block its
        // queries and two stages of K and V tiles (at head dim 128: 85 KB with 16 queries a warp,
        // 102 KB with 32, more than the 99 KB of sm_86 / sm_89, which keep 16); else the CUDA-core
        // tiled kernel.
        let mut mma_attention: [Option<CudaFunction>; 4] = [None, None, None, None];
        if tiled && major >= 8 && flag_switch("TESSERA_MMA_ATTENTION").map_err(|e| err(&e))? {
            let forms = [
                ("attention_mma64_r16", 64, 1),
                ("attention_mma128_r16", 128, 1),
                ("attention_mma64_r32", 64, 2),
                ("attention_mma128_r32", 128, 2),
            ];
            for (slot, (name, hd, mt)) in mma_attention.iter_mut().zip(forms) {
                let f = load(name)?;
                *slot = lend_smem(&f, ops::mma_prefill_smem(hd, mt), smem_optin).then_some(f);
            }
        }
        // The warpgroup one (sm_90a) from the same switches and `TESSERA_WG_ATTENTION`.
        let wg_attention = if (major, minor) == (9, 0)
            && mma_attention[0].is_some()
            && mma_attention[1].is_some()
            && flag_switch("TESSERA_WG_ATTENTION").map_err(|e| err(&e))?
        {
            let fs = [
                load("attention_wg64_q64")?,
                load("attention_wg64_q128")?,
                load("attention_wg128_q64")?,
                load("attention_wg128_q128")?,
            ];
            let set = (fs.iter().zip([(64, 1), (64, 2), (128, 1), (128, 2)]))
                .all(|(f, (hd, n))| lend_smem(f, ops::wg_prefill_smem(hd, n), smem_optin));
            set.then_some(fs)
        } else {
            None
        };
        let mma_decode = if major >= 8 {
            let fs = [
                load("decode_attention_mma64")?,
                load("decode_attention_mma128")?,
                load("decode_attention_mma64w")?,
                load("decode_attention_mma128w")?,
            ];
            let set = fs
                .iter()
                .zip([64, 128, 64, 128])
                .all(|(f, hd)| lend_smem(f, ops::mma_decode_smem(16, hd), smem_optin));
            set.then_some(fs)
        } else {
            None
        };
        let skinny_reduce = load("skinny_reduce")?;
        let pdl_probe = load("pdl_probe_delay")?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| err(&e))?;
        let lt = match flag_switch("TESSERA_CUBLASLT").map_err(|e| err(&e))? {
            false => None,
            true => Some(Mutex::new(
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
            skinny_fns,
            skinny_reduce,
            tiled_attention_smem,
            mma_attention,
            wg_attention,
            mma_decode,
            pdl_probe,
            skinny: SkinnyUse::from_env().map_err(|e| err(&e))?,
            gemv,
            gemv_used: gemv_choice().map_err(|e| err(&e))?,
            fused_norm: flag_switch("TESSERA_FUSED_NORM").map_err(|e| err(&e))?,
            // TESSERA_PDL=0 turns programmatic dependent launch off (a debugging aid).
            pdl: major >= 9 && flag_switch("TESSERA_PDL").map_err(|e| err(&e))?,
            has_pdl: major >= 9,
            tables: Mutex::new(HashMap::new()),
            capture: Mutex::new(None),
            arena: Mutex::new(None),
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

    /// Uninitialised device memory for `n` values: from the arena while a decode step is being
    /// captured with one, else from the stream's pool.
    pub(crate) fn temp<T: cudarc::driver::DeviceRepr>(
        &self,
        n: usize,
    ) -> Result<DevSlice<T>, TensorError> {
        let bytes = Arena::aligned(n * std::mem::size_of::<T>());
        let arena = match &*self.arena.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((thread, a)) if *thread == std::thread::current().id() => Some(a.clone()),
            _ => None,
        };
        let Some(arena) = arena else {
            // SAFETY: callers write every element before it is read.
            return Ok(DevSlice::owned(
                unsafe { self.stream.alloc(n) }.map_err(|x| alloc_err(self.ordinal, bytes, x))?,
            ));
        };
        let (at, base, fits) = {
            let mut a = arena.lock().unwrap_or_else(|p| p.into_inner());
            let at = a.take(bytes);
            (at, a.base, a.base != 0 && at + bytes <= a.size)
        };
        let _part = Some(ArenaPart { arena, at, bytes });
        if fits {
            // SAFETY: bytes at..at + bytes of the arena, which the graph keeps allocated while it
            // lives, and which no other live part holds; the part frees nothing on its own.
            let slice = unsafe { self.stream.upgrade_device_ptr(base + at as u64, n) };
            return Ok(DevSlice {
                slice: std::mem::ManuallyDrop::new(slice),
                owned: false,
                _part,
            });
        }
        // Counting (or, were the recordings to differ, out of arena): from the pool, with the
        // arena's bookkeeping kept as if it were the arena's.
        // SAFETY: callers write every element before it is read.
        let slice =
            unsafe { self.stream.alloc(n) }.map_err(|x| alloc_err(self.ordinal, bytes, x))?;
        Ok(DevSlice {
            slice: std::mem::ManuallyDrop::new(slice),
            owned: true,
            _part,
        })
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

/// A failed allocation of `bytes`: out of memory said with the sizes (what was asked, what the
/// device has free), any other failure as the driver's error.
pub(crate) fn alloc_err(
    ordinal: usize,
    bytes: usize,
    e: cudarc::driver::DriverError,
) -> TensorError {
    if e.0 != cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return dev_err(ordinal, e);
    }
    dev_err(
        ordinal,
        oom_message(bytes, cudarc::driver::result::mem_get_info().ok()),
    )
}

fn oom_message(bytes: usize, free_total: Option<(usize, usize)>) -> String {
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let free = free_total.map_or(String::new(), |(f, t)| {
        format!(", {:.0} MiB free of {:.0} MiB", mib(f), mib(t))
    });
    format!(
        "out of GPU memory: {:.1} MiB asked{free} (a smaller batch or cache, or more GPUs with --tp)",
        mib(bytes)
    )
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
    F32(DevSlice<f32>),
    BF16(DevSlice<bf16>),
}

/// The memory of a [`CudaBuf`]: its own allocation from the stream's pool (freed, in stream
/// order, when dropped), or a part of the arena of a CUDA graph being captured (the graph owns
/// and frees the arena; dropping the part hands its bytes back to the arena, for the next
/// intermediate of the step). Dereferences to the `CudaSlice`.
pub struct DevSlice<T> {
    slice: std::mem::ManuallyDrop<CudaSlice<T>>,
    /// Freed on drop (pool memory), else left to the arena's owner.
    owned: bool,
    /// The arena bytes this slice holds (or, counting, stands for), handed back when it drops.
    _part: Option<ArenaPart>,
}

struct ArenaPart {
    arena: Arc<Mutex<Arena>>,
    at: usize,
    bytes: usize,
}

impl<T> DevSlice<T> {
    fn owned(slice: CudaSlice<T>) -> Self {
        DevSlice {
            slice: std::mem::ManuallyDrop::new(slice),
            owned: true,
            _part: None,
        }
    }
}

impl<T> std::ops::Deref for DevSlice<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DevSlice<T> {
    /// The memory to write through. A view, not the `CudaSlice`: one of an arena part must never
    /// be swapped out of its `DevSlice` (it would then be dropped, and its memory freed, as if
    /// the pool owned it).
    pub(crate) fn view_mut(&mut self) -> cudarc::driver::CudaViewMut<'_, T> {
        self.slice.as_view_mut()
    }
}

impl<T> Drop for DevSlice<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; the field is not used again.
        let s = unsafe { std::mem::ManuallyDrop::take(&mut self.slice) };
        if !self.owned {
            // Part of a graph's arena: the graph frees the whole.
            s.leak();
        }
        // The arena part, if any, is handed back as `part` drops.
    }
}

impl Drop for ArenaPart {
    fn drop(&mut self) {
        // Stream order makes the reuse safe, as the pool's: a later kernel that writes these
        // bytes runs after every kernel issued before it (with programmatic dependent launch, a
        // kernel writes only after waiting for its predecessor: see `ops::launch_pdl`).
        self.arena
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .give(self.at, self.bytes);
    }
}

/// Memory for the intermediates of a decode step being captured ([`graph::DecodeGraph`]): parts
/// of one allocation the graph owns, so that the captured kernels follow each other with no
/// allocation or free node between them (which would end their programmatic dependent launch).
/// Freed parts are reused first-fit, as a stream-ordered pool reuses them, so the step's
/// intermediates stay few and warm in L2. The bookkeeping is deterministic: a first recording
/// with `base` 0 finds the size the second, into real memory, needs (`high`).
pub(crate) struct Arena {
    base: u64,
    size: usize,
    /// End of the bytes ever handed out; parts below it are in use or in `free`.
    top: usize,
    /// Most bytes `top` reached.
    high: usize,
    /// Free ranges (offset, bytes) below `top`, by offset, never adjacent.
    free: Vec<(usize, usize)>,
}

impl Arena {
    pub(crate) fn new(base: u64, size: usize) -> Self {
        Arena {
            base,
            size,
            top: 0,
            high: 0,
            free: Vec::new(),
        }
    }

    /// Bytes the arena must hold for what was asked of it so far.
    pub(crate) fn used(&self) -> usize {
        self.high
    }

    /// Bytes up to the end of the last part still held (0: every part was handed back).
    pub(crate) fn held(&self) -> usize {
        self.top
    }

    /// Bytes a part of `bytes` takes (256-byte aligned, as the pool aligns).
    fn aligned(bytes: usize) -> usize {
        bytes.div_ceil(256).max(1) * 256
    }

    /// The offset of a new part of `bytes` (aligned): the first free range it fits, else the top.
    fn take(&mut self, bytes: usize) -> usize {
        if let Some(i) = self.free.iter().position(|&(_, b)| b >= bytes) {
            let (at, b) = self.free[i];
            if b == bytes {
                self.free.remove(i);
            } else {
                self.free[i] = (at + bytes, b - bytes);
            }
            return at;
        }
        let at = self.top;
        self.top += bytes;
        self.high = self.high.max(self.top);
        at
    }

    /// Hands back the part at `at` of `bytes`, merging it with free neighbours (and into the top).
    fn give(&mut self, at: usize, bytes: usize) {
        let i = self.free.partition_point(|&(o, _)| o < at);
        let (mut at, mut bytes) = (at, bytes);
        if i < self.free.len() && at + bytes == self.free[i].0 {
            bytes += self.free.remove(i).1;
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == at {
            at = self.free[i - 1].0;
            bytes += self.free.remove(i - 1).1;
        }
        if at + bytes == self.top {
            self.top = at;
        } else {
            let i = self.free.partition_point(|&(o, _)| o < at);
            self.free.insert(i, (at, bytes));
        }
    }
}

/// A buffer on a GPU.
pub struct CudaBuf {
    pub(crate) data: CudaData,
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
            CudaData::F32(s) => CudaData::F32(DevSlice::owned(
                self.dev.stream.clone_dtod(&**s).expect("device copy"),
            )),
            CudaData::BF16(s) => CudaData::BF16(DevSlice::owned(
                self.dev.stream.clone_dtod(&**s).expect("device copy"),
            )),
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
        let mut b = Self::alloc(dev, dtype, n)?;
        let e = |e| dev_err(dev.ordinal, e);
        match &mut b.data {
            CudaData::F32(s) => dev.stream.memset_zeros(&mut s.view_mut()).map_err(e)?,
            CudaData::BF16(s) => dev.stream.memset_zeros(&mut s.view_mut()).map_err(e)?,
        }
        Ok(b)
    }

    /// Uninitialised memory, for outputs every element of which a kernel writes.
    pub(crate) fn alloc(dev: &Arc<GpuDevice>, dtype: DType, n: usize) -> Result<Self, TensorError> {
        let data = match dtype {
            DType::F32 => CudaData::F32(dev.temp(n)?),
            DType::BF16 => CudaData::BF16(dev.temp(n)?),
            DType::F16 => return Err(no_f16(dev)),
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
            CudaData::F32(s) => {
                stream.memcpy_htod(src, &mut s.view_mut().slice_mut(offset..offset + n))
            }
            CudaData::BF16(s) => {
                let h: Vec<bf16> = src.iter().map(|&x| bf16::from_f32(x)).collect();
                stream.memcpy_htod(&h, &mut s.view_mut().slice_mut(offset..offset + n))
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
                        use rayon::prelude::*;
                        // A vocabulary's logits (millions of values at a batch) over the threads.
                        dst.par_iter_mut()
                            .zip(h.par_iter())
                            .with_min_len(1 << 14)
                            .for_each(|(d, x)| *d = x.to_f32());
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
                stream.memcpy_dtod(&**s, &mut d.view_mut().slice_mut(offset..offset + n))
            }
            (CudaData::BF16(d), CudaData::BF16(s)) => {
                stream.memcpy_dtod(&**s, &mut d.view_mut().slice_mut(offset..offset + n))
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
            (CudaData::F32(d), CudaData::F32(s)) => {
                stream.memcpy_dtod(&s.slice(lo..hi), &mut d.view_mut())
            }
            (CudaData::BF16(d), CudaData::BF16(s)) => {
                stream.memcpy_dtod(&s.slice(lo..hi), &mut d.view_mut())
            }
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

/// Free and total memory of GPU `ordinal` in bytes, as the driver says now.
pub fn memory_info(ordinal: usize) -> Result<(usize, usize), TensorError> {
    let dev = GpuDevice::get(ordinal)?;
    dev.ctx.bind_to_thread().map_err(|e| dev_err(ordinal, e))?;
    cudarc::driver::result::mem_get_info().map_err(|e| dev_err(ordinal, e))
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

/// Lets `f`'s blocks take `bytes` of dynamic shared memory where the device lends a block that
/// much (`optin`, its opt-in maximum): whether they may now.
fn lend_smem(f: &CudaFunction, bytes: usize, optin: usize) -> bool {
    bytes <= optin
        && f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .is_ok()
}

#[cfg(test)]
mod tests {
    /// Parses `source` after `host_check.h` with a host C++ compiler (`$CXX`, else `c++`, `g++`,
    /// `clang++`), every template the entry points use instantiated: Err(the compiler's first
    /// lines) where it does not compile; Ok(None) where no compiler is found.
    fn host_compile(source: &str, tag: &str) -> Result<Option<()>, String> {
        let dir =
            std::env::temp_dir().join(format!("tessera-kernels-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let file = dir.join("kernels.cpp");
        let text = format!(
            "{}\n#line 1 \"kernels.cu\"\n{source}",
            include_str!("host_check.h")
        );
        std::fs::write(&file, text).map_err(|e| e.to_string())?;
        let env = std::env::var("CXX").ok();
        let compilers = env
            .iter()
            .map(String::as_str)
            .chain(["c++", "g++", "clang++"]);
        let mut result = Ok(None);
        for cxx in compilers {
            let out = std::process::Command::new(cxx)
                .args(["-std=c++17", "-fsyntax-only", "-w"])
                .arg(&file)
                .output();
            let Ok(out) = out else { continue };
            result = if out.status.success() {
                Ok(Some(()))
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                Err(err.lines().take(40).collect::<Vec<_>>().join("\n"))
            };
            break;
        }
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    /// The kernels compile with NVRTC only on a GPU (at start-up), so a typo in `kernels.cu`
    /// would first show there: a host C++ compiler parses the source NVRTC gets (the skinny GEMM
    /// instances included) with CUDA's built-ins declared as stubs (`host_check.h`), checking
    /// names, types, overloads and every kernel template the entry points instantiate (not PTX,
    /// inline assembly or device limits: NVRTC's part). The check is shown to catch an error
    /// only an instantiation reveals. `TESSERA_SKIP_KERNEL_CHECK=1` skips it on a machine without
    /// a C++ compiler.
    #[test]
    fn the_kernels_parse_and_instantiate_on_a_host_compiler() {
        // `scripts/nvrtc_check.sh` takes the source NVRTC gets from here.
        if let Some(path) = std::env::var_os("TESSERA_KERNEL_SOURCE_OUT") {
            std::fs::write(&path, super::kernel_source()).expect("TESSERA_KERNEL_SOURCE_OUT");
        }
        if std::env::var_os("TESSERA_SKIP_KERNEL_CHECK").is_some() {
            eprintln!("TESSERA_SKIP_KERNEL_CHECK: the host check of kernels.cu skipped");
            return;
        }
        let found = host_compile(&super::kernel_source(), "ok")
            .unwrap_or_else(|e| panic!("kernels.cu does not compile:\n{e}"));
        assert!(
            found.is_some(),
            "no host C++ compiler (c++, g++, clang++ or $CXX) to check kernels.cu; \
             TESSERA_SKIP_KERNEL_CHECK=1 skips the check"
        );
        let broken = format!(
            "{}\ntemplate <int N> __device__ void never() {{ static_assert(N < 0, \"instantiated\"); }}\n\
             extern \"C\" __global__ void uses_never() {{ never<3>(); }}\n",
            super::kernel_source()
        );
        let err = host_compile(&broken, "broken").expect_err("an instantiation error passed");
        assert!(
            err.contains("kernels.cu:") && err.contains("instantiated"),
            "{err}"
        );
    }

    use super::*;

    #[test]
    fn skinny_use_takes_auto_never_and_all_only() {
        assert_eq!(SkinnyUse::parse(None), Ok(SkinnyUse::Auto));
        assert_eq!(SkinnyUse::parse(Some(" auto")), Ok(SkinnyUse::Auto));
        assert_eq!(SkinnyUse::parse(Some("0")), Ok(SkinnyUse::Never));
        assert_eq!(SkinnyUse::parse(Some("all")), Ok(SkinnyUse::All));
        assert_eq!(SkinnyUse::parse(Some("")), Ok(SkinnyUse::Auto));
        let e = SkinnyUse::parse(Some("1")).unwrap_err();
        assert_eq!(e, "TESSERA_SKINNY=1: expected auto, 0 or all");
    }

    #[test]
    fn out_of_memory_says_what_was_asked_and_what_is_free() {
        assert_eq!(
            oom_message(3 << 19, Some((5 << 20, 1 << 30))),
            "out of GPU memory: 1.5 MiB asked, 5 MiB free of 1024 MiB \
             (a smaller batch or cache, or more GPUs with --tp)"
        );
        assert!(oom_message(1 << 20, None).starts_with("out of GPU memory: 1.0 MiB asked ("));
    }

    #[test]
    fn every_switch_is_checked_and_a_bad_value_names_its_variable() {
        let with = |set: &[(&str, &str)]| {
            let set: Vec<(String, String)> = set
                .iter()
                .map(|&(k, v)| (k.to_string(), v.to_string()))
                .collect();
            check_switches(&move |var| set.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone()))
        };
        // Unset, and every value each switch documents.
        assert_eq!(with(&[]), Ok(()));
        let good = [
            ("TESSERA_CUBLASLT", "0"),
            ("TESSERA_FUSED_NORM", "1"),
            ("TESSERA_PDL", " 0 "),
            ("TESSERA_P2P_ALLREDUCE", "0"),
            ("TESSERA_P2P_PUSH", "1"),
            ("TESSERA_P2P_FENCE", ""),
            ("TESSERA_P2P_STATS", "1"),
            ("TESSERA_SKINNY", "all"),
            ("TESSERA_GEMV", "r2u2,gated_u2"),
            ("TESSERA_GRAPH_ARENA", "1"),
            ("TESSERA_DECODE_ATTENTION", "by_head"),
            ("TESSERA_P2P_TRIGGER", "end"),
        ];
        assert_eq!(with(&good), Ok(()));
        for v in ["wait", "pushed", "end"] {
            assert_eq!(with(&[("TESSERA_P2P_TRIGGER", v)]), Ok(()));
        }
        for v in ["auto", "grouped", "by_head", "per_head", "flash", "mma"] {
            assert_eq!(with(&[("TESSERA_DECODE_ATTENTION", v)]), Ok(()));
        }
        // One misspelt value among good ones: an error naming it and what it takes.
        let bad = [
            (
                "TESSERA_P2P_TRIGGER",
                "ends",
                "TESSERA_P2P_TRIGGER=ends: expected wait, pushed or end",
            ),
            (
                "TESSERA_P2P_FENCE",
                "on",
                "TESSERA_P2P_FENCE=on: expected 0 or 1",
            ),
            (
                "TESSERA_P2P_ALLREDUCE",
                "norm",
                "TESSERA_P2P_ALLREDUCE=norm: expected 1 or 0",
            ),
            ("TESSERA_PDL", "yes", "TESSERA_PDL=yes: expected 1 or 0"),
            ("TESSERA_DECODE_ATTENTION", "grouped ", ""),
            (
                "TESSERA_DECODE_ATTENTION",
                "group",
                "TESSERA_DECODE_ATTENTION=group: expected auto, grouped, by_head, per_head, flash or mma",
            ),
            (
                "TESSERA_GRAPH_ARENA",
                "yes",
                "TESSERA_GRAPH_ARENA=yes: expected auto, 1 or 0",
            ),
            (
                "TESSERA_SKINNY",
                "1",
                "TESSERA_SKINNY=1: expected auto, 0 or all",
            ),
        ];
        for (var, v, want) in bad {
            let mut set: Vec<(&str, &str)> =
                good.iter().copied().filter(|&(k, _)| k != var).collect();
            set.push((var, v));
            let got = with(&set);
            if want.is_empty() {
                // Values are trimmed: a stray space is not an error.
                assert_eq!(got, Ok(()), "{var}={v:?}");
            } else {
                assert_eq!(got, Err(want.to_string()), "{var}={v:?}");
            }
        }
        let e = with(&[("TESSERA_GEMV", "r2u2")]).unwrap_err();
        assert!(e.starts_with("TESSERA_GEMV=r2u2: "), "{e}");
        // The flags' defaults are what the backend runs when they are unset.
        let default = |var: &str| {
            env_flag(
                var,
                None,
                FLAG_SWITCHES.iter().find(|s| s.0 == var).unwrap().1,
            )
        };
        assert_eq!(default("TESSERA_CUBLASLT"), Ok(true));
        assert_eq!(default("TESSERA_P2P_ALLREDUCE"), Ok(true));
        assert_eq!(default("TESSERA_P2P_PUSH"), Ok(false));
        assert_eq!(default("TESSERA_P2P_STATS"), Ok(false));
        assert_eq!(default("TESSERA_NCCL_HOST_BYTES"), Ok(true));
        assert_eq!(ops::parse_decode_kernel(None), Ok(None));
        assert_eq!(p2p::parse_trigger(None), Ok(0));
        assert_eq!(p2p::parse_trigger(Some("pushed")), Ok(1));
        assert!(flag_switch("TESSERA_NOT_A_SWITCH").is_err());
    }

    #[test]
    fn a_skinny_variant_takes_its_batch_tiles_and_whole_steps_of_k() {
        let index = |name| SKINNY_VARIANTS.iter().position(|v| v.name == name).unwrap();
        let (t1, t2, t8) = (index("t1"), index("t2"), index("t8"));
        // Batch tiles: 1-8 rows one, 9-16 two, ... 33-64 eight; nothing above 64.
        assert_eq!(
            [1, 8, 9, 16, 17, 33, 64].map(ops::skinny_tiles),
            [1, 1, 2, 2, 4, 8, 8]
        );
        assert!(ops::skinny_takes((8, 100, 1024), t1, 8));
        assert!(!ops::skinny_takes((9, 100, 1024), t1, 1));
        assert!(ops::skinny_takes((9, 100, 1024), t2, 1));
        assert!(ops::skinny_takes((64, 1, 128), t8, 1));
        assert!(!ops::skinny_takes((65, 100, 1024), t8, 1));
        // Each split a whole number of 128-wide steps; no empty shapes.
        assert!(!ops::skinny_takes((4, 100, 1024), t1, 16));
        assert!(!ops::skinny_takes((4, 100, 96), t1, 1));
        assert!(!ops::skinny_takes((4, 100, 384), t1, 2));
        assert!(!ops::skinny_takes((0, 100, 1024), t1, 1));
        assert!(!ops::skinny_takes((4, 0, 1024), t1, 1));
        assert!(!ops::skinny_takes((4, 100, 1024), t1, 0));
        assert!(!ops::skinny_takes((4, 100, 1024), SKINNY_VARIANTS.len(), 1));
        // Every variant's shared memory fits a block of an sm_90 multiprocessor (227 KB).
        assert!(SKINNY_VARIANTS.iter().all(|v| v.smem() <= 227 * 1024));
    }

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
        // A prefetching variant's fused-norm kernels are its base's: a variant of the same shape
        // of work that prefetches nothing (kernels.cu instantiates them only there).
        for v in GEMV_VARIANTS {
            let base = GEMV_VARIANTS
                .iter()
                .find(|b| b.name == v.fused_norm_base())
                .unwrap_or_else(|| panic!("{}: no variant {}", v.name, v.fused_norm_base()));
            assert_eq!(base.prefetch, 0, "{}", v.name);
            assert_eq!(
                (base.rows_per_warp, base.gated, base.splits),
                (v.rows_per_warp, v.gated, v.splits),
                "{}",
                v.name
            );
        }
    }

    #[test]
    fn graph_arena_reuses_freed_parts_first_fit_and_sizes_itself_by_its_high_water() {
        let mut a = Arena::new(0, 0);
        let k = 256;
        // A step's pattern: an output kept, a temporary, the next output where it was.
        let x = a.take(4 * k);
        let t = a.take(2 * k);
        assert_eq!((x, t), (0, 4 * k));
        a.give(x, 4 * k);
        let y = a.take(3 * k);
        assert_eq!(y, 0, "first fit in the freed range");
        let z = a.take(2 * k);
        assert_eq!(z, 6 * k, "the free k left at 3k is too small: from the top");
        assert_eq!(a.used(), 8 * k);
        // Handing everything back merges the ranges and lowers the top to 0.
        a.give(t, 2 * k);
        a.give(z, 2 * k);
        a.give(y, 3 * k);
        assert!(a.free.is_empty(), "{:?}", a.free);
        assert_eq!((a.top, a.used()), (0, 8 * k));
        // Neighbours on both sides merge into one free range.
        let p: Vec<usize> = (0..4).map(|_| a.take(k)).collect();
        a.give(p[0], k);
        a.give(p[2], k);
        a.give(p[1], k);
        assert_eq!(a.free, vec![(0, 3 * k)]);
        assert_eq!(a.take(3 * k), 0);
        // Takes and hand-backs of many sizes: no two live parts overlap, every part lies within
        // the size the bookkeeping reports (so a first recording sizes the arena of the second),
        // and once all are handed back nothing is held.
        let mut a = Arena::new(0, 0);
        let mut live: Vec<(usize, usize)> = Vec::new();
        for i in 0..50usize {
            let b = Arena::aligned(1 + (i * 7919) % 5000);
            let at = a.take(b);
            assert!(
                live.iter().all(|&(o, n)| at + b <= o || o + n <= at),
                "overlap"
            );
            live.push((at, b));
            assert!(live.iter().all(|&(o, n)| o + n <= a.used()));
            if i % 3 != 0 {
                let (o, n) = live.remove((i * 31) % live.len());
                a.give(o, n);
            }
        }
        for (o, n) in live.drain(..) {
            a.give(o, n);
        }
        assert_eq!(a.held(), 0, "all handed back");
        assert_eq!(Arena::aligned(0), 256);
        assert_eq!(Arena::aligned(257), 512);
    }

    #[test]
    fn decode_attention_takes_the_most_heads_a_block_that_still_fills_the_gpu() {
        use super::ops::{decode_plan, DecodeKernel, DecodePlan, DecodeRun};
        let plan =
            |keys, batch, hq, hkv, hd, forced| decode_plan(keys, batch, hq, hkv, hd, 132, forced);
        // The two-pass kernel with gb heads a block (None: the per-head kernel).
        let p = |gb: Option<usize>, per| DecodePlan {
            run: gb.map_or(DecodeRun::PerHead, DecodeRun::TwoPass),
            per,
        };
        // The shape's choice of whole groups of 2-4 heads runs in one pass.
        let f = |gb, per| DecodePlan {
            run: DecodeRun::OnePass(gb),
            per,
        };
        // Llama-3-8B at tp 1 (32 / 8 heads of 128): batch 64 gives 132 SMs two blocks each with
        // whole groups over a short cache, batch 32 and 8 only with one query head a block (and
        // one rank of tp 2, 16 / 4 heads, at batch 64 too), batch 1 never (one head a block, one
        // split for a short cache, 256-position splits for a long one); over a long cache one
        // block a multiprocessor is enough for whole groups.
        assert_eq!(plan(48, 64, 32, 8, 128, None), f(4, 256));
        assert_eq!(plan(48, 32, 32, 8, 128, None), p(Some(1), 256));
        assert_eq!(plan(48, 64, 16, 4, 128, None), p(Some(1), 256));
        assert_eq!(plan(2048, 8, 16, 4, 128, None), f(4, 256));
        assert_eq!(plan(48, 8, 32, 8, 128, None), p(Some(1), 256));
        assert_eq!(plan(512, 8, 32, 8, 128, None), p(Some(1), 256));
        assert_eq!(plan(48, 1, 32, 8, 128, None), p(Some(1), 64));
        assert_eq!(plan(200, 1, 32, 8, 128, None), p(Some(1), 64));
        assert_eq!(plan(2048, 1, 32, 8, 128, None), p(Some(1), 256));
        assert_eq!(plan(2048, 32, 32, 8, 128, None), f(4, 256));
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
        // The one-pass kernel forced: whole groups at every shape, at most 4 heads a block (g =
        // 8 and 12: blocks of 4); hd 48: the per-head kernel.
        let flash = Some(DecodeKernel::Flash);
        assert_eq!(plan(48, 64, 32, 8, 128, flash), f(4, 256));
        assert_eq!(plan(48, 64, 16, 4, 128, flash), f(4, 256));
        assert_eq!(plan(48, 1, 16, 4, 128, flash), f(4, 64));
        assert_eq!(plan(2048, 32, 32, 8, 128, flash), f(4, 256));
        assert_eq!(plan(700, 64, 8, 1, 128, flash), f(4, 256));
        assert_eq!(plan(700, 64, 12, 1, 32, flash), f(4, 256));
        assert_eq!(plan(700, 64, 6, 2, 48, flash), p(None, 256));
        // The shape's choice of 8 heads a block (g = 8) keeps the two-pass kernel; groups of 2
        // and 3 run in one pass.
        assert_eq!(plan(2048, 8, 64, 8, 128, None), p(Some(8), 256));
        assert_eq!(plan(2048, 32, 16, 8, 128, None), f(2, 256));
        assert_eq!(plan(2048, 32, 24, 8, 128, None), f(3, 256));
        // On tensor cores, forced: whole groups of up to 16 heads, past the two-pass kernel's
        // gb hd <= 1024.
        let mma = Some(DecodeKernel::Mma);
        let t = |gb, per| DecodePlan {
            run: DecodeRun::TensorCores(gb),
            per,
        };
        assert_eq!(plan(2048, 8, 64, 8, 128, mma), t(8, 256));
        assert_eq!(plan(700, 64, 16, 1, 128, mma), t(16, 256));
        assert_eq!(plan(48, 64, 16, 4, 128, mma), t(4, 256));
        assert_eq!(plan(30, 3, 7, 1, 128, mma), t(7, 64));
    }

    #[test]
    fn tensor_cores_take_caches_of_2048_positions_or_more() {
        use super::ops::{mma_decode_pays, mma_resident_by_smem};
        assert!(mma_decode_pays(2048));
        assert!(mma_decode_pays(8192));
        assert!(!mma_decode_pays(2047));
        // An H200 by shared memory alone (what bench attention prints where the driver does not
        // answer): 132 multiprocessors of 228 KB, 3 blocks of 4 heads of 128, 6 of 2 heads of 64
        // (38,912 bytes and the driver's 1 KB each).
        assert_eq!(mma_resident_by_smem(233_472, 4, 128), 3);
        assert_eq!(mma_resident_by_smem(233_472, 2, 64), 6);
    }

    #[test]
    fn a_prefill_takes_32_queries_a_warp_where_its_blocks_fill_half_the_gpu() {
        use ops::{force_prefill_tiles, mma_prefill_smem, prefill_tiles};
        // An H200's 132 multiprocessors, Llama-3-8B's 32 query heads (16 a rank at tp 2).
        assert_eq!(prefill_tiles(512, 16, 132), 1);
        assert_eq!(prefill_tiles(512, 32, 132), 2);
        assert_eq!(prefill_tiles(1024, 16, 132), 2);
        assert_eq!(prefill_tiles(2048, 32, 132), 2);
        assert_eq!(prefill_tiles(16, 32, 132), 1);
        force_prefill_tiles(Some(2));
        assert_eq!(prefill_tiles(16, 1, 132), 2);
        force_prefill_tiles(Some(1));
        assert_eq!(prefill_tiles(1 << 20, 64, 132), 1);
        force_prefill_tiles(None);
        assert_eq!(prefill_tiles(1 << 20, 64, 132), 2);
        // The queries, then two stages of K and V tiles of 64 rows of hd + 8 bf16: within the
        // 227 KB a block of an sm_90 device may take.
        assert_eq!(mma_prefill_smem(128, 2), 104_448);
        assert_eq!(mma_prefill_smem(64, 1), 46_080);
        assert!(mma_prefill_smem(128, 2) <= 227 << 10);
        // The warpgroup kernel: 1 KB of alignment, the queries and two stages of K and V, each
        // 64 x 128 bf16; two blocks fit an SM's 228 KB.
        assert_eq!(ops::wg_prefill_smem(128, 1), 82_944);
        assert_eq!(ops::wg_prefill_smem(128, 2), 99_328);
        assert_eq!(ops::wg_prefill_smem(64, 2), 50_176);
        assert!(2 * (ops::wg_prefill_smem(128, 2) + 1024) <= 228 << 10);
        // Forcing 3 or 4 (the warpgroup kernel's 64 or 128 queries a block) takes 16 or 32
        // queries a warp where that kernel did not load.
        use ops::prefill_warpgroups;
        force_prefill_tiles(Some(3));
        assert_eq!(prefill_tiles(1 << 20, 64, 132), 1);
        assert_eq!(prefill_warpgroups(1 << 20, 64, 132), 1);
        force_prefill_tiles(Some(4));
        assert_eq!(prefill_tiles(16, 1, 132), 2);
        assert_eq!(prefill_warpgroups(16, 1, 132), 2);
        force_prefill_tiles(None);
        // The warpgroup kernel's blocks of 128 queries where they are 2 a multiprocessor: 8B's
        // heads at 2,048 tokens at tp 1 (512 blocks), not at tp 2 (256).
        assert_eq!(prefill_warpgroups(2048, 32, 132), 2);
        assert_eq!(prefill_warpgroups(2048, 16, 132), 1);
        assert_eq!(prefill_warpgroups(8192, 16, 132), 2);
        assert_eq!(prefill_warpgroups(512, 32, 132), 1);
        // The grid's 65,535 rows of query tiles: 4,194,240 queries at 16 a warp, twice at 32.
        use ops::prefill_grid_fits;
        assert!(prefill_grid_fits(4_194_240, 1) && !prefill_grid_fits(4_194_241, 1));
        assert!(prefill_grid_fits(8_388_480, 2) && !prefill_grid_fits(8_388_481, 2));
        // The form that runs: 32 a warp where asked and loaded; 16 where 32 did not load (sm_86 /
        // sm_89 at head dim 128) or was not asked; none where neither loaded or the grid is too
        // short for the prompt (the CUDA-core kernel then).
        use ops::prefill_form;
        let all = [true; 4];
        let sm89 = [true, true, true, false];
        assert_eq!(prefill_form(all, 1, 2, 8192), Some(2));
        assert_eq!(prefill_form(all, 1, 1, 8192), Some(1));
        assert_eq!(prefill_form(sm89, 1, 2, 8192), Some(1));
        assert_eq!(prefill_form(sm89, 0, 2, 8192), Some(2));
        assert_eq!(prefill_form([false; 4], 0, 2, 8192), None);
        assert_eq!(prefill_form([false, false, true, true], 1, 1, 8192), None);
        assert_eq!(prefill_form(all, 0, 2, 8_388_480), Some(2));
        assert_eq!(prefill_form(all, 0, 2, 8_388_481), None);
        assert_eq!(prefill_form(sm89, 1, 2, 4_194_241), None);
    }

    #[test]
    fn the_shape_takes_tensor_cores_for_whole_groups_over_long_caches() {
        use super::ops::{decode_plan, with_tensor_cores, DecodePlan, DecodeRun};
        let choose = |keys, batch, hq, hkv, hd| {
            let plan = decode_plan(keys, batch, hq, hkv, hd, 132, None);
            with_tensor_cores(plan, keys, batch, (hq, hkv, hd), 132)
        };
        let t = |gb, per| DecodePlan {
            run: DecodeRun::TensorCores(gb),
            per,
        };
        // 8B at tp 1, batch 64 over 2,048 positions: 4,096 blocks of 4 heads (>= 2 waves).
        assert_eq!(choose(2048, 64, 32, 8, 128), t(4, 256));
        // tp 1 batch 8: 512 blocks, 1.3 waves of 3 blocks a multiprocessor: tensor cores too.
        assert_eq!(choose(2048, 8, 32, 8, 128), t(4, 256));
        // A cache of fewer than 2,048 positions: the one-pass kernel on CUDA cores.
        assert_eq!(choose(2047, 64, 32, 8, 128).run, DecodeRun::OnePass(4));
        // 70B at tp 2 (32 / 4 heads, g = 8): the two-pass kernel's whole groups move to tensor
        // cores at batch 8 (256 blocks, one wave) and 32 (1,024, >= 2 waves), not over a short
        // cache.
        assert_eq!(choose(2048, 8, 32, 4, 128), t(8, 256));
        assert_eq!(choose(2048, 32, 32, 4, 128), t(8, 256));
        assert_eq!(choose(512, 32, 32, 4, 128).run, DecodeRun::TwoPass(8));
        // cuda_graph's long-cache test (head dim 64, g = 4, batch 32 over a 2,100-position cache,
        // tp 1 and 2): tensor cores for the capacity, where a plan for its positions (2-7) takes
        // the two-pass kernel a head a block.
        assert_eq!(choose(2100, 32, 8, 2, 64).run, DecodeRun::TensorCores(4));
        assert_eq!(choose(2100, 32, 4, 1, 64).run, DecodeRun::TensorCores(4));
        assert_eq!(choose(7, 32, 8, 2, 64).run, DecodeRun::TwoPass(1));
        assert_eq!(choose(7, 32, 4, 1, 64).run, DecodeRun::TwoPass(1));
        // Grids too small for whole groups at 256 positions a split, where the shape's plan
        // takes one head a block: groups of 8 take whole groups on tensor cores over shorter
        // splits (70B at tp 2 batch 1 over 8,192 positions: 4 x 64 blocks of 128 positions;
        // batch 4 over 2,048: 16 x 16; batch 1 over 2,048: 4 x 32 of 64), groups of 4 stay.
        assert_eq!(
            decode_plan(2048, 1, 32, 4, 128, 132, None).run,
            DecodeRun::TwoPass(1)
        );
        assert_eq!(choose(8192, 1, 32, 4, 128), t(8, 128));
        assert_eq!(choose(2048, 4, 32, 4, 128), t(8, 128));
        assert_eq!(choose(2048, 1, 32, 4, 128), t(8, 64));
        assert_eq!(choose(6018, 1, 32, 4, 128), t(8, 128));
        assert_eq!(choose(6018, 1, 64, 8, 128), t(8, 256));
        assert_eq!(choose(2048, 1, 32, 8, 128).run, DecodeRun::TwoPass(1));
        assert_eq!(choose(4018, 1, 32, 8, 128).run, DecodeRun::TwoPass(1));
        // Groups split in parts (g = 16 in blocks of 8, g = 9 in one-pass blocks of 3) and one
        // head a KV head stay off.
        assert_eq!(choose(4096, 32, 64, 4, 128).run, DecodeRun::TwoPass(8));
        assert_eq!(choose(4096, 32, 36, 4, 128).run, DecodeRun::OnePass(3));
        assert_eq!(choose(4096, 1, 32, 32, 128).run, DecodeRun::TwoPass(1));
    }

    #[test]
    fn each_plan_launches_the_kernel_instance_that_holds_its_heads() {
        use super::ops::DecodeRun::*;
        // The vectorised kernels' instances hold 1, 2, 4 or 8 heads (one pass: up to 4); a
        // group of 3 runs in the 4-head instance, 5-8 in the 8-head one.
        let cases = [
            (PerHead, "decode_attention"),
            (TwoPass(1), "decode_attention_gqa1"),
            (TwoPass(2), "decode_attention_gqa2"),
            (TwoPass(3), "decode_attention_gqa4"),
            (TwoPass(4), "decode_attention_gqa4"),
            (TwoPass(6), "decode_attention_gqa8"),
            (TwoPass(8), "decode_attention_gqa8"),
            (OnePass(1), "decode_attention_flash1"),
            (OnePass(2), "decode_attention_flash2"),
            (OnePass(3), "decode_attention_flash4"),
            (OnePass(4), "decode_attention_flash4"),
            (TensorCores(8), "decode_attention_mma"),
        ];
        for (run, kernel) in cases {
            assert_eq!(run.kernel(), kernel, "{run:?}");
            let launched = kernel != "decode_attention_mma";
            assert_eq!(super::KERNEL_NAMES.contains(&kernel), launched, "{kernel}");
        }
        assert_eq!(TwoPass(3).heads_per_block(), Some(3));
        assert_eq!(PerHead.heads_per_block(), None);
        assert_eq!(TensorCores(8).label(), "tensor cores, 8 heads/block");
    }

    #[test]
    fn a_step_outside_a_graph_launches_the_splits_its_position_reaches_of_the_captured_plan() {
        use super::ops::decode_splits;
        // Captured: every split of the cache.
        assert_eq!(decode_splits(600, None, 256), 3);
        assert_eq!(decode_splits(2100, None, 512), 5);
        // Outside a graph: those the position reaches, at least two where the captured step
        // joins several (so the call joins too), at most the cache's.
        assert_eq!(decode_splits(600, Some(13), 256), 2);
        assert_eq!(decode_splits(600, Some(300), 256), 2);
        assert_eq!(decode_splits(600, Some(513), 256), 3);
        assert_eq!(decode_splits(2100, Some(1100), 512), 3);
        assert_eq!(decode_splits(2100, Some(2100), 512), 5);
        // A cache of one split: one, written without the join, in both.
        assert_eq!(decode_splits(200, Some(13), 256), 1);
        assert_eq!(decode_splits(200, None, 256), 1);
    }

    #[test]
    fn the_tensor_core_decode_kernel_is_the_head_dims_and_for_more_than_8_heads_the_wide_one() {
        // [mma64, mma128, mma64w, mma128w]: rows 8-15 of the m16 tiles only in the wide ones.
        assert_eq!(super::mma_decode_index(64, 1), Some(0));
        assert_eq!(super::mma_decode_index(128, 4), Some(1));
        assert_eq!(super::mma_decode_index(128, 8), Some(1));
        assert_eq!(super::mma_decode_index(64, 9), Some(2));
        assert_eq!(super::mma_decode_index(128, 16), Some(3));
        assert_eq!(super::mma_decode_index(96, 4), None);
    }

    #[test]
    fn a_norm_block_takes_the_fewest_chunks_a_thread_that_512_threads_cover() {
        use super::ops::norm_shape;
        // (chunks of 8 a thread, threads): one chunk up to 4,096 values, two up to 8,192, four
        // up to 16,384 (longer rows go value by value in the kernel); at least one warp.
        assert_eq!(norm_shape(64), (1, 32));
        assert_eq!(norm_shape(4096), (1, 512));
        assert_eq!(norm_shape(4104), (2, 288));
        assert_eq!(norm_shape(8192), (2, 512));
        assert_eq!(norm_shape(16384), (4, 512));
        assert_eq!(norm_shape(16392), (4, 512));
        assert_eq!(norm_shape(12), (1, 32));
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

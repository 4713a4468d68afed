//! bf16 GEMMs through cuBLASLt with the algorithm chosen by measurement: cuBLAS's own heuristic
//! picks one kernel per shape from a model of the GPU, which for the skinny, weight-streaming GEMMs
//! of a batched decode step (a few dozen rows of activations against a large weight matrix) is
//! often not the fastest of the candidates it lists. `Lt` asks cuBLASLt for its candidates, times
//! each on the real operands the first time a shape runs outside a graph capture, and keeps the
//! fastest for that shape. The same tuner picks among other kernels for a shape instead (the
//! skinny tensor-core GEMM of `kernels.cu`, k split in 1 to 8, for a few rows).

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::Arc;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, CudaStream};

/// Candidates asked of cuBLASLt's heuristic per shape.
const CANDIDATES: usize = 16;
/// Timed calls per candidate (after one untimed call).
const REPS: usize = 3;
/// A candidate replaces cuBLASLt's first only when it is this much faster (its first is kept
/// on near-ties, so that runs on the same machine mostly agree).
const MARGIN: f64 = 0.97;
/// Rows of activations up to which `matmul_t` tunes its bf16 GEMMs (a decode step's batch; a
/// prefill's many rows run cuBLAS's own choice, which is compute-bound and fine there).
pub(crate) const LT_MAX_ROWS: usize = 64;

/// Kernels for a shape besides cuBLASLt's candidates: how many, and one that queues the i-th.
pub(crate) type Other<'a> = (usize, &'a dyn Fn(usize) -> Result<(), String>);

/// One shape: `y[m, n] = x[m, k] w[n, k]^T`, row-major bf16, f32 accumulation.
pub(crate) struct LtPlan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    /// cuBLASLt's candidates, its own first.
    pub(crate) algos: Vec<sys::cublasLtMatmulHeuristicResult_t>,
    /// The candidate used once measured (cuBLASLt's first until then), and how many other
    /// kernels were measured beside (or instead of) cuBLASLt's.
    chosen: Option<usize>,
    others: usize,
}

// SAFETY: the descriptors are plain host objects of cuBLASLt, used under the device's lock.
unsafe impl Send for LtPlan {}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: created in `LtPlan::new`, destroyed once here.
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// cuBLASLt on one device's stream, with a workspace and the plans of the shapes seen.
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    ws: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    plans: HashMap<(usize, usize, usize), LtPlan>,
}

// SAFETY: the handle is used under the device's lock only.
unsafe impl Send for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: created in `Lt::new`, destroyed once here.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// A cuBLASLt status as text.
fn e(x: lt::CublasError) -> String {
    format!("cuBLASLt: {x:?}")
}

impl Lt {
    /// Workspace for split-K candidates (NVIDIA's recommendation for Hopper).
    const WORKSPACE: usize = 32 << 20;

    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Self, String> {
        let handle = lt::create_handle().map_err(e)?;
        // SAFETY: a byte buffer cuBLASLt only writes scratch data into.
        let ws = unsafe { stream.alloc::<u8>(Self::WORKSPACE) }.map_err(|x| x.to_string())?;
        Ok(Lt {
            handle,
            ws,
            stream,
            plans: HashMap::new(),
        })
    }

    /// The plan of a shape, made (descriptors and candidates) on first use.
    pub(crate) fn plan(&mut self, m: usize, n: usize, k: usize) -> Result<&mut LtPlan, String> {
        if !self.plans.contains_key(&(m, n, k)) {
            let p = self.make_plan(m, n, k)?;
            self.plans.insert((m, n, k), p);
        }
        Ok(self.plans.get_mut(&(m, n, k)).expect("inserted above"))
    }

    fn make_plan(&self, m: usize, n: usize, k: usize) -> Result<LtPlan, String> {
        use sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
        // Row-major y = x w^T is column-major y^T (n x m) = op(w) (k x n, transposed) x^T (k x m).
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)
            .map_err(e)?;
        let mut plan = LtPlan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algos: Vec::new(),
            chosen: None,
            others: 0,
        };
        let trans = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
        // SAFETY: the attribute's value is a cublasOperation_t, as cuBLASLt documents.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&trans as *const cudarc::cublas::sys::cublasOperation_t).cast(),
                std::mem::size_of::<cudarc::cublas::sys::cublasOperation_t>(),
            )
        }
        .map_err(e)?;
        plan.a = lt::create_matrix_layout(CUDA_R_16BF, k as u64, n as u64, k as i64).map_err(e)?;
        plan.b = lt::create_matrix_layout(CUDA_R_16BF, k as u64, m as u64, k as i64).map_err(e)?;
        plan.c = lt::create_matrix_layout(CUDA_R_16BF, n as u64, m as u64, n as i64).map_err(e)?;
        let pref = lt::create_matmul_pref().map_err(e)?;
        let ws = Self::WORKSPACE as u64;
        let mut found = 0i32;
        let mut res: [MaybeUninit<sys::cublasLtMatmulHeuristicResult_t>; CANDIDATES] =
            [const { MaybeUninit::uninit() }; CANDIDATES];
        // SAFETY: the preference takes the workspace size as a u64; the heuristic writes at most
        // CANDIDATES results and their count.
        let r = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
            .and_then(|_| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    desc,
                    plan.a,
                    plan.b,
                    plan.c,
                    plan.c,
                    pref,
                    CANDIDATES as i32,
                    res.as_mut_ptr().cast(),
                    &mut found,
                )
                .result()
            })
        };
        // SAFETY: created above, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        r.map_err(e)?;
        for r in res.iter().take(found.max(0) as usize) {
            // SAFETY: the first `found` results were written by cuBLASLt.
            let r = unsafe { r.assume_init() };
            if r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                plan.algos.push(r);
            }
        }
        if plan.algos.is_empty() {
            return Err(format!("cuBLASLt has no kernel for {m} x {n} x {k}"));
        }
        Ok(plan)
    }

    /// Queues `y = x w^T` (device addresses) with the shape's measured candidate: one of
    /// cuBLASLt's, or, when `other` has any, one of `other`'s kernels for the same product
    /// instead (`other.1(i)` queues the i-th; the same ones at every call of a shape). The first
    /// call of a shape outside a graph capture (`tune`) times every candidate on these operands,
    /// with the L2 cache flushed before each timed call (a decode step reads each weight once),
    /// and keeps the fastest. Inside a capture an untuned shape runs the first candidate.
    pub(crate) fn matmul(
        &mut self,
        (m, n, k): (usize, usize, usize),
        tune: bool,
        (w, x, y): (u64, u64, u64),
        other: Other,
    ) -> Result<(), String> {
        let plan = self.plan(m, n, k)?;
        let in_play = in_play(plan.algos.len(), other.0);
        // A choice made among other kernels than these is made again.
        let chosen = plan.chosen.filter(|_| plan.others == other.0);
        let algo = match chosen {
            Some(a) => a,
            None if !tune || in_play.len() == 1 => in_play.start,
            None => {
                let a = self.tune((m, n, k), (w, x, y), other)?;
                let plan = self.plans.get_mut(&(m, n, k)).expect("planned");
                (plan.chosen, plan.others) = (Some(a), other.0);
                a
            }
        };
        self.candidate((m, n, k), algo, (w, x, y), other)
    }

    /// Every shape whose candidate was measured: the candidate kept, and how many of the
    /// candidates were cuBLASLt's.
    pub(crate) fn chosen(&self) -> Vec<((usize, usize, usize), usize, usize)> {
        self.plans
            .iter()
            .filter_map(|(&shape, p)| p.chosen.map(|a| (shape, a, p.algos.len())))
            .collect()
    }

    /// Queues candidate `a` of a planned shape: cuBLASLt's `a`, or `other`'s `a - cuBLASLt's`.
    fn candidate(
        &self,
        shape: (usize, usize, usize),
        a: usize,
        (w, x, y): (u64, u64, u64),
        other: Other,
    ) -> Result<(), String> {
        match a.checked_sub(self.plans[&shape].algos.len()) {
            None => self.run(shape, a, w, x, y),
            Some(i) if i < other.0 => other.1(i),
            Some(i) => Err(format!(
                "{shape:?}: no GEMM candidate {i} besides cuBLASLt's"
            )),
        }
    }

    /// The fastest candidate of a planned shape (see `matmul`); candidates that fail are skipped.
    fn tune(
        &self,
        shape: (usize, usize, usize),
        (w, x, y): (u64, u64, u64),
        other: Other,
    ) -> Result<usize, String> {
        let err = |x: cudarc::driver::DriverError| x.to_string();
        let ctx = self.stream.context();
        let l2 = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(err)?
            .max(1 << 20) as usize;
        // Written between timed calls: twice the L2, so that no weight stays cached. A GPU too
        // full for it (a model that fills the memory) keeps cuBLASLt's own first choice.
        let Ok(mut flush) = self.stream.alloc_zeros::<u8>(2 * l2) else {
            return Ok(0);
        };
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (
            ctx.new_event(timed).map_err(err)?,
            ctx.new_event(timed).map_err(err)?,
        );
        // The candidates in play; the rest stay `None`.
        let lt_count = self.plans[&shape].algos.len();
        let mut times = vec![None; lt_count + other.0];
        for a in in_play(lt_count, other.0) {
            if self.candidate(shape, a, (w, x, y), other).is_err() {
                continue;
            }
            let mut total = 0.0;
            for _ in 0..REPS {
                self.stream.memset_zeros(&mut flush).map_err(err)?;
                start.record(&self.stream).map_err(err)?;
                self.candidate(shape, a, (w, x, y), other)?;
                end.record(&self.stream).map_err(err)?;
                end.synchronize().map_err(err)?;
                total += start.elapsed_ms(&end).map_err(err)? as f64;
            }
            times[a] = Some(total);
        }
        pick(&times).ok_or_else(|| format!("no GEMM candidate ran for {shape:?}"))
    }

    /// Queues `y = x w^T` for the planned shape `(m, n, k)` with its candidate `algo` on the
    /// stream (device addresses).
    pub(crate) fn run(
        &self,
        shape: (usize, usize, usize),
        algo: usize,
        w: u64,
        x: u64,
        y: u64,
    ) -> Result<(), String> {
        use cudarc::driver::DevicePtr;
        let plan = self
            .plans
            .get(&shape)
            .ok_or_else(|| format!("no cuBLASLt plan for {shape:?}"))?;
        let (alpha, beta) = (1f32, 0f32);
        let (ws, _rec) = self.ws.device_ptr(&self.stream);
        let h = &plan.algos[algo];
        // SAFETY: the layouts describe w, x and y as allocated by the caller; the workspace is
        // this handle's and large enough for every candidate (the heuristic was told its size).
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w as *const c_void,
                plan.a,
                x as *const c_void,
                plan.b,
                y as *const c_void,
                plan.c,
                y as *mut c_void,
                plan.c,
                &h.algo,
                ws as *mut c_void,
                Self::WORKSPACE,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(e)
    }
}

/// The candidates of a shape with `lt_count` of cuBLASLt's and `others` other kernels that are
/// in play: cuBLASLt's, or only the others when there are any.
fn in_play(lt_count: usize, others: usize) -> std::ops::Range<usize> {
    match others {
        0 => 0..lt_count,
        n => lt_count..lt_count + n,
    }
}

/// The candidate to keep from each one's time (`None`: it failed to run): the fastest, unless
/// cuBLASLt's first ran and the fastest does not beat it by `MARGIN`.
fn pick(times: &[Option<f64>]) -> Option<usize> {
    let best = times
        .iter()
        .enumerate()
        .filter_map(|(a, t)| t.map(|t| (a, t)))
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    Some(match times.first().copied().flatten() {
        Some(first) if best.1 >= MARGIN * first => 0,
        _ => best.0,
    })
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn the_fastest_candidate_wins_by_a_margin_over_cublaslts_first() {
        assert_eq!(pick(&[Some(10.0), Some(9.0), Some(9.5)]), Some(1));
        // A near-tie keeps cuBLASLt's first.
        assert_eq!(pick(&[Some(10.0), Some(9.8)]), Some(0));
        assert_eq!(pick(&[Some(10.0), Some(11.0)]), Some(0));
        // Failed candidates are skipped, the first included.
        assert_eq!(pick(&[None, Some(12.0), Some(11.0)]), Some(2));
        assert_eq!(pick(&[Some(10.0), None, Some(5.0)]), Some(2));
        assert_eq!(pick(&[None, None]), None);
        assert_eq!(pick(&[]), None);
    }
}

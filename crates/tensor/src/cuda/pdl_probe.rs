//! Whether a cuBLASLt kernel waits for the kernel before it: the probe behind `tessera bench
//! gemm --probe-pdl`.
//!
//! This crate's kernels are launched with programmatic dependent launch: each lets the next
//! start early and waits for the one before (`griddepcontrol.wait`) only where it first reads
//! its results. cuBLASLt launches its own kernels plainly, so in a captured decode step every
//! GEMM starts only once the kernel before it has ended. A graph edge can be made programmatic
//! after the capture, but that is safe only for a kernel that itself waits before it reads: one
//! that does not would read its input before it is written. Which of cuBLASLt's kernels do is
//! not documented, so it is measured ([`probe`]): a kernel that lets the next one start at once,
//! sleeps 200 µs and then writes the GEMM's input, followed by the GEMM on a programmatic edge.
//! A GEMM kernel that waits gives the product of the written input; one that does not gives the
//! product of what was there before, every time. (CUDA 13.0 on an H200: none of the `nvjet`
//! kernels a decode step runs waits, so decode graphs keep plain edges into them;
//! BENCHMARKS.md.)

use std::ffi::CStr;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaStream};

use super::lt::Lt;
use super::GpuDevice;

/// What the probe found for a GEMM's first kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProbedKernel {
    /// The kernel's (mangled) name.
    pub name: String,
    /// Whether it read the input written after it started (it waits for the kernel before).
    pub waits: bool,
}

fn check(what: &str, r: sys::CUresult) -> Result<(), String> {
    r.result().map_err(|e| format!("{what}: {e:?}"))
}

/// Every node of graph `g`.
///
/// # Safety
/// `g` is a live graph of the current context, not edited concurrently.
unsafe fn nodes(g: sys::CUgraph) -> Result<Vec<sys::CUgraphNode>, String> {
    let mut n = 0usize;
    check("cuGraphGetNodes", unsafe {
        sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n)
    })?;
    let mut v = vec![std::ptr::null_mut(); n];
    check("cuGraphGetNodes", unsafe {
        sys::cuGraphGetNodes(g, v.as_mut_ptr(), &mut n)
    })?;
    v.truncate(n);
    Ok(v)
}

type Edge = (sys::CUgraphNode, sys::CUgraphNode, sys::CUgraphEdgeData);

/// Every edge of graph `g`: (from, to, its data).
///
/// # Safety
/// As [`nodes`].
unsafe fn edges(g: sys::CUgraph) -> Result<Vec<Edge>, String> {
    let mut m = 0usize;
    let none: *mut sys::CUgraphNode = std::ptr::null_mut();
    check("cuGraphGetEdges", unsafe {
        sys::cuGraphGetEdges_v2(g, none, none, std::ptr::null_mut(), &mut m)
    })?;
    let mut from = vec![std::ptr::null_mut(); m];
    let mut to = vec![std::ptr::null_mut(); m];
    // SAFETY: edge data is plain bytes.
    let mut data: Vec<sys::CUgraphEdgeData> = vec![unsafe { std::mem::zeroed() }; m];
    check("cuGraphGetEdges", unsafe {
        sys::cuGraphGetEdges_v2(
            g,
            from.as_mut_ptr(),
            to.as_mut_ptr(),
            data.as_mut_ptr(),
            &mut m,
        )
    })?;
    Ok((0..m).map(|i| (from[i], to[i], data[i])).collect())
}

/// The name of a kernel node's kernel; `None` for other nodes.
///
/// # Safety
/// `node` is a node of a live graph of the current context.
unsafe fn kernel_of(node: sys::CUgraphNode) -> Result<Option<String>, String> {
    let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    check("cuGraphNodeGetType", unsafe {
        sys::cuGraphNodeGetType(node, &mut t)
    })?;
    if t != sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL {
        return Ok(None);
    }
    // SAFETY: the driver fills the parameters of a kernel node.
    let mut p: sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
    check("cuGraphKernelNodeGetParams", unsafe {
        sys::cuGraphKernelNodeGetParams_v2(node, &mut p)
    })?;
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // The node names its function, or the library kernel it was launched from.
    let r = if !p.func.is_null() {
        unsafe { sys::cuFuncGetName(&mut name, p.func) }
    } else {
        unsafe { sys::cuKernelGetName(&mut name, p.kern) }
    };
    let name = if r == sys::CUresult::CUDA_SUCCESS && !name.is_null() {
        // SAFETY: the driver returns a NUL-terminated name it owns.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    } else {
        String::from("?")
    };
    Ok(Some(name))
}

/// Replaces the edge `from -> to` (data `old`) of `g` by a programmatic one.
///
/// # Safety
/// As [`nodes`]; both nodes are kernel nodes of `g` joined by that edge, and `g` is instantiated
/// again after the edit.
unsafe fn make_programmatic(
    g: sys::CUgraph,
    from: sys::CUgraphNode,
    to: sys::CUgraphNode,
    old: &sys::CUgraphEdgeData,
) -> Result<(), String> {
    check("cuGraphRemoveDependencies", unsafe {
        sys::cuGraphRemoveDependencies_v2(g, &from, &to, old, 1)
    })?;
    // SAFETY: plain bytes, set below.
    let mut e: sys::CUgraphEdgeData = unsafe { std::mem::zeroed() };
    e.from_port = sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8;
    e.type_ = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
    check("cuGraphAddDependencies", unsafe {
        sys::cuGraphAddDependencies_v2(g, &from, &to, &e, 1)
    })
}

/// An executable graph instantiated from an edited graph (cudarc's `CudaGraph` instantiates at
/// the end of the capture, before any edit).
struct Exec {
    exec: sys::CUgraphExec,
    ctx: Arc<CudaContext>,
}

impl Exec {
    /// # Safety
    /// `g` is a live graph of `ctx`.
    unsafe fn new(ctx: &Arc<CudaContext>, g: sys::CUgraph) -> Result<Self, String> {
        ctx.bind_to_thread().map_err(|e| e.to_string())?;
        let mut exec = std::ptr::null_mut();
        check("cuGraphInstantiate", unsafe {
            sys::cuGraphInstantiateWithFlags(&mut exec, g, 0)
        })?;
        Ok(Exec {
            exec,
            ctx: ctx.clone(),
        })
    }

    fn launch(&self, stream: &CudaStream) -> Result<(), String> {
        self.ctx.bind_to_thread().map_err(|e| e.to_string())?;
        // SAFETY: as `upload`.
        check("cuGraphLaunch", unsafe {
            sys::cuGraphLaunch(self.exec, stream.cu_stream())
        })
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: instantiated in `new`, destroyed once here.
        unsafe {
            let _ = sys::cuGraphExecDestroy(self.exec);
        }
    }
}

/// How long the probe's first kernel holds the GEMM's input back (far longer than any GEMM
/// of a decode step runs).
const PROBE_DELAY_NS: u64 = 200_000;
/// Replays of the probe's graph; a kernel waits only if every one gives the written input's
/// product.
const PROBE_RUNS: usize = 3;

/// Bits of `n` bf16 values in [-1, 1) from `seed` (a linear congruential sequence).
fn random_bf16(n: usize, seed: u64) -> Vec<u16> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            half::bf16::from_f32(2.0 * u - 1.0).to_bits()
        })
        .collect()
}

/// Probes cuBLASLt's candidate `algo` of the planned shape `(m, n, k)` with weights `w`
/// (device address, n x k bf16; only read): the first kernel it launches, and whether that
/// kernel waits for the kernel before it (see the module's notes). `Ok(None)` when the capture
/// did not have the form the probe needs (the GEMM's first node not a kernel right after the
/// delay), so nothing can be said. Runs on the device's stream, outside any capture.
pub(crate) fn probe(
    dev: &GpuDevice,
    lt: &Lt,
    (m, n, k): (usize, usize, usize),
    algo: usize,
    w: u64,
) -> Result<Option<ProbedKernel>, String> {
    probe_with(dev, m * k, m * n, &|x, y| lt.run((m, n, k), algo, w, x, y))
}

/// Queues `pdl_probe_delay` copying `n16` units of 16 bytes from `src` to `dst` after `ns`
/// nanoseconds, waiting for the kernel before it first or not.
fn delay(
    dev: &GpuDevice,
    (src, dst): (u64, u64),
    n16: usize,
    ns: u64,
    wait: bool,
) -> Result<(), String> {
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (mut src, mut dst, mut n16, mut ns, mut wait) = (src, dst, n16 as i64, ns, i32::from(wait));
    let mut params: [*mut std::ffi::c_void; 5] = [
        (&mut src as *mut u64).cast(),
        (&mut dst as *mut u64).cast(),
        (&mut n16 as *mut i64).cast(),
        (&mut ns as *mut u64).cast(),
        (&mut wait as *mut i32).cast(),
    ];
    dev.ctx.bind_to_thread().map_err(|e| e.to_string())?;
    // SAFETY: pdl_probe_delay(src, dst, n16, ns, wait) over two device buffers of at least n16
    // units of 16 bytes; the parameters outlive the call. A plain launch: the probe's edge is
    // made programmatic in the graph, not by the launch.
    check("cuLaunchKernel", unsafe {
        sys::cuLaunchKernel(
            dev.pdl_probe.cu_function(),
            cfg.grid_dim.0,
            cfg.grid_dim.1,
            cfg.grid_dim.2,
            cfg.block_dim.0,
            cfg.block_dim.1,
            cfg.block_dim.2,
            cfg.shared_mem_bytes,
            dev.stream.cu_stream(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    })
}

/// The copy kernel a probe's own test runs in the GEMM's place ([`probe_copy`]).
fn copy_second(
    dev: &GpuDevice,
    len: usize,
    wait: bool,
) -> impl Fn(u64, u64) -> Result<(), String> + '_ {
    move |x, y| delay(dev, (x, y), len * 2 / 16, 0, wait)
}

/// The probe run on this crate's own copy, which waits for the kernel before it (`wait`) or
/// not: what the probe says of it (`None`: it could not tell). For the probe's test.
pub(crate) fn probe_copy(dev: &GpuDevice, wait: bool) -> Result<Option<bool>, String> {
    let len = 64 * 4096;
    let found = probe_with(dev, len, len, &copy_second(dev, len, wait))?;
    Ok(found.map(|k| k.waits))
}

/// The probe: `second(x, y)` queues kernels that make `y` (`ny` bf16 values) from `x` (`nx`
/// bf16 values, a multiple of 8), the first of which is the one probed.
fn probe_with(
    dev: &GpuDevice,
    nx: usize,
    ny: usize,
    second: &dyn Fn(u64, u64) -> Result<(), String>,
) -> Result<Option<ProbedKernel>, String> {
    use cudarc::driver::DevicePtr;
    let s = &dev.stream;
    let err = |e: cudarc::driver::DriverError| e.to_string();
    let ptr = |x: &cudarc::driver::CudaSlice<u16>| x.device_ptr(s).0;
    let x0 = s.clone_htod(&random_bf16(nx, 1)).map_err(err)?;
    let x1 = s.clone_htod(&random_bf16(nx, 2)).map_err(err)?;
    let mut xin = s.alloc_zeros::<u16>(nx).map_err(err)?;
    let (y, yref, ystale) = (
        s.alloc_zeros::<u16>(ny).map_err(err)?,
        s.alloc_zeros::<u16>(ny).map_err(err)?,
        s.alloc_zeros::<u16>(ny).map_err(err)?,
    );
    second(ptr(&x1), ptr(&yref))?;
    second(ptr(&x0), ptr(&ystale))?;
    let (want, stale) = (
        s.clone_dtoh(&yref).map_err(err)?,
        s.clone_dtoh(&ystale).map_err(err)?,
    );
    if want == stale {
        // The two inputs give the same result: it cannot tell them apart.
        return Ok(None);
    }
    s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(err)?;
    let queued = delay(
        dev,
        (ptr(&x1), ptr(&xin)),
        nx * 2 / 16,
        PROBE_DELAY_NS,
        false,
    )
    .and_then(|()| second(ptr(&xin), ptr(&y)));
    let graph = s
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .map_err(err)?;
    queued?;
    let Some(graph) = graph else {
        return Ok(None);
    };
    let g = graph.cu_graph();
    // The delay is the graph's only node without dependencies; its one edge must lead to the
    // probed kernel, whose only dependency it is.
    // SAFETY: a live graph of this context, edited by this thread only, instantiated again
    // after the edit.
    let es = unsafe { edges(g) }?;
    let all = unsafe { nodes(g) }?;
    let roots: Vec<_> = all
        .iter()
        .filter(|&&nd| es.iter().all(|(_, to, _)| *to != nd))
        .collect();
    let [&delay_node] = roots[..] else {
        return Ok(None);
    };
    let out: Vec<_> = es.iter().filter(|(f, ..)| *f == delay_node).collect();
    let [&(from, to, data)] = out[..] else {
        return Ok(None);
    };
    if es.iter().filter(|(_, t, _)| *t == to).count() != 1 {
        return Ok(None);
    }
    let Some(name) = (unsafe { kernel_of(to) })? else {
        return Ok(None);
    };
    unsafe { make_programmatic(g, from, to, &data) }?;
    let exec = unsafe { Exec::new(&dev.ctx, g) }?;
    let mut waits = true;
    for _ in 0..PROBE_RUNS {
        s.memcpy_dtod(&x0, &mut xin).map_err(err)?;
        exec.launch(s)?;
        let got = s.clone_dtoh(&y).map_err(err)?;
        waits &= got == want;
    }
    drop(exec);
    drop(graph);
    Ok(Some(ProbedKernel { name, waits }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_probes_inputs_differ_and_stay_within_one() {
        let (a, b) = (super::random_bf16(1000, 1), super::random_bf16(1000, 2));
        assert_ne!(a, b);
        for v in a.iter().chain(&b) {
            let f = half::bf16::from_bits(*v).to_f32();
            assert!((-1.0..1.0).contains(&f), "{f}");
        }
        // Not all alike: a spread of values.
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 500, "{}", distinct.len());
    }
}

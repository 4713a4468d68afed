//! CUDA Graphs for the decode step. Eager decode is bound by the host: a step of an 8B model
//! issues about 700 kernels, GEMMs and allocations, and the GPU waits on their launches. A
//! captured step replays them all with one launch.
//!
//! A step's kernels must not bake in what changes between steps, so while a step is captured
//! ([`DecodeGraph::capture`]) the kernels that need the position, the tokens or give the result
//! read and write fixed device buffers ([`GraphIo`]) instead: the position for RoPE, the KV append
//! and attention; the input tokens for the embedding; the greedy (value, index) pairs of the LM
//! head. A replay ([`DecodeGraph::replay`]) fills the inputs, launches the graph and reads the
//! outputs. Intermediate tensors are allocated and freed inside the graph (stream-ordered
//! allocation), so a replay allocates nothing.
//!
//! A capture needs the device to itself: the process has one stream per GPU and one capture slot,
//! so work another thread issues on that GPU while a step is being captured would be recorded
//! into the graph (or read the graph's inputs). tessera runs one rank thread per GPU; tests that
//! share a GPU take turns.

use std::sync::Arc;

use cudarc::driver::sys::CUstreamCaptureMode;
use cudarc::driver::{CudaGraph, CudaSlice};

use super::{dev_err, GpuDevice};
use crate::TensorError;

/// The device buffers a captured step reads its inputs from and writes its outputs to.
pub struct GraphIo {
    pub(crate) pos: CudaSlice<i32>,
    pub(crate) tokens: CudaSlice<u32>,
    pub(crate) vals: CudaSlice<f32>,
    pub(crate) idx: CudaSlice<i32>,
}

/// Nodes and edges of a captured step ([`DecodeGraph::stats`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct GraphStats {
    pub kernels: usize,
    pub allocs: usize,
    pub frees: usize,
    pub other: usize,
    pub edges: usize,
    /// Edges that let the kernel after start before the one before finishes.
    pub programmatic: usize,
}

impl std::fmt::Display for GraphStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} kernels, {} allocations, {} frees, {} other nodes; {} of {} edges programmatic",
            self.kernels, self.allocs, self.frees, self.other, self.programmatic, self.edges
        )
    }
}

/// One captured decode step for a batch of `batch` sequences on one device.
pub struct DecodeGraph {
    dev: Arc<GpuDevice>,
    io: Arc<GraphIo>,
    graph: CudaGraph,
}

// SAFETY: a graph is replayed by the one rank thread that owns it.
unsafe impl Send for DecodeGraph {}

impl DecodeGraph {
    /// Captures what `step` issues on `ordinal`'s stream (it runs once, recording, not
    /// executing). `step` must issue the step of `batch` tokens through the ops of this crate.
    pub fn capture<E: From<TensorError>>(
        ordinal: usize,
        batch: usize,
        step: impl FnOnce() -> Result<(), E>,
    ) -> Result<Self, E> {
        let dev = GpuDevice::get(ordinal)?;
        let e = |x| dev_err(ordinal, x);
        let io = Arc::new(GraphIo {
            pos: dev.stream.alloc_zeros(1).map_err(e)?,
            tokens: dev.stream.alloc_zeros(batch).map_err(e)?,
            vals: dev.stream.alloc_zeros(batch).map_err(e)?,
            idx: dev.stream.alloc_zeros(batch).map_err(e)?,
        });
        dev.synchronize()?;
        *dev.capture.lock().unwrap_or_else(|p| p.into_inner()) = Some(io.clone());
        let begun = dev
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(e);
        let ran = match begun {
            Ok(()) => step(),
            Err(x) => Err(x.into()),
        };
        // End the capture whatever happened, so that the stream is usable again.
        let ended = dev.stream.end_capture(
            cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        *dev.capture.lock().unwrap_or_else(|p| p.into_inner()) = None;
        ran?;
        let graph = ended
            .map_err(e)?
            .ok_or_else(|| dev_err(ordinal, "the captured step issued no work"))?;
        graph.upload().map_err(e)?;
        Ok(DecodeGraph { dev, io, graph })
    }

    /// What the capture recorded: nodes by kind and edges by type (a programmatic edge lets a
    /// kernel start before the one it depends on finishes, as programmatic dependent launch does
    /// in a stream).
    pub fn stats(&self) -> Result<GraphStats, TensorError> {
        use cudarc::driver::sys;
        let e = |x: sys::CUresult| dev_err(self.dev.ordinal, format!("graph query: {x:?}"));
        let g = self.graph.cu_graph();
        let mut st = GraphStats::default();
        // SAFETY: queries of a live graph of this context, into buffers of the reported sizes.
        unsafe {
            let mut n = 0usize;
            sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n)
                .result()
                .map_err(|x| e(x.0))?;
            let mut nodes = vec![std::ptr::null_mut(); n];
            sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut n)
                .result()
                .map_err(|x| e(x.0))?;
            for &node in &nodes[..n] {
                let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
                sys::cuGraphNodeGetType(node, &mut t)
                    .result()
                    .map_err(|x| e(x.0))?;
                match t {
                    sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => st.kernels += 1,
                    sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC => st.allocs += 1,
                    sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE => st.frees += 1,
                    _ => st.other += 1,
                }
            }
            let mut m = 0usize;
            let none: *mut sys::CUgraphNode = std::ptr::null_mut();
            sys::cuGraphGetEdges_v2(g, none, none, std::ptr::null_mut(), &mut m)
                .result()
                .map_err(|x| e(x.0))?;
            let mut from: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); m];
            let mut to: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); m];
            let mut data: Vec<sys::CUgraphEdgeData> = vec![std::mem::zeroed(); m];
            sys::cuGraphGetEdges_v2(
                g,
                from.as_mut_ptr(),
                to.as_mut_ptr(),
                data.as_mut_ptr(),
                &mut m,
            )
            .result()
            .map_err(|x| e(x.0))?;
            st.edges = m;
            st.programmatic = data[..m]
                .iter()
                .filter(|d| {
                    d.type_
                        == sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8
                })
                .count();
        }
        Ok(st)
    }

    /// Runs the captured step for `tokens` at position `pos`; returns each row's greedy (value,
    /// index) pair of this device's vocab shard.
    pub fn replay(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<(f32, u32)>, TensorError> {
        let e = |x| dev_err(self.dev.ordinal, x);
        let io = Arc::get_mut(&mut self.io).ok_or_else(|| {
            e(cudarc::driver::DriverError(
                cudarc::driver::sys::CUresult::CUDA_ERROR_ILLEGAL_STATE,
            ))
        })?;
        if tokens.len() != io.tokens.len() {
            return Err(dev_err(
                self.dev.ordinal,
                format!(
                    "graph captured for {} sequences, replayed with {}",
                    io.tokens.len(),
                    tokens.len()
                ),
            ));
        }
        let stream = &self.dev.stream;
        stream.memcpy_htod(tokens, &mut io.tokens).map_err(e)?;
        stream.memcpy_htod(&[pos as i32], &mut io.pos).map_err(e)?;
        self.graph.launch().map_err(e)?;
        let v = stream.clone_dtoh(&io.vals).map_err(e)?;
        let i = stream.clone_dtoh(&io.idx).map_err(e)?;
        stream.synchronize().map_err(e)?;
        Ok(v.into_iter().zip(i).map(|(v, i)| (v, i as u32)).collect())
    }
}

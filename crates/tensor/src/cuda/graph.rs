//! CUDA Graphs for the decode step. Eager decode is bound by the host: a step of an 8B model
//! issues about 700 kernels, GEMMs and allocations, and the GPU waits on their launches. A
//! captured step replays them all with one launch.
//!
//! A step's kernels must not bake in what changes between steps, so while a step is captured
//! ([`DecodeGraph::capture`]) the kernels that need the position, the tokens or give the result
//! read and write fixed device buffers ([`GraphIo`]) instead: the position for RoPE, the KV append
//! and attention; the input tokens for the embedding; the greedy (value, index) pairs of the LM
//! head. A replay ([`DecodeGraph::replay`]) fills the inputs, launches the graph and reads the
//! outputs. A replay allocates nothing: the step's intermediate tensors live in an arena the graph
//! owns ([`GraphArena`]), or are allocated and freed inside the graph (stream-ordered allocation).
//!
//! A capture needs the device to itself: the process has one stream per GPU and one capture slot,
//! so work another thread issues on that GPU while a step is being captured would be recorded
//! into the graph (or read the graph's inputs). tessera runs one rank thread per GPU; tests that
//! share a GPU take turns.

use std::sync::{Arc, Mutex};

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
    /// Bytes of the arena the intermediates live in (0: from the stream's pool).
    pub arena_bytes: usize,
}

impl std::fmt::Display for GraphStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} kernels, {} allocations, {} frees, {} other nodes; {} of {} edges programmatic; ",
            self.kernels, self.allocs, self.frees, self.other, self.programmatic, self.edges
        )?;
        match self.arena_bytes {
            0 => write!(f, "intermediates from the pool"),
            b => write!(f, "intermediates in a {:.1} MB arena", b as f64 / 1e6),
        }
    }
}

/// Where a captured step's intermediates live: in an arena the graph owns, or in the stream's
/// pool (an allocation and a free node around every kernel, which end programmatic dependent
/// launch between them). `Auto` takes the arena for steps of up to `GRAPH_ARENA_MAX_BATCH` rows
/// (batch 1: 3.85-3.88 against 4.00-4.05 ms a step of the 8B shape on an H200; batch 24-32, where
/// cuBLASLt GEMMs sit between this crate's kernels: tp 1 4.75-4.89 against 4.77-4.91, tp 2 on two
/// H200s 3.36-3.52 against 3.45-3.60, its fused all-reduce + norm then overlapping its
/// neighbours), and the pool above (batch 64: tp 1 5.22-5.35 with the arena against 5.10-5.30 ms
/// from the pool, with or without PDL, cause not found; tp 2 3.78-3.80 against 3.76-3.78).
/// `TESSERA_GRAPH_ARENA=auto|1|0` (or [`force_graph_arena`]) chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphArena {
    Auto,
    Always,
    Never,
}

/// The largest batch whose captured step keeps its intermediates in the graph's arena under
/// `GraphArena::Auto` (measured: see [`GraphArena`]).
pub const GRAPH_ARENA_MAX_BATCH: usize = 32;

/// 0: not forced; else 1 + the forced choice's index in `GraphArena::ALL`.
static FORCED_ARENA: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Overrides `TESSERA_GRAPH_ARENA` for the captures that follow (`None`: the environment's).
pub fn force_graph_arena(choice: Option<GraphArena>) {
    let code = choice.map_or(0, |c| {
        1 + GraphArena::ALL.iter().position(|&x| x == c).unwrap_or(0) as u8
    });
    FORCED_ARENA.store(code, std::sync::atomic::Ordering::Relaxed);
}

impl GraphArena {
    const ALL: [GraphArena; 3] = [GraphArena::Auto, GraphArena::Always, GraphArena::Never];

    /// The forced choice, else `TESSERA_GRAPH_ARENA`'s (unset: `Auto`).
    pub fn current() -> Result<Self, String> {
        let code = FORCED_ARENA.load(std::sync::atomic::Ordering::Relaxed) as usize;
        match code.checked_sub(1).and_then(|i| Self::ALL.get(i)) {
            Some(&forced) => Ok(forced),
            None => Self::parse(std::env::var("TESSERA_GRAPH_ARENA").ok().as_deref()),
        }
    }

    pub(crate) fn parse(v: Option<&str>) -> Result<Self, String> {
        let names = [
            ("auto", Self::Auto),
            ("1", Self::Always),
            ("0", Self::Never),
        ];
        super::env_choice("TESSERA_GRAPH_ARENA", v, &names)
    }

    /// Whether a step of `batch` tokens keeps its intermediates in an arena.
    pub fn used_for(self, batch: usize) -> bool {
        match self {
            GraphArena::Auto => batch <= GRAPH_ARENA_MAX_BATCH,
            GraphArena::Always => true,
            GraphArena::Never => false,
        }
    }
}

/// One captured decode step for a batch of `batch` sequences on one device.
pub struct DecodeGraph {
    // Dropped in this order: the graph before the arena its kernels use.
    graph: CudaGraph,
    /// The intermediates' memory and its size in bytes (`None`: they come from the pool).
    arena: Option<(CudaSlice<u8>, usize)>,
    dev: Arc<GpuDevice>,
    io: Arc<GraphIo>,
}

// SAFETY: a graph is replayed by the one rank thread that owns it.
unsafe impl Send for DecodeGraph {}

impl DecodeGraph {
    /// Captures what `step` issues on `ordinal`'s stream (it runs, recording, not executing).
    /// `step` must issue the step of `batch` tokens through the ops of this crate, and issue the
    /// same work each time it is called. With an arena ([`GraphArena`]) it is called twice: a
    /// first time to count the bytes of the step's intermediates, then to record the graph with
    /// those intermediates in one arena the graph owns (no allocation or free node between the
    /// kernels, so their programmatic dependent launch holds inside the graph). Without, it is
    /// recorded once, its intermediates from the stream's pool.
    pub fn capture<E: From<TensorError>>(
        ordinal: usize,
        batch: usize,
        mut step: impl FnMut() -> Result<(), E>,
    ) -> Result<Self, E> {
        let dev = GpuDevice::get(ordinal)?;
        let e = |x| dev_err(ordinal, x);
        let io = Arc::new(GraphIo {
            pos: dev.stream.alloc_zeros(1).map_err(e)?,
            tokens: dev.stream.alloc_zeros(batch).map_err(e)?,
            vals: dev.stream.alloc_zeros(batch).map_err(e)?,
            idx: dev.stream.alloc_zeros(batch).map_err(e)?,
        });
        // The bytes of the step's intermediates, counted by a first recording, when they go to
        // an arena; a step one of whose buffers outlived it (it would point into the arena after
        // the capture) is recorded from the pool instead.
        let counted = if GraphArena::current()
            .map_err(|x| dev_err(ordinal, x))?
            .used_for(batch)
        {
            let (_, bytes, held) = Self::record(&dev, &io, &mut step, Some((0, 0)))?;
            (held == 0).then_some(bytes)
        } else {
            None
        };
        let Some(bytes) = counted else {
            let (graph, ..) = Self::record(&dev, &io, &mut step, None)?;
            return Ok(DecodeGraph {
                graph,
                arena: None,
                dev,
                io,
            });
        };
        let arena = dev
            .stream
            .alloc_zeros::<u8>(bytes.max(256))
            .map_err(|x| super::alloc_err(dev.ordinal, bytes.max(256), x))?;
        let base = {
            use cudarc::driver::DevicePtr;
            arena.device_ptr(&dev.stream).0
        };
        let (graph, ..) = Self::record(&dev, &io, &mut step, Some((base, bytes)))?;
        Ok(DecodeGraph {
            graph,
            arena: Some((arena, bytes)),
            dev,
            io,
        })
    }

    /// One recording of `step`. With `arena` `Some((0, 0))` the intermediates come from the pool
    /// and their bytes are counted; with `Some((base, size))` they come from the arena of `size`
    /// bytes at `base`; with `None` from the pool. Returns the graph, the bytes counted and the
    /// bytes of the arena still held when `step` returned (0 unless a buffer outlived the step).
    /// A counting recording's graph is not uploaded: it is dropped unused.
    fn record<E: From<TensorError>>(
        dev: &Arc<GpuDevice>,
        io: &Arc<GraphIo>,
        step: &mut impl FnMut() -> Result<(), E>,
        arena: Option<(u64, usize)>,
    ) -> Result<(CudaGraph, usize, usize), E> {
        let ordinal = dev.ordinal;
        let e = |x| dev_err(ordinal, x);
        dev.synchronize()?;
        *dev.capture.lock().unwrap_or_else(|p| p.into_inner()) = Some(io.clone());
        let counting = arena.is_some_and(|(base, _)| base == 0);
        *dev.arena.lock().unwrap_or_else(|p| p.into_inner()) = arena.map(|(base, size)| {
            let a = super::Arena::new(base, size);
            (std::thread::current().id(), Arc::new(Mutex::new(a)))
        });
        let begun = dev
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(e);
        // A panic inside the step is caught only to end the capture and clear the slots first
        // (the stream and the device stay usable), then goes on unwinding.
        let ran = match begun {
            Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut *step)),
            Err(x) => Ok(Err(x.into())),
        };
        // End the capture whatever happened, so that the stream is usable again.
        let ended = dev.stream.end_capture(
            cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        *dev.capture.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let (used, held) = dev
            .arena
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map_or((0, 0), |(_, a)| {
                let a = a.lock().unwrap_or_else(|p| p.into_inner());
                (a.used(), a.held())
            });
        let ran = ran.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        ran?;
        let graph = ended
            .map_err(e)?
            .ok_or_else(|| dev_err(ordinal, "the captured step issued no work"))?;
        if !counting {
            graph.upload().map_err(e)?;
        }
        Ok((graph, used, held))
    }

    /// What the capture recorded: nodes by kind and edges by type (a programmatic edge lets a
    /// kernel start before the one it depends on finishes, as programmatic dependent launch does
    /// in a stream).
    pub fn stats(&self) -> Result<GraphStats, TensorError> {
        use cudarc::driver::sys;
        let e = |x: sys::CUresult| dev_err(self.dev.ordinal, format!("graph query: {x:?}"));
        let g = self.graph.cu_graph();
        let mut st = GraphStats {
            arena_bytes: self.arena.as_ref().map_or(0, |a| a.1),
            ..GraphStats::default()
        };
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
        self.launch(tokens, pos)?;
        let e = |x| dev_err(self.dev.ordinal, x);
        let stream = &self.dev.stream;
        let v = stream.clone_dtoh(&self.io.vals).map_err(e)?;
        let i = stream.clone_dtoh(&self.io.idx).map_err(e)?;
        stream.synchronize().map_err(e)?;
        Ok(v.into_iter().zip(i).map(|(v, i)| (v, i as u32)).collect())
    }

    /// Queues the captured step for `tokens` at position `pos` on the device's stream, without
    /// waiting: later work on the stream sees what it wrote (a step that leaves its outputs in
    /// memory it does not own, rather than greedy pairs).
    pub fn launch(&mut self, tokens: &[u32], pos: usize) -> Result<(), TensorError> {
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
        self.graph.launch().map_err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::GraphArena;

    #[test]
    fn graph_arena_choice_parses_and_takes_the_arena_up_to_batch_32_when_auto() {
        assert_eq!(GraphArena::parse(None), Ok(GraphArena::Auto));
        assert_eq!(GraphArena::parse(Some("auto")), Ok(GraphArena::Auto));
        assert_eq!(GraphArena::parse(Some("1")), Ok(GraphArena::Always));
        assert_eq!(GraphArena::parse(Some(" 0")), Ok(GraphArena::Never));
        let e = GraphArena::parse(Some("yes")).unwrap_err();
        assert_eq!(e, "TESSERA_GRAPH_ARENA=yes: expected auto, 1 or 0");
        assert!(GraphArena::Auto.used_for(1) && GraphArena::Auto.used_for(32));
        assert!(!GraphArena::Auto.used_for(33) && !GraphArena::Auto.used_for(64));
        assert!(GraphArena::Always.used_for(64) && !GraphArena::Never.used_for(1));
        // A forced choice is the one in use, and None gives the environment's back.
        for c in GraphArena::ALL {
            super::force_graph_arena(Some(c));
            assert_eq!(GraphArena::current(), Ok(c));
        }
        super::force_graph_arena(None);
    }
}

//! The all-reduce of tensor-parallel decode fused with the residual add and the RMSNorm after it,
//! over NVLink between the GPUs of one process (rank threads) that can access each other's
//! memory: [`P2pAllReduce::all_reduce_add_rms_norm`], one kernel (`all_reduce_add_rms_norm` in
//! `kernels.cu`) whose ranks push their values into each other's receive slots with NCCL's LL
//! protocol (data and flag in one 16-byte store, no fence, no flag round trip), as TensorRT-LLM
//! fuses its all-reduce with the norm. On two H200s it takes 4.8 µs a call of one row where NCCL's
//! all-reduce and the norm kernel take 9.0-9.8 (`tessera bench comm --backend nccl`).
//!
//! Set up collectively: every rank makes its [`P2pAllReduce`] (receive slots, call counters),
//! the ranks exchange [`P2pAllReduce::address`] and ordinals through their host communicator, and
//! each [`P2pAllReduce::connect`]s (peer access to every peer's GPU, the peers' addresses on the
//! device).
//!
//! A one-shot all-reduce without the norm (copy to a staging buffer, flags released and acquired
//! at system scope, peers' copies read over NVLink) was here before: 21 µs a call of 8 KB against
//! NCCL's 7 µs, so it went.
//!
//! The shared memory is allocated with `cuMemAlloc`, not from the stream's pool: pool memory does
//! not follow `cuCtxEnablePeerAccess`. A word of pinned host memory mapped into the device lets
//! [`P2pAllReduce::abort`] stop a kernel that waits for a peer, and lets the kernel report a peer
//! that did not come within the deadline (it returns instead of spinning on).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{result, sys, CudaSlice, CudaStream};

use super::CudaBuf;
use super::{dev_err, GpuDevice};
use crate::{Storage, TensorError};

/// Bytes of values a call takes at most: up to this the kernel beats NCCL's all-reduce and the
/// norm kernel on two H200s (64 rows of 4,096 bf16: 9.2 against 12.7 µs), beyond it no more (0.9x
/// at 960 KiB before its lines were coalesced), and calls of exactly 1 MiB of bf16 took
/// milliseconds (not understood; see `BENCHMARKS.md`). Larger calls go through NCCL.
pub const P2P_MAX_BYTES: usize = 512 << 10;
/// Rows the fused all-reduce + norm takes at most (one block and one call counter a row).
pub const FUSED_MAX_ROWS: usize = 1024;

/// Where the fused kernel's calls spent their time, summed by thread 0 of each row of each call
/// (globaltimer, ns, from the kernel before's end as this kernel sees it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct P2pStats {
    /// Until this rank's values were sent to the peers.
    pub push_ns: u64,
    /// From then until every peer's lines were there.
    pub wait_ns: u64,
    /// Until the row's sum of squares was known (the whole row had its peers' values).
    pub total_ns: u64,
    /// Calls times rows.
    pub row_calls: u64,
    /// The longest single wait for the peers.
    pub longest_wait_ns: u64,
}

/// The words of the kernel's stats array (`P2pStats`, in the kernel's order).
const STATS_WORDS: usize = 5;

impl P2pStats {
    fn from_words(v: &[u64]) -> Self {
        P2pStats {
            push_ns: v[0],
            wait_ns: v[1],
            total_ns: v[2],
            row_calls: v[3],
            longest_wait_ns: v[4],
        }
    }

    /// Both accounts together.
    fn plus(self, o: P2pStats) -> Self {
        P2pStats {
            push_ns: self.push_ns + o.push_ns,
            wait_ns: self.wait_ns + o.wait_ns,
            total_ns: self.total_ns + o.total_ns,
            row_calls: self.row_calls + o.row_calls,
            longest_wait_ns: self.longest_wait_ns.max(o.longest_wait_ns),
        }
    }
}

/// `TESSERA_P2P_TRIGGER=wait|pushed|end`: where the fused kernel releases the kernel after it
/// (0 at its wait for the kernel before, the default; 1 once its pushes are sent; 2 at its end).
pub(crate) fn parse_trigger(v: Option<&str>) -> Result<i32, String> {
    let names = [("wait", 0), ("pushed", 1), ("end", 2)];
    super::env_choice("TESSERA_P2P_TRIGGER", v, &names)
}

/// One rank's side of the fused all-reduce + norm.
pub struct P2pAllReduce {
    dev: Arc<GpuDevice>,
    /// The stream calls are queued on: the GPU's, or the rank's own where two ranks share a GPU
    /// (`with_own_stream`).
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    /// `cuMemAlloc`'d: `FUSED_MAX_ROWS` u32 call counters (one a row), then (16-byte aligned)
    /// the receive slots: `[2 parity][world source]` slots of `slot_bytes()` (16-byte lines of 8
    /// bytes of values, rows rounded up to whole groups of 32 chunks).
    mem: sys::CUdeviceptr,
    /// The bytes of a row the fused kernel was first called with (0: not yet): a row's place in
    /// the slots depends on it, so other row sizes are refused (the caller falls back) rather
    /// than read lines a call of another size left there.
    row_bytes: std::sync::atomic::AtomicUsize,
    /// A pushing GEMV ([`Self::matmul_pushing`]) has sent this rank's values of the next call.
    pushed: std::sync::atomic::AtomicBool,
    /// GEMVs push their outputs ([`Self::matmul_pushing`]): `TESSERA_P2P_PUSH=1`, off by default
    /// (no gain measured on two GPUs).
    push: bool,
    /// A system-scope fence after the kernel's pushes (`TESSERA_P2P_FENCE=1`, off: on two H200s
    /// the fence itself takes ~3.7 µs in decode and the call ends later, see docs/COMM.md).
    fence: bool,
    /// Where the kernel after is released (`TESSERA_P2P_TRIGGER`, a measurement aid): 0 at this
    /// one's wait for the kernel before (default: the fastest step on two H200s), 1 (`pushed`)
    /// once its pushes are sent, 2 (`end`) at its end.
    trigger: i32,
    /// Pinned host word, mapped into the device: 0 running, 1 aborted by the host, 2 a peer did
    /// not come within the deadline.
    word: *mut u32,
    word_dev: sys::CUdeviceptr,
    timeout_ns: u64,
    /// A group of one holds each call this long after its wait for the kernel before: a
    /// stand-in for the exchange in measurements of one rank alone ([`Self::with_hold`]).
    hold_ns: u32,
    /// Every rank's receive-slot addresses, on this GPU (after `connect`).
    table: Option<CudaSlice<u64>>,
    /// `TESSERA_P2P_STATS=1` or [`Self::with_stats`]: where the calls' time goes, summed by the
    /// kernel ([`P2pStats`]'s words in the order push, wait, total, row calls, longest wait),
    /// the eager calls' account first, then the captured calls' (replays of a decode graph),
    /// printed to stderr when this side is dropped.
    stats: Option<CudaSlice<u64>>,
}

// SAFETY: the raw device and pinned pointers are owned by this value and freed once (Drop); the
// host word is only accessed atomically.
unsafe impl Send for P2pAllReduce {}
unsafe impl Sync for P2pAllReduce {}

/// Enables access from `dev`'s context to GPU `peer`'s memory (already enabled is fine); an
/// error where the pair cannot access each other.
pub(crate) fn enable_peer_access(dev: &GpuDevice, peer: usize) -> Result<(), TensorError> {
    let o = dev.ordinal;
    let other = GpuDevice::get(peer)?;
    // Bound after the `get` (which may bind the peer's context): access is enabled from this
    // GPU's context to the peer's.
    dev.ctx.bind_to_thread().map_err(|e| dev_err(o, e))?;
    let mut can = 0;
    // SAFETY: plain queries and a flag change on live contexts of this process.
    unsafe {
        sys::cuDeviceCanAccessPeer(&mut can, dev.ctx.cu_device(), other.ctx.cu_device())
            .result()
            .map_err(|e| dev_err(o, e))?;
        if can == 0 {
            return Err(dev_err(o, format!("cannot access cuda:{peer}'s memory")));
        }
        match sys::cuCtxEnablePeerAccess(other.ctx.cu_ctx(), 0) {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {
                Ok(())
            }
            err => Err(dev_err(o, format!("peer access to cuda:{peer}: {err:?}"))),
        }
    }
}

impl P2pAllReduce {
    /// This rank's side; a peer that does not come to a call within `timeout` ends it with an
    /// error instead of a hang.
    pub fn new(
        ordinal: usize,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, TensorError> {
        let dev = GpuDevice::get(ordinal)?;
        let e = |x: cudarc::driver::DriverError| dev_err(ordinal, x);
        dev.ctx.bind_to_thread().map_err(e)?;
        // The device's set-up checked these switches (`check_switches`); an error here is one
        // all the same, not a silent default.
        let switch = |var| super::flag_switch(var).map_err(|x| dev_err(ordinal, x));
        let (push, fence, stats) = (
            switch("TESSERA_P2P_PUSH")?,
            switch("TESSERA_P2P_FENCE")?,
            switch("TESSERA_P2P_STATS")?,
        );
        let trigger = std::env::var("TESSERA_P2P_TRIGGER").ok();
        let trigger = parse_trigger(trigger.as_deref()).map_err(|x| dev_err(ordinal, x))?;
        let total = Self::SLOTS_OFFSET + 2 * world * Self::slot_bytes();
        // SAFETY: fresh allocations, zeroed before use, freed in Drop.
        let p = unsafe {
            let mem = result::malloc_sync(total).map_err(e)?;
            result::memset_d8_sync(mem, 0, total).map_err(e)?;
            let word =
                result::malloc_host(4, sys::CU_MEMHOSTALLOC_DEVICEMAP).map_err(e)? as *mut u32;
            word.write(0);
            let mut word_dev = 0;
            sys::cuMemHostGetDevicePointer_v2(&mut word_dev, word.cast(), 0)
                .result()
                .map_err(e)?;
            P2pAllReduce {
                stream: dev.stream.clone(),
                dev,
                rank,
                world,
                mem,
                word,
                word_dev,
                row_bytes: std::sync::atomic::AtomicUsize::new(0),
                pushed: std::sync::atomic::AtomicBool::new(false),
                push,
                fence,
                trigger,
                timeout_ns: timeout.as_nanos().min(u64::MAX as u128) as u64,
                hold_ns: 0,
                table: None,
                stats: None,
            }
        };
        if stats {
            p.with_stats()
        } else {
            Ok(p)
        }
    }

    /// Queues this rank's calls on a stream of its own instead of the GPU's: two ranks on one GPU
    /// (a test of the exchange without NVLink) must not wait for each other in one stream. The
    /// caller orders the tensors' producers and consumers with that stream.
    pub fn with_own_stream(mut self) -> Result<Self, TensorError> {
        self.stream = self
            .dev
            .ctx
            .new_stream()
            .map_err(|e| dev_err(self.dev.ordinal, e))?;
        Ok(self)
    }

    /// The same side with a system-scope fence after the kernel's pushes on or off, whatever
    /// `TESSERA_P2P_FENCE` says.
    pub fn with_fence(mut self, on: bool) -> Self {
        self.fence = on;
        self
    }

    /// The same side with the kernel after each call released where `at` says, whatever
    /// `TESSERA_P2P_TRIGGER` says: 0 at the call's wait for the kernel before (the default),
    /// 1 once its pushes are sent, 2 at its end.
    pub fn with_trigger(mut self, at: u8) -> Self {
        self.trigger = i32::from(at.min(2));
        self
    }

    /// The same side with the pushing GEMV ([`Self::matmul_pushing`]) on or off, whatever
    /// `TESSERA_P2P_PUSH` says.
    pub fn with_push(mut self, on: bool) -> Self {
        self.push = on;
        self
    }

    /// A group of one whose calls each take at least `hold` on the GPU (capped at 1 s) from the
    /// moment the kernel before has finished, as if waiting for peers over NVLink: what hiding
    /// an exchange of that length under the kernels around it is worth can be measured on one
    /// GPU. Without effect in a group of more than one.
    pub fn with_hold(mut self, hold: Duration) -> Self {
        self.hold_ns = hold.as_nanos().min(1_000_000_000) as u32;
        self
    }

    /// The same side with the time of its calls summed ([`Self::stats`]), whatever
    /// `TESSERA_P2P_STATS` says.
    pub fn with_stats(mut self) -> Result<Self, TensorError> {
        if self.stats.is_none() {
            let st = self.stream.alloc_zeros::<u64>(2 * STATS_WORDS);
            self.stats = Some(st.map_err(|e| dev_err(self.dev.ordinal, e))?);
        }
        Ok(self)
    }

    /// Where the calls' time went so far (after the calls queued are done), or `None` where
    /// not asked for (`TESSERA_P2P_STATS=1` or [`Self::with_stats`]).
    pub fn stats(&self) -> Result<Option<P2pStats>, TensorError> {
        Ok(self
            .stats_by_kind()?
            .map(|(eager, captured)| eager.plus(captured)))
    }

    /// The same, the calls queued eagerly apart from those of captured graphs (each replay of a
    /// graph counts its calls again): (eager, captured).
    pub fn stats_by_kind(&self) -> Result<Option<(P2pStats, P2pStats)>, TensorError> {
        let Some(st) = &self.stats else {
            return Ok(None);
        };
        let v = self
            .stream
            .clone_dtoh(st)
            .map_err(|e| dev_err(self.dev.ordinal, e))?;
        let (eager, captured) = v.split_at(STATS_WORDS);
        Ok(Some((
            P2pStats::from_words(eager),
            P2pStats::from_words(captured),
        )))
    }

    /// Waits for every call queued so far.
    pub fn synchronize(&self) -> Result<(), TensorError> {
        self.stream
            .synchronize()
            .map_err(|e| dev_err(self.dev.ordinal, e))
    }

    /// Where the receive slots start (after the call counters): the same offset on every rank.
    const SLOTS_OFFSET: usize = (FUSED_MAX_ROWS * 4).next_multiple_of(16);

    /// One slot: `P2P_MAX_BYTES` of values in lines of 16 bytes that carry 8, with room for rows
    /// rounded up to whole groups of 32 chunks of 8 values (`line_of` in the kernel).
    fn slot_bytes() -> usize {
        4 * P2P_MAX_BYTES
    }

    /// Bytes of lines a row of `h` values of `dt` takes in a slot: 16-byte lines carrying 8 bytes,
    /// chunks of 8 values in whole groups of 32.
    fn row_line_bytes(h: usize, dt: crate::DType) -> usize {
        (h / 8).div_ceil(32) * 32 * 8 * dt.size_in_bytes() * 2
    }

    /// This rank's memory (counters, then receive slots), as the device address the peers use.
    pub fn address(&self) -> u64 {
        self.mem
    }

    fn word(&self) -> &AtomicU32 {
        // SAFETY: a live, 4-byte aligned pinned allocation owned by self.
        unsafe { AtomicU32::from_ptr(self.word) }
    }

    /// Stops every call waiting for a peer now and every later one at once (they leave their
    /// tensors unreduced; the caller reports the abort).
    pub fn abort(&self) {
        let _ = self
            .word()
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Why the NVLink path stopped, if it did.
    pub fn failed(&self) -> Option<&'static str> {
        match self.word().load(Ordering::SeqCst) {
            0 => None,
            1 => Some("the NVLink all-reduce + norm was aborted"),
            _ => Some("a peer did not come to an NVLink all-reduce + norm within the deadline"),
        }
    }

    /// Enables access from this GPU to every peer's (`peers[r]` = rank r's ordinal and
    /// `address()`), and keeps the table on the device. Fails when a pair of GPUs cannot access
    /// each other (the caller then keeps NCCL).
    pub fn connect(&mut self, peers: &[(usize, u64)]) -> Result<(), TensorError> {
        let o = self.dev.ordinal;
        if peers.len() != self.world {
            return Err(dev_err(
                o,
                "NVLink all-reduce + norm: a table of the wrong size",
            ));
        }
        for (r, &(peer, _)) in peers.iter().enumerate() {
            // A rank on this GPU (itself, or another on its own stream) needs no peer access.
            if r == self.rank || peer == o {
                continue;
            }
            enable_peer_access(&self.dev, peer)?;
        }
        let e = |x| dev_err(o, x);
        let slots: Vec<u64> = peers
            .iter()
            .map(|p| p.1 + Self::SLOTS_OFFSET as u64)
            .collect();
        let table = self.dev.stream.clone_htod(&slots).map_err(e)?;
        // The table is read by calls on this rank's stream, which may not be the GPU's.
        self.dev.stream.synchronize().map_err(e)?;
        self.table = Some(table);
        Ok(())
    }

    /// `x += ` the sum of every rank's `part`, then `y = w * x / rms(x)` a row (eps inside the
    /// root): a row-parallel projection's all-reduce, the residual add and the next RMSNorm, in
    /// one kernel queued on this rank's stream; `x` and the returned `y` are the same on every
    /// rank, and with two ranks bit for bit what NCCL's all-reduce and `add_rms_norm` give.
    /// `Ok(None)` (nothing done, `x` untouched) where the kernel does not apply: not connected,
    /// more than [`FUSED_MAX_ROWS`] rows or [`P2P_MAX_BYTES`] of values, a row of another size
    /// than the first call's, `h` not a multiple of 8 or above 16,384.
    pub fn all_reduce_add_rms_norm(
        &self,
        part: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<Option<CudaBuf>, TensorError> {
        // The values of this call went out with the GEMV that made `part`: from here on every
        // way out but the kernel's launch is an error (the peers' sum would otherwise take those
        // values for a later call's).
        let pushed = self.pushed.swap(false, Ordering::SeqCst);
        let dev = &self.dev;
        let o = dev.ordinal;
        let Some(slots) = &self.table else {
            return self.refused(pushed, "not connected");
        };
        let dt = x.dtype();
        if [part, x, w]
            .iter()
            .any(|b| b.dev.ordinal != o || b.dtype() != dt)
            || part.len() != rows * h
            || x.len() != rows * h
            || w.len() != h
        {
            if pushed {
                self.abort();
            }
            return Err(dev_err(
                o,
                "fused all-reduce + norm: buffers of other sizes, dtypes or GPUs",
            ));
        }
        let Some((per, threads)) = self.takes(rows, h, dt) else {
            return self.refused(pushed, "a call the kernel does not take");
        };
        if pushed && rows != 1 {
            return self.refused(pushed, "one row pushed, more summed");
        }
        let name = match per {
            1 => "all_reduce_add_rms_norm1",
            2 => "all_reduce_add_rms_norm2",
            _ => "all_reduce_add_rms_norm4",
        };
        if let Some(why) = self.failed() {
            return Err(dev_err(o, why));
        }
        let y = CudaBuf::alloc(dev, dt, rows * h)?;
        self.follow_gpu_stream()?;
        let mut ptrs = [part, x, w, &y].map(super::ops::dptr);
        let (mut hh, mut eps) = (h as i32, eps);
        let (mut slots_ptr, mut slot_lines) = self.slots_on_device(slots);
        let mut counter = self.mem;
        let (mut rank, mut world) = (self.rank as i32, self.world as i32);
        let (mut word, mut timeout) = (self.word_dev, self.timeout_ns);
        let mut pushed = i32::from(pushed);
        let mut hold = self.hold_ns;
        let mut stats = self.stats.as_ref().map_or(0, |st| {
            use cudarc::driver::DevicePtr;
            // A call being captured into a graph sums into the second account.
            let captured = self.dev.capturing().is_some();
            st.device_ptr(&self.stream).0 + 8 * (STATS_WORDS * usize::from(captured)) as u64
        });
        let mut opts = i32::from(self.fence) | (self.trigger << 1);
        let mut params = super::ops::raw_params(&mut ptrs);
        params.push((&mut hh as *mut i32).cast());
        params.push((&mut eps as *mut f32).cast());
        params.push((&mut slots_ptr as *mut u64).cast());
        params.push((&mut slot_lines as *mut i64).cast());
        params.push((&mut counter as *mut u64).cast());
        params.push((&mut rank as *mut i32).cast());
        params.push((&mut world as *mut i32).cast());
        params.push((&mut word as *mut u64).cast());
        params.push((&mut timeout as *mut u64).cast());
        params.push((&mut pushed as *mut i32).cast());
        params.push((&mut hold as *mut u32).cast());
        params.push((&mut stats as *mut u64).cast());
        params.push((&mut opts as *mut i32).cast());
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the parameters match all_reduce_add_rms_norm(part, x, w, y, h, eps, slots,
        // slot_lines, counter, rank, world, word, timeout_ns, pushed, hold_ns, stats, opts) and outlive the call; the buffers
        // hold rows x h values (h for w) of one dtype on this GPU; a row's lines fit a slot
        // (rows x row_line_bytes is at most slot_bytes); the peers' slots stay allocated while
        // their communicators live, which outlive every call (teardown meets at a barrier, and a
        // failed teardown leaks them rather than free memory a peer may still write).
        unsafe {
            super::ops::launch_pdl_on(dev, &self.stream, dev.func(name, dt), cfg, &mut params)?
        };
        Ok(Some(y))
    }
}

impl P2pAllReduce {
    /// Whether the fused kernel takes `rows` rows of `h` values of `dt` (the same row size as
    /// the first call's, which this fixes): its chunks of 8 values a thread (1, 2 or 4) and
    /// threads a row, or `None`.
    fn takes(&self, rows: usize, h: usize, dt: crate::DType) -> Option<(usize, u32)> {
        let row = h * dt.size_in_bytes();
        // Chunks of 8 values a thread (1, 2 or 4: a kernel each), up to 512 threads a row, as
        // add_rms_norm takes them.
        let (per, threads) = super::ops::norm_shape(h);
        if !h.is_multiple_of(8)
            || h / 8 > 4 * threads as usize
            || rows == 0
            || rows > FUSED_MAX_ROWS
            || rows * row > P2P_MAX_BYTES
            || rows * Self::row_line_bytes(h, dt) > Self::slot_bytes()
        {
            return None;
        }
        match self
            .row_bytes
            .compare_exchange(0, row, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => Some((per, threads)),
            Err(first) if first == row => Some((per, threads)),
            Err(_) => None,
        }
    }

    /// Queues this rank's calls after the work on the GPU's stream (where its stream is its own:
    /// the tensors, and the outputs from the GPU stream's pool, belong to that stream's order).
    fn follow_gpu_stream(&self) -> Result<(), TensorError> {
        if Arc::ptr_eq(&self.stream, &self.dev.stream) {
            return Ok(());
        }
        self.stream
            .join(&self.dev.stream)
            .map_err(|e| dev_err(self.dev.ordinal, e))
    }

    /// The device address of the table of every rank's receive slots, and the lines a slot
    /// holds: the kernels' `ll` and `slot_lines`.
    fn slots_on_device(&self, slots: &CudaSlice<u64>) -> (u64, i64) {
        use cudarc::driver::DevicePtr;
        let ptr = slots.device_ptr(&self.stream).0;
        (ptr, (Self::slot_bytes() / 16) as i64)
    }

    /// `y[n] = x[k] W[n, k]^T` for one bf16 row through the decode GEMV that also pushes `y`
    /// into every peer's receive slot for the next [`Self::all_reduce_add_rms_norm`] (which
    /// must then be the next call, on `y`: it only waits for the peers). `Ok(None)` (nothing
    /// done) where that does not apply: not connected, not one bf16 row, a GEMV without a
    /// pushing form, or an output the fused kernel would not take.
    pub fn matmul_pushing(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        k: usize,
    ) -> Result<Option<CudaBuf>, TensorError> {
        let dev = &self.dev;
        let o = dev.ordinal;
        let (Some(slots), true) = (&self.table, self.push) else {
            return Ok(None);
        };
        let g = dev.gemv(false);
        let Some(f) = &g.push else { return Ok(None) };
        if x.dtype() != crate::DType::BF16
            || w.dtype() != x.dtype()
            || x.dev.ordinal != o
            || w.dev.ordinal != o
            || x.len() != k
            || w.len() != n * k
            || !k.is_multiple_of(8)
            || !n.is_multiple_of(8)
            || self.takes(1, n, x.dtype()).is_none()
        {
            return Ok(None);
        }
        if self.pushed.load(Ordering::SeqCst) {
            // The fused call of the last push has not come: the contract is broken.
            self.abort();
            return Err(dev_err(
                o,
                "a pushing GEMV before the fused all-reduce + norm of the one before",
            ));
        }
        if let Some(why) = self.failed() {
            return Err(dev_err(o, why));
        }
        let y = CudaBuf::alloc(dev, x.dtype(), n)?;
        self.follow_gpu_stream()?;
        /// `GemvPush` of `kernels.cu`.
        #[repr(C)]
        struct Push {
            ll: u64,
            slot_lines: i64,
            counter: u64,
            rank: i32,
            world: i32,
        }
        let (ll, slot_lines) = self.slots_on_device(slots);
        let mut push = Push {
            ll,
            slot_lines,
            counter: self.mem,
            rank: self.rank as i32,
            world: self.world as i32,
        };
        let mut ptrs = [x, w, &y].map(super::ops::dptr);
        let mut ints = [n as i32, k as i32];
        let mut params = super::ops::raw_params(&mut ptrs);
        params.extend(super::ops::raw_params(&mut ints));
        params.push((&mut push as *mut Push).cast());
        // SAFETY: the parameters match gemv_push_*(x, w, y, n, k, push) and outlive the call;
        // x holds k and w n x k bf16 values on this GPU, y n; the lines land in the peers' slots
        // for one row of n values, which `takes` checked fit (as for the fused kernel).
        unsafe { super::ops::launch_pdl_on(dev, &self.stream, f, g.config(n), &mut params)? };
        self.pushed.store(true, Ordering::SeqCst);
        Ok(Some(y))
    }

    /// [`Self::matmul_pushing`] on tensors: `x` of one row `[.., k]` (every dimension but the
    /// last 1), `w` `[n, k]`; `y` comes back as `[.., n]`.
    pub fn matmul_pushing_tensors(
        &self,
        x: &crate::Tensor,
        w: &crate::Tensor,
    ) -> Result<Option<crate::Tensor>, TensorError> {
        let (Storage::Cuda(xb), Storage::Cuda(wb)) = (x.storage(), w.storage()) else {
            return Ok(None);
        };
        let (&[n, k], Some(&kx)) = (w.shape(), x.shape().last()) else {
            return Ok(None);
        };
        if kx != k || x.elem_count() != k {
            return Ok(None);
        }
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("x has a last dimension") = n;
        self.matmul_pushing(xb, wb, n, k)?
            .map(|y| crate::Tensor::new(shape, Storage::Cuda(y)))
            .transpose()
    }

    /// `Ok(None)` for a call the kernel does not take (`why`), or, when a pushing GEMV sent this
    /// call's values already (`pushed`), an error with the path aborted: the peers' sum would
    /// otherwise take those values for a later call's.
    fn refused<T>(&self, pushed: bool, why: &str) -> Result<Option<T>, TensorError> {
        if !pushed {
            return Ok(None);
        }
        self.abort();
        Err(dev_err(
            self.dev.ordinal,
            format!("fused all-reduce + norm after a pushing GEMV: {why}"),
        ))
    }

    /// [`Self::all_reduce_add_rms_norm`] on tensors: `x` and `part` of one shape `[.., h]` (its
    /// rows: every dimension but the last), `w` of `h`, all on this GPU; the normalised rows come
    /// back in `x`'s shape. `Ok(None)` where the kernel does not apply (as there, or a tensor in
    /// host memory, or shapes that differ).
    pub fn all_reduce_add_rms_norm_tensors(
        &self,
        part: &crate::Tensor,
        x: &crate::Tensor,
        w: &crate::Tensor,
        eps: f64,
    ) -> Result<Option<crate::Tensor>, TensorError> {
        let h = x.shape().last().copied().unwrap_or(0);
        let (Storage::Cuda(pb), Storage::Cuda(xb), Storage::Cuda(wb)) =
            (part.storage(), x.storage(), w.storage())
        else {
            return self.refused(self.pushed.swap(false, Ordering::SeqCst), "host tensors");
        };
        if part.shape() != x.shape() || h == 0 {
            return self.refused(
                self.pushed.swap(false, Ordering::SeqCst),
                "shapes that differ",
            );
        }
        let rows = x.elem_count() / h;
        self.all_reduce_add_rms_norm(pb, xb, wb, rows, h, eps as f32)?
            .map(|y| crate::Tensor::new(x.shape().to_vec(), Storage::Cuda(y)))
            .transpose()
    }
}

impl Drop for P2pAllReduce {
    fn drop(&mut self) {
        if let Ok(Some((eager, captured))) = self.stats_by_kind() {
            for (kind, st) in [("captured", captured), ("eager", eager)] {
                if st.row_calls == 0 {
                    continue;
                }
                let n = st.row_calls as f64 * 1e3;
                eprintln!(
                    "fused all-reduce + norm, rank {} of {}, {kind}: {} row calls; µs a call from the kernel before's end: {:.2} to pushes sent, then {:.2} until the peers' lines are there (longest {:.1}), {:.2} to the row's end",
                    self.rank,
                    self.world,
                    st.row_calls,
                    st.push_ns as f64 / n,
                    st.wait_ns as f64 / n,
                    st.longest_wait_ns as f64 / 1e3,
                    st.total_ns as f64 / n
                );
            }
        }
        // SAFETY: both allocations are owned by self and freed once, with this GPU's context.
        unsafe {
            let _ = self.dev.ctx.bind_to_thread();
            let _ = result::free_sync(self.mem);
            let _ = result::free_host(self.word.cast());
        }
    }
}

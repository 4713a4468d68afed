//! NCCL on one GPU: [`DeviceComm`] is one rank's communicator. It reduces device tensors in place,
//! stream-ordered on the GPU's stream and without waiting (so a captured decode step records the
//! all-reduce into its graph), and moves host bytes through device staging buffers, waiting for
//! the result with a deadline.
//!
//! `tessera-comm`'s `NcclComm` puts this behind the `Communicator` trait; the unique id a group
//! starts from travels through that crate's host communicator. This module lives beside the CUDA
//! storage because it needs the raw device buffers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaSlice, DevicePtr};
use cudarc::nccl::{result, sys};

use super::{dev_err, CudaBuf, CudaData, GpuDevice};
use crate::{Storage, TensorError};

/// Element types of the collectives on host bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    F32,
    BF16,
    F16,
    I32,
    U8,
}

impl Wire {
    fn nccl(self) -> sys::ncclDataType_t {
        use sys::ncclDataType_t::*;
        match self {
            Wire::F32 => ncclFloat32,
            Wire::BF16 => ncclBfloat16,
            Wire::F16 => ncclFloat16,
            Wire::I32 => ncclInt32,
            Wire::U8 => ncclUint8,
        }
    }

    fn size(self) -> usize {
        match self {
            Wire::F32 | Wire::I32 => 4,
            Wire::BF16 | Wire::F16 => 2,
            Wire::U8 => 1,
        }
    }
}

/// Reductions NCCL runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    Avg,
    Max,
}

impl Reduce {
    fn nccl(self) -> sys::ncclRedOp_t {
        match self {
            Reduce::Sum => sys::ncclRedOp_t::ncclSum,
            Reduce::Avg => sys::ncclRedOp_t::ncclAvg,
            Reduce::Max => sys::ncclRedOp_t::ncclMax,
        }
    }
}

/// Why a collective on host bytes did not complete.
#[derive(Debug)]
pub enum NcclFailure {
    /// The deadline passed (a peer never joined, or is stuck); the communicator is aborted.
    TimedOut,
    /// The caller's group can no longer complete it (aborted, or a rank left); the communicator
    /// is aborted.
    Cancelled(String),
    Failed(TensorError),
}

impl From<TensorError> for NcclFailure {
    fn from(e: TensorError) -> Self {
        NcclFailure::Failed(e)
    }
}

/// What a waiting collective asks, about every millisecond, to learn that it should give up.
pub trait Cancel {
    /// Why the collective cannot complete any more (its group was aborted, a rank left), if so.
    fn cancelled(&self) -> Option<String>;
}

/// How a collective on host bytes waits: at most `timeout`, and while `cancel` says nothing.
pub struct Wait<'a> {
    pub timeout: Duration,
    pub cancel: &'a dyn Cancel,
}

/// A fresh NCCL unique id (made by rank 0 of a group and sent to the others through the host
/// communicator).
pub fn unique_id() -> Result<[u8; 128], TensorError> {
    present(0)?;
    let id = result::get_uniqueid().map_err(|e| nccl_err(0, "unique id", e))?;
    Ok(id.internal.map(|c| c as u8))
}

fn present(ordinal: usize) -> Result<(), TensorError> {
    // SAFETY: only probes whether libnccl can be loaded.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(dev_err(
            ordinal,
            "the NCCL library (libnccl.so) was not found on this machine",
        ))
    }
}

fn nccl_err(ordinal: usize, what: &str, e: result::NcclError) -> TensorError {
    // SAFETY: ncclGetErrorString returns a static string for every result code.
    let msg = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(e.0)) };
    dev_err(
        ordinal,
        format!("NCCL {what}: {:?} ({})", e.0, msg.to_string_lossy()),
    )
}

/// Makes NCCL connect the ranks while the communicator is made (`NCCL_RUNTIME_CONNECT=0`), unless
/// the user chose otherwise. Connected lazily, a rank's first collective blocks on the host until
/// its peers join, out of reach of the deadline that [`DeviceComm`]'s waits keep; connected at
/// init, a missing peer only stalls the stream, which the wait sees. Set once, before this
/// process's first NCCL init (every rank thread passes through here first). A program should call
/// it itself at start-up, while it has one thread (the `tessera` binary does): setting a variable
/// while another thread reads the environment is a data race in libc.
pub fn connect_at_init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("NCCL_RUNTIME_CONNECT").is_none() {
            std::env::set_var("NCCL_RUNTIME_CONNECT", "0");
        }
    });
}

/// The state of a live communicator's last call: done, still in progress, or failed.
fn poll_async(comm: sys::ncclComm_t) -> Result<result::NcclStatus, result::NcclError> {
    let mut state = sys::ncclResult_t::ncclSuccess;
    // SAFETY: the caller holds a live communicator; the out pointer is valid.
    unsafe { sys::ncclCommGetAsyncError(comm, &mut state) }
        .result()
        .and_then(|_| state.result())
}

/// The error text of any call on an aborted communicator.
pub const ABORTED: &str = "the NCCL communicator was aborted";

/// An NCCL communicator handle.
struct RawComm(sys::ncclComm_t);

// SAFETY: NCCL allows a communicator to be used from any thread, one at a time; `DeviceComm`
// keeps it behind a mutex.
unsafe impl Send for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        // SAFETY: the handle came from ncclCommInitRank and is dropped once. Abort (rather than
        // destroy) does not wait for peers, so a dead peer cannot hang the drop.
        let _ = unsafe { result::comm_abort(self.0) };
    }
}

/// One rank's NCCL communicator on one GPU, on the stream every op of that GPU runs on.
pub struct DeviceComm {
    comm: Mutex<Option<RawComm>>,
    /// The NVLink all-reduce + norm, once set up ([`Self::set_p2p`]).
    p2p: std::sync::OnceLock<super::p2p::P2pAllReduce>,
    dev: Arc<GpuDevice>,
    rank: usize,
    world: usize,
    /// How long a collective may stay "in progress" while NCCL queues it (non-blocking
    /// communicator); the group's deadline at init.
    enqueue_timeout: Duration,
}

/// The leading fields of NCCL's `ncclConfig_t` (NCCL_CONFIG_INITIALIZER's layout), enough to ask
/// for a non-blocking communicator. NCCL copies `size` bytes of a config and keeps its defaults
/// for the rest; `version` 2.14 is the first that reads `blocking`, and NCCL resets the fields
/// added after it to their defaults.
#[repr(C)]
struct NonBlocking {
    size: usize,
    magic: u32,
    version: u32,
    blocking: i32,
}

impl NonBlocking {
    fn config() -> Self {
        NonBlocking {
            // The four fields, without the struct's tail padding.
            size: std::mem::offset_of!(NonBlocking, blocking) + std::mem::size_of::<i32>(),
            magic: 0xcafe_beef,
            version: 2 * 10000 + 14 * 100,
            blocking: 0,
        }
    }
}

impl std::fmt::Debug for DeviceComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceComm(rank {} of {} on {:?})",
            self.rank, self.world, self.dev
        )
    }
}

/// A device staging buffer and its raw address.
struct Staged {
    buf: CudaSlice<u8>,
    ptr: u64,
}

impl DeviceComm {
    /// Joins GPU `ordinal` to a group of `world` ranks as `rank`, with the id rank 0 made. Every
    /// rank of the group calls this at about the same time (threads of one process, or processes).
    /// The communicator is made non-blocking: its init runs in the background while this call
    /// polls it against `wait`, so a peer that never joins is a timeout (the half-made
    /// communicator is aborted), not a call that never returns.
    pub fn new(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: [u8; 128],
        wait: &Wait,
    ) -> Result<Self, NcclFailure> {
        present(ordinal)?;
        connect_at_init();
        let dev = GpuDevice::get(ordinal)?;
        dev.ctx.bind_to_thread().map_err(|e| dev_err(ordinal, e))?;
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as ::core::ffi::c_char),
        };
        let what = format!("init of rank {rank} of {world}");
        let mut config = NonBlocking::config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: NCCL reads `config.size` bytes of the config (its leading fields, which
        // `NonBlocking` lays out as ncclConfig_t does) and writes the handle into `comm`.
        let started = unsafe {
            sys::ncclCommInitRankConfig(
                &mut comm,
                world as i32,
                id,
                rank as i32,
                (&mut config as *mut NonBlocking).cast(),
            )
        }
        .result();
        if let Err(e) = started {
            if !comm.is_null() {
                // SAFETY: the half-made handle NCCL returned, released once here.
                let _ = unsafe { result::comm_abort(comm) };
            }
            return Err(nccl_err(ordinal, &what, e).into());
        }
        let dc = DeviceComm {
            comm: Mutex::new(Some(RawComm(comm))),
            p2p: std::sync::OnceLock::new(),
            dev,
            rank,
            world,
            enqueue_timeout: wait.timeout,
        };
        dc.until_ready(&what, wait)?;
        Ok(dc)
    }

    /// Polls a non-blocking communicator until the call in flight (its init, or a collective
    /// being queued) is done: at most `wait.timeout`, and while `wait.cancel` says nothing. The
    /// communicator is aborted on a failure, a timeout or a cancel.
    fn until_ready(&self, what: &str, wait: &Wait) -> Result<(), NcclFailure> {
        self.spin_until(wait, || {
            Ok(self.async_state(what)? != result::NcclStatus::InProgress)
        })
    }

    /// The state of the communicator's last call (`ncclCommGetAsyncError`); an error aborts the
    /// communicator (NCCL's rule: one with an asynchronous error must be aborted, or its
    /// collective may never finish).
    fn async_state(&self, what: &str) -> Result<result::NcclStatus, NcclFailure> {
        let state = {
            let guard = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            let Some(comm) = guard.as_ref() else {
                return Err(NcclFailure::Cancelled(ABORTED.into()));
            };
            poll_async(comm.0)
        };
        state.map_err(|e| {
            self.abort();
            nccl_err(self.dev.ordinal, what, e).into()
        })
    }

    /// Calls `done` until it says so, at most `w.timeout` and while `w.cancel` says nothing
    /// (checked every 20th call); spins briefly (small collectives finish in microseconds), then
    /// backs off. The communicator is aborted on a timeout or a cancel.
    fn spin_until(
        &self,
        w: &Wait,
        mut done: impl FnMut() -> Result<bool, NcclFailure>,
    ) -> Result<(), NcclFailure> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if done()? {
                return Ok(());
            }
            if start.elapsed() > w.timeout {
                self.abort();
                return Err(NcclFailure::TimedOut);
            }
            if spins.is_multiple_of(20) {
                if let Some(reason) = w.cancel.cancelled() {
                    self.abort();
                    return Err(NcclFailure::Cancelled(reason));
                }
            }
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    pub fn ordinal(&self) -> usize {
        self.dev.ordinal
    }

    /// From now on [`Self::all_reduce_add_rms_norm`] runs over NVLink (every rank of the group
    /// must set it up, or none).
    pub fn set_p2p(&self, p: super::p2p::P2pAllReduce) {
        let _ = self.p2p.set(p);
    }

    /// Whether the NVLink all-reduce + norm is set up.
    pub fn p2p_ready(&self) -> bool {
        self.p2p.get().is_some()
    }

    /// The NVLink path when it is set up (`None` otherwise), and the error of every call after
    /// an abort (it queues work without NCCL, so NCCL cannot refuse it).
    fn live_p2p(&self) -> Result<Option<&super::p2p::P2pAllReduce>, TensorError> {
        let Some(p) = self.p2p.get() else {
            return Ok(None);
        };
        let live = self
            .comm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        live.then_some(Some(p))
            .ok_or_else(|| dev_err(self.dev.ordinal, ABORTED))
    }

    /// `x += ` the sum over the group of `part`, then the RMSNorm of the new `x` (scale `w`) in
    /// one NVLink kernel ([`super::p2p::P2pAllReduce::all_reduce_add_rms_norm_tensors`]), queued
    /// on the GPU's stream; `Ok(None)` (nothing done) where that path is off or does not apply:
    /// the caller then sums and normalises itself.
    pub fn all_reduce_add_rms_norm(
        &self,
        part: &crate::Tensor,
        x: &crate::Tensor,
        w: &crate::Tensor,
        eps: f64,
    ) -> Result<Option<crate::Tensor>, TensorError> {
        match self.live_p2p()? {
            Some(p) => p.all_reduce_add_rms_norm_tensors(part, x, w, eps),
            None => Ok(None),
        }
    }

    /// `x W^T` for one row, through the GEMV that pushes its outputs to the peers for the
    /// next [`Self::all_reduce_add_rms_norm`] on them
    /// ([`super::p2p::P2pAllReduce::matmul_pushing_tensors`]); `Ok(None)` where that path is off
    /// or does not apply.
    pub fn row_parallel_matmul(
        &self,
        x: &crate::Tensor,
        w: &crate::Tensor,
    ) -> Result<Option<crate::Tensor>, TensorError> {
        match self.live_p2p()? {
            Some(p) => p.matmul_pushing_tensors(x, w),
            None => Ok(None),
        }
    }

    /// Runs `f` with the communicator and this GPU's stream, the context bound to this thread.
    fn with_comm(
        &self,
        what: &str,
        f: impl FnOnce(
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> Result<result::NcclStatus, result::NcclError>,
    ) -> Result<(), TensorError> {
        let guard = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let comm = guard
            .as_ref()
            .ok_or_else(|| dev_err(self.dev.ordinal, ABORTED))?;
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| dev_err(self.dev.ordinal, e))?;
        let raw = comm.0;
        let r = f(raw, self.dev.stream.cu_stream() as _)
            .map_err(|e| nccl_err(self.dev.ordinal, what, e))?;
        if r == result::NcclStatus::InProgress {
            // A non-blocking communicator may still be queuing the call: it is on the stream only
            // once NCCL says so, and no other call may use the communicator before (the lock is
            // held meanwhile).
            let start = Instant::now();
            loop {
                let failure = match poll_async(raw) {
                    Ok(result::NcclStatus::InProgress) => None,
                    Ok(_) => break,
                    Err(e) => Some(nccl_err(self.dev.ordinal, what, e)),
                };
                let failure = failure.or_else(|| {
                    (start.elapsed() > self.enqueue_timeout).then(|| {
                        dev_err(
                            self.dev.ordinal,
                            format!(
                                "NCCL {what}: still being queued after {:.1}s",
                                self.enqueue_timeout.as_secs_f64()
                            ),
                        )
                    })
                });
                if let Some(e) = failure {
                    drop(guard);
                    self.abort();
                    return Err(e);
                }
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    /// Reduces a tensor's device storage in place across the group, in its own dtype. Queued on
    /// the GPU's stream; returns without waiting (later work on the stream sees the result).
    pub fn all_reduce_storage(&self, s: &mut Storage, op: Reduce) -> Result<(), TensorError> {
        let b = self.own(s)?;
        let n = b.len();
        if n == 0 {
            return Ok(());
        }
        let stream = &self.dev.stream;
        let (ptr, ty) = match &b.data {
            CudaData::F32(x) => (x.device_ptr(stream).0, Wire::F32),
            CudaData::BF16(x) => (x.device_ptr(stream).0, Wire::BF16),
        };
        self.with_comm("all_reduce", |comm, st| {
            // SAFETY: `ptr` addresses `n` elements of `ty` on this communicator's GPU, which live
            // as long as the tensor; the reduction runs on the stream every later use of it is on.
            unsafe {
                result::all_reduce(
                    ptr as *const _,
                    ptr as *mut _,
                    n,
                    ty.nccl(),
                    op.nccl(),
                    comm,
                    st,
                )
            }
        })
    }

    /// Every rank's device buffer `s` (the same length and dtype on every rank) concatenated in
    /// rank order, in a new buffer on this GPU. Queued on the GPU's stream; returns without
    /// waiting (later work on the stream sees the result).
    pub fn all_gather_storage(&self, s: &Storage) -> Result<Storage, TensorError> {
        let b = self.own(s)?;
        let n = b.len();
        let out = CudaBuf::alloc(&b.dev, b.dtype(), n * self.world)?;
        if n == 0 {
            return Ok(Storage::Cuda(out));
        }
        let stream = &self.dev.stream;
        let (src, dst, ty) = match (&b.data, &out.data) {
            (CudaData::F32(x), CudaData::F32(y)) => {
                (x.device_ptr(stream).0, y.device_ptr(stream).0, Wire::F32)
            }
            (CudaData::BF16(x), CudaData::BF16(y)) => {
                (x.device_ptr(stream).0, y.device_ptr(stream).0, Wire::BF16)
            }
            _ => unreachable!("allocated in the input's dtype"),
        };
        self.with_comm("all_gather", |comm, st| {
            // SAFETY: `src` addresses `n` elements of `ty` and `dst` `world * n` of them, on this
            // communicator's GPU; both live until the gather, queued on the stream every later
            // use of them is on, has run (the output is returned, the input borrowed here).
            unsafe { result::all_gather(src as *const _, dst as *mut _, n, ty.nccl(), comm, st) }
        })?;
        Ok(Storage::Cuda(out))
    }

    /// `s`'s buffer, if it lies on this communicator's GPU.
    fn own<'a>(&self, s: &'a Storage) -> Result<&'a CudaBuf, TensorError> {
        let Storage::Cuda(b) = s else {
            return Err(dev_err(
                self.dev.ordinal,
                "NCCL moves device buffers; this tensor is in host memory",
            ));
        };
        if b.dev.ordinal != self.dev.ordinal {
            return Err(dev_err(
                self.dev.ordinal,
                format!(
                    "the tensor is on {:?}, not on this communicator's GPU",
                    b.dev
                ),
            ));
        }
        Ok(b)
    }

    fn stage(&self, bytes: &[u8]) -> Result<Staged, TensorError> {
        let buf = self
            .dev
            .stream
            .clone_htod(bytes)
            .map_err(|e| dev_err(self.dev.ordinal, e))?;
        let ptr = buf.device_ptr(&self.dev.stream).0;
        Ok(Staged { buf, ptr })
    }

    fn scratch(&self, len: usize) -> Result<Staged, TensorError> {
        let buf = self
            .dev
            .stream
            .alloc_zeros::<u8>(len)
            .map_err(|e| dev_err(self.dev.ordinal, e))?;
        let ptr = buf.device_ptr(&self.dev.stream).0;
        Ok(Staged { buf, ptr })
    }

    /// Waits, within `timeout`, for everything queued on the stream so far; polls NCCL's
    /// asynchronous error too (a peer that failed). On the deadline the communicator is aborted,
    /// so that the queued operation ends and the GPU is free again.
    fn wait(&self, what: &str, w: &Wait) -> Result<(), NcclFailure> {
        let o = self.dev.ordinal;
        let event = self
            .dev
            .stream
            .record_event(Some(
                cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
            ))
            .map_err(|e| dev_err(o, e))?;
        self.spin_until(w, || {
            if event.try_is_complete().map_err(|e| dev_err(o, e))? {
                return Ok(true);
            }
            // An NVLink all-reduce + norm that gave up (late peer, abort) fails the wait too.
            if let Some(why) = self.p2p.get().and_then(|p| p.failed()) {
                self.abort();
                return Err(if why.contains("deadline") {
                    NcclFailure::TimedOut
                } else {
                    NcclFailure::Cancelled(why.into())
                });
            }
            self.async_state(what).map(|_| false)
        })
    }

    /// Refuses lengths NCCL would read or write past the staging buffers with.
    fn check(&self, ok: bool, what: &str) -> Result<(), NcclFailure> {
        if ok {
            Ok(())
        } else {
            Err(dev_err(
                self.dev.ordinal,
                format!("NCCL {what}: buffer lengths do not fit the group"),
            )
            .into())
        }
    }

    fn download(&self, src: &Staged, dst: &mut [u8]) -> Result<(), TensorError> {
        self.dev
            .stream
            .memcpy_dtoh(&src.buf, dst)
            .map_err(|e| dev_err(self.dev.ordinal, e))
    }

    /// One collective on host bytes: stages `input` on the device (`None`: `out` itself, in
    /// place), queues `call(src, dst, comm, stream)` with `dst` a fresh `out.len()`-byte device
    /// buffer (in place: the staged input), waits with `w`, and copies `dst` into `out`.
    fn on_host(
        &self,
        what: &str,
        input: Option<&[u8]>,
        out: &mut [u8],
        w: &Wait,
        call: impl FnOnce(
            u64,
            u64,
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> Result<result::NcclStatus, result::NcclError>,
    ) -> Result<(), NcclFailure> {
        let src = self.stage(input.unwrap_or(out))?;
        let fresh = match input {
            Some(_) => Some(self.scratch(out.len())?),
            None => None,
        };
        let dst = fresh.as_ref().unwrap_or(&src);
        self.with_comm(what, |comm, st| call(src.ptr, dst.ptr, comm, st))?;
        self.wait(what, w)?;
        Ok(self.download(dst, out)?)
    }

    /// Reduces host bytes (elements of `ty`) across the group; every rank gets the result.
    pub fn all_reduce_host(
        &self,
        buf: &mut [u8],
        ty: Wire,
        op: Reduce,
        w: &Wait,
    ) -> Result<(), NcclFailure> {
        self.check(buf.len().is_multiple_of(ty.size()), "all_reduce")?;
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.len() / ty.size();
        self.on_host("all_reduce", None, buf, w, |src, dst, comm, st| {
            // SAFETY: in place on a live staging buffer of `n` elements of `ty`.
            unsafe {
                result::all_reduce(
                    src as *const _,
                    dst as *mut _,
                    n,
                    ty.nccl(),
                    op.nccl(),
                    comm,
                    st,
                )
            }
        })
    }

    /// Concatenates every rank's `send` in rank order into `recv`.
    pub fn all_gather_host(
        &self,
        send: &[u8],
        recv: &mut [u8],
        w: &Wait,
    ) -> Result<(), NcclFailure> {
        self.check(recv.len() == send.len() * self.world, "all_gather")?;
        if send.is_empty() {
            return Ok(());
        }
        self.on_host("all_gather", Some(send), recv, w, |src, dst, comm, st| {
            // SAFETY: live staging buffers of `send.len()` and `world * send.len()` bytes.
            unsafe {
                result::all_gather(
                    src as *const _,
                    dst as *mut _,
                    send.len(),
                    Wire::U8.nccl(),
                    comm,
                    st,
                )
            }
        })
    }

    /// Copies `root`'s `buf` into every rank's `buf`.
    pub fn broadcast_host(&self, buf: &mut [u8], root: usize, w: &Wait) -> Result<(), NcclFailure> {
        self.check(root < self.world, "broadcast")?;
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len();
        self.on_host("broadcast", None, buf, w, |src, dst, comm, st| {
            // SAFETY: in place on a live staging buffer of `len` bytes.
            unsafe {
                result::broadcast(
                    src as *const _,
                    dst as *mut _,
                    len,
                    Wire::U8.nccl(),
                    root as i32,
                    comm,
                    st,
                )
            }
        })
    }

    /// Reduces `send` (`world` equal chunks) across the group; rank r receives chunk r.
    pub fn reduce_scatter_host(
        &self,
        send: &[u8],
        recv: &mut [u8],
        ty: Wire,
        op: Reduce,
        w: &Wait,
    ) -> Result<(), NcclFailure> {
        self.check(
            send.len() == recv.len() * self.world && recv.len().is_multiple_of(ty.size()),
            "reduce_scatter",
        )?;
        if recv.is_empty() {
            return Ok(());
        }
        let n = recv.len() / ty.size();
        self.on_host(
            "reduce_scatter",
            Some(send),
            recv,
            w,
            |src, dst, comm, st| {
                // SAFETY: live staging buffers of `world * n` and `n` elements of `ty`.
                unsafe {
                    result::reduce_scatter(
                        src as *const _,
                        dst as *mut _,
                        n,
                        ty.nccl(),
                        op.nccl(),
                        comm,
                        st,
                    )
                }
            },
        )
    }

    /// Waits until every rank has reached this point and this GPU's queued work is done.
    pub fn barrier(&self, w: &Wait) -> Result<(), NcclFailure> {
        let mut one = [0u8; 4];
        self.all_reduce_host(&mut one, Wire::I32, Reduce::Sum, w)
    }

    /// Waits, within `timeout`, until this GPU has finished the work queued so far (this rank's
    /// collectives included).
    pub fn drain(&self, w: &Wait) -> Result<(), NcclFailure> {
        self.wait("drain", w)
    }

    /// Gives up the NVLink path's memory without freeing it: after a failed teardown a peer's
    /// kernel may still write into it.
    pub fn leak_p2p(&mut self) {
        if let Some(p) = self.p2p.take() {
            p.abort();
            std::mem::forget(p);
        }
    }

    /// Frees this rank's side now, the NCCL communicator and the NVLink path's memory (every
    /// later call fails). For a teardown the ranks agreed on: freeing can wait until the peers'
    /// GPUs are idle (it unmaps memory they share), so no rank may queue work that waits for a
    /// peer (another communicator's collective) before every rank has freed its side.
    pub fn release(&mut self) {
        // The NVLink path's memory freed now (`abort` only stops its kernel); the rest is what
        // `abort` frees.
        drop(self.p2p.take());
        self.abort();
    }

    /// Aborts the communicator: queued NCCL work ends, every later call fails.
    pub fn abort(&self) {
        if let Some(p) = self.p2p.get() {
            p.abort();
        }
        let old = self.comm.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(old);
    }
}

//! The NCCL backend of [`Communicator`]: one rank on one GPU (feature `cuda`).
//!
//! An [`NcclComm`] is made collectively over a host communicator (in-process threads or TCP
//! processes), which stays its control plane: rank 0 makes the NCCL unique id and broadcasts it
//! there, sub-groups are formed there, and gathers and broadcasts of host bytes up to
//! [`HOST_BYTES_MAX`] go through it (with its deadline; `TESSERA_NCCL_HOST_BYTES=0`: on NCCL as
//! below). Everything else runs on NCCL:
//! - [`Communicator::all_reduce_tensor`] on a device tensor reduces it where it lies, queued on
//!   the GPU's stream without waiting (stream-ordered and asynchronous: the next kernel on the
//!   stream sees the sum, and a CUDA graph capture records the all-reduce into the graph);
//! - [`Communicator::all_gather_tensor`] on a device tensor gathers it into a new buffer on the
//!   same GPU, then waits for it with the group's deadline (its callers read it at once);
//! - the other collectives on host bytes stage them through device memory and wait for the result with
//!   the group's deadline (a peer that never joins is a [`CommError::Timeout`], the communicator
//!   is then aborted so the GPU is not left running a collective that cannot finish).
//!
//! Point-to-point host messages go through the control plane: the trait's `send` is eager, and an
//! NCCL send completes only once the peer receives, which would deadlock two ranks that each send
//! before they receive.

use std::time::Duration;

use tessera_tensor::cuda::nccl::{self, Cancel, DeviceComm, NcclFailure, Reduce, Wait, Wire};
use tessera_tensor::cuda::p2p::P2pAllReduce;
use tessera_tensor::{Storage, Tensor};

use crate::communicator::{all_gather_tensor_via_host, all_reduce_tensor_via_host, gathered_shape};
use crate::{args, CommError, Communicator, ElemKind, ReduceOp};

enum Host<'a> {
    Borrowed(&'a dyn Communicator),
    Owned(Box<dyn Communicator>),
}

/// One rank's NCCL communicator on one GPU, over a host communicator of the same group.
pub struct NcclComm<'a> {
    host: Host<'a>,
    dev: DeviceComm,
    timeout: Duration,
    /// Gathers and broadcasts of host bytes up to [`HOST_BYTES_MAX`] go through the host
    /// communicator ([`host_bytes_wanted`]).
    small_via_host: bool,
}

/// Host bytes a gather or broadcast moves through the host communicator at most (where
/// [`host_bytes_wanted`]): a sampled token, the greedy step's (value, index) pairs, a score's
/// log-sum-exps. NCCL would copy them to the device, run the collective and copy them back.
pub const HOST_BYTES_MAX: usize = 64 << 10;

/// Whether small gathers and broadcasts of host bytes go through the host communicator: yes
/// unless `TESSERA_NCCL_HOST_BYTES` is `0` (NCCL's collective on a staging buffer, as before).
/// Every rank must take the same path (else one waits in NCCL for a peer waiting in the host
/// group): the ranks compare their switches when the communicator is made and refuse a
/// difference by name. Such calls wait with the host group's deadline, not
/// [`NcclComm::with_timeout`]'s.
pub fn host_bytes_wanted() -> Result<bool, String> {
    tessera_tensor::cuda::flag_switch("TESSERA_NCCL_HOST_BYTES")
}

impl<'a> NcclComm<'a> {
    /// Joins GPU `ordinal` to an NCCL group of `host`'s ranks (collective: every rank of `host`
    /// calls it, each with its own GPU). The deadline of every wait is [`crate::default_timeout`].
    pub fn new(host: &'a dyn Communicator, ordinal: usize) -> Result<Self, CommError> {
        Self::join(Host::Borrowed(host), ordinal, crate::default_timeout())
    }

    /// [`Self::new`] with another deadline, for the NCCL init (a rank that never joins makes the
    /// others' init a [`CommError::Timeout`]) and every wait after it.
    pub fn with_deadline(
        host: &'a dyn Communicator,
        ordinal: usize,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        Self::join(Host::Borrowed(host), ordinal, timeout)
    }

    fn join(host: Host<'a>, ordinal: usize, timeout: Duration) -> Result<Self, CommError> {
        let h = match &host {
            Host::Borrowed(h) => *h,
            Host::Owned(h) => &**h,
        };
        let rank = h.rank();
        // A bad switch stops this rank before anything collective, and the host group tells the
        // others (who would otherwise wait for it in their NCCL init).
        let (wanted, small_via_host) = nvlink_wanted()
            .and_then(|w| Ok((w, host_bytes_wanted()?)))
            .map_err(|msg| {
                h.abort(&format!("rank {rank}: {msg}"));
                CommError::Invalid { rank, msg }
            })?;
        // NCCL's unique id, then rank 0's TESSERA_NCCL_HOST_BYTES: small host bytes take the
        // host group or NCCL on every rank alike, or none starts.
        let mut id = [0u8; 129];
        if rank == 0 {
            match nccl::unique_id() {
                Ok(v) => id[..128].copy_from_slice(&v),
                Err(e) => {
                    let msg = e.to_string();
                    h.abort(&msg);
                    return Err(CommError::Device { rank, msg });
                }
            }
            id[128] = small_via_host as u8;
        }
        // Every rank needs the id (a plain broadcast skips a group of one).
        h.broadcast_bytes(&mut id, 0)?;
        if id[128] != small_via_host as u8 {
            let msg = format!(
                "TESSERA_NCCL_HOST_BYTES differs between the ranks ({} on rank 0, {} on rank {rank})",
                id[128], small_via_host as u8
            );
            // The others would wait for this rank in their NCCL init.
            h.abort(&msg);
            return Err(CommError::Invalid { rank, msg });
        }
        let mut nccl_id = [0u8; 128];
        nccl_id.copy_from_slice(&id[..128]);
        // The init waits for every rank, within the deadline and while the host group stands.
        struct HostCancel<'h>(&'h dyn Communicator);
        impl Cancel for HostCancel<'_> {
            fn cancelled(&self) -> Option<String> {
                self.0.aborted()
            }
        }
        let wait = Wait {
            timeout,
            cancel: &HostCancel(h),
        };
        let world = h.world_size();
        let dev = DeviceComm::new(ordinal, rank, world, nccl_id, &wait).map_err(|f| {
            let (msg, err) = match f {
                NcclFailure::TimedOut => {
                    let msg = format!("NCCL init timed out after {:.1}s", timeout.as_secs_f64());
                    let err = CommError::Timeout {
                        rank,
                        op: "NCCL init".into(),
                        secs: timeout.as_secs_f64(),
                        // NCCL does not say which peer is missing.
                        missing: (0..world).filter(|&r| r != rank).collect(),
                    };
                    (msg, err)
                }
                NcclFailure::Cancelled(reason) => {
                    (reason.clone(), CommError::Aborted { rank, reason })
                }
                NcclFailure::Failed(e) => {
                    let msg = e.to_string();
                    (msg.clone(), CommError::Device { rank, msg })
                }
            };
            // The others may be waiting in their own init: the host group tells them at once.
            h.abort(&format!("rank {rank}: {msg}"));
            err
        })?;
        if h.world_size() > 1 && wanted {
            setup_p2p(h, &dev, ordinal)?;
        }
        Ok(NcclComm {
            host,
            dev,
            timeout,
            small_via_host,
        })
    }

    /// The same communicator with another deadline for its waits.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether [`Communicator::all_reduce_add_rms_norm`] runs fused over NVLink.
    pub fn fused_norm_active(&self) -> bool {
        self.dev.p2p_ready()
    }

    /// The GPU this rank runs on.
    pub fn ordinal(&self) -> usize {
        self.dev.ordinal()
    }

    fn host(&self) -> &dyn Communicator {
        match &self.host {
            Host::Borrowed(h) => *h,
            Host::Owned(h) => &**h,
        }
    }

    fn fail(&self, op: &str, f: NcclFailure) -> CommError {
        let rank = self.rank();
        match f {
            NcclFailure::TimedOut => {
                // The NCCL communicator is aborted; the host group goes too, so that the other
                // ranks stop at once instead of at their own deadlines.
                self.host().abort(&format!(
                    "rank {rank}: NCCL {op} timed out after {:.1}s",
                    self.timeout.as_secs_f64()
                ));
                CommError::Timeout {
                    rank,
                    op: format!("NCCL {op}"),
                    secs: self.timeout.as_secs_f64(),
                    // NCCL does not say which peer is missing.
                    missing: (0..self.world_size()).filter(|&r| r != rank).collect(),
                }
            }
            NcclFailure::Cancelled(reason) => CommError::Aborted { rank, reason },
            NcclFailure::Failed(e) => self.device_error(e),
        }
    }

    /// The deadline of a wait, cut short when the host group is aborted or loses a rank.
    fn wait(&self) -> Wait<'_> {
        Wait {
            timeout: self.timeout,
            cancel: self,
        }
    }

    /// A device error of this rank: an aborted communicator is `Aborted`; anything else is
    /// `Device`, and the host group is aborted with it (NCCL's communicator is gone or must go).
    fn device_error(&self, e: tessera_tensor::TensorError) -> CommError {
        let rank = self.rank();
        let msg = e.to_string();
        if msg.contains(nccl::ABORTED) {
            return CommError::Aborted { rank, reason: msg };
        }
        self.host().abort(&format!("rank {rank}: {msg}"));
        CommError::Device { rank, msg }
    }

    fn invalid(&self, msg: String) -> CommError {
        CommError::Invalid {
            rank: self.rank(),
            msg,
        }
    }
}

/// Whether to set up the fused NVLink all-reduce + residual add + RMSNorm
/// ([`Communicator::all_reduce_add_rms_norm`]) where the ranks allow it: yes unless
/// `TESSERA_P2P_ALLREDUCE` is `0` (any value but `1` or `0` is an error). Measured on two H200s (`BENCHMARKS.md`): 4.8 µs a call of one row
/// against 9.0-9.8 for NCCL's all-reduce and the norm kernel, tp 2 decode of the 8B shape
/// 2.86-2.92 -> 2.56-2.58 ms a step at batch 1, 4.17 -> 3.74-3.84 at batch 64.
pub fn nvlink_wanted() -> Result<bool, String> {
    tessera_tensor::cuda::flag_switch("TESSERA_P2P_ALLREDUCE")
}

/// Sets up the NVLink all-reduce + norm when every rank of `h` is a thread of this process on its
/// own GPU and every pair of GPUs can access each other; otherwise leaves NCCL alone. Every step
/// is agreed over `h`, so all ranks take the same path.
fn setup_p2p(h: &dyn Communicator, dev: &DeviceComm, ordinal: usize) -> Result<(), CommError> {
    use crate::CommExt;
    let (rank, world) = (h.rank(), h.world_size());
    // A number drawn once per process: pids repeat across hosts and containers.
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let nonce = *NONCE.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    });
    let mut who = vec![0i32; 3 * world];
    h.all_gather(
        &[nonce as i32, (nonce >> 32) as i32, ordinal as i32],
        &mut who,
    )?;
    let one_process = who.chunks(3).all(|w| w[..2] == who[..2]);
    let mut ordinals: Vec<usize> = who.chunks(3).map(|w| w[2] as usize).collect();
    let distinct = {
        let mut o = ordinals.clone();
        o.sort_unstable();
        o.dedup();
        o.len() == world
    };
    if !one_process || !distinct {
        return Ok(());
    }
    // Everyone makes its side; any failure anywhere keeps NCCL everywhere.
    let agree = |ok: bool| -> Result<bool, CommError> {
        let mut bad = [i32::from(!ok)];
        h.all_reduce(&mut bad, ReduceOp::Max)?;
        Ok(bad[0] == 0)
    };
    let mine = P2pAllReduce::new(ordinal, rank, world, crate::default_timeout());
    if !agree(mine.is_ok())? {
        return Ok(());
    }
    let Ok(mut mine) = mine else { return Ok(()) };
    let a = mine.address();
    let mut all = vec![0i32; 2 * world];
    h.all_gather(&[a as i32, (a >> 32) as i32], &mut all)?;
    let joint = |lo: i32, hi: i32| (lo as u32 as u64) | ((hi as u32 as u64) << 32);
    let peers: Vec<(usize, u64)> = all
        .chunks(2)
        .zip(ordinals.drain(..))
        .map(|(w, o)| (o, joint(w[0], w[1])))
        .collect();
    let connected = mine.connect(&peers);
    if agree(connected.is_ok())? {
        dev.set_p2p(mine);
    }
    Ok(())
}

fn wire(kind: ElemKind) -> Wire {
    match kind {
        ElemKind::F32 => Wire::F32,
        ElemKind::BF16 => Wire::BF16,
        ElemKind::F16 => Wire::F16,
        ElemKind::I32 => Wire::I32,
        ElemKind::U8 => Wire::U8,
    }
}

fn reduce(op: ReduceOp) -> Reduce {
    match op {
        ReduceOp::Sum => Reduce::Sum,
        ReduceOp::Avg => Reduce::Avg,
        ReduceOp::Max => Reduce::Max,
    }
}

impl Communicator for NcclComm<'_> {
    fn rank(&self) -> usize {
        self.host().rank()
    }

    fn world_size(&self) -> usize {
        self.host().world_size()
    }

    fn all_reduce_bytes(
        &self,
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        args::all_reduce(buf.len(), kind).map_err(|m| self.invalid(m))?;
        self.dev
            .all_reduce_host(buf, wire(kind), reduce(op), &self.wait())
            .map_err(|f| self.fail("all_reduce", f))
    }

    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        args::all_gather(send.len(), recv.len(), self.world_size()).map_err(|m| self.invalid(m))?;
        if self.small_via_host && recv.len() <= HOST_BYTES_MAX {
            return self.host().all_gather_bytes(send, recv);
        }
        self.dev
            .all_gather_host(send, recv, &self.wait())
            .map_err(|f| self.fail("all_gather", f))
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        args::rank("root", root, self.world_size()).map_err(|m| self.invalid(m))?;
        if self.small_via_host && buf.len() <= HOST_BYTES_MAX {
            return self.host().broadcast_bytes(buf, root);
        }
        self.dev
            .broadcast_host(buf, root, &self.wait())
            .map_err(|f| self.fail("broadcast", f))
    }

    fn reduce_scatter_bytes(
        &self,
        send: &[u8],
        recv: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        args::reduce_scatter(send.len(), recv.len(), kind, self.world_size())
            .map_err(|m| self.invalid(m))?;
        self.dev
            .reduce_scatter_host(send, recv, wire(kind), reduce(op), &self.wait())
            .map_err(|f| self.fail("reduce_scatter", f))
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.dev
            .barrier(&self.wait())
            .map_err(|f| self.fail("barrier", f))
    }

    fn send_bytes(&self, buf: &[u8], dst: usize) -> Result<(), CommError> {
        self.host().send_bytes(buf, dst)
    }

    fn recv_bytes(&self, buf: &mut [u8], src: usize) -> Result<(), CommError> {
        self.host().recv_bytes(buf, src)
    }

    fn sub_group(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>, CommError> {
        let me = ranks.iter().position(|&r| r == self.rank());
        let host = self.host().sub_group(ranks)?;
        debug_assert!(me.is_some(), "the host refuses a rank outside the group");
        let sub = NcclComm::join(Host::Owned(host), self.ordinal(), self.timeout)?;
        Ok(Box::new(sub))
    }

    fn abort(&self, reason: &str) {
        self.host().abort(reason);
        self.dev.abort();
    }

    fn aborted(&self) -> Option<String> {
        self.host().aborted()
    }

    fn all_reduce_tensor(&self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        if !matches!(t.storage(), Storage::Cuda(_)) {
            return all_reduce_tensor_via_host(self, t, op);
        }
        self.dev
            .all_reduce_storage(t.storage_mut(), reduce(op))
            .map_err(|e| self.device_error(e))
    }

    fn all_gather_tensor(&self, t: &Tensor) -> Result<Tensor, CommError> {
        if !matches!(t.storage(), Storage::Cuda(_)) {
            return all_gather_tensor_via_host(self, t);
        }
        let gathered = self
            .dev
            .all_gather_storage(t.storage())
            .map_err(|e| self.device_error(e))?;
        // Waited for with the group's deadline, as the byte collectives are: its caller reads it
        // at once, and a peer that failed before its part must end this wait, not hang it.
        self.dev
            .drain(&self.wait())
            .map_err(|f| self.fail("all_gather", f))?;
        Tensor::new(gathered_shape(self.world_size(), t), gathered)
            .map_err(|e| self.device_error(e))
    }

    fn all_reduce_add_rms_norm(
        &self,
        part: &Tensor,
        x: &mut Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<Option<Tensor>, CommError> {
        self.dev
            .all_reduce_add_rms_norm(part, x, w, eps)
            .map_err(|e| self.device_error(e))
    }

    fn row_parallel_matmul(&self, x: &Tensor, w: &Tensor) -> Result<Option<Tensor>, CommError> {
        self.dev
            .row_parallel_matmul(x, w)
            .map_err(|e| self.device_error(e))
    }
}

impl Cancel for NcclComm<'_> {
    fn cancelled(&self) -> Option<String> {
        self.host().aborted()
    }
}

impl Drop for NcclComm<'_> {
    /// Tears the communicator down once every rank is done with it: a peer may still be reading
    /// this rank's NCCL buffers (NVLink reads), so this rank first finishes its own queued work,
    /// then meets the others at a barrier of the host communicator (a failed peer makes that an
    /// error within the deadline), and only then frees its side. Freeing can wait for the peers'
    /// GPUs to go idle, so the ranks meet once more after it: a rank that went on at once to a
    /// collective of another communicator (its kernel waiting on the GPU for a peer still
    /// freeing) hung both (two H200: the sub-group test of `tests/nccl.rs`).
    fn drop(&mut self) {
        // A rank unwinding from a panic does not wait for the others: it frees its side now and
        // they fail at their deadline, as they would if it had died.
        let done = !std::thread::panicking()
            && self.dev.drain(&self.wait()).is_ok()
            && self.host().barrier().is_ok();
        if done {
            self.dev.release();
            let _ = self.host().barrier();
        } else {
            self.dev.abort();
            self.dev.leak_p2p();
        }
    }
}

// A `NcclComm` over a borrowed host communicator is still `Send + Sync`: the host is.
const _: fn() = || {
    fn check<T: Send + Sync>() {}
    check::<NcclComm<'static>>();
};

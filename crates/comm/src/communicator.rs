//! The `Communicator` trait: the collectives every backend provides, on raw bytes (object safe), and
//! typed wrappers over them (`CommExt`), blocking and asynchronous.

use std::marker::PhantomData;

use crate::element::{as_bytes, as_bytes_mut};
use crate::work::{run_op, AsyncOp, Work};
use crate::{CommError, ElemKind, Element};
use tessera_tensor::{Storage, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Avg,
    Max,
}

/// One rank's handle on a group. Every rank of the group must issue the same collectives in the
/// same order with the same sizes; backends check this and fail with [`CommError::Mismatch`].
/// Every wait has a deadline ([`crate::default_timeout`]). One thread at a time issues operations
/// on a communicator (as with NCCL); asynchronous operations run in issue order, before any
/// operation issued after them.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Reduces `buf` (elements of `kind`) across ranks; every rank gets the result.
    fn all_reduce_bytes(
        &self,
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError>;
    /// Concatenates every rank's `send` in rank order into `recv` (`world_size` times as long).
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError>;
    /// Copies `root`'s `buf` into every rank's `buf`.
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<(), CommError>;
    /// Reduces `send` (`world_size` equal chunks) across ranks; rank r receives chunk r.
    fn reduce_scatter_bytes(
        &self,
        send: &[u8],
        recv: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError>;
    fn barrier(&self) -> Result<(), CommError>;
    /// Sends `buf` to rank `dst` of this group. Eager: returns once the transport holds the bytes,
    /// without waiting for the matching [`Communicator::recv_bytes`].
    fn send_bytes(&self, buf: &[u8], dst: usize) -> Result<(), CommError>;
    /// Receives the next message rank `src` sent to this rank; it must be `buf.len()` bytes.
    fn recv_bytes(&self, buf: &mut [u8], src: usize) -> Result<(), CommError>;
    /// Starts `op` and returns at once; [`Work::wait`] gives the output buffer back. The default
    /// runs `op` before returning (a valid, if not overlapping, schedule); the backends override
    /// it with their comm stream ([`crate::CommStream`]).
    fn issue(&self, op: AsyncOp) -> Result<Work, CommError> {
        Ok(Work::ready(run_op(self, op)))
    }
    /// A communicator over `ranks` (ranks of this group; position i becomes rank i of the new
    /// group). Not a collective: every member calls it with the same list, in the same order as
    /// its other `sub_group` calls; a rank that is not in `ranks` gets an error.
    fn sub_group(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>, CommError>;
    /// Fails every pending and future operation of this group, on every rank, with `reason`.
    /// Called by a rank that gives up (its own error), so the others stop at once.
    fn abort(&self, reason: &str);
    /// Why this group can no longer complete a collective, if that is so: it was aborted (by any
    /// rank), or a rank has left it. Never blocks. A backend whose waits cannot see the host
    /// group (NCCL on a GPU) polls this while it waits, so that one rank's failure stops the
    /// others at once rather than at their deadline.
    fn aborted(&self) -> Option<String> {
        None
    }
    /// Reduces tensor `t` across ranks in place, in its own dtype (as vLLM all-reduces bf16
    /// activations); every rank gets the result. The default carries host tensors through
    /// [`Communicator::all_reduce_bytes`] and stages device tensors through host memory (correct,
    /// not fast); a device backend (`NcclComm`) reduces device memory where it lies,
    /// queued on the device's stream without waiting.
    fn all_reduce_tensor(&self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        all_reduce_tensor_via_host(self, t, op)
    }
    /// Every rank's `t` (the same shape and dtype on every rank) stacked in rank order,
    /// `[world_size, ..t's shape]`, on `t`'s device. The default carries it through host memory
    /// (correct, not fast, for device tensors); a device backend (`NcclComm`) gathers device
    /// memory where it lies (and waits for it within the group's deadline).
    fn all_gather_tensor(&self, t: &Tensor) -> Result<Tensor, CommError> {
        all_gather_tensor_via_host(self, t)
    }
    /// `x += ` the sum over the group of `part` (a row-parallel projection's output), then the
    /// RMSNorm of every row of the new `x` with scale `w`: what a decoder layer does after its
    /// o and down projections, in one step where the backend fuses it (`NcclComm` over NVLink,
    /// when set up). `Ok(None)`, with `x` untouched, where it does not: the caller then calls
    /// [`Communicator::all_reduce_tensor`] and normalises itself (the default).
    fn all_reduce_add_rms_norm(
        &self,
        part: &Tensor,
        x: &mut Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<Option<Tensor>, CommError> {
        let _ = (part, x, w, eps);
        Ok(None)
    }
    /// This rank's part `x W^T` of a row-parallel projection (no bias) whose sum over the group
    /// goes next through [`Communicator::all_reduce_add_rms_norm`]: where the backend can, the
    /// projection hands its outputs to the peers as it makes them (`NcclComm` over NVLink, one
    /// row at decode), and then that call must follow, on the returned part. `Ok(None)` where
    /// it does not (the default): the caller multiplies itself.
    fn row_parallel_matmul(&self, x: &Tensor, w: &Tensor) -> Result<Option<Tensor>, CommError> {
        let _ = (x, w);
        Ok(None)
    }
}

/// [`Communicator::all_reduce_tensor`] through host memory.
pub fn all_reduce_tensor_via_host<C: Communicator + ?Sized>(
    comm: &C,
    t: &mut Tensor,
    op: ReduceOp,
) -> Result<(), CommError> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    match t.storage_mut() {
        Storage::F32(v) => comm.all_reduce(v, op),
        Storage::BF16(v) => comm.all_reduce(v, op),
        Storage::F16(v) => comm.all_reduce(v, op),
        #[allow(unreachable_patterns)]
        other => {
            let mut host = vec![0.0f32; other.len()];
            other.read_f32(0, &mut host);
            comm.all_reduce(&mut host, op)?;
            let dt = other.dtype();
            let rounded: Vec<f32> = host.iter().map(|&x| dt.round(x)).collect();
            other.write_f32(0, &rounded);
            Ok(())
        }
    }
}

/// [`Communicator::all_gather_tensor`] through host memory.
pub fn all_gather_tensor_via_host<C: Communicator + ?Sized>(
    comm: &C,
    t: &Tensor,
) -> Result<Tensor, CommError> {
    fn gathered<T: Element + Default + Clone, C: Communicator + ?Sized>(
        comm: &C,
        v: &[T],
    ) -> Result<Vec<T>, CommError> {
        let mut all = vec![T::default(); v.len() * comm.world_size()];
        comm.all_gather(v, &mut all)?;
        Ok(all)
    }
    let device_err = |e: tessera_tensor::TensorError| CommError::Device {
        rank: comm.rank(),
        msg: e.to_string(),
    };
    let storage = match t.storage() {
        Storage::F32(v) => Storage::F32(gathered(comm, v)?),
        Storage::BF16(v) => Storage::BF16(gathered(comm, v)?),
        Storage::F16(v) => Storage::F16(gathered(comm, v)?),
        #[allow(unreachable_patterns)]
        other => {
            // Device memory: through f32 on the host (exact: the values are the dtype's).
            let mut host = vec![0.0f32; other.len()];
            other.read_f32(0, &mut host);
            let all = gathered(comm, &host)?;
            let mut s =
                Storage::zeros_on(other.dtype(), all.len(), other.device()).map_err(device_err)?;
            s.write_f32(0, &all);
            s
        }
    };
    Tensor::new(gathered_shape(comm.world_size(), t), storage).map_err(device_err)
}

/// The shape of an all-gather of `t` over `world` ranks: `[world, ..t.shape()]`.
pub fn gathered_shape(world: usize, t: &Tensor) -> Vec<usize> {
    std::iter::once(world)
        .chain(t.shape().iter().copied())
        .collect()
}

/// An asynchronous typed collective in flight; [`Pending::wait`] returns its output.
#[must_use = "a collective in flight must be waited on to see its result or error"]
pub struct Pending<T: Element> {
    work: Work,
    rank: usize,
    _t: PhantomData<T>,
}

impl<T: Element> Pending<T> {
    /// Whether the operation has finished (waiting would not block).
    pub fn is_complete(&self) -> bool {
        self.work.is_complete()
    }

    /// Blocks until the operation is done (within the deadline) and returns its output buffer.
    pub fn wait(self) -> Result<Vec<T>, CommError> {
        let buf = self.work.wait()?;
        T::from_buf(buf).map_err(|b| CommError::Invalid {
            rank: self.rank,
            msg: format!("backend returned a {:?} buffer for {:?}", b.kind(), T::KIND),
        })
    }
}

/// Typed collectives over any [`Communicator`].
pub trait CommExt: Communicator {
    fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        if self.world_size() == 1 {
            return Ok(());
        }
        self.all_reduce_bytes(as_bytes_mut(buf), T::KIND, op)
    }
    fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<(), CommError> {
        self.all_gather_bytes(as_bytes(send), as_bytes_mut(recv))
    }
    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<(), CommError> {
        if self.world_size() == 1 {
            return Ok(());
        }
        self.broadcast_bytes(as_bytes_mut(buf), root)
    }
    fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.reduce_scatter_bytes(as_bytes(send), as_bytes_mut(recv), T::KIND, op)
    }
    fn send<T: Element>(&self, buf: &[T], dst: usize) -> Result<(), CommError> {
        self.send_bytes(as_bytes(buf), dst)
    }
    fn recv<T: Element>(&self, buf: &mut [T], src: usize) -> Result<(), CommError> {
        self.recv_bytes(as_bytes_mut(buf), src)
    }

    /// Starts an all-reduce of `buf`; `wait` gives back the reduced buffer.
    fn all_reduce_async<T: Element>(
        &self,
        buf: Vec<T>,
        op: ReduceOp,
    ) -> Result<Pending<T>, CommError> {
        self.pending(AsyncOp::AllReduce {
            buf: T::into_buf(buf),
            op,
        })
    }
    /// Starts an all-gather of `send` into `recv` (`world_size` times as long); `wait` gives `recv`.
    fn all_gather_async<T: Element>(
        &self,
        send: Vec<T>,
        recv: Vec<T>,
    ) -> Result<Pending<T>, CommError> {
        self.pending(AsyncOp::AllGather {
            send: T::into_buf(send),
            recv: T::into_buf(recv),
        })
    }
    /// Starts a reduce-scatter of `send` into `recv`; `wait` gives back `recv`.
    fn reduce_scatter_async<T: Element>(
        &self,
        send: Vec<T>,
        recv: Vec<T>,
        op: ReduceOp,
    ) -> Result<Pending<T>, CommError> {
        self.pending(AsyncOp::ReduceScatter {
            send: T::into_buf(send),
            recv: T::into_buf(recv),
            op,
        })
    }
    fn broadcast_async<T: Element>(
        &self,
        buf: Vec<T>,
        root: usize,
    ) -> Result<Pending<T>, CommError> {
        self.pending(AsyncOp::Broadcast {
            buf: T::into_buf(buf),
            root,
        })
    }
    /// Starts a send; `wait` gives the buffer back for reuse.
    fn send_async<T: Element>(&self, buf: Vec<T>, dst: usize) -> Result<Pending<T>, CommError> {
        self.pending(AsyncOp::Send {
            buf: T::into_buf(buf),
            dst,
        })
    }
    fn recv_async<T: Element>(&self, buf: Vec<T>, src: usize) -> Result<Pending<T>, CommError> {
        self.pending(AsyncOp::Recv {
            buf: T::into_buf(buf),
            src,
        })
    }
    fn barrier_async(&self) -> Result<Work, CommError> {
        self.issue(AsyncOp::Barrier)
    }

    #[doc(hidden)]
    fn pending<T: Element>(&self, op: AsyncOp) -> Result<Pending<T>, CommError> {
        Ok(Pending {
            work: self.issue(op)?,
            rank: self.rank(),
            _t: PhantomData,
        })
    }
}

impl<C: Communicator + ?Sized> CommExt for C {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalGroup;
    use tessera_tensor::DType;

    /// The default tensor all-gather stacks every rank's tensor in rank order, in its own dtype.
    #[test]
    fn tensor_all_gather_through_the_host() {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let comms = LocalGroup::new(3).into_comms();
            let value = |r: usize, i: usize| dt.round(0.37 * i as f32 - r as f32 * 1.1);
            let out: Vec<Tensor> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .map(|c| {
                        s.spawn(move || {
                            let v = (0..6).map(|i| value(c.rank(), i)).collect();
                            let t = Tensor::from_f32(vec![2, 3], v, dt).unwrap();
                            c.all_gather_tensor(&t).unwrap()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let want: Vec<f32> = (0..3)
                .flat_map(|r| (0..6).map(move |i| value(r, i)))
                .collect();
            for g in &out {
                assert_eq!((g.shape(), g.dtype()), (&[3, 2, 3][..], dt));
                assert_eq!(g.to_f32_vec(), want);
            }
        }
    }

    /// The default tensor all-reduce equals the typed host all-reduce of the same values, in the
    /// tensor's own dtype.
    #[test]
    fn tensor_all_reduce_through_the_host() {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let comms = LocalGroup::new(3).into_comms();
            let out: Vec<Vec<f32>> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .map(|c| {
                        s.spawn(move || {
                            let r = c.rank() as f32;
                            let v: Vec<f32> = (0..7).map(|i| 0.37 * i as f32 - r * 1.1).collect();
                            let mut t = Tensor::from_f32(vec![7], v, dt).unwrap();
                            c.all_reduce_tensor(&mut t, ReduceOp::Sum).unwrap();
                            assert_eq!(t.dtype(), dt);
                            t.to_f32_vec()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let want: Vec<f32> = (0..7)
                .map(|i| {
                    // Ranks combined in order, each step rounded to the dtype (as the backend does).
                    (0..3).fold(0.0f32, |acc, r| {
                        dt.round(acc + dt.round(0.37 * i as f32 - r as f32 * 1.1))
                    })
                })
                .collect();
            for o in &out {
                for (a, b) in o.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-2 * b.abs().max(1.0),
                        "{dt}: {o:?} vs {want:?}"
                    );
                }
            }
            assert!(out.windows(2).all(|w| w[0] == w[1]), "{dt}: ranks differ");
        }
    }
}

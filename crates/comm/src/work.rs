//! Asynchronous collectives: an [`AsyncOp`] owns its buffers while it runs; [`Work`] is the
//! handle to wait on.
//!
//! Why owned buffers: a transfer that runs behind the caller's back must not see its memory freed
//! or changed; owning it makes that a compile-time fact, with no `unsafe` contract for callers.
//!
//! How a stream-ordered NCCL backend fits: its `issue` enqueues `ncclAllReduce` (etc.) on the
//! communicator's CUDA stream and returns a [`WorkHandle`] holding a CUDA event recorded after it
//! plus the device buffers; `is_complete` is `cudaEventQuery`, `wait` makes the compute stream
//! wait on the event (or synchronizes the host, polling the event against the deadline and
//! calling `ncclCommAbort` when it passes). Issue order is stream order, exactly as with the CPU
//! backends' [`crate::CommStream`], so callers cannot tell the two apart.

use crate::{CommError, Communicator, OwnedBuf, ReduceOp};

/// A collective (or point-to-point transfer) to run asynchronously, with the buffers it owns.
#[derive(Debug)]
pub enum AsyncOp {
    AllReduce {
        buf: OwnedBuf,
        op: ReduceOp,
    },
    AllGather {
        send: OwnedBuf,
        recv: OwnedBuf,
    },
    ReduceScatter {
        send: OwnedBuf,
        recv: OwnedBuf,
        op: ReduceOp,
    },
    Broadcast {
        buf: OwnedBuf,
        root: usize,
    },
    Send {
        buf: OwnedBuf,
        dst: usize,
    },
    Recv {
        buf: OwnedBuf,
        src: usize,
    },
    Barrier,
}

/// A backend's handle on an operation in flight.
pub trait WorkHandle: Send {
    fn is_complete(&self) -> bool;
    /// Blocks until the operation finishes (every backend bounds this with its deadline) and
    /// returns the output buffer.
    fn wait(self: Box<Self>) -> Result<OwnedBuf, CommError>;
}

/// An operation in flight. Dropping it without waiting lets the operation finish unobserved.
#[must_use = "a collective in flight must be waited on to see its result or error"]
pub struct Work(WorkState);

enum WorkState {
    Ready(Result<OwnedBuf, CommError>),
    Handle(Box<dyn WorkHandle>),
}

impl Work {
    /// An operation that has already finished.
    pub fn ready(result: Result<OwnedBuf, CommError>) -> Self {
        Work(WorkState::Ready(result))
    }

    pub fn from_handle(handle: Box<dyn WorkHandle>) -> Self {
        Work(WorkState::Handle(handle))
    }

    pub fn is_complete(&self) -> bool {
        match &self.0 {
            WorkState::Ready(_) => true,
            WorkState::Handle(h) => h.is_complete(),
        }
    }

    /// The output buffer: the reduced / gathered / received data, or the sent buffer back.
    pub fn wait(self) -> Result<OwnedBuf, CommError> {
        match self.0 {
            WorkState::Ready(r) => r,
            WorkState::Handle(h) => h.wait(),
        }
    }
}

/// Runs `op` to completion with `c`'s blocking collectives.
pub(crate) fn run_op<C: Communicator + ?Sized>(c: &C, op: AsyncOp) -> Result<OwnedBuf, CommError> {
    match op {
        AsyncOp::AllReduce { mut buf, op } => {
            if c.world_size() > 1 {
                let kind = buf.kind();
                c.all_reduce_bytes(buf.as_bytes_mut(), kind, op)?;
            }
            Ok(buf)
        }
        AsyncOp::AllGather { send, mut recv } => {
            c.all_gather_bytes(send.as_bytes(), recv.as_bytes_mut())?;
            Ok(recv)
        }
        AsyncOp::ReduceScatter { send, mut recv, op } => {
            let kind = send.kind();
            if recv.kind() != kind {
                return Err(CommError::Invalid {
                    rank: c.rank(),
                    msg: format!("reduce_scatter from {kind:?} into {:?}", recv.kind()),
                });
            }
            c.reduce_scatter_bytes(send.as_bytes(), recv.as_bytes_mut(), kind, op)?;
            Ok(recv)
        }
        AsyncOp::Broadcast { mut buf, root } => {
            if c.world_size() > 1 {
                c.broadcast_bytes(buf.as_bytes_mut(), root)?;
            }
            Ok(buf)
        }
        AsyncOp::Send { buf, dst } => {
            c.send_bytes(buf.as_bytes(), dst)?;
            Ok(buf)
        }
        AsyncOp::Recv { mut buf, src } => {
            c.recv_bytes(buf.as_bytes_mut(), src)?;
            Ok(buf)
        }
        AsyncOp::Barrier => {
            c.barrier()?;
            Ok(OwnedBuf::empty())
        }
    }
}

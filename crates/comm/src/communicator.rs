//! The `Communicator` trait: the collectives every backend provides, on raw bytes (object safe), and
//! typed wrappers over them (`CommExt`).

use crate::element::{as_bytes, as_bytes_mut};
use crate::{CommError, ElemKind, Element};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Avg,
    Max,
}

/// One rank's handle on a group. Every rank of the group must issue the same collectives in the
/// same order with the same sizes; backends check this and fail with [`CommError::Mismatch`].
/// Every wait has a deadline ([`crate::default_timeout`]).
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
}

impl<C: Communicator + ?Sized> CommExt for C {}

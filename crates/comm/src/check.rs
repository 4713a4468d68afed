//! What each collective is, as the ranks compare it: op, element type, reduction, size, root.
//!
//! The in-process backend compares every rank's description at every collective. The TCP backend
//! stamps each frame with it, so a neighbour that issued something else is caught on the first
//! frame; in check mode (`TESSERA_COMM_CHECK=1`) every rank also exchanges its description with
//! every other member before each collective, so all ranks report the same, first mismatch, and a
//! rank that never issues the collective is named exactly.

use std::fmt;

use crate::{CommError, ElemKind, ReduceOp};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    Broadcast = 4,
    Barrier = 5,
    Send = 6,
}

impl OpCode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpCode::AllReduce => "all_reduce",
            OpCode::AllGather => "all_gather",
            OpCode::ReduceScatter => "reduce_scatter",
            OpCode::Broadcast => "broadcast",
            OpCode::Barrier => "barrier",
            OpCode::Send => "send",
        }
    }

    pub(crate) fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => OpCode::AllReduce,
            2 => OpCode::AllGather,
            3 => OpCode::ReduceScatter,
            4 => OpCode::Broadcast,
            5 => OpCode::Barrier,
            6 => OpCode::Send,
            _ => return None,
        })
    }
}

/// One rank's description of the collective it issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpDesc {
    pub code: OpCode,
    pub kind: Option<ElemKind>,
    pub op: Option<ReduceOp>,
    /// Bytes this rank contributes (send buffer; the buffer for all_reduce and broadcast).
    pub bytes: u64,
    pub root: Option<u32>,
}

impl OpDesc {
    pub(crate) fn new(code: OpCode, bytes: usize) -> Self {
        OpDesc {
            code,
            kind: None,
            op: None,
            bytes: bytes as u64,
            root: None,
        }
    }

    pub(crate) fn reduce(mut self, kind: ElemKind, op: ReduceOp) -> Self {
        self.kind = Some(kind);
        self.op = Some(op);
        self
    }

    pub(crate) fn root(mut self, root: usize) -> Self {
        self.root = Some(root as u32);
        self
    }

    /// `(code, kind, op, root)` as they travel in a frame header.
    pub(crate) fn encode(&self) -> (u8, u8, u8, u32) {
        let kind = match self.kind {
            None => 0,
            Some(ElemKind::F32) => 1,
            Some(ElemKind::BF16) => 2,
            Some(ElemKind::F16) => 3,
            Some(ElemKind::I32) => 4,
            Some(ElemKind::U8) => 5,
        };
        let op = match self.op {
            None => 0,
            Some(ReduceOp::Sum) => 1,
            Some(ReduceOp::Avg) => 2,
            Some(ReduceOp::Max) => 3,
        };
        (self.code as u8, kind, op, self.root.unwrap_or(u32::MAX))
    }

    pub(crate) fn decode(code: u8, kind: u8, op: u8, root: u32, bytes: u64) -> Option<Self> {
        Some(OpDesc {
            code: OpCode::from_u8(code)?,
            kind: match kind {
                0 => None,
                1 => Some(ElemKind::F32),
                2 => Some(ElemKind::BF16),
                3 => Some(ElemKind::F16),
                4 => Some(ElemKind::I32),
                5 => Some(ElemKind::U8),
                _ => return None,
            },
            op: match op {
                0 => None,
                1 => Some(ReduceOp::Sum),
                2 => Some(ReduceOp::Avg),
                3 => Some(ReduceOp::Max),
                _ => return None,
            },
            bytes,
            root: (root != u32::MAX).then_some(root),
        })
    }
}

impl fmt::Display for OpDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {} bytes", self.code.name(), self.bytes)?;
        if let Some(k) = self.kind {
            write!(f, " ({k:?}")?;
            if let Some(op) = self.op {
                write!(f, ", {op:?}")?;
            }
            write!(f, ")")?;
        }
        if let Some(r) = self.root {
            write!(f, " from root {r}")?;
        }
        Ok(())
    }
}

/// The first rank whose description differs from rank 0's, as one message every rank agrees on.
/// `descs[i]` is `(rank name, description)` in group order.
pub(crate) fn first_mismatch(seq: u64, descs: &[(usize, OpDesc)]) -> Option<String> {
    let (r0, d0) = descs.first()?;
    descs
        .iter()
        .find(|(_, d)| d != d0)
        .map(|(r, d)| format!("collective #{seq}: rank {r0} issued {d0} but rank {r} issued {d}"))
}

/// Whether check mode is on: `TESSERA_COMM_CHECK` = 1/true/yes (0/false/no/empty: off).
pub fn check_mode_from_env() -> Result<bool, CommError> {
    match std::env::var("TESSERA_COMM_CHECK") {
        Err(_) => Ok(false),
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" | "0" | "false" | "no" | "off" => Ok(false),
            "1" | "true" | "yes" | "on" => Ok(true),
            _ => Err(CommError::Setup(format!(
                "TESSERA_COMM_CHECK must be 0 or 1, got {v:?}"
            ))),
        },
    }
}

//! NCCL collectives on device buffers, for tensor-parallel ranks that are threads of one process
//! (one GPU each). A job attaches one NCCL communicator to each of its GPUs
//! ([`init_group`]); a collective on a buffer then runs on that buffer's GPU's communicator,
//! stream-ordered on the device's stream, without a host round trip.
//!
//! This lives beside the CUDA storage because it moves device memory; the host-memory
//! `Communicator` of `tessera-comm` keeps the control plane (broadcasts of tokens, barriers,
//! deadlines). Once `tessera-comm`'s trait carries device buffers, this becomes its NCCL backend.

use std::sync::Arc;

use cudarc::nccl::safe::{Comm, ReduceOp};

use super::{dev_err, CudaBuf, CudaData, GpuDevice};
use crate::TensorError;

/// One GPU's communicator in a group.
pub(crate) struct NcclSlot {
    pub(crate) comm: Comm,
    /// The group's devices, in rank order.
    pub(crate) members: Vec<usize>,
}

// SAFETY: a communicator is used by one rank thread at a time (the slot sits behind a Mutex), which
// NCCL allows from any thread.
unsafe impl Send for NcclSlot {}

/// Creates one NCCL communicator per device of `ordinals` (rank i on `ordinals[i]`) and attaches
/// each to its device, replacing any earlier group. A group of one device needs none.
pub fn init_group(ordinals: &[usize]) -> Result<(), TensorError> {
    if ordinals.len() < 2 {
        return Ok(());
    }
    let devs: Vec<Arc<GpuDevice>> = ordinals
        .iter()
        .map(|&o| GpuDevice::get(o))
        .collect::<Result<_, _>>()?;
    if devs.iter().all(|d| {
        d.nccl
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|s| s.members == ordinals)
    }) {
        return Ok(());
    }
    // SAFETY: only probes whether libnccl can be loaded.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(dev_err(
            ordinals[0],
            "the NCCL library (libnccl.so) was not found on this machine",
        ));
    }
    let streams = devs.iter().map(|d| d.stream.clone()).collect();
    let comms = Comm::from_devices(streams)
        .map_err(|e| dev_err(ordinals[0], format!("NCCL init: {e:?}")))?;
    for (d, comm) in devs.iter().zip(comms) {
        *d.nccl.lock().unwrap_or_else(|e| e.into_inner()) = Some(NcclSlot {
            comm,
            members: ordinals.to_vec(),
        });
    }
    Ok(())
}

/// Sums `buf` in place across the group attached to its GPU. `None` when no group is attached.
pub fn all_reduce_sum(buf: &mut CudaBuf) -> Option<Result<(), TensorError>> {
    let dev = buf.dev.clone();
    let slot = dev.nccl.lock().unwrap_or_else(|e| e.into_inner());
    let comm = &slot.as_ref()?.comm;
    let r = match &mut buf.data {
        CudaData::F32(s) => comm.all_reduce_in_place(s, &ReduceOp::Sum),
        CudaData::BF16(s) => comm.all_reduce_in_place(s, &ReduceOp::Sum),
    };
    Some(
        r.map(|_| ())
            .map_err(|e| dev_err(dev.ordinal, format!("NCCL all_reduce: {e:?}"))),
    )
}

/// A fresh NCCL unique id (made by rank 0 of a multi-process group and sent to the others through
/// the host communicator).
pub fn unique_id() -> Result<[u8; 128], TensorError> {
    // SAFETY: only probes whether libnccl can be loaded.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(dev_err(
            0,
            "the NCCL library (libnccl.so) was not found on this machine",
        ));
    }
    let id =
        cudarc::nccl::safe::Id::new().map_err(|e| dev_err(0, format!("NCCL unique id: {e:?}")))?;
    Ok(id.internal().map(|c| c as u8))
}

/// Joins this process's GPU `ordinal` to a group of `world` processes as `rank`, with the unique id
/// rank 0 made (one process per GPU, as `tessera launch` or torchrun start them).
pub fn init_rank(
    ordinal: usize,
    rank: usize,
    world: usize,
    id: [u8; 128],
) -> Result<(), TensorError> {
    let dev = GpuDevice::get(ordinal)?;
    let members: Vec<usize> = (0..world).collect();
    let id = cudarc::nccl::safe::Id::uninit(id.map(|b| b as ::core::ffi::c_char));
    let comm = Comm::from_rank(dev.stream.clone(), rank, world, id).map_err(|e| {
        dev_err(
            ordinal,
            format!("NCCL init of rank {rank} of {world}: {e:?}"),
        )
    })?;
    *dev.nccl.lock().unwrap_or_else(|e| e.into_inner()) = Some(NcclSlot { comm, members });
    Ok(())
}

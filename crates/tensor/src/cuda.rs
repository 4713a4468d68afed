//! CUDA backend seam. The CUDA work fills this module with kernels (cuBLAS GEMMs, NVRTC kernels) and
//! device storage; today it only checks that the driver and a device are present, so that
//! `--device cuda` fails with a clear message instead of a panic.

use crate::TensorError;

pub fn ensure_device(ordinal: usize) -> Result<(), TensorError> {
    let name = format!("cuda:{ordinal}");
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(TensorError::Device(
            name,
            "the CUDA driver library (libcuda.so) was not found on this machine".into(),
        ));
    }
    let n = cudarc::driver::CudaContext::device_count()
        .map_err(|e| TensorError::Device(name.clone(), format!("cannot count devices: {e}")))?;
    if ordinal >= n as usize {
        return Err(TensorError::Device(
            name,
            format!("this machine has {n} CUDA device(s)"),
        ));
    }
    Err(TensorError::Device(
        name,
        "CUDA kernels are not built yet in this version of tessera; use --device cpu".into(),
    ))
}

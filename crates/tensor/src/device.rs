//! Where a tensor lives.

use std::fmt;
use std::str::FromStr;

use crate::TensorError;

/// The host's memory in bytes when `bytes` would take more than 90% of it (`MemTotal` of
/// /proc/meminfo; `None` where it fits or the host does not say): what the CPU backend's weights,
/// caches and training state share, for refusing in one line a size that could never fit
/// instead of aborting in an allocation.
pub fn exceeds_host_memory(bytes: f64) -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let total = kb * 1024.0;
    (bytes > 0.9 * total).then_some(total)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Checks that this device can be used by this build on this machine.
    pub fn ensure_available(self) -> Result<(), TensorError> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => crate::cuda::ensure_device(i),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(TensorError::Device(
                self.to_string(),
                "this tessera was built without CUDA support (rebuild with `--features cuda`)"
                    .into(),
            )),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = TensorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    TensorError::Device(s.into(), "expected cpu, cuda or cuda:N".into())
                }),
        }
    }
}

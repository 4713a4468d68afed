//! Where a tensor lives.

use std::fmt;
use std::str::FromStr;

use crate::TensorError;

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

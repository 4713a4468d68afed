//! Where a tensor lives.

use std::fmt;
use std::str::FromStr;

use crate::TensorError;

/// The host's memory in bytes when `bytes` would take more than 90% of it (`None` where it fits or
/// the host does not say): what the CPU backend's weights, caches and training state share, for
/// refusing in one line a size that could never fit instead of aborting in an allocation (or
/// being killed by a container's limit). The memory is `MemTotal` of /proc/meminfo, or the
/// container's limit where one is set and lower (cgroup v2 `memory.max`, v1
/// `memory.limit_in_bytes`).
pub fn exceeds_host_memory(bytes: f64) -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let limits = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .map(|p| std::fs::read_to_string(p).ok());
    let total = memory_limit(&info, limits.iter().flatten().map(String::as_str))?;
    (bytes > 0.9 * total).then_some(total)
}

/// `MemTotal` of a /proc/meminfo text in bytes, lowered to any cgroup limit given (`max`, or v1's
/// "no limit" of ~2^63, leave it).
fn memory_limit<'a>(meminfo: &str, cgroup: impl IntoIterator<Item = &'a str>) -> Option<f64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(
        cgroup
            .into_iter()
            .filter_map(|c| c.trim().parse::<u64>().ok())
            .fold(kb * 1024.0, |total, limit| total.min(limit as f64)),
    )
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

#[cfg(test)]
mod tests {
    use super::memory_limit;

    /// The host's memory is MemTotal, or a container's cgroup limit where lower; "max" and v1's
    /// "no limit" leave MemTotal.
    #[test]
    fn memory_limit_takes_a_containers_limit() {
        let info = "MemTotal:       24683652 kB\nMemFree:         1000 kB\n";
        let total = 24683652.0 * 1024.0;
        assert_eq!(memory_limit(info, []), Some(total));
        assert_eq!(memory_limit(info, ["max\n"]), Some(total));
        assert_eq!(memory_limit(info, ["9223372036854771712\n"]), Some(total));
        assert_eq!(memory_limit(info, ["8589934592\n"]), Some(8589934592.0));
        assert_eq!(
            memory_limit(info, ["max\n", "4294967296"]),
            Some(4294967296.0)
        );
        assert_eq!(memory_limit("MemFree: 1 kB\n", ["4096"]), None);
    }
}

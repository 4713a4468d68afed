//! Where a tensor lives.

use std::fmt;
use std::str::FromStr;

use crate::TensorError;

/// The host's memory in bytes when `bytes` would take more than 90% of it (`None` where it fits or
/// the host does not say): what the CPU backend's weights, caches and training state share, for
/// refusing in one line a size that could never fit instead of aborting in an allocation (or
/// being killed by a container's limit). The memory is `MemTotal` of /proc/meminfo, or the lowest
/// cgroup limit over this process's cgroup and its ancestors where one is set and lower (v2
/// `memory.max`, v1 `memory.limit_in_bytes`, at their usual mount points).
pub fn exceeds_host_memory(bytes: f64) -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let limits: Vec<String> = cgroup_limit_files(&own)
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    let total = memory_limit(&info, limits.iter().map(String::as_str))?;
    (bytes > 0.9 * total).then_some(total)
}

/// The host memory available now, in bytes: `MemAvailable` of /proc/meminfo, lowered to what is
/// left under each cgroup limit over this process's cgroup and its ancestors where one is set (the
/// limit less the cgroup's usage: v2 `memory.max` less `memory.current`, v1
/// `memory.limit_in_bytes` less `memory.usage_in_bytes`). `None` where the host does not say.
/// What a bound on memory taken now (a dataset read into memory) is measured against; a container
/// with a limit below the host's free memory is bounded by its limit.
pub fn available_host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let pairs: Vec<(String, String)> = cgroup_limit_files(&own)
        .iter()
        .filter_map(|limit| {
            let usage = match limit.file_name()?.to_str()? {
                "memory.max" => limit.with_file_name("memory.current"),
                _ => limit.with_file_name("memory.usage_in_bytes"),
            };
            let l = std::fs::read_to_string(limit).ok()?;
            let u = std::fs::read_to_string(usage).ok()?;
            Some((l, u))
        })
        .collect();
    memory_available(&info, pairs.iter().map(|(l, u)| (l.as_str(), u.as_str())))
}

/// The value of the /proc/meminfo line starting with `key` (`"MemTotal:"`), in its unit (kB).
fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `MemAvailable` of a /proc/meminfo text in bytes, lowered to each cgroup's room (its limit less
/// its usage, at least 0) where both read as numbers: v2's `max` is none, and v1's ~2^63 "no
/// limit" leaves a room past any host's memory.
fn memory_available<'a>(
    meminfo: &str,
    cgroups: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<u64> {
    let kib = meminfo_kib(meminfo, "MemAvailable:")?;
    Some(
        cgroups
            .into_iter()
            .filter_map(|(limit, usage)| {
                let limit: u64 = limit.trim().parse().ok()?;
                let usage: u64 = usage.trim().parse().ok()?;
                Some(limit.saturating_sub(usage))
            })
            .fold(kib.saturating_mul(1024), u64::min),
    )
}

/// The memory-limit files of the cgroups of a /proc/self/cgroup text and of all their ancestors,
/// under the usual mount points: v2 (`0::PATH`) at /sys/fs/cgroup (or /sys/fs/cgroup/unified of
/// a hybrid layout), v1's memory controller at /sys/fs/cgroup/memory; the roots always (a
/// container's own cgroup is its root). Files that are not there are skipped by the reader.
fn cgroup_limit_files(own: &str) -> Vec<std::path::PathBuf> {
    use std::path::Path;
    let mut out: Vec<std::path::PathBuf> = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .map(|&p| p.into())
    .collect();
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (roots, file): (&[&str], &str) = if id == "0" && controllers.is_empty() {
            (&["/sys/fs/cgroup", "/sys/fs/cgroup/unified"], "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (&["/sys/fs/cgroup/memory"], "memory.limit_in_bytes")
        } else {
            continue;
        };
        for root in roots {
            let mut at = Some(Path::new(path.trim()));
            while let Some(p) = at {
                let rel = p.strip_prefix("/").unwrap_or(p);
                let file = Path::new(root).join(rel).join(file);
                if !out.contains(&file) {
                    out.push(file);
                }
                at = p.parent();
            }
        }
    }
    out
}

/// `MemTotal` of a /proc/meminfo text in bytes, lowered to any cgroup limit given (`max`, or v1's
/// "no limit" of ~2^63, leave it).
fn memory_limit<'a>(meminfo: &str, cgroup: impl IntoIterator<Item = &'a str>) -> Option<f64> {
    let kb = meminfo_kib(meminfo, "MemTotal:")? as f64;
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
    /// The device's free memory in bytes where it has its own (a GPU's, as its driver says now);
    /// `None` for the CPU, or where it cannot be read.
    pub fn free_memory(self) -> Option<u64> {
        match self {
            Device::Cpu => None,
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => crate::cuda::memory_info(i)
                .ok()
                .map(|(free, _)| free as u64),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => None,
        }
    }

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
    use super::{memory_available, memory_limit};

    /// The memory available now is MemAvailable, or what a cgroup's limit leaves over its usage
    /// where less; "max", v1's "no limit" and unreadable values leave MemAvailable, and a cgroup
    /// past its limit leaves none.
    #[test]
    fn memory_available_takes_what_a_containers_limit_leaves() {
        let info = "MemTotal:       24683652 kB\nMemAvailable:   20000000 kB\n";
        let avail = 20_000_000u64 * 1024;
        assert_eq!(memory_available(info, []), Some(avail));
        assert_eq!(memory_available(info, [("max\n", "123\n")]), Some(avail));
        assert_eq!(
            memory_available(info, [("9223372036854771712\n", "4096\n")]),
            Some(avail)
        );
        assert_eq!(
            memory_available(info, [("8589934592\n", "1073741824\n")]),
            Some(8589934592 - 1073741824)
        );
        // The lowest room over the cgroup and its ancestors.
        assert_eq!(
            memory_available(
                info,
                [("8589934592\n", "0\n"), ("4294967296\n", "4294967000\n")]
            ),
            Some(296)
        );
        assert_eq!(memory_available(info, [("1000\n", "5000\n")]), Some(0));
        assert_eq!(memory_available(info, [("1000\n", "many\n")]), Some(avail));
        assert_eq!(memory_available("MemTotal: 5 kB\n", []), None);
    }

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

    /// A process's own cgroup and its ancestors, v1 and v2, under the usual mount points.
    #[test]
    fn cgroup_limit_files_walk_up_to_the_root() {
        let names = |own: &str| -> Vec<String> {
            super::cgroup_limit_files(own)
                .iter()
                .map(|p| p.display().to_string())
                .collect()
        };
        let roots = [
            "/sys/fs/cgroup/memory.max",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        ];
        assert_eq!(names(""), roots);
        assert_eq!(
            names("0::/\n"),
            [&roots[..], &["/sys/fs/cgroup/unified/memory.max"]].concat()
        );
        let v1 = names("4:memory:/job/42\n3:cpu,cpuacct:/job/42\n");
        assert_eq!(
            v1,
            [
                &roots[..],
                &[
                    "/sys/fs/cgroup/memory/job/42/memory.limit_in_bytes",
                    "/sys/fs/cgroup/memory/job/memory.limit_in_bytes",
                ]
            ]
            .concat()
        );
        let v2 = names("0::/user.slice/run.scope\n");
        assert!(v2.contains(&"/sys/fs/cgroup/user.slice/run.scope/memory.max".to_string()));
        assert!(v2.contains(&"/sys/fs/cgroup/user.slice/memory.max".to_string()));
        assert!(v2.contains(&"/sys/fs/cgroup/unified/user.slice/memory.max".to_string()));
    }
}

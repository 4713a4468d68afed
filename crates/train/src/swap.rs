//! ZeRO-Infinity's optimizer offload to NVMe: each rank's optimizer state (its fp32 master shard,
//! unless the weights are the master, and both Adam moments) lives in one file under `nvme_path`;
//! the step brings one unit's state into memory, updates it, writes it back and frees it, so a
//! rank holds one unit's optimizer state at a time. The file is removed when training ends.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::TrainError;

/// One unit's optimizer state: its fp32 master (absent when the weights are the master) and the
/// two Adam moments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnitState {
    pub master: Option<Vec<f32>>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

pub struct Swap {
    file: File,
    path: PathBuf,
    /// Per unit: the byte offset of its block and the elements of each of its arrays.
    blocks: Vec<(u64, usize)>,
    /// Arrays a unit keeps (2: the moments; 3: master and moments).
    arrays: usize,
}

impl Swap {
    /// A new swap file in `dir` for units of `lens` elements, `arrays` arrays each.
    pub fn create(
        dir: &Path,
        rank: usize,
        lens: &[usize],
        arrays: usize,
    ) -> Result<Self, TrainError> {
        let path = dir.join(format!(
            "tessera-optimizer-{}-rank{rank}.swap",
            std::process::id()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        let mut blocks = Vec::with_capacity(lens.len());
        let mut at = 0u64;
        for &n in lens {
            blocks.push((at, n));
            at += (arrays * n * 4) as u64;
        }
        file.set_len(at).map_err(|e| TrainError::io(&path, e))?;
        Ok(Swap {
            file,
            path,
            blocks,
            arrays,
        })
    }

    /// Bytes the file holds.
    pub fn bytes(&self) -> usize {
        self.blocks.iter().map(|b| self.arrays * b.1 * 4).sum()
    }

    /// Bytes of the `k` largest units' state: what a step holding `k` units at once holds at most.
    pub fn largest_units_bytes(&self, k: usize) -> usize {
        let mut sizes: Vec<usize> = self.blocks.iter().map(|b| self.arrays * b.1 * 4).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        sizes.iter().take(k).sum()
    }

    /// Writes unit `u`'s state (each array of the unit's length; a master exactly when the file
    /// holds masters).
    pub fn write(&self, u: usize, st: &UnitState) -> Result<(), TrainError> {
        let (at, n) = self.blocks[u];
        let parts: Vec<&[f32]> = st
            .master
            .as_deref()
            .into_iter()
            .chain([&st.exp_avg[..], &st.exp_avg_sq[..]])
            .collect();
        assert!(parts.len() == self.arrays && parts.iter().all(|p| p.len() == n));
        let mut bytes = Vec::with_capacity(self.arrays * n * 4);
        for p in parts {
            bytes.extend(p.iter().flat_map(|x| x.to_le_bytes()));
        }
        self.file
            .write_all_at(&bytes, at)
            .map_err(|e| TrainError::io(&self.path, e))
    }

    /// Reads unit `u`'s state back.
    pub fn read(&self, u: usize) -> Result<UnitState, TrainError> {
        let (at, n) = self.blocks[u];
        let mut bytes = vec![0u8; self.arrays * n * 4];
        self.file
            .read_exact_at(&mut bytes, at)
            .map_err(|e| TrainError::io(&self.path, e))?;
        let mut parts = bytes.chunks_exact(n * 4).map(|c| {
            c.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<f32>>()
        });
        let master = if self.arrays == 3 { parts.next() } else { None };
        Ok(UnitState {
            master,
            exp_avg: parts.next().unwrap_or_default(),
            exp_avg_sq: parts.next().unwrap_or_default(),
        })
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_round_trip_and_the_file_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let s = Swap::create(dir.path(), 3, &[4, 0, 2], 3).unwrap();
        assert_eq!(s.bytes(), (4 + 2) * 3 * 4);
        let a = UnitState {
            master: Some(vec![1.0f32, -2.0, 3.5, f32::MIN_POSITIVE]),
            exp_avg: vec![0.0; 4],
            exp_avg_sq: vec![7.0; 4],
        };
        s.write(0, &a).unwrap();
        let c = UnitState {
            master: Some(vec![9.0, 8.0]),
            exp_avg: vec![1.0, 1.0],
            exp_avg_sq: vec![-0.0, 5.0],
        };
        s.write(2, &c).unwrap();
        assert_eq!(s.read(0).unwrap(), a);
        assert_eq!(s.read(2).unwrap().master, Some(vec![9.0, 8.0]));
        // Moments only (the weights are the master).
        let m = Swap::create(dir.path(), 4, &[2], 2).unwrap();
        let b = UnitState {
            master: None,
            exp_avg: vec![1.5, 2.5],
            exp_avg_sq: vec![3.5, 4.5],
        };
        m.write(0, &b).unwrap();
        assert_eq!(m.read(0).unwrap(), b);
        drop(m);
        let path = s.path.clone();
        assert!(path.exists());
        drop(s);
        assert!(!path.exists());
        assert!(Swap::create(&dir.path().join("missing"), 0, &[1], 2).is_err());
    }
}

//! ZeRO-Infinity's optimizer offload to NVMe: each rank's optimizer state (its fp32 master shard,
//! unless the weights are the master, and both Adam moments) lives in one file under `nvme_path`;
//! the step brings one unit's state into memory, updates it, writes it back and frees it, so a
//! rank holds one unit's optimizer state at a time. The file is removed when training ends.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::TrainError;

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

    /// Writes unit `u`'s arrays (each of the unit's length).
    pub fn write(&self, u: usize, parts: &[&[f32]]) -> Result<(), TrainError> {
        let (at, n) = self.blocks[u];
        assert!(parts.len() == self.arrays && parts.iter().all(|p| p.len() == n));
        let mut bytes = Vec::with_capacity(self.arrays * n * 4);
        for p in parts {
            bytes.extend(p.iter().flat_map(|x| x.to_le_bytes()));
        }
        self.file
            .write_all_at(&bytes, at)
            .map_err(|e| TrainError::io(&self.path, e))
    }

    /// Reads unit `u`'s arrays back.
    pub fn read(&self, u: usize) -> Result<Vec<Vec<f32>>, TrainError> {
        let (at, n) = self.blocks[u];
        let mut bytes = vec![0u8; self.arrays * n * 4];
        self.file
            .read_exact_at(&mut bytes, at)
            .map_err(|e| TrainError::io(&self.path, e))?;
        Ok(bytes
            .chunks_exact(n * 4)
            .map(|c| {
                c.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            })
            .collect())
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
        let a = [1.0f32, -2.0, 3.5, f32::MIN_POSITIVE];
        s.write(0, &[&a, &[0.0; 4], &[7.0; 4]]).unwrap();
        s.write(2, &[&[9.0, 8.0], &[1.0, 1.0], &[-0.0, 5.0]])
            .unwrap();
        assert_eq!(
            s.read(0).unwrap(),
            vec![a.to_vec(), vec![0.0; 4], vec![7.0; 4]]
        );
        assert_eq!(s.read(2).unwrap()[0], vec![9.0, 8.0]);
        let path = s.path.clone();
        assert!(path.exists());
        drop(s);
        assert!(!path.exists());
        assert!(Swap::create(&dir.path().join("missing"), 0, &[1], 2).is_err());
    }
}

//! The mesh: world ranks laid out as dp × pp × tp in Megatron order (tp fastest, then pp, then dp),
//! so the ranks of a tensor-parallel group are neighbours, on one node where the bandwidth is.
//!
//! ```
//! use tessera_comm::{Communicator, LocalGroup, Mesh, MeshShape};
//! let shape = MeshShape::new(2, 1, 2).unwrap(); // dp 2, pp 1, tp 2
//! assert_eq!(shape.tp_group(3), vec![2, 3]);
//! assert_eq!(shape.dp_group(3), vec![1, 3]);
//! let comms = LocalGroup::new(4).into_comms();
//! std::thread::scope(|s| {
//!     for c in &comms {
//!         s.spawn(move || {
//!             let mesh = Mesh::new(c, shape).unwrap();
//!             assert_eq!(mesh.tp().world_size(), 2);
//!             assert_eq!(mesh.coord().tp, c.rank() % 2);
//!         });
//!     }
//! });
//! ```

use crate::{CommError, Communicator};

/// Sizes of the three parallel dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshShape {
    pub dp: usize,
    pub pp: usize,
    pub tp: usize,
}

/// A rank's place in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coord {
    pub dp: usize,
    pub pp: usize,
    pub tp: usize,
}

impl MeshShape {
    pub fn new(dp: usize, pp: usize, tp: usize) -> Result<Self, CommError> {
        if dp == 0 || pp == 0 || tp == 0 {
            return Err(CommError::Setup(format!(
                "every mesh dimension needs at least one rank, got dp {dp} x pp {pp} x tp {tp}"
            )));
        }
        Ok(MeshShape { dp, pp, tp })
    }

    pub fn world_size(&self) -> usize {
        self.dp * self.pp * self.tp
    }

    pub fn coord(&self, rank: usize) -> Coord {
        Coord {
            tp: rank % self.tp,
            pp: (rank / self.tp) % self.pp,
            dp: rank / (self.tp * self.pp),
        }
    }

    pub fn rank(&self, c: Coord) -> usize {
        (c.dp * self.pp + c.pp) * self.tp + c.tp
    }

    /// The world ranks that share `rank`'s dp and pp coordinates, in tp order.
    pub fn tp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coord(rank);
        (0..self.tp)
            .map(|tp| self.rank(Coord { tp, ..c }))
            .collect()
    }

    /// The world ranks that share `rank`'s dp and tp coordinates, in pipeline-stage order.
    pub fn pp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coord(rank);
        (0..self.pp)
            .map(|pp| self.rank(Coord { pp, ..c }))
            .collect()
    }

    /// The world ranks that share `rank`'s pp and tp coordinates, in dp order.
    pub fn dp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coord(rank);
        (0..self.dp)
            .map(|dp| self.rank(Coord { dp, ..c }))
            .collect()
    }
}

/// One rank's view of the mesh: its coordinates and a communicator for each of its groups.
pub struct Mesh {
    shape: MeshShape,
    rank: usize,
    tp: Box<dyn Communicator>,
    pp: Box<dyn Communicator>,
    dp: Box<dyn Communicator>,
}

impl Mesh {
    /// Splits `world` into this rank's tp, pp and dp groups. Every rank calls it with the same
    /// shape (no communication: the groups are known from the shape).
    pub fn new(world: &dyn Communicator, shape: MeshShape) -> Result<Mesh, CommError> {
        if world.world_size() != shape.world_size() {
            return Err(CommError::Setup(format!(
                "a dp {} x pp {} x tp {} mesh needs {} ranks, the world has {}",
                shape.dp,
                shape.pp,
                shape.tp,
                shape.world_size(),
                world.world_size()
            )));
        }
        let rank = world.rank();
        Ok(Mesh {
            shape,
            rank,
            tp: world.sub_group(&shape.tp_group(rank))?,
            pp: world.sub_group(&shape.pp_group(rank))?,
            dp: world.sub_group(&shape.dp_group(rank))?,
        })
    }

    pub fn shape(&self) -> MeshShape {
        self.shape
    }

    /// This rank's world rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn coord(&self) -> Coord {
        self.shape.coord(self.rank)
    }

    pub fn tp(&self) -> &dyn Communicator {
        &*self.tp
    }

    pub fn pp(&self) -> &dyn Communicator {
        &*self.pp
    }

    pub fn dp(&self) -> &dyn Communicator {
        &*self.dp
    }
}

/// Validates a `sub_group` rank list for rank `me` of a group of `size`; returns `me`'s position.
pub(crate) fn check_sub_group(me: usize, size: usize, ranks: &[usize]) -> Result<usize, CommError> {
    let invalid = |msg: String| Err(CommError::Invalid { rank: me, msg });
    if let Some(r) = ranks.iter().find(|&&r| r >= size) {
        return invalid(format!("sub-group rank {r} is not in a group of {size}"));
    }
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != ranks.len() {
        return invalid(format!("sub-group {ranks:?} names a rank twice"));
    }
    match ranks.iter().position(|&r| r == me) {
        Some(p) => Ok(p),
        None => invalid(format!("rank {me} is not a member of sub-group {ranks:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megatron_order_puts_tp_fastest() {
        let s = MeshShape::new(2, 2, 2).unwrap();
        assert_eq!(
            s.coord(5),
            Coord {
                dp: 1,
                pp: 0,
                tp: 1
            }
        );
        assert_eq!(s.tp_group(5), vec![4, 5]);
        assert_eq!(s.pp_group(5), vec![5, 7]);
        assert_eq!(s.dp_group(5), vec![1, 5]);
        for r in 0..8 {
            assert_eq!(s.rank(s.coord(r)), r);
        }
        assert!(MeshShape::new(0, 1, 1).is_err());
    }
}

//! ZeRO stages 0-3 over the data-parallel group (DeepSpeed's partitioning), one engine for all:
//!
//! | stage | 16-bit weights | gradients | fp32 master + Adam moments |
//! |-------|----------------|-----------|----------------------------|
//! | 0     | full           | full, all-reduced at the step | full (every rank updates all) |
//! | 1     | full           | full, reduce-scattered at the step | shard |
//! | 2     | full           | shard: reduce-scattered as each unit's backward ends | shard |
//! | 3     | shard: all-gathered before each use, freed after | shard | shard |
//!
//! Stages 1-2 all-gather the updated 16-bit weights after the step. Under stage 3 with
//! `overlap_comm`, the gather of the next unit runs on a helper thread while this one computes;
//! at most one collective is in flight, and it is always joined before the next is issued, so every
//! rank issues the same collectives in the same order.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tessera_comm::{CommError, CommExt, Communicator, ReduceOp};
use tessera_model::grad::ParamLayout;
use tessera_model::{ModelError, UnitSource};
use tessera_tensor::{ops, DType, Storage};

use crate::adamw::{adamw_update, AdamWParams};
use crate::flat_buffer::{all_gather_storage, padded, to_storage, widen, Bucket};
use crate::swap::UnitState;

/// Bytes and seconds spent in each kind of collective.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommStats {
    pub all_reduce_bytes: u64,
    pub reduce_scatter_bytes: u64,
    pub all_gather_bytes: u64,
    pub calls: u64,
    /// Seconds the compute thread waited on collectives.
    pub wait_s: f64,
}

/// Bytes this rank holds, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Resident compute-dtype weights (a shard under stage 3).
    pub weights: usize,
    /// Most stage-3 gathered weight bytes alive at once.
    pub gathered_peak: usize,
    pub grads: usize,
    /// fp32 master weights and both Adam moments in memory (with NVMe offload: the most held at
    /// once, one unit's).
    pub optimizer: usize,
    /// Optimizer state kept on NVMe (`offload_optimizer.device` nvme).
    pub nvme: usize,
}

/// The result of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Global gradient norm before clipping (unscaled).
    pub grad_norm: f32,
    /// An inf or nan was found in some rank's gradients; the update was skipped.
    pub overflow: bool,
}

pub struct ZeroEngine {
    comm: Arc<dyn Communicator>,
    pub stage: u8,
    pub dp: usize,
    pub rank: usize,
    pub dtype: DType,
    pub buckets: Vec<Bucket>,
    overlap: bool,
    /// Compute-dtype weights: padded full units (stage 0-2) or shards (stage 3).
    weights: Vec<Storage>,
    /// fp32 master weights and Adam moments: full padded units (stage 0) or shards. Empty when
    /// the compute dtype is f32: the weights are then the master (a second f32 copy would cost
    /// 4 bytes a parameter for nothing).
    master: Vec<Vec<f32>>,
    exp_avg: Vec<Vec<f32>>,
    exp_avg_sq: Vec<Vec<f32>>,
    /// f32 gradient accumulators: full padded (stage 0-1) or shards (stage 2-3).
    grads: Vec<Vec<f32>>,
    /// Optimizer state offloaded to NVMe: the vectors above are then empty between steps.
    swap: Option<crate::swap::Swap>,
    pending: Option<(usize, JoinHandle<Result<Storage, CommError>>)>,
    ready: Option<(usize, Storage)>,
    live_gathered: usize,
    pub memory: MemoryStats,
    pub comm_stats: CommStats,
}

fn comm_err(e: CommError) -> ModelError {
    ModelError::Comm(e)
}

impl ZeroEngine {
    /// `init`: every unit's full f32 weights (the same on every rank). `nvme`: a directory to keep
    /// the optimizer state in instead of memory.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        comm: Arc<dyn Communicator>,
        layout: &ParamLayout,
        stage: u8,
        dtype: DType,
        overlap: bool,
        init: Vec<Vec<f32>>,
        nvme: Option<&std::path::Path>,
    ) -> Result<Self, crate::TrainError> {
        let (dp, rank) = (comm.world_size(), comm.rank());
        let buckets: Vec<Bucket> = layout
            .units
            .iter()
            .map(|u| Bucket::new(u.len, dp))
            .collect();
        let mut e = ZeroEngine {
            comm,
            stage,
            dp,
            rank,
            dtype,
            buckets,
            overlap,
            weights: vec![],
            master: vec![],
            exp_avg: vec![],
            exp_avg_sq: vec![],
            grads: vec![],
            swap: None,
            pending: None,
            ready: None,
            live_gathered: 0,
            memory: MemoryStats::default(),
            comm_stats: CommStats::default(),
        };
        if let Some(dir) = nvme {
            let lens: Vec<usize> = e
                .buckets
                .iter()
                .map(|b| if e.full_master() { b.padded } else { b.shard })
                .collect();
            let arrays = if e.master_is_weights() { 2 } else { 3 };
            e.swap = Some(crate::swap::Swap::create(dir, rank, &lens, arrays)?);
        }
        let zeros: Vec<Vec<f32>> = init.iter().map(|u| vec![0.0; u.len()]).collect();
        e.load_full(init, zeros.clone(), zeros)?;
        Ok(e)
    }

    /// Unit `u`'s optimizer state, moved out of memory.
    fn take_state(&mut self, u: usize) -> UnitState {
        UnitState {
            master: self.master.get_mut(u).map(std::mem::take),
            exp_avg: std::mem::take(&mut self.exp_avg[u]),
            exp_avg_sq: std::mem::take(&mut self.exp_avg_sq[u]),
        }
    }

    /// Puts unit `u`'s optimizer state in memory.
    fn put_state(&mut self, u: usize, st: UnitState) {
        self.exp_avg[u] = st.exp_avg;
        self.exp_avg_sq[u] = st.exp_avg_sq;
        if let Some(m) = st.master {
            self.master[u] = m;
        }
    }

    /// Brings unit `u`'s optimizer state into memory (NVMe offload; a no-op otherwise).
    fn swap_in(&mut self, u: usize) -> Result<(), crate::TrainError> {
        let st = match &self.swap {
            Some(s) => s.read(u)?,
            None => return Ok(()),
        };
        self.put_state(u, st);
        Ok(())
    }

    /// Frees unit `u`'s optimizer state from memory, writing it back first when `write`.
    fn swap_out(&mut self, u: usize, write: bool) -> Result<(), crate::TrainError> {
        if self.swap.is_none() {
            return Ok(());
        }
        let st = self.take_state(u);
        match &self.swap {
            Some(s) if write => s.write(u, &st),
            _ => Ok(()),
        }
    }

    fn full_master(&self) -> bool {
        self.stage == 0
    }

    /// f32 training: the weights are the master copy.
    fn master_is_weights(&self) -> bool {
        self.dtype == DType::F32
    }

    /// The f32 values this rank updates, for unit `u`: its master shard (or full padded unit at
    /// stage 0), which for f32 training lives inside the weights.
    fn master_mut<'a>(
        weights: &'a mut [Storage],
        master: &'a mut [Vec<f32>],
        stage: u8,
        b: Bucket,
        rank: usize,
        u: usize,
    ) -> &'a mut [f32] {
        match (&mut weights[u], master.is_empty()) {
            (Storage::F32(w), true) => match stage {
                0 | 3 => &mut w[..],
                _ => &mut w[b.range(rank)],
            },
            _ => &mut master[u],
        }
    }

    /// Replaces the whole optimizer state with full (unpadded) per-unit values; each rank keeps
    /// what its stage says it owns. Used at start and when resuming from a checkpoint.
    pub fn load_full(
        &mut self,
        master: Vec<Vec<f32>>,
        m: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    ) -> Result<(), crate::TrainError> {
        let keep = |full: Vec<f32>, b: &Bucket, full_master: bool, rank: usize| {
            let p = padded(full, b.padded);
            if full_master {
                p
            } else {
                p[b.range(rank)].to_vec()
            }
        };
        let fm = self.full_master();
        let bs = self.buckets.clone();
        let rank = self.rank;
        self.weights = master
            .iter()
            .zip(&bs)
            .map(|(w, b)| {
                let p = padded(w.clone(), b.padded);
                if self.stage == 3 {
                    to_storage(self.dtype, &p[b.range(rank)])
                } else {
                    to_storage(self.dtype, &p)
                }
            })
            .collect();
        self.master = if self.master_is_weights() {
            Vec::new()
        } else {
            master
                .into_iter()
                .zip(&bs)
                .map(|(x, b)| keep(x, b, fm, rank))
                .collect()
        };
        self.exp_avg = m
            .into_iter()
            .zip(&bs)
            .map(|(x, b)| keep(x, b, fm, rank))
            .collect();
        self.exp_avg_sq = v
            .into_iter()
            .zip(&bs)
            .map(|(x, b)| keep(x, b, fm, rank))
            .collect();
        self.grads = bs
            .iter()
            .map(|b| vec![0.0; if self.stage >= 2 { b.shard } else { b.padded }])
            .collect();
        let bytes = |vs: &[Vec<f32>]| vs.iter().map(|v| v.len() * 4).sum::<usize>();
        let in_memory = bytes(&self.master) + bytes(&self.exp_avg) + bytes(&self.exp_avg_sq);
        let (optimizer, nvme) = match &self.swap {
            // The step holds up to three units' state at once (reading, updating, writing).
            Some(s) => (s.largest_units_bytes(3), s.bytes()),
            None => (in_memory, 0),
        };
        self.memory = MemoryStats {
            weights: self.weights.iter().map(Storage::size_in_bytes).sum(),
            gathered_peak: 0,
            grads: bytes(&self.grads),
            optimizer,
            nvme,
        };
        for u in 0..self.buckets.len() {
            self.swap_out(u, true)?;
        }
        Ok(())
    }

    /// Full (unpadded) master weights and moments of every unit, on every rank (a collective).
    #[allow(clippy::type_complexity)]
    pub fn gather_full(
        &mut self,
    ) -> Result<(Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>), crate::TrainError> {
        self.join_pending()?;
        let mut out = (vec![], vec![], vec![]);
        for u in 0..self.buckets.len() {
            self.swap_in(u)?;
            let b = self.buckets[u];
            let get = |x: &Vec<f32>| -> Result<Vec<f32>, CommError> {
                let mut full = if self.full_master() {
                    x.clone()
                } else {
                    let mut full = vec![0.0f32; b.padded];
                    self.comm.all_gather(x, &mut full)?;
                    full
                };
                full.truncate(b.len);
                Ok(full)
            };
            let master = if self.master_is_weights() {
                let Storage::F32(w) = &self.weights[u] else {
                    unreachable!("f32 training keeps f32 weights")
                };
                let mut full = if self.stage == 3 && self.dp > 1 {
                    let mut full = vec![0.0f32; b.padded];
                    self.comm.all_gather(w, &mut full)?;
                    full
                } else {
                    w.clone()
                };
                full.truncate(b.len);
                full
            } else {
                get(&self.master[u])?
            };
            out.0.push(master);
            out.1.push(get(&self.exp_avg[u])?);
            out.2.push(get(&self.exp_avg_sq[u])?);
            self.swap_out(u, false)?;
        }
        Ok(out)
    }

    fn timed<R>(&mut self, f: impl FnOnce(&dyn Communicator) -> R) -> R {
        let t = Instant::now();
        let r = f(self.comm.as_ref());
        self.comm_stats.wait_s += t.elapsed().as_secs_f64();
        self.comm_stats.calls += 1;
        r
    }

    /// Waits for an in-flight prefetch and keeps its result.
    fn join_pending(&mut self) -> Result<(), CommError> {
        if let Some((u, h)) = self.pending.take() {
            let t = Instant::now();
            let s = h.join().unwrap_or_else(|_| {
                Err(CommError::Invalid {
                    rank: self.rank,
                    msg: "prefetch thread panicked".into(),
                })
            })?;
            self.comm_stats.wait_s += t.elapsed().as_secs_f64();
            self.ready = Some((u, s));
        }
        Ok(())
    }

    fn gathered(&mut self, unit: usize) -> Result<Storage, CommError> {
        self.join_pending()?;
        if let Some((u, s)) = self.ready.take() {
            if u == unit {
                return Ok(s);
            }
        }
        let shard = &self.weights[unit];
        if self.dp > 1 {
            self.comm_stats.all_gather_bytes += (shard.size_in_bytes() * self.dp) as u64;
        }
        let shard = shard.clone();
        self.timed(|c| all_gather_storage(c, &shard))
    }

    fn grads_dtype_round(&self, g: &mut [f32]) {
        // The gradients a 16-bit kernel would write: rounded, and inf past fp16's range.
        ops::round_slice(self.dtype, g);
    }

    /// Adds `a` into `b` elementwise.
    fn add(b: &mut [f32], a: &[f32]) {
        for (x, y) in b.iter_mut().zip(a) {
            *x += y;
        }
    }

    /// Reduces the accumulated gradients (stages 0-1), checks for overflow, clips by the global
    /// norm, runs AdamW on this rank's part and refreshes the compute weights. `loss_scale`
    /// divides the gradients first.
    pub fn step(
        &mut self,
        lr: f32,
        adam_step: u64,
        hp: &AdamWParams,
        clip: f32,
        loss_scale: f32,
        apply: impl FnOnce(bool) -> bool,
    ) -> Result<StepOutcome, crate::TrainError> {
        self.join_pending()?;
        self.ready = None;
        let n_units = self.buckets.len();
        // This rank's gradients, aligned with its master weights.
        let mut local: Vec<Vec<f32>> = Vec::with_capacity(n_units);
        for u in 0..n_units {
            let b = self.buckets[u];
            match self.stage {
                0 => {
                    let mut g = std::mem::take(&mut self.grads[u]);
                    if self.dp > 1 {
                        self.comm_stats.all_reduce_bytes += (g.len() * 4) as u64;
                        self.timed(|c| c.all_reduce(&mut g, ReduceOp::Sum))?;
                    }
                    local.push(g);
                }
                1 => {
                    let mut shard = vec![0.0f32; b.shard];
                    let full = std::mem::take(&mut self.grads[u]);
                    if self.dp > 1 {
                        self.comm_stats.reduce_scatter_bytes += (full.len() * 4) as u64;
                    }
                    self.timed(|c| c.reduce_scatter(&full, &mut shard, ReduceOp::Sum))?;
                    self.grads[u] = full;
                    local.push(shard);
                }
                _ => local.push(std::mem::take(&mut self.grads[u])),
            }
        }
        let mut sq = 0.0f64;
        let mut bad = false;
        for g in &local {
            for &x in g {
                if !x.is_finite() {
                    bad = true;
                }
                sq += (x as f64) * (x as f64);
            }
        }
        if self.stage > 0 && self.dp > 1 {
            // f64 through an f32 collective: a high and a low part.
            let hi = sq as f32;
            let lo = (sq - hi as f64) as f32;
            let mut buf = [hi, lo, if bad { 1.0 } else { 0.0 }];
            self.timed(|c| c.all_reduce(&mut buf, ReduceOp::Sum))?;
            sq = buf[0] as f64 + buf[1] as f64;
            bad = buf[2] > 0.0;
        }
        let grad_norm = (sq.sqrt() / loss_scale as f64) as f32;
        let proceed = apply(bad);
        if proceed {
            let mut mult = 1.0 / loss_scale;
            if clip > 0.0 && grad_norm > clip {
                mult *= clip / (grad_norm + 1e-6);
            }
            let owns = self.update_units(&mut local, mult, lr, adam_step, hp)?;
            self.refresh_weights(owns)?;
        }
        // Fresh zeroed accumulators (stage 0 and 2-3 moved theirs out).
        for u in 0..n_units {
            let b = self.buckets[u];
            let n = if self.stage >= 2 { b.shard } else { b.padded };
            if self.grads[u].len() != n {
                self.grads[u] = vec![0.0; n];
            } else {
                self.grads[u].fill(0.0);
            }
        }
        Ok(StepOutcome {
            grad_norm,
            overflow: bad,
        })
    }

    /// AdamW on every unit this rank owns, with gradients `local` scaled by `mult`. Returns the
    /// compute-dtype copy of each updated master shard (unless the weights are the master), made
    /// while the shard is in memory. With NVMe offload the reads and writes are pipelined: unit
    /// u + 1 is read and unit u - 1 written while unit u updates (at most three units' state in
    /// memory).
    fn update_units(
        &mut self,
        local: &mut [Vec<f32>],
        mult: f32,
        lr: f32,
        adam_step: u64,
        hp: &AdamWParams,
    ) -> Result<Vec<Storage>, crate::TrainError> {
        let n = local.len();
        let mut owns = Vec::with_capacity(n);
        let Some(swap) = self.swap.take() else {
            for (u, g) in local.iter_mut().enumerate() {
                self.update_unit(u, g, mult, lr, adam_step, hp, &mut owns);
            }
            return Ok(owns);
        };
        let rank = self.rank;
        fn joined<T>(
            rank: usize,
            r: std::thread::Result<Result<T, crate::TrainError>>,
        ) -> Result<T, crate::TrainError> {
            r.unwrap_or_else(|_| {
                Err(crate::TrainError::Panic {
                    rank,
                    msg: "the NVMe swap thread panicked".into(),
                })
            })
        }
        let swap_ref = &swap;
        let r = std::thread::scope(|s| -> Result<(), crate::TrainError> {
            let mut next = (n > 0).then(|| s.spawn(move || swap_ref.read(0)));
            let mut writing: Option<
                std::thread::ScopedJoinHandle<'_, Result<(), crate::TrainError>>,
            > = None;
            for (u, g) in local.iter_mut().enumerate() {
                let reading = next.take().expect("one read per unit");
                let st = joined(rank, reading.join())?;
                if u + 1 < n {
                    next = Some(s.spawn(move || swap_ref.read(u + 1)));
                }
                self.put_state(u, st);
                self.update_unit(u, g, mult, lr, adam_step, hp, &mut owns);
                let st = self.take_state(u);
                if let Some(w) = writing.take() {
                    joined(rank, w.join())?;
                }
                writing = Some(s.spawn(move || swap_ref.write(u, &st)));
            }
            if let Some(w) = writing.take() {
                joined(rank, w.join())?;
            }
            Ok(())
        });
        self.swap = Some(swap);
        r.map(|()| owns)
    }

    /// AdamW on unit `u`, its state in memory.
    #[allow(clippy::too_many_arguments)]
    fn update_unit(
        &mut self,
        u: usize,
        g: &mut [f32],
        mult: f32,
        lr: f32,
        adam_step: u64,
        hp: &AdamWParams,
        owns: &mut Vec<Storage>,
    ) {
        g.iter_mut().for_each(|x| *x *= mult);
        let b = self.buckets[u];
        let p = Self::master_mut(
            &mut self.weights,
            &mut self.master,
            self.stage,
            b,
            self.rank,
            u,
        );
        adamw_update(
            p,
            g,
            &mut self.exp_avg[u],
            &mut self.exp_avg_sq[u],
            lr,
            adam_step,
            hp,
        );
        if !self.master_is_weights() {
            owns.push(to_storage(self.dtype, &self.master[u]));
        }
    }

    /// New compute weights from the updated master: `owns[u]`, each unit's updated shard in the
    /// compute dtype (empty when the weights are the master and were updated in place).
    fn refresh_weights(&mut self, owns: Vec<Storage>) -> Result<(), CommError> {
        let mut owns = owns.into_iter();
        for u in 0..self.buckets.len() {
            let own = if self.master_is_weights() {
                // Updated in place: stages 0 and 3 hold just what they updated; stages 1-2
                // all-gather their updated shard into the full weights.
                if matches!(self.stage, 0 | 3) {
                    continue;
                }
                let Storage::F32(w) = &self.weights[u] else {
                    unreachable!("f32 training keeps f32 weights")
                };
                Storage::F32(w[self.buckets[u].range(self.rank)].to_vec())
            } else {
                owns.next().expect("one updated shard per unit")
            };
            self.weights[u] = match self.stage {
                0 | 3 => own,
                _ => {
                    if self.dp > 1 {
                        self.comm_stats.all_gather_bytes += (own.size_in_bytes() * self.dp) as u64;
                    }
                    self.timed(|c| all_gather_storage(c, &own))?
                }
            };
        }
        Ok(())
    }
}

impl UnitSource for ZeroEngine {
    fn fetch(&mut self, unit: usize) -> Result<Vec<f32>, ModelError> {
        let len = self.buckets[unit].len;
        if self.stage < 3 {
            return Ok(widen(&self.weights[unit], len));
        }
        let full = self.gathered(unit).map_err(comm_err)?;
        self.live_gathered += full.size_in_bytes();
        self.memory.gathered_peak = self.memory.gathered_peak.max(self.live_gathered);
        Ok(widen(&full, len))
    }

    fn prefetch(&mut self, unit: usize) -> Result<(), ModelError> {
        if self.stage < 3 || !self.overlap || unit >= self.buckets.len() || self.dp == 1 {
            return Ok(());
        }
        self.join_pending().map_err(comm_err)?;
        if self.ready.as_ref().is_some_and(|(u, _)| *u == unit) {
            return Ok(());
        }
        self.ready = None;
        let comm = self.comm.clone();
        let shard = self.weights[unit].clone();
        self.comm_stats.all_gather_bytes += (shard.size_in_bytes() * self.dp) as u64;
        self.comm_stats.calls += 1;
        let h = std::thread::spawn(move || all_gather_storage(comm.as_ref(), &shard));
        self.pending = Some((unit, h));
        Ok(())
    }

    fn release(&mut self, unit: usize) {
        if self.stage == 3 {
            let b = self.buckets[unit];
            let bytes = b.padded * self.dtype.size_in_bytes();
            self.live_gathered = self.live_gathered.saturating_sub(bytes);
        }
    }

    fn grads_done(&mut self, unit: usize, mut grads: Vec<f32>) -> Result<(), ModelError> {
        self.grads_dtype_round(&mut grads);
        let b = self.buckets[unit];
        if self.stage < 2 {
            Self::add(&mut self.grads[unit][..b.len], &grads);
            return Ok(());
        }
        self.join_pending().map_err(comm_err)?;
        let full = padded(grads, b.padded);
        let mut shard = vec![0.0f32; b.shard];
        if self.dp > 1 {
            self.comm_stats.reduce_scatter_bytes += (full.len() * 4) as u64;
        }
        self.timed(|c| c.reduce_scatter(&full, &mut shard, ReduceOp::Sum))
            .map_err(comm_err)?;
        Self::add(&mut self.grads[unit], &shard);
        Ok(())
    }
}

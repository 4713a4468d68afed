//! The in-process backend: one thread per rank, collectives through shared memory.
//!
//! Each collective is a rendezvous: every rank deposits its contribution and its description (op,
//! element kind, sizes, root); the last to arrive checks that the descriptions agree and publishes
//! the deposits; each rank then computes its own result from them outside the lock, reducing in
//! the same order as the TCP ring ([`crate::reduce`]) so both backends give the same bits. A rank
//! that leaves the group (its handle dropped, e.g. after an error) aborts everyone still waiting,
//! and every wait has a deadline, so no rank can hang the others. Point-to-point messages go
//! through per-pair mailboxes; sub-groups are found in a registry shared by the whole world.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::check::{OpCode, OpDesc};
use crate::reduce::{ring_reduce_segment, segment};
use crate::{args, CommError, CommStream, Communicator, ElemKind, ReduceOp};

#[derive(Default)]
struct State {
    /// Collectives completed so far.
    generation: u64,
    arrived: Vec<bool>,
    slots: Vec<Vec<u8>>,
    descs: Vec<Option<OpDesc>>,
    /// The deposits of the last completed collective, or why it failed.
    published: Option<Result<Arc<Vec<Vec<u8>>>, String>>,
    aborted: Option<String>,
    /// Ranks whose handle was dropped: they will issue nothing more.
    left: Vec<bool>,
    /// Point-to-point messages in flight, by (source, destination).
    mail: HashMap<(usize, usize), VecDeque<Vec<u8>>>,
}

struct Shared {
    size: usize,
    state: Mutex<State>,
    cv: Condvar,
    /// `State::generation`, readable without the lock (a waiting rank polls it briefly before it
    /// sleeps on `cv`).
    generation: AtomicU64,
}

/// How long a rank waiting in a collective polls for the last rank's arrival before it sleeps on
/// the condition variable: a collective's ranks mostly arrive within microseconds of each other,
/// and waking a sleeping thread takes tens of them.
const SPIN: Duration = Duration::from_micros(100);

impl Shared {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(Shared {
            size,
            state: Mutex::new(State {
                arrived: vec![false; size],
                slots: vec![Vec::new(); size],
                descs: vec![None; size],
                left: vec![false; size],
                ..State::default()
            }),
            cv: Condvar::new(),
            generation: AtomicU64::new(0),
        })
    }
}

/// The sub-groups of one world: `(world ranks, nth group over them)` -> its shared state.
#[derive(Default)]
struct Registry {
    groups: HashMap<(Vec<usize>, u64), Arc<Shared>>,
    /// How many groups over these world ranks each world rank has created.
    created: HashMap<(Vec<usize>, usize), u64>,
}

/// A group of in-process ranks; hand one [`LocalComm`] to each rank's thread.
pub struct LocalGroup {
    comms: Vec<LocalComm>,
}

impl LocalGroup {
    pub fn new(size: usize) -> Self {
        Self::with_timeout(size, crate::default_timeout())
    }

    pub fn with_timeout(size: usize, timeout: Duration) -> Self {
        assert!(size > 0, "a group needs at least one rank");
        let shared = Shared::new(size);
        let registry = Arc::new(Mutex::new(Registry::default()));
        let comms = (0..size)
            .map(|rank| {
                CommStream::new(LocalRank {
                    rank,
                    world_ranks: (0..size).collect(),
                    shared: shared.clone(),
                    registry: registry.clone(),
                    timeout,
                })
            })
            .collect();
        LocalGroup { comms }
    }

    pub fn into_comms(self) -> Vec<LocalComm> {
        self.comms
    }
}

/// One rank's handle of a [`LocalGroup`] (or of one of its sub-groups).
pub type LocalComm = CommStream<LocalRank>;

/// The in-process backend's blocking collectives for one rank; use it as [`LocalComm`].
pub struct LocalRank {
    rank: usize,
    /// World rank of each rank of this group.
    world_ranks: Vec<usize>,
    shared: Arc<Shared>,
    registry: Arc<Mutex<Registry>>,
    timeout: Duration,
}

impl Drop for LocalRank {
    /// A rank that drops its handle (finished, or unwinding from a panic) issues nothing more: an
    /// operation that needs it fails at once, naming it; the others' operations go on (two ranks
    /// can still exchange messages after a third has finished).
    fn drop(&mut self) {
        let mut st = self.lock();
        st.left[self.rank] = true;
        self.shared.cv.notify_all();
    }
}

impl LocalRank {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a rank panicked mid-collective; the state is still consistent
        // enough to report an abort, which is all that is left to do.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn left(&self, r: usize) -> CommError {
        self.aborted(&format!("rank {r} left the group"))
    }

    /// The ranks that have left, named in one error (None when none has).
    fn left_ranks(&self, st: &State, pending: impl Fn(usize) -> bool) -> Option<CommError> {
        let gone: Vec<usize> = (0..self.shared.size)
            .filter(|&r| st.left[r] && pending(r))
            .collect();
        match gone.as_slice() {
            [] => None,
            [r] => Some(self.left(*r)),
            _ => Some(self.aborted(&format!("ranks {gone:?} left the group"))),
        }
    }

    fn aborted(&self, reason: &str) -> CommError {
        CommError::Aborted {
            rank: self.rank,
            reason: reason.to_string(),
        }
    }

    /// Deposits `data` with `desc`, waits for every rank, and returns all deposits in rank order.
    fn rendezvous(&self, desc: OpDesc, data: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>, CommError> {
        let n = self.shared.size;
        let mut st = self.lock();
        if let Some(reason) = &st.aborted {
            return Err(self.aborted(reason));
        }
        if let Some(e) = self.left_ranks(&st, |_| true) {
            return Err(e);
        }
        let my_gen = st.generation;
        st.arrived[self.rank] = true;
        st.slots[self.rank] = data;
        st.descs[self.rank] = Some(desc);
        if st.arrived.iter().all(|a| *a) {
            let descs: Vec<(usize, OpDesc)> = st
                .descs
                .iter()
                .enumerate()
                .filter_map(|(r, d)| d.map(|d| (r, d)))
                .collect();
            let mismatch = crate::check::first_mismatch(my_gen, &descs);
            let slots = std::mem::replace(&mut st.slots, vec![Vec::new(); n]);
            st.published = Some(match mismatch {
                None => Ok(Arc::new(slots)),
                Some(m) => Err(m),
            });
            st.arrived.iter_mut().for_each(|a| *a = false);
            st.descs.iter_mut().for_each(|d| *d = None);
            st.generation += 1;
            self.shared
                .generation
                .store(st.generation, Ordering::Release);
            self.shared.cv.notify_all();
        } else {
            // Polled without the lock first (no later collective can complete before this rank
            // joins it, so the generation moves at most once meanwhile), yielding the CPU to
            // any rank that still has to arrive.
            drop(st);
            let spin_end = Instant::now() + SPIN;
            while self.shared.generation.load(Ordering::Acquire) == my_gen
                && Instant::now() < spin_end
            {
                std::thread::yield_now();
            }
            st = self.lock();
            let deadline = Instant::now() + self.timeout;
            while st.generation == my_gen {
                if let Some(reason) = &st.aborted {
                    return Err(self.aborted(reason));
                }
                if let Some(e) = self.left_ranks(&st, |r| !st.arrived[r]) {
                    // Withdraw this rank's deposit: the collective can never complete.
                    st.arrived[self.rank] = false;
                    st.descs[self.rank] = None;
                    return Err(e);
                }
                let now = Instant::now();
                if now >= deadline {
                    let missing: Vec<usize> = (0..n).filter(|&r| !st.arrived[r]).collect();
                    let err = CommError::Timeout {
                        rank: self.rank,
                        op: format!("{} (collective #{my_gen})", desc.code.name()),
                        secs: self.timeout.as_secs_f64(),
                        missing: missing.clone(),
                    };
                    st.aborted = Some(format!(
                        "rank {} timed out in {} waiting for rank(s) {}",
                        self.rank,
                        desc.code.name(),
                        crate::error::rank_list(&missing)
                    ));
                    self.shared.cv.notify_all();
                    return Err(err);
                }
                st = self
                    .shared
                    .cv
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        // A later collective cannot complete before this rank joins it, so `published` still
        // holds this one's deposits.
        match st.published.clone() {
            Some(Ok(slots)) => Ok(slots),
            Some(Err(msg)) => Err(CommError::Mismatch {
                rank: self.rank,
                msg,
            }),
            None => Err(self.aborted("collective completed without a result")),
        }
    }

    fn check_rank(&self, what: &str, r: usize) -> Result<(), CommError> {
        self.valid(args::rank(what, r, self.shared.size))
    }

    /// An argument check's verdict as this rank's error.
    fn valid(&self, r: Result<(), String>) -> Result<(), CommError> {
        r.map_err(|msg| CommError::Invalid {
            rank: self.rank,
            msg,
        })
    }
}

impl Communicator for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_bytes(
        &self,
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.valid(args::all_reduce(buf.len(), kind))?;
        let desc = OpDesc::new(OpCode::AllReduce, buf.len()).reduce(kind, op);
        let slots = self.rendezvous(desc, buf.to_vec())?;
        let (n, es) = (self.shared.size, kind.size());
        let elems = buf.len() / es;
        for k in 0..n {
            let r = segment(elems, n, k);
            let bytes = r.start * es..r.end * es;
            ring_reduce_segment(&slots, kind, op, k, bytes.clone(), &mut buf[bytes]);
        }
        Ok(())
    }

    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        self.valid(args::all_gather(send.len(), recv.len(), self.shared.size))?;
        let desc = OpDesc::new(OpCode::AllGather, send.len());
        let slots = self.rendezvous(desc, send.to_vec())?;
        for (chunk, s) in recv.chunks_mut(send.len().max(1)).zip(slots.iter()) {
            chunk.copy_from_slice(s);
        }
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        self.check_rank("root", root)?;
        let desc = OpDesc::new(OpCode::Broadcast, buf.len()).root(root);
        let data = if self.rank == root {
            buf.to_vec()
        } else {
            Vec::new()
        };
        let slots = self.rendezvous(desc, data)?;
        if self.rank != root {
            buf.copy_from_slice(&slots[root]);
        }
        Ok(())
    }

    fn reduce_scatter_bytes(
        &self,
        send: &[u8],
        recv: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let n = self.shared.size;
        self.valid(args::reduce_scatter(send.len(), recv.len(), kind, n))?;
        let desc = OpDesc::new(OpCode::ReduceScatter, send.len()).reduce(kind, op);
        let slots = self.rendezvous(desc, send.to_vec())?;
        let per = recv.len();
        let range = self.rank * per..(self.rank + 1) * per;
        ring_reduce_segment(&slots, kind, op, self.rank, range, recv);
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.rendezvous(OpDesc::new(OpCode::Barrier, 0), Vec::new())
            .map(|_| ())
    }

    fn send_bytes(&self, buf: &[u8], dst: usize) -> Result<(), CommError> {
        self.check_rank("destination", dst)?;
        let mut st = self.lock();
        if let Some(reason) = &st.aborted {
            return Err(self.aborted(reason));
        }
        if st.left[dst] {
            return Err(self.left(dst));
        }
        st.mail
            .entry((self.rank, dst))
            .or_default()
            .push_back(buf.to_vec());
        self.shared.cv.notify_all();
        Ok(())
    }

    fn recv_bytes(&self, buf: &mut [u8], src: usize) -> Result<(), CommError> {
        self.check_rank("source", src)?;
        let deadline = Instant::now() + self.timeout;
        let mut st = self.lock();
        loop {
            if let Some(msg) = st
                .mail
                .get_mut(&(src, self.rank))
                .and_then(|q| q.pop_front())
            {
                if msg.len() != buf.len() {
                    return Err(CommError::Mismatch {
                        rank: self.rank,
                        msg: format!(
                            "rank {} receives {} bytes but rank {src} sent {}",
                            self.rank,
                            buf.len(),
                            msg.len()
                        ),
                    });
                }
                buf.copy_from_slice(&msg);
                return Ok(());
            }
            if let Some(reason) = &st.aborted {
                return Err(self.aborted(reason));
            }
            if st.left[src] {
                return Err(self.left(src));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    rank: self.rank,
                    op: "recv".into(),
                    secs: self.timeout.as_secs_f64(),
                    missing: vec![src],
                });
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn sub_group(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>, CommError> {
        let me = crate::mesh::check_sub_group(self.rank, self.shared.size, ranks)?;
        let world_ranks: Vec<usize> = ranks.iter().map(|&r| self.world_ranks[r]).collect();
        let my_world = self.world_ranks[self.rank];
        let shared = {
            let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
            let nth = reg
                .created
                .entry((world_ranks.clone(), my_world))
                .or_insert(0);
            let key = (world_ranks.clone(), *nth);
            *nth += 1;
            reg.groups
                .entry(key)
                .or_insert_with(|| Shared::new(ranks.len()))
                .clone()
        };
        Ok(Box::new(CommStream::new(LocalRank {
            rank: me,
            world_ranks,
            shared,
            registry: self.registry.clone(),
            timeout: self.timeout,
        })))
    }

    fn abort(&self, reason: &str) {
        let mut st = self.lock();
        if st.aborted.is_none() {
            st.aborted = Some(reason.to_string());
        }
        self.shared.cv.notify_all();
    }

    fn aborted(&self) -> Option<String> {
        let st = self.lock();
        if let Some(reason) = &st.aborted {
            return Some(reason.clone());
        }
        self.left_ranks(&st, |_| true).map(|e| match e {
            CommError::Aborted { reason, .. } => reason,
            other => other.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CommExt;
    use half::bf16;

    fn run<R: Send>(n: usize, timeout: Duration, f: impl Fn(LocalComm) -> R + Sync) -> Vec<R> {
        let comms = LocalGroup::with_timeout(n, timeout).into_comms();
        std::thread::scope(|s| {
            let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn collectives_agree_with_their_definitions() {
        let t = Duration::from_secs(10);
        for n in 1..=4 {
            let out = run(n, t, |c| {
                let r = c.rank() as f32;
                let mut a = vec![r, 2.0 * r + 1.0];
                c.all_reduce(&mut a, ReduceOp::Sum).unwrap();
                let mut m = vec![r];
                c.all_reduce(&mut m, ReduceOp::Max).unwrap();
                let mut avg = vec![bf16::from_f32(r)];
                c.all_reduce(&mut avg, ReduceOp::Avg).unwrap();
                let mut g = vec![0i32; 2 * c.world_size()];
                c.all_gather(&[c.rank() as i32, -1], &mut g).unwrap();
                let mut b = vec![if c.rank() == n - 1 { 7u8 } else { 0 }; 3];
                c.broadcast(&mut b, n - 1).unwrap();
                let send: Vec<f32> = (0..2 * n).map(|i| i as f32 + r).collect();
                let mut rs = vec![0.0f32; 2];
                c.reduce_scatter(&send, &mut rs, ReduceOp::Sum).unwrap();
                c.barrier().unwrap();
                (a, m, avg[0].to_f32(), g, b, rs)
            });
            let s: f32 = (0..n).map(|r| r as f32).sum();
            for (rank, (a, m, avg, g, b, rs)) in out.into_iter().enumerate() {
                assert_eq!(a, vec![s, 2.0 * s + n as f32]);
                assert_eq!(m, vec![(n - 1) as f32]);
                assert_eq!(avg, bf16::from_f32(s / n as f32).to_f32());
                let want: Vec<i32> = (0..n as i32).flat_map(|r| [r, -1]).collect();
                assert_eq!(g, want);
                assert_eq!(b, vec![7u8; 3]);
                let base = (2 * rank) as f32 * n as f32 + s;
                assert_eq!(rs, vec![base, base + n as f32]);
            }
        }
    }

    #[test]
    fn mismatched_sizes_are_named() {
        let out = run(2, Duration::from_secs(10), |c| {
            let mut v = vec![0.0f32; 2 + c.rank()];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err().to_string()
        });
        assert!(
            out[0].contains("rank 1 issued all_reduce of 12 bytes"),
            "{}",
            out[0]
        );
    }

    #[test]
    fn a_rank_that_never_joins_times_out_with_its_name() {
        // Rank 2 holds its handle without joining until the others have given up (a barrier,
        // not a sleep: were it to leave first, they would say it left instead of naming it as
        // missing). One second: ranks 0 and 1 must both be waiting before the deadline.
        let gave_up = std::sync::Barrier::new(3);
        let out = run(3, Duration::from_secs(1), |c| {
            if c.rank() == 2 {
                gave_up.wait();
                return String::new();
            }
            let mut v = vec![1.0f32];
            // No unwrap before the barrier: a panic here would leave the others waiting on it.
            let e = format!(
                "{:?}",
                c.all_reduce(&mut v, ReduceOp::Sum)
                    .err()
                    .map(|e| e.to_string())
            );
            gave_up.wait();
            e
        });
        assert!(
            out[0].contains("rank(s) [2]") || out[0].contains("waiting for rank(s) [2]"),
            "{}",
            out[0]
        );
        assert!(out[1].contains("[2]"), "{}", out[1]);
    }

    #[test]
    fn a_rank_that_leaves_aborts_the_others() {
        let out = run(2, Duration::from_secs(30), |c| {
            if c.rank() == 1 {
                drop(c);
                return String::new();
            }
            let mut v = vec![1.0f32];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err().to_string()
        });
        assert!(out[0].contains("rank 1 left the group"), "{}", out[0]);
    }

    #[test]
    fn ranks_go_on_after_one_finishes_and_leaves() {
        let out = run(3, Duration::from_secs(30), |c| {
            c.barrier().unwrap();
            if c.rank() == 2 {
                drop(c);
                return (Vec::new(), String::new());
            }
            // Point-to-point between the two that are left still works.
            let mut got = vec![0u8; 2];
            if c.rank() == 0 {
                c.send(&[7u8, 9], 1).unwrap();
            } else {
                c.recv(&mut got, 0).unwrap();
            }
            // A collective needs rank 2, so it fails naming it, at once.
            let mut v = vec![1.0f32];
            (
                got,
                c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err().to_string(),
            )
        });
        assert_eq!(out[1].0, vec![7u8, 9]);
        // (Rank 0 may have failed and left before rank 1 asks: then both are named.)
        for (got, e) in &out[..2] {
            assert!(
                e.contains("2") && e.contains("left the group"),
                "{e} ({got:?})"
            );
        }
    }
    /// `aborted()` never blocks and says why the group cannot complete a collective: nothing
    /// while all is well, the reason once a rank aborts, a rank that left.
    #[test]
    fn aborted_says_why_without_waiting() {
        let out = run(3, Duration::from_secs(30), |c| {
            let before = c.aborted();
            c.barrier().unwrap();
            if c.rank() == 2 {
                return (before, None, None);
            }
            c.barrier().unwrap_err(); // rank 2 has left (or is leaving): wait for its going
            let left = c.aborted();
            // Rank 0 aborts only once rank 1 has looked (point-to-point still works).
            if c.rank() == 0 {
                c.recv(&mut [0u8], 1).unwrap();
                c.abort("rank 0 gave up");
            } else {
                c.send(&[1u8], 0).unwrap();
            }
            let after = loop {
                if let Some(r) = c.aborted().filter(|r| r.contains("gave up")) {
                    break Some(r);
                }
                std::thread::yield_now();
            };
            (before, left, after)
        });
        for (rank, (before, left, after)) in out.iter().enumerate() {
            assert_eq!(before, &None, "rank {rank}");
            if rank < 2 {
                assert!(
                    left.as_deref().is_some_and(|r| r.contains("rank 2 left")),
                    "{left:?}"
                );
                assert_eq!(after.as_deref(), Some("rank 0 gave up"));
            }
        }
    }
}

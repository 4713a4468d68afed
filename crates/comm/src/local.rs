//! The in-process backend: one thread per rank, collectives through shared memory.
//!
//! Each collective is a rendezvous: every rank deposits its contribution and its description (op,
//! element kind, sizes, root); the last to arrive checks that the descriptions agree and publishes
//! the deposits; each rank then computes its own result from them outside the lock. A rank that
//! leaves the group (its handle dropped, e.g. after an error) aborts everyone still waiting, and
//! every wait has a deadline, so no rank can hang the others.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::element::{load, store};
use crate::{CommError, Communicator, ElemKind, ReduceOp};

#[derive(Debug, Clone, PartialEq, Eq)]
struct OpDesc {
    name: &'static str,
    kind: Option<ElemKind>,
    op: Option<ReduceOp>,
    bytes: usize,
    root: Option<usize>,
}

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
}

struct Shared {
    size: usize,
    state: Mutex<State>,
    cv: Condvar,
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
        let shared = Arc::new(Shared {
            size,
            state: Mutex::new(State {
                arrived: vec![false; size],
                slots: vec![Vec::new(); size],
                descs: vec![None; size],
                ..State::default()
            }),
            cv: Condvar::new(),
        });
        let comms = (0..size)
            .map(|rank| LocalComm {
                rank,
                shared: shared.clone(),
                timeout,
            })
            .collect();
        LocalGroup { comms }
    }

    pub fn into_comms(self) -> Vec<LocalComm> {
        self.comms
    }
}

/// One rank's handle of a [`LocalGroup`].
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    timeout: Duration,
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let mut st = self.lock();
        if st.aborted.is_none() {
            st.aborted = Some(format!("rank {} left the group", self.rank));
        }
        self.shared.cv.notify_all();
    }
}

impl LocalComm {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a rank panicked mid-collective; the state is still consistent
        // enough to report an abort, which is all that is left to do.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deposits `data` with `desc`, waits for every rank, and returns all deposits in rank order.
    fn rendezvous(&self, desc: OpDesc, data: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>, CommError> {
        let n = self.shared.size;
        let mut st = self.lock();
        if let Some(reason) = &st.aborted {
            return Err(CommError::Aborted {
                rank: self.rank,
                reason: reason.clone(),
            });
        }
        let my_gen = st.generation;
        st.arrived[self.rank] = true;
        st.slots[self.rank] = data;
        st.descs[self.rank] = Some(desc.clone());
        if st.arrived.iter().all(|a| *a) {
            let first = st.descs[0].clone();
            let mismatch = st.descs.iter().enumerate().find_map(|(r, d)| {
                (d != &first).then(|| {
                    format!(
                        "collective #{my_gen}: rank 0 issued {} but rank {r} issued {}",
                        describe(first.as_ref()),
                        describe(d.as_ref())
                    )
                })
            });
            let slots = std::mem::replace(&mut st.slots, vec![Vec::new(); n]);
            st.published = Some(match mismatch {
                None => Ok(Arc::new(slots)),
                Some(m) => Err(m),
            });
            st.arrived.iter_mut().for_each(|a| *a = false);
            st.descs.iter_mut().for_each(|d| *d = None);
            st.generation += 1;
            self.shared.cv.notify_all();
        } else {
            let deadline = Instant::now() + self.timeout;
            while st.generation == my_gen {
                if let Some(reason) = &st.aborted {
                    return Err(CommError::Aborted {
                        rank: self.rank,
                        reason: reason.clone(),
                    });
                }
                let now = Instant::now();
                if now >= deadline {
                    let missing: Vec<usize> = (0..n).filter(|&r| !st.arrived[r]).collect();
                    let err = CommError::Timeout {
                        rank: self.rank,
                        op: format!("{} (collective #{my_gen})", desc.name),
                        secs: self.timeout.as_secs_f64(),
                        missing: missing.clone(),
                    };
                    st.aborted = Some(format!(
                        "rank {} timed out in {} waiting for rank(s) {missing:?}",
                        self.rank, desc.name
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
        match st.published.clone().expect("published after completion") {
            Ok(slots) => Ok(slots),
            Err(msg) => Err(CommError::Mismatch {
                rank: self.rank,
                msg,
            }),
        }
    }

    fn check_root(&self, root: usize) -> Result<(), CommError> {
        if root >= self.shared.size {
            return Err(CommError::Invalid {
                rank: self.rank,
                msg: format!(
                    "root {root} is not a rank of a group of {}",
                    self.shared.size
                ),
            });
        }
        Ok(())
    }
}

fn describe(d: Option<&OpDesc>) -> String {
    match d {
        None => "nothing".into(),
        Some(d) => {
            let mut s = format!("{} of {} bytes", d.name, d.bytes);
            if let Some(k) = d.kind {
                s += &format!(" ({k:?}");
                if let Some(op) = d.op {
                    s += &format!(", {op:?}");
                }
                s += ")";
            }
            if let Some(r) = d.root {
                s += &format!(" from root {r}");
            }
            s
        }
    }
}

/// Reduces element range `lo..hi` of every deposit into `out` (which holds `hi - lo` elements).
fn reduce_into(
    slots: &[Vec<u8>],
    kind: ElemKind,
    op: ReduceOp,
    lo: usize,
    hi: usize,
    out: &mut [u8],
) {
    let n = slots.len() as f64;
    for i in lo..hi {
        // Always in rank order, so every rank computes bit-identical results.
        let mut acc = load(kind, &slots[0], i);
        for s in &slots[1..] {
            let x = load(kind, s, i);
            acc = match op {
                ReduceOp::Sum | ReduceOp::Avg => acc + x,
                ReduceOp::Max => acc.max(x),
            };
        }
        if op == ReduceOp::Avg {
            acc /= n;
        }
        store(kind, out, i - lo, acc);
    }
}

impl Communicator for LocalComm {
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
        let desc = OpDesc {
            name: "all_reduce",
            kind: Some(kind),
            op: Some(op),
            bytes: buf.len(),
            root: None,
        };
        let slots = self.rendezvous(desc, buf.to_vec())?;
        reduce_into(&slots, kind, op, 0, buf.len() / kind.size(), buf);
        Ok(())
    }

    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        if recv.len() != send.len() * self.shared.size {
            return Err(CommError::Invalid {
                rank: self.rank,
                msg: format!(
                    "all_gather of {} bytes needs a receive buffer of {}, got {}",
                    send.len(),
                    send.len() * self.shared.size,
                    recv.len()
                ),
            });
        }
        let desc = OpDesc {
            name: "all_gather",
            kind: None,
            op: None,
            bytes: send.len(),
            root: None,
        };
        let slots = self.rendezvous(desc, send.to_vec())?;
        for (chunk, s) in recv.chunks_mut(send.len().max(1)).zip(slots.iter()) {
            chunk.copy_from_slice(s);
        }
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        self.check_root(root)?;
        let desc = OpDesc {
            name: "broadcast",
            kind: None,
            op: None,
            bytes: buf.len(),
            root: Some(root),
        };
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
        if send.len() != recv.len() * n || !recv.len().is_multiple_of(kind.size()) {
            return Err(CommError::Invalid {
                rank: self.rank,
                msg: format!(
                    "reduce_scatter of {} bytes into {} bytes on {n} ranks",
                    send.len(),
                    recv.len()
                ),
            });
        }
        let desc = OpDesc {
            name: "reduce_scatter",
            kind: Some(kind),
            op: Some(op),
            bytes: send.len(),
            root: None,
        };
        let slots = self.rendezvous(desc, send.to_vec())?;
        let per = recv.len() / kind.size();
        reduce_into(
            &slots,
            kind,
            op,
            self.rank * per,
            (self.rank + 1) * per,
            recv,
        );
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        let desc = OpDesc {
            name: "barrier",
            kind: None,
            op: None,
            bytes: 0,
            root: None,
        };
        self.rendezvous(desc, Vec::new()).map(|_| ())
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
        let out = run(3, Duration::from_millis(200), |c| {
            if c.rank() == 2 {
                // Holds its handle without joining until the others have given up.
                std::thread::sleep(Duration::from_millis(600));
                return String::new();
            }
            let mut v = vec![1.0f32];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err().to_string()
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
}

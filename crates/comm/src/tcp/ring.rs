//! The TCP backend's collectives: rings over the connections of [`super::Net`].
//!
//! all-reduce = ring reduce-scatter + ring all-gather (each rank sends and receives 2(n-1)/n of
//! the buffer, the bandwidth optimum); reduce-scatter and all-gather are those rings alone;
//! broadcast is a pipelined chain from the root; send/recv go straight to the peer. Every step
//! moves its segment in chunks, queued to the connection's writer thread a few chunks ahead of
//! those received, so the wire stays busy in both directions. What arrives to be copied is read by
//! the connection's reader thread straight into its final place; what arrives to be reduced, this
//! rank's thread reduces into place from the reader's cache-warm buffer ([`super::direct`]). No
//! op copies its input or output through scratch memory. Segment `k` is reduced in ring order
//! starting at rank `k + 1` ([`crate::reduce`]), which the in-process backend reproduces.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::direct::{Region, Sink};
use super::{fnv, Header, Sends, TcpRank, DATA, P2P};
use crate::check::{OpCode, OpDesc};
use crate::reduce::{finish, segment};
use crate::{args, CommError, CommStream, Communicator, ElemKind, ReduceOp};

/// Chunks a ring step queues ahead of the chunks it has received.
const WINDOW: usize = 4;

fn frames(len: usize, chunk: usize) -> usize {
    len.div_ceil(chunk).max(1)
}

fn chunk_range(len: usize, chunk: usize, i: usize) -> Range<usize> {
    (i * chunk).min(len)..((i + 1) * chunk).min(len)
}

/// One ring step: what it sends to the next rank, and where what the previous rank sends goes.
struct Step {
    send: *const u8,
    send_len: usize,
    recv: Region,
}

/// A copy the rank's thread makes chunk by chunk while it waits for a ring phase's frames, off
/// the critical path (all-gather's own segment).
struct SideCopy {
    src: *const u8,
    dst: *mut u8,
    len: usize,
    done: usize,
}

impl SideCopy {
    /// Copies the next `upto` bytes (all that are left with `usize::MAX`).
    ///
    /// # Safety
    /// `src` and `dst` valid for `len` bytes, `dst` touched by no one else.
    unsafe fn advance(&mut self, upto: usize) {
        let k = upto.min(self.len - self.done);
        std::ptr::copy_nonoverlapping(self.src.add(self.done), self.dst.add(self.done), k);
        self.done += k;
    }
}

/// The ring steps of a phase over `buf` in place: step `s` sends segment `sk(s)` and receives
/// segment `rk(s)` into place (reducing it with what is there, for a reduction).
fn in_place_steps(
    buf: &mut [u8],
    n: usize,
    seg: &dyn Fn(usize) -> Range<usize>,
    sk: impl Fn(usize) -> usize,
    rk: impl Fn(usize) -> usize,
) -> Vec<Step> {
    let base = buf.as_mut_ptr();
    (0..n - 1)
        .map(|s| {
            let (snd, rcv) = (seg(sk(s)), seg(rk(s)));
            // SAFETY (of the pointer arithmetic): the segments lie within `buf`.
            let dst = unsafe { base.add(rcv.start) };
            Step {
                send: unsafe { base.add(snd.start) },
                send_len: snd.len(),
                recv: Region {
                    dst,
                    local: dst,
                    len: rcv.len(),
                },
            }
        })
        .collect()
}

impl TcpRank {
    /// Runs the steps of one ring phase: step `s` queues `steps[s].send` to the next rank (the
    /// connection's writer thread streams it) while the previous rank's chunks land in
    /// `steps[s].recv` ([`super::direct`]). Chunk `i` of a step's
    /// send goes out only once chunk `i` of the step before has landed, so a step may send the
    /// region the step before received.
    ///
    /// # Safety
    /// Every send and region must stay valid until this returns; each step's send must be final
    /// when the step starts (or be the region of the step just before) and stay unmodified; no
    /// region may be a later step's region or overlap memory sent by an earlier step or phase
    /// still in flight, and nothing else may touch the regions meanwhile.
    unsafe fn ring_phase<'a>(
        &'a self,
        seq: u64,
        desc: &OpDesc,
        steps: &[Step],
        sink: Sink,
        mut side: Option<SideCopy>,
    ) -> Result<(), CommError> {
        let (n, me) = (self.n(), self.me);
        let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
        let c = self.net.chunk;
        let expect = Header::new(DATA, desc, self.tag, seq, 0);
        let regions = steps.iter().map(|s| s.recv).collect();
        let plan = self.net.post_plan(self.ranks[prev], expect, sink, regions);
        // Declared after `plan`, so dropped (waiting for the writer) before it is withdrawn.
        let mut sends = Sends::new();
        let mut g = 0;
        for step in steps {
            let (ns, nr) = (frames(step.send_len, c), frames(step.recv.len, c));
            // Up to WINDOW chunks queued ahead of what this rank has received: enough to keep
            // the link busy, few enough that no inbox grows without bound (every rank paces its
            // sends by its receives, so a ring runs in step).
            let mut posted = 0;
            let mut post_upto = |upto: usize, sends: &mut Sends<'a>| -> Result<(), CommError> {
                while posted < upto.min(ns) {
                    let r = chunk_range(step.send_len, c, posted);
                    let data = std::slice::from_raw_parts(step.send.add(r.start), r.len());
                    self.post_data(sends, next, self.tag, seq, desc, data)?;
                    posted += 1;
                }
                Ok(())
            };
            post_upto(WINDOW, &mut sends)?;
            for i in 0..nr {
                self.await_frame(&plan, g, prev, seq, desc)?;
                g += 1;
                post_upto(i + 1 + WINDOW, &mut sends)?;
                if let Some(side) = &mut side {
                    side.advance(c);
                }
            }
            post_upto(ns, &mut sends)?;
        }
        if let Some(side) = &mut side {
            side.advance(usize::MAX);
        }
        drop(plan);
        self.finish_sends(sends, next, desc, seq)
    }

    /// Ring reduce-scatter over `buf` in place, cut into `n` segments (`seg(k)` bytes):
    /// afterwards this rank holds the finished reduction of its own segment.
    fn reduce_scatter_ring(
        &self,
        seq: u64,
        desc: &OpDesc,
        buf: &mut [u8],
        seg: &dyn Fn(usize) -> Range<usize>,
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let (n, me) = (self.n(), self.me);
        // Step s sends segment me-1-s and reduces segment me-2-s into place, which it sends at
        // step s+1: no segment is written after it was sent.
        let steps = in_place_steps(
            buf,
            n,
            seg,
            |s| (me + 2 * n - 1 - s) % n,
            |s| (me + 2 * n - 2 - s) % n,
        );
        // SAFETY: as above; `buf` is borrowed for the whole phase.
        unsafe { self.ring_phase(seq, desc, &steps, Sink::Reduce(kind, op), None)? };
        finish(kind, op, &mut buf[seg(me)], n);
        Ok(())
    }

    /// Ring all-gather: each rank ends with every segment of `buf`. Its own segment is there
    /// already, or, with `own`, comes from `own` (sent from there, and copied into place while
    /// the ring runs).
    fn all_gather_ring(
        &self,
        seq: u64,
        desc: &OpDesc,
        buf: &mut [u8],
        seg: &dyn Fn(usize) -> Range<usize>,
        own: Option<&[u8]>,
    ) -> Result<(), CommError> {
        let (n, me) = (self.n(), self.me);
        // Step s sends segment me-s and fills segment me-1-s, sent at step s+1; segments sent by
        // an earlier phase (all-reduce's reduce-scatter) were all written before it returned.
        let mut steps = in_place_steps(
            buf,
            n,
            seg,
            |s| (me + n - s) % n,
            |s| (me + 2 * n - 1 - s) % n,
        );
        let side = own.map(|own| {
            steps[0].send = own.as_ptr();
            SideCopy {
                src: own.as_ptr(),
                // SAFETY (of the pointer arithmetic): segment me lies within `buf`.
                dst: unsafe { buf.as_mut_ptr().add(seg(me).start) },
                len: own.len(),
                done: 0,
            }
        });
        // SAFETY: as above (segment me is neither sent nor received); `buf` and `own` are
        // borrowed for the whole phase.
        unsafe { self.ring_phase(seq, desc, &steps, Sink::Copy, side) }
    }

    fn all_reduce_impl(
        &self,
        desc: OpDesc,
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.check(seq, &desc)?;
        let (n, es) = (self.n(), kind.size());
        if n == 1 {
            return Ok(());
        }
        let elems = buf.len() / es;
        let seg = |k: usize| {
            let r = segment(elems, n, k);
            r.start * es..r.end * es
        };
        self.reduce_scatter_ring(seq, &desc, buf, &seg, kind, op)?;
        self.all_gather_ring(seq, &desc, buf, &seg, None)
    }
}

impl Communicator for TcpRank {
    fn rank(&self) -> usize {
        self.me
    }

    fn world_size(&self) -> usize {
        self.n()
    }

    fn all_reduce_bytes(
        &self,
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.guarded(|| {
            args::all_reduce(buf.len(), kind).map_err(|m| self.invalid(m))?;
            let desc = OpDesc::new(OpCode::AllReduce, buf.len()).reduce(kind, op);
            self.all_reduce_impl(desc, buf, kind, op)
        })
    }

    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        self.guarded(|| {
            let (n, len) = (self.n(), send.len());
            args::all_gather(len, recv.len(), n).map_err(|m| self.invalid(m))?;
            let desc = OpDesc::new(OpCode::AllGather, len);
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            self.check(seq, &desc)?;
            if n == 1 {
                recv.copy_from_slice(send);
                return Ok(());
            }
            self.all_gather_ring(seq, &desc, recv, &|k| k * len..(k + 1) * len, Some(send))
        })
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        self.guarded(|| {
            let n = self.n();
            args::rank("root", root, n).map_err(|m| self.invalid(m))?;
            let desc = OpDesc::new(OpCode::Broadcast, buf.len()).root(root);
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            self.check(seq, &desc)?;
            if n == 1 {
                return Ok(());
            }
            let pos = (self.me + n - root) % n;
            let (next, prev) = ((self.me + 1) % n, (self.me + n - 1) % n);
            let c = self.net.chunk;
            let (base, len) = (buf.as_mut_ptr(), buf.len());
            let plan = (pos > 0).then(|| {
                let expect = Header::new(DATA, &desc, self.tag, seq, 0);
                let region = Region {
                    dst: base,
                    local: base,
                    len,
                };
                // SAFETY: `buf` is borrowed for this call, and chunk i is read (sent on) only
                // once it has landed.
                unsafe {
                    self.net
                        .post_plan(self.ranks[prev], expect, Sink::Copy, vec![region])
                }
            });
            let mut sends = Sends::new();
            for i in 0..frames(len, c) {
                let r = chunk_range(len, c, i);
                if let Some(plan) = &plan {
                    self.await_frame(plan, i, prev, seq, &desc)?;
                }
                if pos < n - 1 {
                    // SAFETY: chunk i is final before it is queued and never written again;
                    // `sends` is waited for before returning.
                    unsafe {
                        let data = std::slice::from_raw_parts(base.add(r.start), r.len());
                        self.post_data(&mut sends, next, self.tag, seq, &desc, data)?
                    };
                }
            }
            drop(plan);
            self.finish_sends(sends, next, &desc, seq)
        })
    }

    fn reduce_scatter_bytes(
        &self,
        send: &[u8],
        recv: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.guarded(|| {
            let (n, per) = (self.n(), recv.len());
            args::reduce_scatter(send.len(), per, kind, n).map_err(|m| self.invalid(m))?;
            let desc = OpDesc::new(OpCode::ReduceScatter, send.len()).reduce(kind, op);
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            self.check(seq, &desc)?;
            if n == 1 {
                recv.copy_from_slice(send);
                return Ok(());
            }
            // Step s sends segment me-1-s (the input's, then what step s-1 reduced) and reduces
            // segment me-2-s of the input with what arrives into out(s): `recv` at the last step
            // (segment me), before that a slot of the scratch, each written once, so nothing
            // sent is written again and the input is never copied.
            let me = self.me;
            let mut work = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            if work.len() < (n - 2) * per {
                // Kept across calls: a fresh buffer per call would page-fault its way in.
                work.resize((n - 2) * per, 0);
            }
            let (input, scratch, last) = (send.as_ptr(), work.as_mut_ptr(), recv.as_mut_ptr());
            let out = |s: usize| {
                if s == n - 2 {
                    last
                } else {
                    // SAFETY (of the pointer arithmetic): slot s < n-2 lies within the scratch.
                    unsafe { scratch.add(s * per) }
                }
            };
            let steps: Vec<Step> = (0..n - 1)
                .map(|s| {
                    let (sk, rk) = ((me + 2 * n - 1 - s) % n, (me + 2 * n - 2 - s) % n);
                    // SAFETY (of the pointer arithmetic): segments lie within the input.
                    let send = if s == 0 {
                        unsafe { input.add(sk * per) }
                    } else {
                        out(s - 1) as *const u8
                    };
                    Step {
                        send,
                        send_len: per,
                        recv: Region {
                            dst: out(s),
                            local: unsafe { input.add(rk * per) },
                            len: per,
                        },
                    }
                })
                .collect();
            // SAFETY: as above; `send`, `recv` and the scratch are borrowed for the whole phase.
            unsafe { self.ring_phase(seq, &desc, &steps, Sink::Reduce(kind, op), None)? };
            drop(work);
            finish(kind, op, recv, n);
            Ok(())
        })
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.guarded(|| {
            let desc = OpDesc::new(OpCode::Barrier, 0);
            // Zero-byte ring all-reduce: one empty frame per step carries the dependency.
            self.all_reduce_impl(desc, &mut [], ElemKind::U8, ReduceOp::Max)
        })
    }

    fn send_bytes(&self, buf: &[u8], dst: usize) -> Result<(), CommError> {
        self.guarded(|| {
            args::rank("destination", dst, self.n()).map_err(|m| self.invalid(m))?;
            let seq = {
                let mut s = self.p2p_sent.lock().unwrap_or_else(|e| e.into_inner());
                s[dst] += 1;
                s[dst] - 1
            };
            let desc = OpDesc::new(OpCode::Send, buf.len());
            let c = self.net.chunk;
            let mut sends = Sends::new();
            for i in 0..frames(buf.len(), c) {
                let r = chunk_range(buf.len(), c, i);
                // SAFETY: `buf` is borrowed for this call; `sends` is waited for before it ends.
                unsafe { self.post_data(&mut sends, dst, self.tag | P2P, seq, &desc, &buf[r])? };
            }
            self.finish_sends(sends, dst, &desc, seq)
        })
    }

    fn recv_bytes(&self, buf: &mut [u8], src: usize) -> Result<(), CommError> {
        self.guarded(|| {
            args::rank("source", src, self.n()).map_err(|m| self.invalid(m))?;
            let seq = {
                let mut s = self.p2p_recvd.lock().unwrap_or_else(|e| e.into_inner());
                s[src] += 1;
                s[src] - 1
            };
            let c = self.net.chunk;
            let len = buf.len();
            for i in 0..frames(len, c) {
                let r = chunk_range(len, c, i);
                let peer = self.ranks[src];
                let f = self.net.take(peer, self.tag | P2P, &|| format!("recv from rank {peer}"))?;
                if f.hdr.total != len as u64 || f.hdr.seq != seq || f.payload.len() != r.len() {
                    return Err(CommError::Mismatch {
                        rank: self.world_rank(),
                        msg: format!(
                            "rank {} receives {len} bytes (message #{seq}) but rank {peer} sent {} bytes (message #{})",
                            self.world_rank(),
                            f.hdr.total,
                            f.hdr.seq
                        ),
                    });
                }
                buf[r].copy_from_slice(&f.payload);
                self.net.inbox.recycle(f.payload);
            }
            Ok(())
        })
    }

    fn sub_group(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>, CommError> {
        crate::mesh::check_sub_group(self.me, self.n(), ranks)?;
        let world: Vec<usize> = ranks.iter().map(|&r| self.ranks[r]).collect();
        let nth = {
            let mut c = self.created.lock().unwrap_or_else(|e| e.into_inner());
            let e = c.entry(world.clone()).or_insert(0);
            *e += 1;
            *e - 1
        };
        let mut parts = vec![self.tag, nth, world.len() as u64];
        parts.extend(world.iter().map(|&r| r as u64));
        let tag = fnv(&parts);
        Ok(Box::new(CommStream::new(TcpRank::group(
            self.net.clone(),
            world,
            tag,
        ))))
    }

    fn abort(&self, reason: &str) {
        self.net.abort(reason);
    }

    fn aborted(&self) -> Option<String> {
        let st = self.net.inbox.lock();
        if let Some(reason) = &st.aborted {
            return Some(reason.clone());
        }
        // A peer of this group whose connection ended.
        self.ranks
            .iter()
            .filter(|&&w| w != self.net.rank)
            .find_map(|&w| st.closed.get(w).cloned().flatten())
    }
}

//! The TCP backend's collectives: rings over the connections of [`super::Net`].
//!
//! all-reduce = ring reduce-scatter + ring all-gather (each rank sends and receives 2(n-1)/n of
//! the buffer, the bandwidth optimum); reduce-scatter and all-gather are those rings alone;
//! broadcast is a pipelined chain from the root; send/recv go straight to the peer. Every step
//! moves its segment in chunks, queued to the connection's writer thread a few chunks ahead of
//! those received, so the wire stays busy in both directions while this rank reduces what
//! already arrived. Segment `k` is reduced in ring
//! order starting at rank `k + 1` ([`crate::reduce`]), which the in-process backend reproduces.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::{fnv, Sends, TcpRank, P2P};
use crate::check::{OpCode, OpDesc};
use crate::reduce::{combine, finish, segment};
use crate::{CommError, CommStream, Communicator, ElemKind, ReduceOp};

/// Chunks a ring step queues ahead of the chunks it has received.
const WINDOW: usize = 4;

fn frames(len: usize, chunk: usize) -> usize {
    len.div_ceil(chunk).max(1)
}

fn chunk_range(len: usize, chunk: usize, i: usize) -> Range<usize> {
    (i * chunk).min(len)..((i + 1) * chunk).min(len)
}

/// `(&buf[a], &mut buf[b])` for disjoint ranges.
fn split2(buf: &mut [u8], a: Range<usize>, b: Range<usize>) -> (&[u8], &mut [u8]) {
    if b.is_empty() {
        return (&buf[a], &mut []);
    }
    if a.is_empty() {
        return (&[], &mut buf[b]);
    }
    if a.end <= b.start {
        let (x, y) = buf.split_at_mut(b.start);
        (&x[a], &mut y[..b.len()])
    } else {
        let (x, y) = buf.split_at_mut(a.start);
        (&y[..a.len()], &mut x[b])
    }
}

impl TcpRank {
    /// One ring step: queues `send` to group rank `to` (the connection's writer thread streams
    /// it) while this thread receives `recv.len()` bytes from `from`, applying each received
    /// chunk to its place in `recv` as it arrives.
    ///
    /// # Safety
    /// `send` must stay valid and unmodified until `sends` is finished or dropped.
    #[allow(clippy::too_many_arguments)]
    unsafe fn ring_step<'a>(
        &'a self,
        sends: &mut Sends<'a>,
        seq: u64,
        desc: &OpDesc,
        send: &[u8],
        to: usize,
        recv: &mut [u8],
        from: usize,
        apply: &dyn Fn(&mut [u8], &[u8]),
    ) -> Result<(), CommError> {
        let c = self.net.chunk;
        let (ns, nr) = (frames(send.len(), c), frames(recv.len(), c));
        // Up to WINDOW chunks queued ahead of what this rank has received: enough to keep the
        // link busy while it reduces, few enough that no inbox grows without bound (every rank
        // paces its sends by its receives, so a ring runs in step).
        let mut posted = 0;
        let mut post_upto = |upto: usize, sends: &mut Sends<'a>| -> Result<(), CommError> {
            while posted < upto.min(ns) {
                let r = chunk_range(send.len(), c, posted);
                self.post_data(sends, to, self.tag, seq, desc, &send[r])?;
                posted += 1;
            }
            Ok(())
        };
        post_upto(WINDOW, sends)?;
        for i in 0..nr {
            let r = chunk_range(recv.len(), c, i);
            let data = self.recv_data(from, self.tag, seq, desc, r.len())?;
            apply(&mut recv[r], &data);
            self.net.inbox.recycle(data);
            post_upto(i + 1 + WINDOW, sends)?;
        }
        post_upto(ns, sends)
    }

    /// Ring reduce-scatter over `buf` cut into `n` segments (`seg(k)` bytes): afterwards this rank
    /// holds the finished reduction of its own segment.
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
        let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
        let mut sends = Sends::new();
        for s in 0..n - 1 {
            let (sk, rk) = ((me + 2 * n - 1 - s) % n, (me + 2 * n - 2 - s) % n);
            let (snd, rcv) = split2(buf, seg(sk), seg(rk));
            // SAFETY: step s sends segment me-1-s and writes segment me-2-s, which it sends at
            // step s+1; so no segment is written after it was queued, and `sends` is finished
            // (or dropped, which waits) before `buf` is released.
            unsafe {
                self.ring_step(&mut sends, seq, desc, snd, next, rcv, prev, &|dst, src| {
                    combine(kind, op, dst, src)
                })?;
            }
        }
        self.finish_sends(sends, next, desc, seq)?;
        finish(kind, op, &mut buf[seg(me)], n);
        Ok(())
    }

    /// Ring all-gather: each rank starts with its own segment filled in, ends with all of them.
    fn all_gather_ring(
        &self,
        seq: u64,
        desc: &OpDesc,
        buf: &mut [u8],
        seg: &dyn Fn(usize) -> Range<usize>,
    ) -> Result<(), CommError> {
        let (n, me) = (self.n(), self.me);
        let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
        let mut sends = Sends::new();
        for s in 0..n - 1 {
            let (sk, rk) = ((me + n - s) % n, (me + 2 * n - 1 - s) % n);
            let (snd, rcv) = split2(buf, seg(sk), seg(rk));
            // SAFETY: step s sends segment me-s and fills segment me-1-s, sent at step s+1:
            // nothing queued is written again, and `sends` is waited for before returning.
            unsafe {
                self.ring_step(&mut sends, seq, desc, snd, next, rcv, prev, &|dst, src| {
                    dst.copy_from_slice(src)
                })?;
            }
        }
        self.finish_sends(sends, next, desc, seq)
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
        self.all_gather_ring(seq, &desc, buf, &seg)
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
            if !buf.len().is_multiple_of(kind.size()) {
                return Err(self.invalid(format!("all_reduce of {} bytes of {kind:?}", buf.len())));
            }
            let desc = OpDesc::new(OpCode::AllReduce, buf.len()).reduce(kind, op);
            self.all_reduce_impl(desc, buf, kind, op)
        })
    }

    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        self.guarded(|| {
            let (n, len) = (self.n(), send.len());
            if recv.len() != len * n {
                return Err(self.invalid(format!(
                    "all_gather of {len} bytes needs a receive buffer of {}, got {}",
                    len * n,
                    recv.len()
                )));
            }
            let desc = OpDesc::new(OpCode::AllGather, len);
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            self.check(seq, &desc)?;
            recv[self.me * len..(self.me + 1) * len].copy_from_slice(send);
            if n > 1 {
                self.all_gather_ring(seq, &desc, recv, &|k| k * len..(k + 1) * len)?;
            }
            Ok(())
        })
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        self.guarded(|| {
            let n = self.n();
            if root >= n {
                return Err(self.invalid(format!("root {root} is not a rank of a group of {n}")));
            }
            let desc = OpDesc::new(OpCode::Broadcast, buf.len()).root(root);
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            self.check(seq, &desc)?;
            if n == 1 {
                return Ok(());
            }
            let pos = (self.me + n - root) % n;
            let (next, prev) = ((self.me + 1) % n, (self.me + n - 1) % n);
            let c = self.net.chunk;
            let mut sends = Sends::new();
            for i in 0..frames(buf.len(), c) {
                let r = chunk_range(buf.len(), c, i);
                if pos > 0 {
                    let data = self.recv_data(prev, self.tag, seq, &desc, r.len())?;
                    buf[r.clone()].copy_from_slice(&data);
                    self.net.inbox.recycle(data);
                }
                if pos < n - 1 {
                    // SAFETY: chunk i is final before it is queued and never written again;
                    // `sends` is waited for before returning.
                    unsafe { self.post_data(&mut sends, next, self.tag, seq, &desc, &buf[r])? };
                }
            }
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
            if send.len() != per * n || !per.is_multiple_of(kind.size()) {
                return Err(self.invalid(format!(
                    "reduce_scatter of {} bytes into {per} bytes on {n} ranks",
                    send.len()
                )));
            }
            let desc = OpDesc::new(OpCode::ReduceScatter, send.len()).reduce(kind, op);
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            self.check(seq, &desc)?;
            // Reused across calls: a fresh buffer per call would page-fault its way in.
            let mut work = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            work.clear();
            work.extend_from_slice(send);
            if n > 1 {
                self.reduce_scatter_ring(
                    seq,
                    &desc,
                    &mut work,
                    &|k| k * per..(k + 1) * per,
                    kind,
                    op,
                )?;
            }
            recv.copy_from_slice(&work[self.me * per..(self.me + 1) * per]);
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
            if dst >= self.n() {
                return Err(self.invalid(format!(
                    "destination {dst} is not a rank of a group of {}",
                    self.n()
                )));
            }
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
            if src >= self.n() {
                return Err(self.invalid(format!("source {src} is not a rank of a group of {}", self.n())));
            }
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
}

//! Posted receives: a ring phase tells the connections' reader threads where each incoming chunk
//! goes. A chunk to copy (all-gather, broadcast) is read from the socket straight into its final
//! place: not queued, not copied again, not handed to the rank's thread, which only waits for the
//! chunks to land and paces its sends. A chunk to reduce takes the inbox path (into a recycled,
//! cache-warm buffer) and the rank's thread reduces it into place: receiving and reducing then run
//! on two cores at once, measured faster than both on the reader's.
//!
//! A frame the reader cannot place (it came before the phase posted its plan, or it is not the
//! frame the plan expects: another op, size or sequence number) takes the inbox path too; the
//! rank's thread then applies it, or reports the mismatch, as it would without a plan.

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::time::{Duration, Instant};

use super::{Header, Inbox, Net, TcpRank, DATA};
use crate::check::OpDesc;
use crate::reduce::{combine, combine_into};
use crate::{CommError, ElemKind, ReduceOp};

/// How long withdrawing a plan waits for the reader to finish the frame it is writing into the
/// plan's memory, before shutting the connection's reading side to stop it (only after a failure).
const WITHDRAW_GRACE: Duration = Duration::from_millis(200);

/// What happens to received bytes.
#[derive(Clone, Copy, Debug)]
pub(super) enum Sink {
    Copy,
    Reduce(ElemKind, ReduceOp),
}

/// Where one ring step's incoming bytes go: `dst[i] = received[i]` for a copy, `dst[i] = local[i]
/// op received[i]` for a reduction (`local == dst` reduces in place).
#[derive(Clone, Copy)]
pub(super) struct Region {
    pub dst: *mut u8,
    pub local: *const u8,
    pub len: usize,
}

/// The frames one ring phase expects from one peer, in order, and where each goes.
pub(super) struct Plan {
    tag: u64,
    expect: Header,
    sink: Sink,
    chunk: usize,
    regions: Vec<Region>,
    /// The frame index each region starts at, and the total.
    starts: Vec<usize>,
    /// The next frame to place, by the reader or (from the inbox) the rank's thread.
    next: usize,
    /// The reader is writing frame `next` into place.
    busy: bool,
    withdrawn: bool,
}

// SAFETY: the regions' memory is only touched while the plan is posted, and the poster keeps it
// valid (and does not touch the parts not yet placed) until the plan is withdrawn ([`PlanGuard`]).
unsafe impl Send for Plan {}

/// One frame's place: `range` of `region`.
#[derive(Clone)]
pub(super) struct Target {
    sink: Sink,
    region: Region,
    range: Range<usize>,
}

impl Plan {
    fn place(&self, g: usize) -> Option<Target> {
        let r = (0..self.regions.len()).find(|&r| g < self.starts[r + 1])?;
        let region = self.regions[r];
        let i = g - self.starts[r];
        let range = (i * self.chunk).min(region.len)..((i + 1) * self.chunk).min(region.len);
        Some(Target {
            sink: self.sink,
            region,
            range,
        })
    }

    /// Whether `h` is the frame this plan expects next, `len` bytes long.
    fn expects(&self, h: &Header, len: usize) -> bool {
        let e = &self.expect;
        h.kind == DATA
            && (h.code, h.elem, h.redop, h.root) == (e.code, e.elem, e.redop, e.root)
            && (h.tag, h.seq, h.total) == (e.tag, e.seq, e.total)
            && h.len == len as u64
    }
}

impl Target {
    fn len(&self) -> usize {
        self.range.len()
    }

    /// Applies received bytes `x` to the first `x.len()` bytes of this place from `off`.
    ///
    /// # Safety
    /// The region must be valid, and those bytes of it touched by no one else meanwhile.
    unsafe fn apply(&self, off: usize, x: &[u8]) {
        let at = self.range.start + off;
        let dst = std::slice::from_raw_parts_mut(self.region.dst.add(at), x.len());
        match self.sink {
            Sink::Copy => dst.copy_from_slice(x),
            Sink::Reduce(kind, op) => {
                if std::ptr::eq(self.region.local, self.region.dst) {
                    combine(kind, op, dst, x)
                } else {
                    let local = std::slice::from_raw_parts(self.region.local.add(at), x.len());
                    combine_into(kind, op, dst, local, x)
                }
            }
        }
    }

    /// Reads this frame's payload (a copy) from `s` straight into place.
    ///
    /// # Safety
    /// As for [`Target::apply`]: the reader claimed this place from a posted plan.
    pub(super) unsafe fn fill(&self, s: &mut TcpStream) -> std::io::Result<()> {
        let dst = std::slice::from_raw_parts_mut(self.region.dst.add(self.range.start), self.len());
        s.read_exact(dst)
    }
}

impl Inbox {
    /// The place of frame `h` from `peer`, when a posted plan expects it now and copies it; the
    /// reader then owns that place until [`Inbox::release`].
    pub(super) fn claim(&self, peer: usize, h: &Header) -> Option<Target> {
        let mut st = self.lock();
        let st = &mut *st;
        // Frames of one tag are placed in order: not past one waiting in the queue.
        if st.queues[peer].iter().any(|f| f.hdr.tag == h.tag) {
            return None;
        }
        let plan = st.plans[peer]
            .iter_mut()
            .find(|p| p.tag == h.tag && !p.withdrawn && matches!(p.sink, Sink::Copy))?;
        let t = plan.place(plan.next)?;
        if !plan.expects(h, t.len()) {
            return None;
        }
        plan.busy = true;
        Some(t)
    }

    /// The reader is done with the place it claimed; `placed`: the frame is all there.
    pub(super) fn release(&self, peer: usize, tag: u64, placed: bool) {
        let mut st = self.lock();
        if let Some(p) = st.plans[peer].iter_mut().find(|p| p.tag == tag && p.busy) {
            p.busy = false;
            if placed {
                p.next += 1;
            }
        }
        self.cv.notify_all();
    }
}

/// A posted plan; withdrawn when dropped, once the reader no longer writes into its memory.
pub(super) struct PlanGuard<'a> {
    inbox: &'a Inbox,
    peer: usize,
    tag: u64,
}

impl Net {
    /// Posts where the frames with `expect`'s tag, op and sequence number from `peer` go: frame by
    /// frame (chunks of `self.chunk`), `regions` one after the other.
    ///
    /// # Safety
    /// Every region must stay valid until the guard is dropped, and no part of it be read or
    /// written by anyone else before [`TcpRank::await_frame`] said that part is in place.
    pub(super) unsafe fn post_plan(
        &self,
        peer: usize,
        expect: Header,
        sink: Sink,
        regions: Vec<Region>,
    ) -> PlanGuard<'_> {
        self.inbox
            .post_plan(peer, self.chunk, expect, sink, regions)
    }
}

impl Inbox {
    /// [`Net::post_plan`], with chunks of `chunk` bytes.
    ///
    /// # Safety
    /// As for [`Net::post_plan`].
    unsafe fn post_plan(
        &self,
        peer: usize,
        chunk: usize,
        expect: Header,
        sink: Sink,
        regions: Vec<Region>,
    ) -> PlanGuard<'_> {
        let mut starts = vec![0];
        for r in &regions {
            let last = starts[starts.len() - 1];
            starts.push(last + r.len.div_ceil(chunk).max(1));
        }
        let plan = Plan {
            tag: expect.tag,
            expect,
            sink,
            chunk,
            regions,
            starts,
            next: 0,
            busy: false,
            withdrawn: false,
        };
        let mut st = self.lock();
        st.plans[peer].push(plan);
        PlanGuard {
            inbox: self,
            peer,
            tag: expect.tag,
        }
    }
}

impl Drop for PlanGuard<'_> {
    fn drop(&mut self) {
        let inbox = self.inbox;
        let mut st = inbox.lock();
        let find = |plans: &mut Vec<Plan>| plans.iter().position(|p| p.tag == self.tag);
        let Some(i) = find(&mut st.plans[self.peer]) else {
            return;
        };
        st.plans[self.peer][i].withdrawn = true;
        // Only after a failure can the reader still be writing here: the frame stops midway (the
        // peer stalled) or soon completes. Past the grace period, shutting the reading side ends
        // its read at once; the connection is of no more use to a job that failed anyway.
        let grace = Instant::now() + WITHDRAW_GRACE;
        let mut shut = false;
        loop {
            let Some(i) = find(&mut st.plans[self.peer]) else {
                return;
            };
            if !st.plans[self.peer][i].busy {
                st.plans[self.peer].remove(i);
                return;
            }
            if !shut && Instant::now() >= grace {
                if let Some(s) = &inbox.socks[self.peer] {
                    let _ = s.shutdown(Shutdown::Read);
                }
                shut = true;
            }
            st = inbox
                .cv
                .wait_timeout(st, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl TcpRank {
    /// Waits until frame `g` of `plan` (from group rank `from`) is in place, placing it here when
    /// it came through the inbox; with the deadline, and failing as soon as the peer is lost, the
    /// job aborted, or the frame is not what this rank issued.
    pub(super) fn await_frame(
        &self,
        plan: &PlanGuard<'_>,
        g: usize,
        from: usize,
        seq: u64,
        desc: &OpDesc,
    ) -> Result<(), CommError> {
        let peer = plan.peer;
        debug_assert_eq!(peer, self.ranks[from]);
        let deadline = Instant::now() + self.net.timeout;
        let inbox = &self.net.inbox;
        let mut guard = inbox.lock();
        loop {
            let st = &mut *guard;
            let Some(p) = st.plans[peer].iter_mut().find(|p| p.tag == plan.tag) else {
                return Err(self.invalid("a posted receive vanished".into()));
            };
            if p.next > g {
                return Ok(());
            }
            if !p.busy {
                if let Some(i) = st.queues[peer].iter().position(|f| f.hdr.tag == plan.tag) {
                    let t = p.place(g);
                    p.next += 1;
                    let f = st.queues[peer].remove(i);
                    drop(guard);
                    let (Some(f), Some(t)) = (f, t) else {
                        return Err(self.invalid("a frame past the end of a ring phase".into()));
                    };
                    self.check_frame(&f, from, seq, desc, t.len())?;
                    // SAFETY: the plan's poster guarantees the region; the reader skips this
                    // frame (its `next` is past it).
                    unsafe { t.apply(0, &f.payload) };
                    inbox.recycle(f.payload);
                    return Ok(());
                }
            }
            if let Some(reason) = &st.aborted {
                return Err(CommError::Aborted {
                    rank: self.world_rank(),
                    reason: reason.clone(),
                });
            }
            if let Some(why) = &st.closed[peer] {
                return Err(CommError::PeerLost {
                    rank: self.world_rank(),
                    peer,
                    msg: format!("{why}, during {}", self.what(desc, seq)),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    rank: self.world_rank(),
                    op: self.what(desc, seq),
                    secs: self.net.timeout.as_secs_f64(),
                    missing: vec![peer],
                });
            }
            guard = inbox
                .cv
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::{Arc, Condvar, Mutex};

    use super::super::{reader, InboxState};
    use super::*;
    use crate::check::OpCode;

    /// An inbox whose peer 0 is the far end of a loopback connection, with its reader thread
    /// running; and that far end, to write frames into.
    fn inbox_with_reader() -> (Arc<Inbox>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let far = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (near, _) = l.accept().unwrap();
        let inbox = Arc::new(Inbox {
            st: Mutex::new(InboxState {
                queues: vec![VecDeque::new()],
                closed: vec![None],
                aborted: None,
                plans: vec![Vec::new()],
            }),
            cv: Condvar::new(),
            pool: Mutex::new(Vec::new()),
            socks: vec![Some(near.try_clone().unwrap())],
        });
        let i2 = inbox.clone();
        std::thread::spawn(move || reader(0, near, i2));
        (inbox, far)
    }

    fn wait_until(inbox: &Inbox, cond: impl Fn(&InboxState) -> bool) {
        let mut st = inbox.lock();
        while !cond(&st) {
            // Polls too: claiming a frame notifies no one.
            st = inbox
                .cv
                .wait_timeout(st, Duration::from_millis(5))
                .unwrap()
                .0;
        }
    }

    fn frame(seq: u64, len: usize) -> [u8; super::super::HEADER] {
        let desc = OpDesc::new(OpCode::AllGather, 64);
        Header::new(DATA, &desc, 7, seq, len).encode()
    }

    fn copy_plan<'a>(inbox: &'a Inbox, buf: &mut [u8]) -> PlanGuard<'a> {
        let desc = OpDesc::new(OpCode::AllGather, 64);
        let region = Region {
            dst: buf.as_mut_ptr(),
            local: buf.as_ptr(),
            len: buf.len(),
        };
        // SAFETY: the tests keep `buf` alive and untouched until the guard is dropped.
        unsafe {
            inbox.post_plan(
                0,
                32,
                Header::new(DATA, &desc, 7, 3, 0),
                Sink::Copy,
                vec![region],
            )
        }
    }

    #[test]
    fn chunks_land_in_place_and_a_frame_stalled_midway_is_let_go() {
        let (inbox, mut far) = inbox_with_reader();
        let mut buf = vec![0u8; 64];
        let plan = copy_plan(&inbox, &mut buf);
        far.write_all(&frame(3, 32)).unwrap();
        far.write_all(&[5; 32]).unwrap();
        wait_until(&inbox, |st| st.plans[0][0].next == 1);
        assert!(
            inbox.lock().queues[0].is_empty(),
            "the chunk went into place, not the inbox"
        );
        // The second chunk stops halfway, with the peer still connected: withdrawing the plan
        // must not wait for the rest (it stops the reader instead).
        far.write_all(&frame(3, 32)).unwrap();
        far.write_all(&[6; 16]).unwrap();
        wait_until(&inbox, |st| st.plans[0][0].busy);
        drop(plan);
        assert!(inbox.lock().plans[0].is_empty());
        wait_until(&inbox, |st| st.closed[0].is_some());
        assert_eq!(buf[..32], [5; 32]);
    }

    #[test]
    fn a_frame_the_plan_does_not_expect_goes_to_the_inbox() {
        let (inbox, mut far) = inbox_with_reader();
        let mut buf = vec![0u8; 64];
        let plan = copy_plan(&inbox, &mut buf);
        far.write_all(&frame(4, 32)).unwrap(); // another sequence number
        far.write_all(&[9; 32]).unwrap();
        wait_until(&inbox, |st| !st.queues[0].is_empty());
        assert_eq!(inbox.lock().plans[0][0].next, 0);
        drop(plan);
        assert_eq!(buf, vec![0u8; 64]);
    }
}

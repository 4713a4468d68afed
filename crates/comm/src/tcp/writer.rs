//! One writer thread per connection, so a rank's sends run while its own thread receives and
//! reduces: the ring's link never idles while this rank computes, and the other way round.
//!
//! Frames are posted to a FIFO queue and written in order (header and payload with one vectored
//! write). A payload is either owned, or borrowed memory ([`Payload::Raw`]) that the poster
//! keeps alive and unmodified until the frame is written: [`Sends`] tracks what a collective
//! posted and waits for it before the collective returns, even when it fails (its `Drop` skips
//! what is still queued, then waits for the frame being written).

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::HEADER;

pub(super) enum Payload {
    Owned(Vec<u8>),
    /// `len` bytes at a pointer that stays valid and unmodified until the job is done.
    Raw(*const u8, usize),
}

struct Job {
    id: u64,
    hdr: [u8; HEADER],
    data: Payload,
    skip: bool,
}

// SAFETY: a `Raw` payload is only read, and its poster waits for the job before the memory is
// written or freed (see `Sends`).
unsafe impl Send for Job {}

/// Why a connection's writes stopped: the first failed write.
#[derive(Clone, Debug)]
pub(super) struct WriteFailure {
    pub kind: ErrorKind,
    pub msg: String,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    next_id: u64,
    /// Every job with an id below this is finished (written, failed or skipped).
    done: u64,
    /// The id of the first job that failed, and why; every later job fails with it.
    failed: Option<(u64, WriteFailure)>,
    closing: bool,
    exited: bool,
}

/// How long closing a connection waits for its queued frames to be written.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

pub(super) struct Writer {
    st: Mutex<State>,
    cv: Condvar,
    sock: TcpStream,
}

impl Writer {
    pub(super) fn start(peer: usize, sock: TcpStream) -> std::io::Result<Arc<Writer>> {
        let w = Arc::new(Writer {
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
            sock: sock.try_clone()?,
        });
        let w2 = w.clone();
        std::thread::Builder::new()
            .name(format!("comm-writer-{peer}"))
            .spawn(move || w2.run(sock))?;
        Ok(w)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, mut s: TcpStream) {
        struct Exit<'a>(&'a Writer);
        impl Drop for Exit<'_> {
            fn drop(&mut self) {
                let mut st = self.0.lock();
                st.exited = true;
                if st.failed.is_none() && !st.queue.is_empty() {
                    let first = st.done;
                    st.failed = Some((
                        first,
                        WriteFailure {
                            kind: ErrorKind::NotConnected,
                            msg: "the connection's writer stopped".into(),
                        },
                    ));
                }
                st.queue.clear();
                st.done = st.next_id;
                self.0.cv.notify_all();
            }
        }
        let _exit = Exit(self);
        loop {
            let (job, ok) = {
                let mut st = self.lock();
                loop {
                    if let Some(j) = st.queue.pop_front() {
                        break (j, st.failed.is_none());
                    }
                    if st.closing {
                        return;
                    }
                    st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            let res = if ok && !job.skip {
                let data: &[u8] = match &job.data {
                    Payload::Owned(v) => v,
                    // SAFETY: see `Payload::Raw`.
                    Payload::Raw(p, len) => unsafe { std::slice::from_raw_parts(*p, *len) },
                };
                write_frame(&mut s, &job.hdr, data)
            } else {
                Ok(())
            };
            let mut st = self.lock();
            if let Err(e) = res {
                if st.failed.is_none() {
                    st.failed = Some((
                        job.id,
                        WriteFailure {
                            kind: e.kind(),
                            msg: e.to_string(),
                        },
                    ));
                }
            }
            st.done = job.id + 1;
            self.cv.notify_all();
        }
    }

    /// Queues a frame; its id, to wait for. Fails at once when an earlier write failed.
    pub(super) fn post(&self, hdr: [u8; HEADER], data: Payload) -> Result<u64, WriteFailure> {
        let mut st = self.lock();
        if let Some((_, f)) = &st.failed {
            return Err(f.clone());
        }
        if st.exited || st.closing {
            return Err(WriteFailure {
                kind: ErrorKind::NotConnected,
                msg: "the connection is closed".into(),
            });
        }
        let id = st.next_id;
        st.next_id += 1;
        st.queue.push_back(Job {
            id,
            hdr,
            data,
            skip: false,
        });
        self.cv.notify_all();
        Ok(id)
    }

    /// Waits until job `id` is finished (each write is bounded by the socket's write timeout);
    /// with `limit`, gives up after it (only for owned payloads). Its outcome.
    pub(super) fn wait(&self, id: u64, limit: Option<Duration>) -> Result<(), WriteFailure> {
        let deadline = limit.map(|l| Instant::now() + l);
        let mut st = self.lock();
        while st.done <= id {
            match deadline {
                None => st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(WriteFailure {
                            kind: ErrorKind::TimedOut,
                            msg: "timed out".into(),
                        });
                    }
                    st = self
                        .cv
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        match &st.failed {
            Some((first, f)) if *first <= id => Err(f.clone()),
            _ => Ok(()),
        }
    }

    /// Marks the still-queued jobs with ids in `ids` to be skipped.
    fn skip(&self, ids: std::ops::Range<u64>) {
        let mut st = self.lock();
        for j in st.queue.iter_mut().filter(|j| ids.contains(&j.id)) {
            j.skip = true;
        }
    }

    pub(super) fn set_write_timeout(&self, d: Duration) {
        let _ = self.sock.set_write_timeout(Some(d));
    }

    /// Ends the thread once the queue is drained, and the connection (which ends the reader).
    pub(super) fn close(&self) {
        // Frames already queued (an abort message telling the peer why this rank stops, say) go
        // out before the connection closes, for at most `CLOSE_FLUSH`; a closed socket would
        // otherwise reach the peer first and hide the reason.
        let deadline = Instant::now() + CLOSE_FLUSH;
        let mut st = self.lock();
        st.closing = true;
        self.cv.notify_all();
        while !st.exited && st.done < st.next_id {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(st);
        // Half-close: the peer reads everything sent, then end-of-file. (A full close with
        // unread bytes in our receive buffer would send a reset, and the peer could lose the
        // queued frames.)
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

/// Writes a header and its payload, as few system calls as the socket allows.
fn write_frame(s: &mut TcpStream, hdr: &[u8], data: &[u8]) -> std::io::Result<()> {
    let total = hdr.len() + data.len();
    let mut off = 0;
    while off < total {
        let r = if off < hdr.len() {
            s.write_vectored(&[IoSlice::new(&hdr[off..]), IoSlice::new(data)])
        } else {
            s.write(&data[off - hdr.len()..])
        };
        match r {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The frames one operation posted to one connection. Waits for them when dropped, so borrowed
/// payloads are never used after the operation returns.
pub(super) struct Sends<'a> {
    w: Option<&'a Writer>,
    first: u64,
    /// One past the last id posted.
    end: u64,
}

impl<'a> Sends<'a> {
    pub(super) fn new() -> Self {
        Sends {
            w: None,
            first: 0,
            end: 0,
        }
    }

    /// Queues `data` to `w`.
    ///
    /// # Safety
    /// `data` must stay valid and unmodified until this `Sends` is finished or dropped.
    pub(super) unsafe fn post(
        &mut self,
        w: &'a Writer,
        hdr: [u8; HEADER],
        data: &[u8],
    ) -> Result<(), WriteFailure> {
        if let Some(prev) = self.w {
            if !std::ptr::eq(prev, w) {
                // One connection per tracker; finish the previous one first.
                self.wait_all()?;
                self.w = None;
            }
        }
        let id = w.post(hdr, Payload::Raw(data.as_ptr(), data.len()))?;
        if self.w.is_none() {
            self.w = Some(w);
            self.first = id;
        }
        self.end = id + 1;
        Ok(())
    }

    fn wait_all(&mut self) -> Result<(), WriteFailure> {
        match self.w {
            Some(w) if self.end > self.first => w.wait(self.end - 1, None),
            _ => Ok(()),
        }
    }

    /// Waits until everything posted is written; the first failure, if any.
    pub(super) fn finish(mut self) -> Result<(), WriteFailure> {
        let r = self.wait_all();
        self.w = None;
        r
    }
}

impl Drop for Sends<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.w {
            w.skip(self.first..self.end);
            let _ = self.wait_all();
        }
    }
}

//! `CommStream`: a backend's blocking collectives plus a comm stream, the CPU counterpart of the
//! CUDA stream an NCCL communicator runs on.
//!
//! Asynchronous operations go, in issue order, to one progress thread per communicator (started
//! on first use); a blocking operation first waits for the ones issued before it, then runs on the
//! caller's thread. So every rank executes its operations in the order it issued them, whatever
//! mix of blocking and asynchronous calls it made, and the bytes on the wire stay in step.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::work::{run_op, AsyncOp, Work, WorkHandle};
use crate::{CommError, Communicator, ElemKind, OwnedBuf, ReduceOp};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain counters behind; carrying on is safe.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Queue {
    /// Operations issued but not finished.
    pending: Mutex<usize>,
    idle: Condvar,
    /// Held by whoever executes an operation: the progress thread or a blocking caller.
    exec: Mutex<()>,
}

struct Slot {
    result: Mutex<Option<Result<OwnedBuf, CommError>>>,
    done: Condvar,
}

struct SlotHandle(Arc<Slot>);

impl WorkHandle for SlotHandle {
    fn is_complete(&self) -> bool {
        lock(&self.0.result).is_some()
    }

    fn wait(self: Box<Self>) -> Result<OwnedBuf, CommError> {
        let mut r = lock(&self.0.result);
        loop {
            if let Some(res) = r.take() {
                return res;
            }
            // The operation itself has deadlines, so this wait ends.
            r = self.0.done.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Job {
    op: AsyncOp,
    slot: Arc<Slot>,
}

/// A backend `E` with a comm stream; see the module docs. [`crate::LocalComm`] and
/// [`crate::TcpComm`] are this over their backends.
pub struct CommStream<E: Communicator + 'static> {
    exec: Arc<E>,
    queue: Arc<Queue>,
    worker: Mutex<Option<(Sender<Job>, JoinHandle<()>)>>,
}

impl<E: Communicator + 'static> CommStream<E> {
    pub(crate) fn new(exec: E) -> Self {
        CommStream {
            exec: Arc::new(exec),
            queue: Arc::new(Queue {
                pending: Mutex::new(0),
                idle: Condvar::new(),
                exec: Mutex::new(()),
            }),
            worker: Mutex::new(None),
        }
    }

    /// Waits for every asynchronous operation issued so far, then holds the execution lock.
    fn ordered(&self) -> MutexGuard<'_, ()> {
        let mut p = lock(&self.queue.pending);
        while *p > 0 {
            p = self.queue.idle.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        drop(p);
        lock(&self.queue.exec)
    }
}

impl<E: Communicator + 'static> Drop for CommStream<E> {
    fn drop(&mut self) {
        let worker = lock(&self.worker).take();
        if let Some((tx, handle)) = worker {
            drop(tx); // the thread finishes what was queued (each op has a deadline), then ends
            let _ = handle.join();
        }
    }
}

impl<E: Communicator + 'static> Communicator for CommStream<E> {
    fn rank(&self) -> usize {
        self.exec.rank()
    }

    fn world_size(&self) -> usize {
        self.exec.world_size()
    }

    fn all_reduce_bytes(
        &self,
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let _g = self.ordered();
        self.exec.all_reduce_bytes(buf, kind, op)
    }

    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        let _g = self.ordered();
        self.exec.all_gather_bytes(send, recv)
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        let _g = self.ordered();
        self.exec.broadcast_bytes(buf, root)
    }

    fn reduce_scatter_bytes(
        &self,
        send: &[u8],
        recv: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let _g = self.ordered();
        self.exec.reduce_scatter_bytes(send, recv, kind, op)
    }

    fn barrier(&self) -> Result<(), CommError> {
        let _g = self.ordered();
        self.exec.barrier()
    }

    fn send_bytes(&self, buf: &[u8], dst: usize) -> Result<(), CommError> {
        let _g = self.ordered();
        self.exec.send_bytes(buf, dst)
    }

    fn recv_bytes(&self, buf: &mut [u8], src: usize) -> Result<(), CommError> {
        let _g = self.ordered();
        self.exec.recv_bytes(buf, src)
    }

    fn issue(&self, op: AsyncOp) -> Result<Work, CommError> {
        let slot = Arc::new(Slot {
            result: Mutex::new(None),
            done: Condvar::new(),
        });
        let mut worker = lock(&self.worker);
        if worker.is_none() {
            let (tx, rx) = channel::<Job>();
            let exec = self.exec.clone();
            let queue = self.queue.clone();
            let handle = std::thread::Builder::new()
                .name(format!("comm-stream-{}", self.exec.rank()))
                .spawn(move || {
                    for job in rx {
                        let result = {
                            let _g = lock(&queue.exec);
                            let rank = exec.rank();
                            catch_unwind(AssertUnwindSafe(|| run_op(&*exec, job.op)))
                                .unwrap_or_else(|_| {
                                    Err(CommError::Aborted {
                                        rank,
                                        reason: format!("rank {rank}'s comm stream panicked"),
                                    })
                                })
                        };
                        *lock(&job.slot.result) = Some(result);
                        job.slot.done.notify_all();
                        let mut p = lock(&queue.pending);
                        *p -= 1;
                        if *p == 0 {
                            queue.idle.notify_all();
                        }
                    }
                })
                .map_err(|e| CommError::Setup(format!("cannot start a comm stream thread: {e}")))?;
            *worker = Some((tx, handle));
        }
        *lock(&self.queue.pending) += 1;
        let sent = worker
            .as_ref()
            .map(|(tx, _)| {
                tx.send(Job {
                    op,
                    slot: slot.clone(),
                })
                .is_ok()
            })
            .unwrap_or(false);
        if !sent {
            *lock(&self.queue.pending) -= 1;
            self.queue.idle.notify_all();
            return Err(CommError::Aborted {
                rank: self.rank(),
                reason: "the comm stream thread is gone".into(),
            });
        }
        Ok(Work::from_handle(Box::new(SlotHandle(slot))))
    }

    fn sub_group(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>, CommError> {
        self.exec.sub_group(ranks)
    }

    fn abort(&self, reason: &str) {
        // Never waits for the stream: aborting is how a stuck stream gets unstuck.
        self.exec.abort(reason)
    }

    fn aborted(&self) -> Option<String> {
        self.exec.aborted()
    }
}

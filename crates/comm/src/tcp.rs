//! The TCP backend: one process per rank, a full mesh of TCP connections, ring collectives.
//!
//! - **Setup.** Rank 0 hosts the rendezvous store ([`crate::rendezvous`]); every rank listens on a
//!   free port, publishes `ip:port` there, waits for every other rank's (naming the ranks that
//!   never came), then connects to each other rank and accepts a connection from each: one
//!   connection per direction, as both directions of one socket would take turns in the kernel.
//!   Every connection opens with the job token, so a foreign process cannot join.
//! - **Frames.** Every message is a 40-byte header (frame kind, op, element type, reduction, root,
//!   group tag, sequence number, op size, payload length) and a payload. One reader thread per peer
//!   drains its socket, reading a ring's chunks straight into their final place ([`direct`]) and
//!   anything else into a per-peer inbox, so sends never wait for the receiver's code and both
//!   directions of a ring stream at once; one writer thread per peer ([`writer`]) writes queued
//!   frames, so a rank reduces while its sends stream. Groups (the world and its sub-groups)
//!   share connections and are told apart by their tag.
//! - **Algorithms.** all-reduce = ring reduce-scatter + ring all-gather; reduce-scatter and
//!   all-gather are those rings alone; broadcast is a pipelined chain from the root; send/recv go
//!   straight to the peer. Buffers move in chunks (`TESSERA_COMM_CHUNK_BYTES`, default 1 MiB,
//!   rounded down to a multiple of 16 bytes), a few queued ahead of the chunks received, so a
//!   rank reduces chunk i while later ones are on the wire. Reductions follow
//!   [`crate::reduce`], the same order as the in-process backend.
//! - **Failure.** Each wait has the deadline (`TESSERA_COMM_TIMEOUT_S`). A peer whose connection
//!   closes while this rank needs it fails the operation at once, naming it. A rank that fails
//!   sends an abort frame with its reason to every peer, so all ranks stop within moments with
//!   the root cause, instead of each waiting out its deadline.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::check::{first_mismatch, OpDesc};
use crate::rendezvous::{read_bytes, read_u32, write_bytes, write_u32, StoreClient, StoreServer};
use crate::{CommError, CommStream, LaunchEnv};

mod direct;
mod ring;
mod writer;

use writer::{Payload, Sends, WriteFailure, Writer};

const HELLO: &[u8; 4] = b"TSD1";
const HEADER: usize = 40;
const DATA: u8 = 1;
const CHECK: u8 = 2;
const ABORT: u8 = 3;
/// Frames for point-to-point traffic carry the group tag with this bit set.
const P2P: u64 = 1 << 63;
/// Largest frame a peer may announce (a corrupt header must not make us allocate terabytes).
const MAX_FRAME: u64 = 1 << 36;

/// Default chunk size of ring transfers.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// Everything one rank needs to join a TCP job.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    pub rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub job_token: String,
    /// Deadline of every wait: rendezvous, each received chunk, each send.
    pub timeout: Duration,
    /// Check mode: compare every collective's description across all ranks before running it.
    pub check: bool,
    pub chunk_bytes: usize,
}

impl TcpConfig {
    /// The config of this process as one rank of `env`, with the deadline, check mode and chunk
    /// size from `TESSERA_COMM_TIMEOUT_S`, `TESSERA_COMM_CHECK`, `TESSERA_COMM_CHUNK_BYTES`.
    pub fn from_launch_env(env: &LaunchEnv) -> Result<Self, CommError> {
        let chunk_bytes = match std::env::var("TESSERA_COMM_CHUNK_BYTES") {
            Err(_) => DEFAULT_CHUNK_BYTES,
            Ok(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|c| *c >= 1024 && *c <= 1 << 30)
                .ok_or_else(|| {
                    CommError::Setup(format!(
                        "TESSERA_COMM_CHUNK_BYTES must be a byte count from 1024 to 2^30, got {v:?}"
                    ))
                })?,
        };
        Ok(TcpConfig {
            rank: env.rank,
            world_size: env.world_size,
            master_addr: env.master_addr.clone(),
            master_port: env.master_port,
            job_token: env.job_token.clone(),
            timeout: crate::timeout_from_env()?,
            check: crate::check::check_mode_from_env()?,
            chunk_bytes,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Header {
    kind: u8,
    code: u8,
    elem: u8,
    redop: u8,
    root: u32,
    tag: u64,
    seq: u64,
    total: u64,
    len: u64,
}

impl Header {
    fn new(kind: u8, desc: &OpDesc, tag: u64, seq: u64, len: usize) -> Self {
        let (code, elem, redop, root) = desc.encode();
        Header {
            kind,
            code,
            elem,
            redop,
            root,
            tag,
            seq,
            total: desc.bytes,
            len: len as u64,
        }
    }

    fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0] = self.kind;
        b[1] = self.code;
        b[2] = self.elem;
        b[3] = self.redop;
        b[4..8].copy_from_slice(&self.root.to_le_bytes());
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.total.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER]) -> Self {
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Header {
            kind: b[0],
            code: b[1],
            elem: b[2],
            redop: b[3],
            root: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            tag: u64_at(8),
            seq: u64_at(16),
            total: u64_at(24),
            len: u64_at(32),
        }
    }

    fn desc(&self) -> Option<OpDesc> {
        OpDesc::decode(self.code, self.elem, self.redop, self.root, self.total)
    }
}

struct Frame {
    hdr: Header,
    payload: Vec<u8>,
}

#[derive(Default)]
struct InboxState {
    queues: Vec<VecDeque<Frame>>,
    /// Why each peer's connection ended, once it has.
    closed: Vec<Option<String>>,
    aborted: Option<String>,
    /// Per peer, where the frames of the ring phases now running go ([`direct`]).
    plans: Vec<Vec<direct::Plan>>,
}

struct Inbox {
    st: Mutex<InboxState>,
    cv: Condvar,
    /// Payload buffers handed back after use, so streaming a large buffer does not allocate (and
    /// page-fault) a fresh chunk per frame.
    pool: Mutex<Vec<Vec<u8>>>,
    /// Each peer's connection, to stop a reader stuck writing into a withdrawn plan's memory.
    socks: Vec<Option<TcpStream>>,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn buffer(&self) -> Vec<u8> {
        self.pool
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default()
    }

    /// Keeps `b` for a later frame. Its bytes stay initialized, so the reader can resize it to
    /// a frame's length without zeroing it first.
    fn recycle(&self, b: Vec<u8>) {
        if let Ok(mut p) = self.pool.lock() {
            if p.len() < 64 {
                p.push(b);
            }
        }
    }

    fn abort(&self, reason: String) {
        let mut st = self.lock();
        if st.aborted.is_none() {
            st.aborted = Some(reason);
        }
        self.cv.notify_all();
    }
}

/// The connections of one rank to every other rank of the job, shared by all its groups.
struct Net {
    rank: usize,
    world: usize,
    timeout: Duration,
    chunk: usize,
    check: bool,
    writers: Vec<Option<Arc<Writer>>>,
    inbox: Arc<Inbox>,
    /// Kept for the job's life: later setup steps (an NCCL unique id) go through the store.
    _store: Option<StoreServer>,
    _client: Mutex<StoreClient>,
}

/// How long a rank that failed keeps its connections open before closing them, so that the peers
/// read the reason the first failing rank sent them before they see this rank's end-of-file
/// (frames on different connections are not ordered).
const FAILED_LINGER: Duration = Duration::from_millis(300);

impl Drop for Net {
    fn drop(&mut self) {
        if self.inbox.lock().aborted.is_some() {
            std::thread::sleep(FAILED_LINGER);
        }
        // Ends the reader and writer threads here and tells the peers this rank is gone.
        for w in self.writers.iter().flatten() {
            w.close();
        }
    }
}

fn io_lost(rank: usize, peer: usize, what: &str, e: &std::io::Error) -> CommError {
    use std::io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => CommError::Timeout {
            rank,
            op: what.to_string(),
            secs: 0.0,
            missing: vec![peer],
        },
        _ => CommError::PeerLost {
            rank,
            peer,
            msg: format!("{what} failed: {e} (the process exited or was killed)"),
        },
    }
}

impl Net {
    fn send_failed(&self, peer: usize, what: &str, f: &WriteFailure) -> CommError {
        let e = std::io::Error::new(f.kind, f.msg.clone());
        match io_lost(self.rank, peer, what, &e) {
            CommError::Timeout {
                rank, op, missing, ..
            } => CommError::Timeout {
                rank,
                op: format!("{op} (sending)"),
                secs: self.timeout.as_secs_f64(),
                missing,
            },
            other => other,
        }
    }

    /// The writer of the connection to `peer`, unless this rank was aborted.
    fn writer(&self, peer: usize) -> Result<&Writer, CommError> {
        if let Some(reason) = &self.inbox.lock().aborted {
            return Err(CommError::Aborted {
                rank: self.rank,
                reason: reason.clone(),
            });
        }
        self.writers[peer]
            .as_deref()
            .ok_or_else(|| CommError::Invalid {
                rank: self.rank,
                msg: format!("no connection to rank {peer}"),
            })
    }

    /// Sends one frame and waits until it is written.
    fn send_frame(
        &self,
        peer: usize,
        hdr: Header,
        payload: &[u8],
        what: &str,
    ) -> Result<(), CommError> {
        if peer == self.rank {
            self.push_self(hdr, payload);
            return Ok(());
        }
        let mut sends = Sends::new();
        // SAFETY: `sends` is finished (or dropped, which waits) before `payload` goes away.
        let r = unsafe { sends.post(self.writer(peer)?, hdr.encode(), payload) }
            .and_then(|_| sends.finish());
        r.map_err(|f| self.send_failed(peer, what, &f))
    }

    fn push_self(&self, hdr: Header, payload: &[u8]) {
        let mut b = self.inbox.buffer();
        b.clear();
        b.extend_from_slice(payload);
        let mut st = self.inbox.lock();
        st.queues[self.rank].push_back(Frame { hdr, payload: b });
        self.inbox.cv.notify_all();
    }

    /// Queues one frame on `sends` without waiting for it (a frame to this rank itself is
    /// delivered at once).
    ///
    /// # Safety
    /// `payload` must stay valid and unmodified until `sends` is finished or dropped.
    unsafe fn post_frame<'a>(
        &'a self,
        sends: &mut Sends<'a>,
        peer: usize,
        hdr: Header,
        payload: &[u8],
        what: &dyn Fn() -> String,
    ) -> Result<(), CommError> {
        if peer == self.rank {
            self.push_self(hdr, payload);
            return Ok(());
        }
        let w = self.writer(peer)?;
        sends
            .post(w, hdr.encode(), payload)
            .map_err(|f| self.send_failed(peer, &what(), &f))
    }

    /// The next frame with `tag` from `peer`, waiting at most the deadline.
    fn take(&self, peer: usize, tag: u64, what: &dyn Fn() -> String) -> Result<Frame, CommError> {
        let deadline = Instant::now() + self.timeout;
        let mut st = self.inbox.lock();
        loop {
            if let Some(i) = st.queues[peer].iter().position(|f| f.hdr.tag == tag) {
                if let Some(f) = st.queues[peer].remove(i) {
                    return Ok(f);
                }
            }
            if let Some(reason) = &st.aborted {
                return Err(CommError::Aborted {
                    rank: self.rank,
                    reason: reason.clone(),
                });
            }
            if let Some(why) = &st.closed[peer] {
                return Err(CommError::PeerLost {
                    rank: self.rank,
                    peer,
                    msg: format!("{why}, during {}", what()),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    rank: self.rank,
                    op: what(),
                    secs: self.timeout.as_secs_f64(),
                    missing: vec![peer],
                });
            }
            st = self
                .inbox
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Fails every operation here and tells every peer why (best effort).
    fn abort(&self, reason: &str) {
        self.inbox.abort(reason.to_string());
        let hdr = Header {
            kind: ABORT,
            code: 0,
            elem: 0,
            redop: 0,
            root: 0,
            tag: 0,
            seq: 0,
            total: 0,
            len: reason.len() as u64,
        };
        let mut posted = Vec::new();
        for w in self.writers.iter().flatten() {
            w.set_write_timeout(Duration::from_secs(1));
            if let Ok(id) = w.post(hdr.encode(), Payload::Owned(reason.as_bytes().to_vec())) {
                posted.push((w, id));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for (w, id) in posted {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = w.wait(id, Some(left));
        }
    }
}

/// Drains `peer`'s socket into the inbox until the connection ends.
fn reader(peer: usize, mut s: TcpStream, inbox: Arc<Inbox>) {
    let why = loop {
        let mut h = [0u8; HEADER];
        if let Err(e) = s.read_exact(&mut h) {
            break match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    format!("rank {peer} closed its connection (the process exited or was killed)")
                }
                _ => format!("the connection to rank {peer} broke: {e}"),
            };
        }
        let hdr = Header::decode(&h);
        if hdr.len > MAX_FRAME {
            break format!("rank {peer} sent a malformed frame");
        }
        if hdr.kind == DATA {
            if let Some(t) = inbox.claim(peer, &hdr) {
                // SAFETY: the plan's poster keeps this place valid and untouched until the
                // reader releases it (withdrawing the plan waits for that).
                let r = unsafe { t.fill(&mut s) };
                inbox.release(peer, hdr.tag, r.is_ok());
                if r.is_err() {
                    break format!(
                        "rank {peer} closed its connection mid-message (the process exited or was killed)"
                    );
                }
                continue;
            }
        }
        // A recycled buffer is already initialized up to its length: no zeroing, one read call
        // per socket-buffer's worth straight into it.
        let mut payload = inbox.buffer();
        payload.resize(hdr.len as usize, 0);
        match s.read_exact(&mut payload) {
            Ok(()) => {}
            Err(_) => {
                break format!(
                "rank {peer} closed its connection mid-message (the process exited or was killed)"
            )
            }
        }
        match hdr.kind {
            DATA | CHECK => {
                let mut st = inbox.lock();
                st.queues[peer].push_back(Frame { hdr, payload });
                inbox.cv.notify_all();
            }
            ABORT => inbox.abort(String::from_utf8_lossy(&payload).into_owned()),
            _ => break format!("rank {peer} sent a malformed frame"),
        }
    };
    let mut st = inbox.lock();
    st.closed[peer] = Some(why);
    inbox.cv.notify_all();
}

/// One rank of a TCP job (or of one of its sub-groups).
pub type TcpComm = CommStream<TcpRank>;

impl CommStream<TcpRank> {
    /// Joins the job `cfg` describes: rendezvous, then a connection to every other rank.
    pub fn connect(cfg: &TcpConfig) -> Result<TcpComm, CommError> {
        Ok(CommStream::new(TcpRank::connect(cfg)?))
    }
}

/// The TCP backend's blocking collectives for one rank; use it as [`TcpComm`].
pub struct TcpRank {
    net: Arc<Net>,
    /// World rank of each rank of this group.
    ranks: Vec<usize>,
    me: usize,
    tag: u64,
    seq: AtomicU64,
    p2p_sent: Mutex<Vec<u64>>,
    p2p_recvd: Mutex<Vec<u64>>,
    /// How many sub-groups over each rank list this rank has made.
    created: Mutex<HashMap<Vec<usize>, u64>>,
    /// Working buffer of reduce-scatter.
    scratch: Mutex<Vec<u8>>,
}

fn fnv(parts: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h & !P2P
}

impl TcpRank {
    fn connect(cfg: &TcpConfig) -> Result<TcpRank, CommError> {
        let (rank, world) = (cfg.rank, cfg.world_size);
        if world == 0 || rank >= world {
            return Err(CommError::Setup(format!(
                "rank {rank} is not a rank of a job of {world}"
            )));
        }
        let start = Instant::now();
        let deadline = start + cfg.timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let store = if rank == 0 {
            Some(StoreServer::start(
                &cfg.master_addr,
                cfg.master_port,
                &cfg.job_token,
            )?)
        } else {
            None
        };
        let mut client =
            StoreClient::connect(&cfg.master_addr, cfg.master_port, &cfg.job_token, left())?;
        // Every rank's job has rank 0's size, or it leaves before taking a rank's place: nodes
        // started with different --nnodes or --nproc-per-node would otherwise wait out the
        // deadline for ranks that connect and are dropped, or overwrite each other's addresses.
        if rank == 0 {
            client.set("world_size", world.to_string().as_bytes())?;
        } else {
            match client.wait(&["world_size".to_string()], left())? {
                Ok(v) if v[0] == world.to_string().as_bytes() => {}
                Ok(v) => {
                    // Said in this rank's address slot too, so that the ranks waiting for it
                    // (rank 0's job) name the mismatch instead of waiting out their deadline.
                    let _ =
                        client.set(&format!("addr/{rank}"), format!("world {world}").as_bytes());
                    return Err(world_mismatch(
                        rank,
                        0,
                        &String::from_utf8_lossy(&v[0]),
                        world,
                    ));
                }
                Err(_) => {
                    return Err(CommError::Setup(format!(
                    "rank {rank}: rendezvous at {}:{} timed out after {:.1}s: rank 0 never joined",
                    cfg.master_addr,
                    cfg.master_port,
                    cfg.timeout.as_secs_f64()
                )))
                }
            }
        }
        let ip = client.local_ip()?;
        let listener = TcpListener::bind(SocketAddr::new(ip, 0))
            .map_err(|e| CommError::Setup(format!("rank {rank} cannot listen on {ip}: {e}")))?;
        let me = listener
            .local_addr()
            .map_err(|e| CommError::Setup(format!("rank {rank}: {e}")))?;
        client.set(&format!("addr/{rank}"), me.to_string().as_bytes())?;
        let keys: Vec<String> = (0..world).map(|r| format!("addr/{r}")).collect();
        let addrs: Vec<SocketAddr> = match client.wait(&keys, left())? {
            Ok(vals) => vals
                .iter()
                .enumerate()
                .map(|(r, v)| {
                    let v = String::from_utf8_lossy(v);
                    if let Some(w) = v.strip_prefix("world ") {
                        return Err(world_mismatch(rank, r, w, world));
                    }
                    v.parse().map_err(|_| {
                        CommError::Setup("the rendezvous store holds a bad address".into())
                    })
                })
                .collect::<Result<_, _>>()?,
            Err(missing) => {
                return Err(CommError::Setup(format!(
                    "rank {rank}: rendezvous at {}:{} timed out after {:.1}s: rank(s) {} \
                     never joined",
                    cfg.master_addr,
                    cfg.master_port,
                    cfg.timeout.as_secs_f64(),
                    crate::error::rank_list(&missing)
                )))
            }
        };
        // Two connections per pair, one per direction: this rank writes to a peer only on the
        // connection it opened and reads only from the one it accepted. (Both directions on one
        // socket serialize in the kernel, which takes the socket's lock to copy either way: a
        // two-rank ring, whose peers are the same rank, would run at about half speed.)
        let mut outgoing: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let mut incoming: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for (peer, addr) in addrs.iter().enumerate().filter(|&(p, _)| p != rank) {
            let mut s = TcpStream::connect_timeout(addr, left().max(Duration::from_millis(1)))
                .map_err(|e| {
                    CommError::Setup(format!(
                        "rank {rank} cannot connect to rank {peer} at {addr}: {e}"
                    ))
                })?;
            let hello = (|| -> std::io::Result<()> {
                s.write_all(HELLO)?;
                write_u32(&mut s, rank as u32)?;
                write_u32(&mut s, world as u32)?;
                write_bytes(&mut s, cfg.job_token.as_bytes())
            })();
            hello.map_err(|e| CommError::Setup(format!("rank {rank} -> rank {peer}: {e}")))?;
            outgoing[peer] = Some(s);
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| CommError::Setup(format!("rank {rank}: {e}")))?;
        let unconnected = |incoming: &[Option<TcpStream>]| -> Vec<usize> {
            (0..world)
                .filter(|&r| r != rank && incoming[r].is_none())
                .collect()
        };
        while !unconnected(&incoming).is_empty() {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5).min(cfg.timeout)));
                    let hello = (|| -> std::io::Result<(usize, usize, Vec<u8>)> {
                        let mut m = [0u8; 4];
                        s.read_exact(&mut m)?;
                        if &m != HELLO {
                            return Err(std::io::ErrorKind::InvalidData.into());
                        }
                        let r = read_u32(&mut s)? as usize;
                        let w = read_u32(&mut s)? as usize;
                        Ok((r, w, read_bytes(&mut s)?))
                    })();
                    // Anything else (another job, a port scanner) is dropped without a word.
                    if let Ok((r, w, token)) = hello {
                        if w == world
                            && r != rank
                            && r < world
                            && token == cfg.job_token.as_bytes()
                            && incoming[r].is_none()
                        {
                            let _ = s.set_read_timeout(None);
                            incoming[r] = Some(s);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing = unconnected(&incoming);
                        return Err(CommError::Setup(format!(
                            "rank {rank}: rank(s) {} did not connect within {:.1}s",
                            crate::error::rank_list(&missing),
                            cfg.timeout.as_secs_f64()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(CommError::Setup(format!("rank {rank}: accept: {e}"))),
            }
        }
        let socks = incoming
            .iter()
            .map(|s| s.as_ref().map(|s| s.try_clone()).transpose())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| CommError::Setup(format!("rank {rank}: {e}")))?;
        let inbox = Arc::new(Inbox {
            st: Mutex::new(InboxState {
                queues: (0..world).map(|_| VecDeque::new()).collect(),
                closed: vec![None; world],
                aborted: None,
                plans: (0..world).map(|_| Vec::new()).collect(),
            }),
            cv: Condvar::new(),
            pool: Mutex::new(Vec::new()),
            socks,
        });
        let mut writers = Vec::with_capacity(world);
        for (peer, (s, r)) in outgoing.into_iter().zip(incoming).enumerate() {
            let (Some(s), Some(r)) = (s, r) else {
                writers.push(None);
                continue;
            };
            let _ = s.set_nodelay(true);
            let _ = s.set_write_timeout(Some(cfg.timeout));
            let inbox = inbox.clone();
            std::thread::Builder::new()
                .name(format!("comm-reader-{peer}"))
                .spawn(move || reader(peer, r, inbox))
                .map_err(|e| {
                    CommError::Setup(format!("rank {rank}: cannot start a thread: {e}"))
                })?;
            let w = Writer::start(peer, s).map_err(|e| {
                CommError::Setup(format!("rank {rank}: cannot start a thread: {e}"))
            })?;
            writers.push(Some(w));
        }
        let net = Arc::new(Net {
            rank,
            world,
            timeout: cfg.timeout,
            // Whole elements of every type in each chunk, so that each chunk reduces on its own.
            chunk: (cfg.chunk_bytes / 16 * 16).max(16),
            check: cfg.check,
            writers,
            inbox,
            _store: store,
            _client: Mutex::new(client),
        });
        Ok(TcpRank::group(net, (0..world).collect(), 1))
    }

    fn group(net: Arc<Net>, ranks: Vec<usize>, tag: u64) -> TcpRank {
        let n = ranks.len();
        let me = ranks.iter().position(|&r| r == net.rank).unwrap_or(0);
        TcpRank {
            net,
            ranks,
            me,
            tag,
            seq: AtomicU64::new(0),
            p2p_sent: Mutex::new(vec![0; n]),
            p2p_recvd: Mutex::new(vec![0; n]),
            created: Mutex::new(HashMap::new()),
            scratch: Mutex::new(Vec::new()),
        }
    }

    fn n(&self) -> usize {
        self.ranks.len()
    }

    fn world_rank(&self) -> usize {
        self.net.rank
    }

    /// Runs `f`; if it fails with this rank's own error, aborts the job with it so every other
    /// rank stops now (an abort received from elsewhere is not sent on again).
    fn guarded<T>(&self, f: impl FnOnce() -> Result<T, CommError>) -> Result<T, CommError> {
        let r = f();
        if let Err(e) = &r {
            if !matches!(e, CommError::Aborted { .. }) {
                self.net.abort(&e.to_string());
            }
        }
        r
    }

    fn invalid(&self, msg: String) -> CommError {
        CommError::Invalid {
            rank: self.world_rank(),
            msg,
        }
    }

    fn what(&self, desc: &OpDesc, seq: u64) -> String {
        let mut s = format!("{} (collective #{seq}", desc.code.name());
        if self.n() != self.net.world {
            s += &format!(" of group {:?}", self.ranks);
        }
        s + ")"
    }

    /// Check mode: every member sends its description to every other and compares them all.
    fn check(&self, seq: u64, desc: &OpDesc) -> Result<(), CommError> {
        if !self.net.check {
            return Ok(());
        }
        for (i, &peer) in self.ranks.iter().enumerate() {
            if i != self.me {
                self.net.send_frame(
                    peer,
                    Header::new(CHECK, desc, self.tag, seq, 0),
                    &[],
                    "check",
                )?;
            }
        }
        let deadline = Instant::now() + self.net.timeout;
        let mut got: Vec<Option<Header>> = vec![None; self.n()];
        got[self.me] = Some(Header::new(CHECK, desc, self.tag, seq, 0));
        let mut st = self.net.inbox.lock();
        loop {
            for (i, &peer) in self.ranks.iter().enumerate() {
                if got[i].is_none() {
                    if let Some(p) = st.queues[peer].iter().position(|f| f.hdr.tag == self.tag) {
                        got[i] = st.queues[peer].remove(p).map(|f| f.hdr);
                    }
                }
            }
            if got.iter().all(|g| g.is_some()) {
                break;
            }
            if let Some(reason) = &st.aborted {
                return Err(CommError::Aborted {
                    rank: self.world_rank(),
                    reason: reason.clone(),
                });
            }
            let missing: Vec<usize> = (0..self.n())
                .filter(|&i| got[i].is_none())
                .map(|i| self.ranks[i])
                .collect();
            if let Some(&peer) = missing.iter().find(|&&p| st.closed[p].is_some()) {
                return Err(CommError::PeerLost {
                    rank: self.world_rank(),
                    peer,
                    msg: format!(
                        "{}, before {}",
                        st.closed[peer].clone().unwrap_or_default(),
                        self.what(desc, seq)
                    ),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    rank: self.world_rank(),
                    op: format!("{}: rank(s) never issued it;", self.what(desc, seq)),
                    secs: self.net.timeout.as_secs_f64(),
                    missing,
                });
            }
            st = self
                .net
                .inbox
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(st);
        let mut descs = Vec::with_capacity(self.n());
        for (i, h) in got.into_iter().enumerate() {
            let h = h.unwrap_or_else(|| Header::new(CHECK, desc, self.tag, seq, 0));
            let r = self.ranks[i];
            if h.kind != CHECK {
                return Err(CommError::Mismatch {
                    rank: self.world_rank(),
                    msg: format!("rank {r} runs without check mode (set TESSERA_COMM_CHECK alike on every rank)"),
                });
            }
            if h.seq != seq {
                return Err(CommError::Mismatch {
                    rank: self.world_rank(),
                    msg: format!(
                        "rank {} is at collective #{seq} but rank {r} at #{}",
                        self.world_rank(),
                        h.seq
                    ),
                });
            }
            match h.desc() {
                Some(d) => descs.push((r, d)),
                None => {
                    return Err(CommError::Mismatch {
                        rank: self.world_rank(),
                        msg: format!("rank {r} sent an unreadable description"),
                    })
                }
            }
        }
        match first_mismatch(seq, &descs) {
            None => Ok(()),
            Some(msg) => Err(CommError::Mismatch {
                rank: self.world_rank(),
                msg,
            }),
        }
    }

    /// Queues one data frame to group rank `to` on `sends`.
    ///
    /// # Safety
    /// `data` must stay valid and unmodified until `sends` is finished or dropped.
    #[allow(clippy::too_many_arguments)]
    unsafe fn post_data<'a>(
        &'a self,
        sends: &mut Sends<'a>,
        to: usize,
        tag: u64,
        seq: u64,
        desc: &OpDesc,
        data: &[u8],
    ) -> Result<(), CommError> {
        let peer = self.ranks[to];
        self.net.post_frame(
            sends,
            peer,
            Header::new(DATA, desc, tag, seq, data.len()),
            data,
            &|| self.what(desc, seq),
        )
    }

    /// Waits for everything `sends` holds to be written to group rank `to`.
    fn finish_sends(
        &self,
        sends: Sends<'_>,
        to: usize,
        desc: &OpDesc,
        seq: u64,
    ) -> Result<(), CommError> {
        sends.finish().map_err(|f| {
            self.net
                .send_failed(self.ranks[to], &self.what(desc, seq), &f)
        })
    }

    /// Checks a data frame of this op from group rank `from` against what this rank issued: it
    /// must hold exactly `len` bytes.
    fn check_frame(
        &self,
        f: &Frame,
        from: usize,
        seq: u64,
        desc: &OpDesc,
        len: usize,
    ) -> Result<(), CommError> {
        let peer = self.ranks[from];
        let me = self.world_rank();
        let mismatch = |msg: String| Err(CommError::Mismatch { rank: me, msg });
        if f.hdr.kind == CHECK {
            return mismatch(format!(
                "rank {peer} runs in check mode and rank {me} does not (set TESSERA_COMM_CHECK alike on every rank)"
            ));
        }
        let theirs = f.hdr.desc();
        if theirs != Some(*desc) {
            let t = theirs
                .map(|d| d.to_string())
                .unwrap_or_else(|| "something unreadable".into());
            return mismatch(format!(
                "collective #{seq}: rank {me} issued {desc} but rank {peer} issued {t}"
            ));
        }
        if f.hdr.seq != seq {
            return mismatch(format!(
                "rank {me} is at {} #{seq} but rank {peer} at #{}",
                desc.code.name(),
                f.hdr.seq
            ));
        }
        if f.payload.len() != len {
            return mismatch(format!(
                "{}: rank {me} expected a chunk of {len} bytes from rank {peer}, got {}",
                self.what(desc, seq),
                f.payload.len()
            ));
        }
        Ok(())
    }
}

/// Rank `rank`'s error where rank `other` runs a job of `theirs` ranks and this rank one of `world`.
fn world_mismatch(rank: usize, other: usize, theirs: &str, world: usize) -> CommError {
    CommError::Setup(format!(
        "rank {rank}: rank {other} runs a job of {theirs} ranks, this rank one of {world}: start every node with the same --nnodes and --nproc-per-node (the same WORLD_SIZE)"
    ))
}

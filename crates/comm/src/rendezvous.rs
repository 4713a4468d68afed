//! Rendezvous: a small key-value store on the master address, through which the ranks of a job
//! find each other and share what a backend needs (each rank's data address now; the NCCL unique
//! id later). Rank 0 hosts it; every rank (rank 0 too) is a client.
//!
//! Protocol (TCP, little-endian, length-prefixed): the client opens with `"TSS1"`, then the job
//! token; the server answers `0` (welcome) or `1` + a reason and closes, so a rank of another job
//! that happens to use the same port is turned away at once. Requests: `SET key value` and
//! `WAIT keys timeout_ms`, which answers every value once all keys are set, or the indices of the
//! keys still missing when the timeout passes (so the caller can name the ranks that never came).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::CommError;

const MAGIC: &[u8; 4] = b"TSS1";
const SET: u8 = 1;
const WAIT: u8 = 2;
/// Longest key or value the store accepts (a foreign client cannot make it allocate more).
const MAX_ITEM: u32 = 16 << 20;

pub(crate) fn write_u32(w: &mut impl Write, v: u32) -> std::io::Result<()> {
    w.write_all(&v.to_le_bytes())
}

pub(crate) fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub(crate) fn write_bytes(w: &mut impl Write, b: &[u8]) -> std::io::Result<()> {
    write_u32(w, b.len() as u32)?;
    w.write_all(b)
}

pub(crate) fn read_bytes(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let n = read_u32(r)?;
    if n > MAX_ITEM {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "item too long",
        ));
    }
    let mut v = vec![0u8; n as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// Resolves `host:port` to one address.
pub(crate) fn resolve(host: &str, port: u16) -> Result<SocketAddr, CommError> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| CommError::Setup(format!("cannot resolve master address {host:?}: {e}")))?
        .next()
        .ok_or_else(|| CommError::Setup(format!("master address {host:?} has no IP address")))
}

/// The first port of the system's ephemeral range (`net.ipv4.ip_local_port_range`), where it can
/// be read (Linux).
pub fn ephemeral_port_start() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
}

/// A free TCP port on this host for a one-node job's rendezvous store, below the system's
/// ephemeral range (`net.ipv4.ip_local_port_range`, 32768 up by default) where it can: ports in
/// that range are handed to outgoing connections, so one probed free there may be some
/// connection's local port by the time rank 0 binds it (a CI run once failed so). Random, so that
/// jobs started at once rarely probe the same port; the system's pick where no port below the
/// range is free.
pub fn free_port() -> Result<u16, CommError> {
    use std::hash::{BuildHasher, Hasher};
    let low = ephemeral_port_start().unwrap_or(32768);
    // Up to 12,000 ports just below the range, above the well-known and registered low ones.
    let first = low.saturating_sub(12_000).max(10_000);
    if low > first {
        for _ in 0..200 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            let port = first + (h.finish() % u64::from(low - first)) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| {
            CommError::Setup(format!(
                "cannot find a free port for the rendezvous store: {e}"
            ))
        })
}

#[derive(Default)]
struct Table {
    items: HashMap<Vec<u8>, Vec<u8>>,
}

/// The store, hosted by rank 0; it stops when dropped.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl StoreServer {
    /// Listens on `port` (0: any free port) of the interface `host` names (all interfaces unless
    /// `host` is a loopback address).
    pub fn start(host: &str, port: u16, token: &str) -> Result<StoreServer, CommError> {
        let target = resolve(host, port)?;
        let bind: SocketAddr = if target.ip().is_loopback() {
            target
        } else {
            SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port)
        };
        let listener = TcpListener::bind(bind).map_err(|e| {
            CommError::Setup(format!(
                "rank 0 cannot host the rendezvous store on {bind}: {e} (is another job using \
                 this port? pick another --master-port)"
            ))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| CommError::Setup(format!("rendezvous store: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new((Mutex::new(Table::default()), Condvar::new()));
        let token = token.as_bytes().to_vec();
        let stop2 = stop.clone();
        std::thread::Builder::new()
            .name("rendezvous-store".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (shared, token) = (shared.clone(), token.clone());
                    let _ = std::thread::Builder::new()
                        .name("rendezvous-client".into())
                        .spawn(move || serve(conn, &shared, &token));
                }
            })
            .map_err(|e| CommError::Setup(format!("cannot start the rendezvous store: {e}")))?;
        Ok(StoreServer { addr, stop })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_millis(200));
    }
}

fn serve(mut conn: TcpStream, shared: &(Mutex<Table>, Condvar), token: &[u8]) {
    // A client that says nothing (a port scanner, a stuck peer) must not hold a thread forever.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut magic = [0u8; 4];
    if conn.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return;
    }
    let Ok(theirs) = read_bytes(&mut conn) else {
        return;
    };
    if theirs != token {
        let _ = conn.write_all(&[1]);
        let _ = write_bytes(
            &mut conn,
            b"wrong job token (is another job using this port?)",
        );
        return;
    }
    if conn.write_all(&[0]).is_err() {
        return;
    }
    let _ = conn.set_read_timeout(None);
    let (table, cv) = shared;
    loop {
        let mut cmd = [0u8; 1];
        if conn.read_exact(&mut cmd).is_err() {
            return;
        }
        let ok = match cmd[0] {
            SET => (|| -> std::io::Result<()> {
                let k = read_bytes(&mut conn)?;
                let v = read_bytes(&mut conn)?;
                table
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .items
                    .insert(k, v);
                cv.notify_all();
                conn.write_all(&[0])
            })(),
            WAIT => (|| -> std::io::Result<()> {
                let mut ms = [0u8; 8];
                conn.read_exact(&mut ms)?;
                let deadline = Instant::now() + Duration::from_millis(u64::from_le_bytes(ms));
                let n = read_u32(&mut conn)?.min(1 << 20);
                let keys: Vec<Vec<u8>> = (0..n)
                    .map(|_| read_bytes(&mut conn))
                    .collect::<std::io::Result<_>>()?;
                let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let missing: Vec<u32> = (0..keys.len() as u32)
                        .filter(|&i| !t.items.contains_key(&keys[i as usize]))
                        .collect();
                    let now = Instant::now();
                    if missing.is_empty() {
                        let vals: Vec<Vec<u8>> = keys.iter().map(|k| t.items[k].clone()).collect();
                        drop(t);
                        conn.write_all(&[0])?;
                        for v in vals {
                            write_bytes(&mut conn, &v)?;
                        }
                        return Ok(());
                    }
                    if now >= deadline {
                        drop(t);
                        conn.write_all(&[1])?;
                        write_u32(&mut conn, missing.len() as u32)?;
                        for m in missing {
                            write_u32(&mut conn, m)?;
                        }
                        return Ok(());
                    }
                    t = cv
                        .wait_timeout(t, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            })(),
            _ => return,
        };
        if ok.is_err() {
            return;
        }
    }
}

/// One rank's connection to the store.
pub struct StoreClient {
    conn: TcpStream,
    what: String,
}

impl StoreClient {
    /// Connects to the store at `host:port`, retrying until `timeout` passes (rank 0 may start
    /// later than the others).
    pub fn connect(
        host: &str,
        port: u16,
        token: &str,
        timeout: Duration,
    ) -> Result<StoreClient, CommError> {
        let what = format!("the rendezvous store at {host}:{port}");
        let addr = resolve(host, port)?;
        let deadline = Instant::now() + timeout;
        let mut conn = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(
                &addr,
                left.clamp(Duration::from_millis(1), Duration::from_secs(2)),
            ) {
                Ok(c) => break c,
                Err(e) if Instant::now() + Duration::from_millis(50) >= deadline => {
                    return Err(CommError::Setup(format!(
                        "cannot reach {what} within {:.1}s: {e} (is rank 0 running? are the \
                         master address and port right?)",
                        timeout.as_secs_f64()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let io = |e: std::io::Error| CommError::Setup(format!("{what}: {e}"));
        let _ = conn.set_nodelay(true);
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io)?;
        // A store reads the greeting before it answers: one that closes first is something else.
        let hello = |e: std::io::Error| {
            CommError::Setup(format!(
                "{what} did not answer as a tessera rendezvous store ({e}; is something else listening on that port?)"
            ))
        };
        conn.write_all(MAGIC).map_err(hello)?;
        write_bytes(&mut conn, token.as_bytes()).map_err(hello)?;
        let mut status = [0u8; 1];
        conn.read_exact(&mut status).map_err(hello)?;
        // 0: welcome; 1 and a reason: turned away; anything else is not a tessera store.
        let not_a_store = || {
            CommError::Setup(format!(
                "{what} did not answer as a tessera rendezvous store (is something else listening on that port?)"
            ))
        };
        match status[0] {
            0 => {}
            1 => {
                let why = read_bytes(&mut conn).map_err(|_| not_a_store())?;
                let why = String::from_utf8(why).map_err(|_| not_a_store())?;
                if why.is_empty() {
                    return Err(not_a_store());
                }
                return Err(CommError::Setup(format!(
                    "{what} turned this rank away: {why}"
                )));
            }
            _ => return Err(not_a_store()),
        }
        Ok(StoreClient { conn, what })
    }

    /// The address of this host as the master sees it (where peers can reach this rank).
    pub fn local_ip(&self) -> Result<std::net::IpAddr, CommError> {
        self.conn
            .local_addr()
            .map(|a| a.ip())
            .map_err(|e| CommError::Setup(format!("{}: {e}", self.what)))
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let what = self.what.clone();
        let io = move |e: std::io::Error| CommError::Setup(format!("{what}: {e}"));
        self.conn.write_all(&[SET]).map_err(io.clone())?;
        write_bytes(&mut self.conn, key.as_bytes()).map_err(io.clone())?;
        write_bytes(&mut self.conn, value).map_err(io.clone())?;
        let mut ok = [0u8; 1];
        self.conn.read_exact(&mut ok).map_err(io)?;
        Ok(())
    }

    /// Every value of `keys` once all are set; `Ok(Err(missing indices))` if `timeout` passes.
    pub fn wait(
        &mut self,
        keys: &[String],
        timeout: Duration,
    ) -> Result<Result<Vec<Vec<u8>>, Vec<usize>>, CommError> {
        let what = self.what.clone();
        let io = move |e: std::io::Error| CommError::Setup(format!("{what}: {e}"));
        self.conn
            .set_read_timeout(Some(timeout + Duration::from_secs(10)))
            .map_err(io.clone())?;
        self.conn.write_all(&[WAIT]).map_err(io.clone())?;
        self.conn
            .write_all(&(timeout.as_millis() as u64).to_le_bytes())
            .map_err(io.clone())?;
        write_u32(&mut self.conn, keys.len() as u32).map_err(io.clone())?;
        for k in keys {
            write_bytes(&mut self.conn, k.as_bytes()).map_err(io.clone())?;
        }
        let mut status = [0u8; 1];
        self.conn.read_exact(&mut status).map_err(io.clone())?;
        if status[0] == 0 {
            let vals = (0..keys.len())
                .map(|_| read_bytes(&mut self.conn))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(io)?;
            Ok(Ok(vals))
        } else {
            let n = read_u32(&mut self.conn).map_err(io.clone())?;
            let missing = (0..n)
                .map(|_| read_u32(&mut self.conn).map(|i| i as usize))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(io)?;
            Ok(Err(missing))
        }
    }
}

impl Drop for StoreClient {
    fn drop(&mut self) {
        let _ = self.conn.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_wait_and_missing_keys() {
        let server = StoreServer::start("127.0.0.1", 0, "job-a").unwrap();
        let port = server.port();
        let mut a =
            StoreClient::connect("127.0.0.1", port, "job-a", Duration::from_secs(5)).unwrap();
        let mut b =
            StoreClient::connect("127.0.0.1", port, "job-a", Duration::from_secs(5)).unwrap();
        a.set("x", b"1").unwrap();
        let keys = vec!["x".to_string(), "y".to_string()];
        assert_eq!(
            b.wait(&keys, Duration::from_millis(100)).unwrap(),
            Err(vec![1])
        );
        let t = std::thread::spawn(move || b.wait(&keys, Duration::from_secs(5)).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        a.set("y", b"2").unwrap();
        assert_eq!(t.join().unwrap(), Ok(vec![b"1".to_vec(), b"2".to_vec()]));
    }

    #[test]
    fn a_foreign_token_is_turned_away() {
        let server = StoreServer::start("127.0.0.1", 0, "job-a").unwrap();
        let err = StoreClient::connect("127.0.0.1", server.port(), "job-b", Duration::from_secs(5))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("wrong job token"), "{err}");
    }

    #[test]
    fn an_unreachable_store_fails_within_the_deadline() {
        // A port below the ephemeral range, so that no test's outgoing connection or port-0
        // listener can be on it by the time the client tries it.
        let port = free_port().unwrap();
        let err = StoreClient::connect("127.0.0.1", port, "t", Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cannot reach the rendezvous store"), "{err}");
    }

    #[test]
    fn a_free_port_is_below_the_ephemeral_range() {
        let Some(low) = ephemeral_port_start() else {
            return; // not Linux: the system's pick
        };
        for _ in 0..20 {
            let p = free_port().unwrap();
            assert!(
                p < low || low <= 10_000,
                "port {p}, ephemeral range from {low}"
            );
            assert!(p >= 1024, "{p}");
        }
    }
}

//! Helpers shared by the comm tests: a TCP job of n ranks on threads of this process (loopback,
//! a free port), and deterministic test data.

#![allow(dead_code)]

use std::net::TcpListener;
use std::time::Duration;

use tessera_comm::{CommError, TcpComm, TcpConfig};

/// A free port below Linux's ephemeral range (32768 up): ports there are handed to outgoing
/// connections, so one probed free can be some other test's client port by the time a rank binds
/// it. Random, so that tests running at once rarely probe the same one.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20000 + (h.finish() % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port from 20000 to 31999");
}

pub fn config(rank: usize, n: usize, port: u16, timeout: Duration) -> TcpConfig {
    TcpConfig {
        rank,
        world_size: n,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        job_token: format!("test-{port}"),
        timeout,
        check: false,
        chunk_bytes: 1024,
        rank0_hosts_store: true,
    }
}

/// Connects `n` ranks (one thread each, `tweak` adjusts each config) and returns their comms in
/// rank order.
pub fn tcp_job(n: usize, timeout: Duration, tweak: impl Fn(&mut TcpConfig) + Sync) -> Vec<TcpComm> {
    for _attempt in 0..3 {
        let port = free_port();
        let r: Vec<Result<TcpComm, CommError>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|rank| {
                    let mut cfg = config(rank, n, port, timeout);
                    tweak(&mut cfg);
                    s.spawn(move || TcpComm::connect(&cfg))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        if r.iter().all(|c| c.is_ok()) {
            return r.into_iter().map(|c| c.unwrap()).collect();
        }
        // Another test took the port between our probe and rank 0's bind: try another.
    }
    panic!("could not start a TCP job");
}

/// Runs `f` on every comm, one thread each, and returns the results in rank order.
pub fn on_each<C: Send, R: Send>(comms: Vec<C>, f: impl Fn(C) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Deterministic, not-too-round values that differ per rank and position.
pub fn data(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + rank * 104_729) % 1000) as f32 * 0.013 - 6.1)
        .collect()
}

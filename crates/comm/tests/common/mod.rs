//! Helpers shared by the comm tests: a TCP job of n ranks on threads of this process (loopback,
//! a free port), and deterministic test data.

#![allow(dead_code)]

use std::time::Duration;

use tessera_comm::{CommError, TcpComm, TcpConfig};

/// A free port below the ephemeral range (see [`tessera_comm::rendezvous::free_port`]).
pub fn free_port() -> u16 {
    tessera_comm::rendezvous::free_port().unwrap()
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

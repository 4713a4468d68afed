//! The TCP backend never hangs: a rank that leaves, one that never joins, a mismatched collective
//! and a wrong job token each end in an error that names the rank at fault, well before the
//! deadline where the fault can be seen directly.

mod common;

use std::time::Duration;

use common::{config, free_port, on_each, tcp_job};
use tessera_comm::{CommExt, Communicator, ReduceOp, TcpComm};

#[test]
fn a_rank_that_leaves_mid_job_is_named_at_once() {
    let long = Duration::from_secs(60);
    let out = on_each(tcp_job(3, long, |_| {}), |c| {
        let mut v = vec![1.0f32; 100_000];
        c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        if c.rank() == 1 {
            drop(c); // closes its connections, as a killed process would
            return String::new();
        }
        loop {
            if let Err(e) = c.all_reduce(&mut v, ReduceOp::Sum) {
                return e.to_string();
            }
        }
    });
    // Seen from the closed connection ("lost rank 1"), not by waiting out the deadline.
    for r in [0, 2] {
        assert!(out[r].contains("lost rank 1"), "rank {r}: {}", out[r]);
        assert!(!out[r].contains("timed out"), "rank {r}: {}", out[r]);
    }
}

#[test]
fn a_rank_that_never_joins_is_named() {
    let port = free_port();
    let cfgs: Vec<_> = (0..2)
        .map(|r| config(r, 3, port, Duration::from_secs(3)))
        .collect();
    let out = on_each(cfgs, |cfg| {
        TcpComm::connect(&cfg).err().unwrap().to_string()
    });
    for e in &out {
        assert!(e.contains("rank(s) [2] never joined"), "{e}");
    }
}

#[test]
fn a_mismatched_collective_is_named() {
    let out = on_each(tcp_job(3, Duration::from_secs(20), |_| {}), |c| {
        let mut v = vec![0.0f32; if c.rank() == 2 { 9 } else { 8 }];
        c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err().to_string()
    });
    // The neighbour that sees it names both sizes; the others are aborted with that message.
    for e in &out {
        assert!(e.contains("all_reduce of 36 bytes"), "{e}");
        assert!(e.contains("all_reduce of 32 bytes"), "{e}");
    }
}

#[test]
fn check_mode_names_the_first_mismatch_on_every_rank() {
    let out = on_each(
        tcp_job(4, Duration::from_secs(20), |c| c.check = true),
        |c| {
            let mut v = vec![0.0f32; 4];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
            let r = if c.rank() == 3 {
                c.broadcast(&mut v, 0)
            } else {
                c.all_reduce(&mut v, ReduceOp::Sum)
            };
            r.unwrap_err().to_string()
        },
    );
    for e in &out {
        assert!(
            e.contains("collective #1: rank 0 issued all_reduce of 16 bytes (F32, Sum) but rank 3 issued broadcast of 16 bytes from root 0"),
            "{e}"
        );
    }
}

#[test]
fn check_mode_names_a_rank_that_never_issues_the_collective() {
    // Rank 1 holds its connections until the others have their errors (were it to leave first,
    // they would say they lost it instead of naming it as missing).
    let gave_up = std::sync::Barrier::new(3);
    let out = on_each(
        tcp_job(3, Duration::from_secs(3), |c| c.check = true),
        |c| {
            if c.rank() == 1 {
                gave_up.wait();
                return String::new();
            }
            // No unwrap before the barrier: a panic here would leave the others waiting on it.
            let e = format!("{:?}", c.barrier().err().map(|e| e.to_string()));
            gave_up.wait();
            e
        },
    );
    assert!(out[0].contains("[1]"), "{}", out[0]);
    assert!(out[2].contains("[1]"), "{}", out[2]);
}

#[test]
fn a_wrong_job_token_is_turned_away() {
    let port = free_port();
    let mut cfgs: Vec<_> = (0..2)
        .map(|r| config(r, 2, port, Duration::from_secs(2)))
        .collect();
    cfgs[1].job_token = "another-job".into();
    let out = on_each(cfgs, |cfg| {
        TcpComm::connect(&cfg).err().map(|e| e.to_string())
    });
    let e = out[1].clone().unwrap();
    assert!(e.contains("wrong job token"), "{e}");
}

#[test]
fn send_to_a_rank_that_is_not_there_is_an_error_not_a_panic() {
    let out = on_each(tcp_job(2, Duration::from_secs(5), |_| {}), |c| {
        c.send(&[1u8], 5).unwrap_err().to_string()
    });
    assert!(out[0].contains("destination 5"), "{}", out[0]);
}

/// `aborted()` never blocks: nothing while all is well; then the reason of a rank's abort reaches
/// the others, and a peer whose connections closed is reported too.
#[test]
fn aborted_reports_an_abort_and_a_lost_peer() {
    let out = on_each(tcp_job(3, Duration::from_secs(60), |_| {}), |c| {
        let before = c.aborted();
        c.barrier().unwrap();
        if c.rank() == 2 {
            drop(c); // closes its connections
            return (before, None, None);
        }
        let lost = loop {
            if let Some(r) = c.aborted() {
                break r;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if c.rank() == 0 {
            c.abort("rank 0 gave up");
        }
        let after = loop {
            match c.aborted() {
                Some(r) if r.contains("gave up") => break r,
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        (before, Some(lost), Some(after))
    });
    for (rank, (before, lost, after)) in out.iter().enumerate() {
        assert_eq!(before, &None, "rank {rank}");
        if rank < 2 {
            let lost = lost.as_deref().unwrap();
            // Rank 1 may hear rank 0's abort before it sees rank 2's connections close.
            assert!(
                lost.contains("rank 2") || (rank == 1 && lost.contains("gave up")),
                "rank {rank}: {lost}"
            );
            assert!(after.as_deref().unwrap().contains("rank 0 gave up"));
        }
    }
}

//! The in-process backend's asynchronous operations run in issue order with the blocking ones,
//! its sub-groups and point-to-point messages work, and the comm stream never hangs on failure.

mod common;

use std::time::Duration;

use common::on_each;
use tessera_comm::{CommExt, Communicator, LocalGroup, ReduceOp};

#[test]
fn async_and_blocking_operations_complete_in_issue_order() {
    let out = on_each(
        LocalGroup::with_timeout(3, Duration::from_secs(10)).into_comms(),
        |c| {
            let r = c.rank() as f32;
            let a = c.all_reduce_async(vec![r; 4], ReduceOp::Sum).unwrap();
            let b = c
                .reduce_scatter_async(vec![1.0f32; 6], vec![0.0; 2], ReduceOp::Avg)
                .unwrap();
            let mut blocking = vec![r];
            c.all_reduce(&mut blocking, ReduceOp::Max).unwrap(); // runs after a and b
            assert!(a.is_complete() && b.is_complete());
            let sent = c
                .send_async(vec![c.rank() as u8; 2], (c.rank() + 1) % 3)
                .unwrap();
            let got = c.recv_async(vec![0u8; 2], (c.rank() + 2) % 3).unwrap();
            let out = (
                a.wait().unwrap(),
                b.wait().unwrap(),
                blocking,
                sent.wait().unwrap(),
                got.wait().unwrap(),
            );
            c.barrier().unwrap(); // a rank that leaves early aborts the group
            out
        },
    );
    for (r, (a, b, m, sent, got)) in out.into_iter().enumerate() {
        assert_eq!(a, vec![3.0; 4]);
        assert_eq!(b, vec![1.0; 2]);
        assert_eq!(m, vec![2.0]);
        assert_eq!(sent, vec![r as u8; 2]);
        assert_eq!(got, vec![((r + 2) % 3) as u8; 2]);
    }
}

#[test]
fn an_async_failure_is_reported_by_wait() {
    // Rank 1 holds its handle until rank 0 has its error (were it to leave first, rank 0 would
    // say it left instead of naming it as missing).
    let gave_up = std::sync::Barrier::new(2);
    let out = on_each(
        LocalGroup::with_timeout(2, Duration::from_millis(200)).into_comms(),
        |c| {
            if c.rank() == 1 {
                gave_up.wait();
                return String::new();
            }
            // No unwrap before the barrier: a panic here would leave rank 1 waiting on it.
            let e = match c.all_reduce_async(vec![1.0f32], ReduceOp::Sum) {
                Ok(p) => format!("{:?}", p.wait().err().map(|e| e.to_string())),
                Err(e) => format!("issue failed: {e}"),
            };
            gave_up.wait();
            e
        },
    );
    assert!(out[0].contains("waiting for rank(s) [1]"), "{}", out[0]);
}

#[test]
fn sub_groups_and_point_to_point() {
    let out = on_each(
        LocalGroup::with_timeout(4, Duration::from_secs(10)).into_comms(),
        |c| {
            let r = c.rank();
            let evens_odds: Vec<usize> = (0..4).filter(|x| x % 2 == r % 2).collect();
            let g = c.sub_group(&evens_odds).unwrap();
            let mut v = vec![r as i32];
            g.all_reduce(&mut v, ReduceOp::Sum).unwrap();
            // Not a member: an error, not a panic.
            let err = c.sub_group(&[(r + 1) % 4]).err().unwrap().to_string();
            let mut msg = [0u8; 3];
            if r == 0 {
                c.send(&[1u8, 2, 3], 3).unwrap();
            }
            if r == 3 {
                c.recv(&mut msg, 0).unwrap();
            }
            c.barrier().unwrap(); // a rank that leaves early aborts the group
            (g.rank(), v, err, msg)
        },
    );
    assert_eq!(out[2].0, 1);
    assert_eq!(out[2].1, vec![2]);
    assert_eq!(out[3].1, vec![4]);
    assert!(out[0].2.contains("not a member"), "{}", out[0].2);
    assert_eq!(out[3].3, [1, 2, 3]);
}

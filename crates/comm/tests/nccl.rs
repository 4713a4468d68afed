//! The NCCL backend against the values every collective must produce, on one GPU per rank (one
//! rank on a one-GPU machine, two with two GPUs), and a peer that never joins a collective, or
//! never starts NCCL's init, is a timeout, not a hang. Built with `--features cuda`; run by
//! `scripts/gpu_check.sh`. Without a GPU the tests say so and pass, unless
//! `TESSERA_REQUIRE_GPU=1` (the GPU script sets it).
#![cfg(feature = "cuda")]

use std::time::Duration;

use half::bf16;
use tessera_comm::{CommError, CommExt, Communicator, ElemKind, LocalGroup, NcclComm, ReduceOp};
use tessera_tensor::{DType, Device, Storage, Tensor};

fn gpus() -> usize {
    tessera_tensor::cuda::test_gpus(2)
}

/// Whether this machine has two GPUs; says the test is skipped when not.
fn two_gpus() -> bool {
    let two = gpus() >= 2;
    if !two {
        eprintln!("skipped: needs two GPUs");
    }
    two
}

/// Runs `f(nccl communicator)` on `world` threads, rank r on GPU r.
fn on_ranks<R: Send>(world: usize, f: impl Fn(NcclComm) -> R + Sync) -> Vec<R> {
    let ranks = tessera_comm::spmd::run_threads(
        LocalGroup::new(world).into_comms(),
        |rank, host| Ok(f(NcclComm::new(&host, rank).unwrap())),
        |rank, msg| format!("rank {rank} panicked: {msg}"),
    );
    ranks
        .into_iter()
        .map(|r| r.unwrap_or_else(|e: String| panic!("{e}")))
        .collect()
}

/// Progress of a rank through the steps (`TESSERA_TEST_TRACE=1`), to see where one stops.
fn step(rank: usize, world: usize, what: &str) {
    if std::env::var_os("TESSERA_TEST_TRACE").is_some() {
        eprintln!("world {world} rank {rank}: {what}");
    }
}

fn value(rank: usize, i: usize) -> f32 {
    0.25 * i as f32 - 1.5 * rank as f32 + 0.125
}

#[test]
fn every_collective_gives_the_expected_values() {
    for world in 1..=gpus() {
        on_ranks(world, |c| {
            let c = &c;
            let (rank, n) = (c.rank(), 9);
            let mine: Vec<f32> = (0..n).map(|i| value(rank, i)).collect();
            // Sums of at most two values of a few bits each are exact in f32 and bf16.
            let sum: Vec<f32> = (0..n)
                .map(|i| (0..world).map(|r| value(r, i)).sum())
                .collect();
            let max: Vec<f32> = (0..n)
                .map(|i| (0..world).map(|r| value(r, i)).fold(f32::MIN, f32::max))
                .collect();

            step(rank, world, "start");
            // Through the bytes methods: the typed wrappers skip a group of one.
            let mut v = mine.clone();
            c.all_reduce_bytes(bytes_mut(&mut v), ElemKind::F32, ReduceOp::Sum)
                .unwrap();
            assert_eq!(v, sum, "all_reduce sum f32");
            let mut v = mine.clone();
            c.all_reduce_bytes(bytes_mut(&mut v), ElemKind::F32, ReduceOp::Max)
                .unwrap();
            assert_eq!(v, max, "all_reduce max f32");
            let mut v = mine.clone();
            c.all_reduce_bytes(bytes_mut(&mut v), ElemKind::F32, ReduceOp::Avg)
                .unwrap();
            for (a, s) in v.iter().zip(&sum) {
                assert!((a - s / world as f32).abs() < 1e-6, "all_reduce avg f32");
            }
            let mut b: Vec<bf16> = mine.iter().map(|&x| bf16::from_f32(x)).collect();
            c.all_reduce_bytes(bytes_mut(&mut b), ElemKind::BF16, ReduceOp::Sum)
                .unwrap();
            assert_eq!(
                b.iter().map(|x| x.to_f32()).collect::<Vec<_>>(),
                sum,
                "all_reduce sum bf16"
            );
            let mut k: Vec<i32> = (0..n as i32).map(|i| i * 10 + rank as i32).collect();
            c.all_reduce_bytes(bytes_mut(&mut k), ElemKind::I32, ReduceOp::Sum)
                .unwrap();
            let rs: i32 = (0..world as i32).sum();
            assert_eq!(
                k,
                (0..n as i32)
                    .map(|i| i * 10 * world as i32 + rs)
                    .collect::<Vec<_>>(),
                "all_reduce sum i32"
            );

            step(rank, world, "all_gather");
            let mut all = vec![0.0f32; n * world];
            c.all_gather(&mine, &mut all).unwrap();
            let want: Vec<f32> = (0..world)
                .flat_map(|r| (0..n).map(move |i| value(r, i)))
                .collect();
            assert_eq!(all, want, "all_gather");

            step(rank, world, "broadcast");
            let root = world - 1;
            let mut v = mine.clone();
            c.broadcast_bytes(bytes_mut(&mut v), root).unwrap();
            assert_eq!(
                v,
                (0..n).map(|i| value(root, i)).collect::<Vec<_>>(),
                "broadcast"
            );

            step(rank, world, "host bytes past the host communicator's 64 KB");
            // Gathers and broadcasts of host bytes past 64 KB go through NCCL on staging
            // buffers (below it, through the host communicator): 80 KB a rank.
            let big = 20_000;
            let mut mine_big: Vec<f32> = (0..big).map(|i| value(rank, i % 4099)).collect();
            let mut all = vec![0.0f32; big * world];
            c.all_gather_bytes(bytes_mut(&mut mine_big), bytes_mut(&mut all))
                .unwrap();
            let want: Vec<f32> = (0..world)
                .flat_map(|r| (0..big).map(move |i| value(r, i % 4099)))
                .collect();
            assert_eq!(all, want, "all_gather of 80 KB a rank");
            c.broadcast_bytes(bytes_mut(&mut mine_big), root).unwrap();
            assert_eq!(
                mine_big,
                (0..big).map(|i| value(root, i % 4099)).collect::<Vec<_>>(),
                "broadcast of 80 KB"
            );

            step(rank, world, "reduce_scatter");
            // reduce_scatter of world chunks of 3: rank r gets the sum of chunk r.
            let send: Vec<f32> = (0..3 * world).map(|i| value(rank, i)).collect();
            let mut got = vec![0.0f32; 3];
            c.reduce_scatter(&send, &mut got, ReduceOp::Sum).unwrap();
            let want: Vec<f32> = (0..3)
                .map(|j| (0..world).map(|r| value(r, 3 * rank + j)).sum())
                .collect();
            assert_eq!(got, want, "reduce_scatter");

            step(rank, world, "barrier");
            c.barrier().unwrap();

            if world > 1 {
                step(rank, world, "send_recv");
                // Each rank sends first, then receives: the eager send of the trait.
                let peer = 1 - rank;
                c.send(&mine, peer).unwrap();
                let mut v = vec![0.0f32; n];
                c.recv(&mut v, peer).unwrap();
                assert_eq!(v, (0..n).map(|i| value(peer, i)).collect::<Vec<_>>());

                step(rank, world, "sub_group");
                // A sub-group in reverse order renumbers the ranks.
                let sub = c.sub_group(&[1, 0]).unwrap();
                assert_eq!(sub.rank(), 1 - rank);
                let mut r = [sub.rank() as i32 + 1];
                sub.all_reduce(&mut r, ReduceOp::Max).unwrap();
                assert_eq!(r, [2]);
            }

            step(rank, world, "tensors");
            // Device tensors: reduced where they lie, in their own dtype.
            for dt in [DType::F32, DType::BF16] {
                let mut t = Tensor::from_f32(vec![n], mine.clone(), dt)
                    .unwrap()
                    .to_device(Device::Cuda(rank))
                    .unwrap();
                c.all_reduce_tensor(&mut t, ReduceOp::Sum).unwrap();
                assert!(matches!(t.storage(), Storage::Cuda(_)), "left the GPU");
                assert_eq!(t.to_f32_vec(), sum, "all_reduce_tensor {dt}");
            }
            // Gathered where they lie, stacked in rank order, in their own dtype.
            let every: Vec<f32> = (0..world)
                .flat_map(|r| (0..n).map(move |i| value(r, i)))
                .collect();
            for dt in [DType::F32, DType::BF16] {
                let t = Tensor::from_f32(vec![3, n / 3], mine.clone(), dt)
                    .unwrap()
                    .to_device(Device::Cuda(rank))
                    .unwrap();
                let g = c.all_gather_tensor(&t).unwrap();
                assert!(matches!(g.storage(), Storage::Cuda(_)), "left the GPU");
                assert_eq!(g.shape(), [world, 3, n / 3]);
                assert_eq!((g.dtype(), g.to_f32_vec()), (dt, every.clone()));
            }
            let g = c
                .all_gather_tensor(&Tensor::from_f32(vec![n], mine.clone(), DType::F32).unwrap())
                .unwrap();
            assert_eq!(g.to_f32_vec(), every, "all_gather_tensor of a host tensor");
            // A host tensor goes through the host path of the same communicator.
            let mut t = Tensor::from_f32(vec![n], mine.clone(), DType::F32).unwrap();
            c.all_reduce_tensor(&mut t, ReduceOp::Sum).unwrap();
            assert_eq!(t.to_f32_vec(), if world > 1 { sum } else { mine });
        });
        eprintln!("NCCL collectives at world size {world}: all as expected");
    }
}

/// The host default of `all_gather_tensor` (a communicator with no device path) on device tensors:
/// through the host, the result on the tensor's GPU, in its dtype.
#[test]
fn host_gather_of_device_tensors() {
    if gpus() == 0 {
        return;
    }
    let comms = LocalGroup::new(2).into_comms();
    std::thread::scope(|s| {
        for c in comms {
            s.spawn(move || {
                for dt in [DType::F32, DType::BF16] {
                    let mine: Vec<f32> = (0..6).map(|i| value(c.rank(), i)).collect();
                    let t = Tensor::from_f32(vec![2, 3], mine, dt)
                        .unwrap()
                        .to_device(Device::Cuda(0))
                        .unwrap();
                    let g = c.all_gather_tensor(&t).unwrap();
                    assert!(matches!(g.storage(), Storage::Cuda(_)), "left the GPU");
                    assert_eq!((g.shape(), g.dtype()), (&[2, 2, 3][..], dt));
                    let want: Vec<f32> = (0..2)
                        .flat_map(|r| (0..6).map(move |i| value(r, i)))
                        .collect();
                    assert_eq!(g.to_f32_vec(), want, "{dt}");
                }
            });
        }
    });
}

#[test]
fn a_peer_that_never_joins_is_a_timeout() {
    if !two_gpus() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tx, rx) = (std::sync::Mutex::new(Some(tx)), std::sync::Mutex::new(rx));
    let out = on_ranks(2, |c| {
        if c.rank() == 1 {
            // Never joins the all-reduce; stays in the group until rank 0 has given up.
            let _ = rx.lock().unwrap().recv_timeout(Duration::from_secs(120));
            return None;
        }
        let c = c.with_timeout(Duration::from_secs(2));
        let mut v = [1.0f32; 16];
        let r = c.all_reduce(&mut v, ReduceOp::Sum);
        drop(tx.lock().unwrap().take());
        // The communicator is aborted: it refuses what comes next instead of hanging.
        let again = c.barrier();
        Some((r, again))
    });
    let (r, again) = out.into_iter().next().flatten().unwrap();
    match r {
        Err(CommError::Timeout { missing, .. }) => assert_eq!(missing, vec![1]),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(again.is_err(), "an aborted communicator went on");
    eprintln!("a missing peer: timeout, then the aborted communicator refuses work");
}

fn bytes_mut<T: Copy>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: plain-old-data elements viewed as their bytes.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

/// One GPU is enough: rank 1 takes part in the host group (the id's broadcast) but never starts
/// NCCL's init, so rank 0's init can only end by its deadline.
#[test]
fn a_peer_that_never_starts_the_init_is_a_timeout() {
    if gpus() < 1 {
        eprintln!("skipped: needs a GPU");
        return;
    }
    let comms = LocalGroup::new(2).into_comms();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let started = std::time::Instant::now();
    let r = std::thread::scope(|s| {
        let mut it = comms.into_iter();
        let (h0, h1) = (it.next().unwrap(), it.next().unwrap());
        s.spawn(move || {
            // NCCL's id and rank 0's TESSERA_NCCL_HOST_BYTES, as a joining rank receives them.
            let mut id = [0u8; 129];
            h1.broadcast_bytes(&mut id, 0).unwrap();
            let _ = rx.recv_timeout(Duration::from_secs(120));
        });
        let r = NcclComm::with_deadline(&h0, 0, Duration::from_secs(2)).map(|_| ());
        drop(tx);
        r
    });
    match r {
        Err(CommError::Timeout { op, missing, .. }) => {
            assert!(op.contains("init"), "{op}");
            assert_eq!(missing, vec![1]);
        }
        other => panic!("expected a timeout of the init, got {other:?}"),
    }
    eprintln!(
        "a peer that never starts NCCL's init: timeout after {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// A rank whose own setup fails (here: a GPU that does not exist) aborts the host group, and the
/// rank waiting in NCCL's init stops at once instead of at its deadline.
#[test]
fn a_peer_that_fails_before_the_init_stops_the_others() {
    if gpus() < 1 {
        eprintln!("skipped: needs a GPU");
        return;
    }
    let comms = LocalGroup::new(2).into_comms();
    let started = std::time::Instant::now();
    let (r0, r1) = std::thread::scope(|s| {
        let mut it = comms.into_iter();
        let (h0, h1) = (it.next().unwrap(), it.next().unwrap());
        let t1 =
            s.spawn(move || NcclComm::with_deadline(&h1, 99, Duration::from_secs(60)).map(|_| ()));
        let r0 = NcclComm::with_deadline(&h0, 0, Duration::from_secs(60)).map(|_| ());
        (r0, t1.join().unwrap())
    });
    assert!(
        matches!(r1, Err(CommError::Device { rank: 1, .. })),
        "{r1:?}"
    );
    assert!(
        matches!(r0, Err(CommError::Aborted { rank: 0, .. })),
        "{r0:?}"
    );
    eprintln!(
        "a peer that failed before NCCL's init: the other stopped after {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// Device sums between two GPUs of this process give the exact sums, call after call, small and
/// large, in f32 and bf16, interleaved with host collectives, and 100 queued back to back with a
/// late rank (the NVLink all-reduce + norm set up beside NCCL changes none of it).
#[test]
fn device_sums_between_two_gpus_are_exact() {
    if !two_gpus() {
        return;
    }
    on_ranks(2, |c| {
        let rank = c.rank();
        for (call, n) in [1usize, 7, 4096, 100_003, 4096, 500_000, 600_000, 33]
            .into_iter()
            .enumerate()
        {
            for dt in [DType::BF16, DType::F32] {
                let v = |r: usize, i: usize| ((i * 7 + r * 3 + call) % 64) as f32 * 0.25 - 8.0;
                let mine: Vec<f32> = (0..n).map(|i| v(rank, i)).collect();
                let mut t = Tensor::from_f32(vec![n], mine, dt)
                    .unwrap()
                    .to_device(Device::Cuda(rank))
                    .unwrap();
                c.all_reduce_tensor(&mut t, ReduceOp::Sum).unwrap();
                let want: Vec<f32> = (0..n).map(|i| v(0, i) + v(1, i)).collect();
                assert_eq!(t.to_f32_vec(), want, "call {call}, {n} x {dt}");
                // A host collective between device sums keeps the stream's order.
                let mut one = [rank as i32];
                c.all_reduce(&mut one, ReduceOp::Sum).unwrap();
                assert_eq!(one, [1]);
            }
        }
        // 100 sums queued back to back without a host wait, rank 1 starting 50 ms late: the
        // staging halves alternate under a fast rank. Both ranks hold the same values after the
        // first sum, so each later one doubles them (exact in f32 and bf16).
        for dt in [DType::BF16, DType::F32] {
            let mine: Vec<f32> = (0..8192).map(|i| ((i + rank) % 16) as f32 - 8.0).collect();
            let first: Vec<f32> = (0..8192)
                .map(|i| ((i % 16) as f32 - 8.0) + (((i + 1) % 16) as f32 - 8.0))
                .collect();
            let mut t = Tensor::from_f32(vec![8192], mine, dt)
                .unwrap()
                .to_device(Device::Cuda(rank))
                .unwrap();
            if rank == 1 {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            for _ in 0..100 {
                c.all_reduce_tensor(&mut t, ReduceOp::Sum).unwrap();
            }
            let scale = 2f32.powi(99);
            let want: Vec<f32> = first.iter().map(|x| x * scale).collect();
            assert_eq!(t.to_f32_vec(), want, "100 chained sums, {dt}");
        }
    });
    eprintln!("device sums between two GPUs: exact, sizes 1 to 600,000, 100 chained");
}

/// The fused sum + residual add + RMSNorm over NVLink (on unless `TESSERA_P2P_ALLREDUCE=0`):
/// both ranks get bit for bit the dtype-rounded sum followed by `add_rms_norm` (what NCCL's
/// all-reduce and the norm kernel give), call after call with the rows changing, and over 50
/// chained calls queued without a host wait while rank 1 starts 50 ms late.
#[test]
fn fused_sum_and_norm_over_nvlink_are_exact() {
    if !two_gpus() {
        return;
    }
    on_ranks(2, |c| {
        let rank = c.rank();
        let dev = Device::Cuda(rank);
        let (h, dt, eps) = (4096, DType::BF16, 1e-5);
        let t = |rows: usize, f: &dyn Fn(usize) -> f32| {
            Tensor::from_f32(vec![rows, h], (0..rows * h).map(f).collect(), dt)
                .unwrap()
                .to_device(dev)
                .unwrap()
        };
        let w = Tensor::from_f32(
            vec![h],
            (0..h).map(|i| 1.0 + (i % 8) as f32 / 8.0).collect(),
            dt,
        )
        .unwrap()
        .to_device(dev)
        .unwrap();
        let v = |r: usize, i: usize, call: usize| ((i * 7 + r * 3 + call) % 64) as f32 * 0.03 - 1.0;
        let x0 = |i: usize, call: usize| ((i * 5 + call) % 32) as f32 * 0.125 - 2.0;
        // The parts are rounded to the dtype when made; NCCL adds those and rounds the sum once.
        let sum =
            |i: usize, call: usize| dt.round(dt.round(v(0, i, call)) + dt.round(v(1, i, call)));
        for (call, rows) in [1usize, 8, 64, 1, 3].into_iter().enumerate() {
            let part = t(rows, &|i| v(rank, i, call));
            let mut x = t(rows, &|i| x0(i, call));
            let delta = t(rows, &|i| sum(i, call));
            let mut want_x = t(rows, &|i| x0(i, call));
            let want_y = tessera_tensor::ops::add_rms_norm(&mut want_x, &delta, &w, eps).unwrap();
            let Some(y) = c.all_reduce_add_rms_norm(&part, &mut x, &w, eps).unwrap() else {
                assert_eq!(call, 0, "taken once, then refused");
                eprintln!(
                    "skipped: the fused path is off (TESSERA_P2P_ALLREDUCE=0, or no peer access)"
                );
                return;
            };
            assert_eq!(
                x.to_f32_vec(),
                want_x.to_f32_vec(),
                "x, call {call}, {rows} rows"
            );
            assert_eq!(
                y.to_f32_vec(),
                want_y.to_f32_vec(),
                "y, call {call}, {rows} rows"
            );
        }
        // 50 calls back to back, each adding the same sum: x and y after the last as the unfused
        // kernels give them.
        let (rows, call) = (16, 9);
        let part = t(rows, &|i| v(rank, i, call));
        let delta = t(rows, &|i| sum(i, call));
        let (mut x, mut want_x) = (t(rows, &|i| x0(i, call)), t(rows, &|i| x0(i, call)));
        let mut want_y = None;
        for _ in 0..50 {
            want_y = Some(tessera_tensor::ops::add_rms_norm(&mut want_x, &delta, &w, eps).unwrap());
        }
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut y = None;
        for _ in 0..50 {
            y = c.all_reduce_add_rms_norm(&part, &mut x, &w, eps).unwrap();
        }
        assert_eq!(
            x.to_f32_vec(),
            want_x.to_f32_vec(),
            "x after 50 chained calls"
        );
        assert_eq!(
            y.unwrap().to_f32_vec(),
            want_y.unwrap().to_f32_vec(),
            "y after 50 chained calls"
        );
        eprintln!("rank {rank}: fused NVLink sum + norm exact, 1 to 64 rows, 50 chained calls");
    });
}

/// A row-parallel projection of one row that hands its outputs to the peer as it makes them
/// (`row_parallel_matmul`: the GEMV pushes the LL lines the fused kernel would) followed by the
/// fused sum + add + norm gives bit for bit what the GEMV, NCCL's all-reduce and `add_rms_norm`
/// give, call after call (the call numbers and slots of the pushed and the plain fused calls
/// interleaved), and a rank 50 ms late changes nothing.
#[test]
fn pushed_projection_then_fused_norm_is_exact() {
    if !two_gpus() {
        return;
    }
    on_ranks(2, |c| {
        let rank = c.rank();
        let dev = Device::Cuda(rank);
        let (k, h, eps) = (1024, 4096, 1e-5);
        let bf = |shape: Vec<usize>, seed: usize| {
            let n: usize = shape.iter().product();
            let v = (0..n)
                .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 - 500.0) / 2000.0)
                .collect();
            Tensor::from_f32(shape, v, DType::BF16)
                .unwrap()
                .to_device(dev)
                .unwrap()
        };
        let w = bf(vec![h, k], 1 + rank);
        let nw = bf(vec![h], 7);
        let mut x = bf(vec![1, h], 8);
        let mut want_x = bf(vec![1, h], 8);
        for call in 0..12 {
            if rank == 1 && call == 5 {
                std::thread::sleep(Duration::from_millis(50));
            }
            let a = bf(vec![1, k], 20 + call * 2 + rank);
            // The reference: the GEMV, NCCL's sum, add_rms_norm.
            let mut part = tessera_tensor::ops::matmul_t(&a, &w, None).unwrap();
            let mut sum = part.clone();
            c.all_reduce_tensor(&mut sum, ReduceOp::Sum).unwrap();
            let want_y = tessera_tensor::ops::add_rms_norm(&mut want_x, &sum, &nw, eps).unwrap();
            // Every third call without the push: the fused kernel pushes itself.
            let y = if call % 3 == 2 {
                c.all_reduce_add_rms_norm(&part, &mut x, &nw, eps).unwrap()
            } else {
                let Some(p) = c.row_parallel_matmul(&a, &w).unwrap() else {
                    assert_eq!(call, 0, "taken once, then refused");
                    eprintln!("skipped: TESSERA_P2P_PUSH=1 not set (or the NVLink path is off)");
                    return;
                };
                assert_eq!(
                    p.to_f32_vec(),
                    part.to_f32_vec(),
                    "call {call}: the pushed GEMV"
                );
                part = p;
                c.all_reduce_add_rms_norm(&part, &mut x, &nw, eps).unwrap()
            };
            let y = y.expect("the fused kernel takes a row of 4,096");
            assert_eq!(x.to_f32_vec(), want_x.to_f32_vec(), "x, call {call}");
            assert_eq!(y.to_f32_vec(), want_y.to_f32_vec(), "y, call {call}");
        }
        eprintln!("rank {rank}: pushed GEMV + fused sum and norm exact, 12 calls");
    });
}

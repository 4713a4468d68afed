//! The TCP backend against the in-process one: every collective gives the same bits (the ring
//! reduces in the order the local backend reproduces), synchronously and asynchronously, on the
//! world and on sub-groups, for sizes that do and do not divide evenly and span many chunks.

mod common;

use std::time::Duration;

use common::{data, on_each, tcp_job};
use half::{bf16, f16};
use tessera_comm::{CommExt, Communicator, LocalGroup, Mesh, MeshShape, ReduceOp};

const T: Duration = Duration::from_secs(20);

/// Everything one rank computes in the test program, on any backend.
fn program(c: &dyn Communicator) -> Vec<Vec<u8>> {
    let (r, n) = (c.rank(), c.world_size());
    let mut out = Vec::new();
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for (len, op) in [
        (1, ReduceOp::Sum),
        (7, ReduceOp::Avg),
        (3001, ReduceOp::Sum),
        (257, ReduceOp::Max),
    ] {
        let mut v = data(r, len);
        c.all_reduce(&mut v, op).unwrap();
        out.push(bytes(&v));
    }
    let mut h: Vec<bf16> = data(r, 999).into_iter().map(bf16::from_f32).collect();
    c.all_reduce(&mut h, ReduceOp::Sum).unwrap();
    out.push(h.iter().flat_map(|x| x.to_le_bytes()).collect());
    let mut i = vec![r as i32 * 3 - 1; 5];
    c.all_reduce(&mut i, ReduceOp::Max).unwrap();
    out.push(i.iter().flat_map(|x| x.to_le_bytes()).collect());

    let send = data(r, 600);
    let mut g = vec![0.0f32; 600 * n];
    c.all_gather(&send, &mut g).unwrap();
    out.push(bytes(&g));

    let send = data(r, 513 * n);
    let mut rs = vec![0.0f32; 513];
    c.reduce_scatter(&send, &mut rs, ReduceOp::Sum).unwrap();
    out.push(bytes(&rs));

    // Every element type and reduction, through both reduction paths of the ring (in place for
    // all-reduce, into another buffer for reduce-scatter).
    let d = data(r, 211 * n);
    let le = |v: Vec<Vec<u8>>| v.concat();
    let mut hf: Vec<f16> = d.iter().map(|&x| f16::from_f32(x)).collect();
    c.all_reduce(&mut hf, ReduceOp::Avg).unwrap();
    out.push(le(hf.iter().map(|x| x.to_le_bytes().to_vec()).collect()));
    let mut rs_hf = vec![f16::ZERO; 211];
    let hf: Vec<f16> = d.iter().map(|&x| f16::from_f32(x)).collect();
    c.reduce_scatter(&hf, &mut rs_hf, ReduceOp::Max).unwrap();
    out.push(le(rs_hf.iter().map(|x| x.to_le_bytes().to_vec()).collect()));
    let bh: Vec<bf16> = d.iter().map(|&x| bf16::from_f32(x)).collect();
    let mut rs_bh = vec![bf16::ZERO; 211];
    c.reduce_scatter(&bh, &mut rs_bh, ReduceOp::Avg).unwrap();
    out.push(le(rs_bh.iter().map(|x| x.to_le_bytes().to_vec()).collect()));
    let iv: Vec<i32> = d.iter().map(|&x| (x * 1e8) as i32).collect();
    let mut rs_i = vec![0i32; 211];
    c.reduce_scatter(&iv, &mut rs_i, ReduceOp::Sum).unwrap();
    out.push(le(rs_i.iter().map(|x| x.to_le_bytes().to_vec()).collect()));
    let bv: Vec<u8> = d.iter().map(|&x| (x * 20.0).abs() as u8).collect();
    let mut rs_u = vec![0u8; 211];
    c.reduce_scatter(&bv, &mut rs_u, ReduceOp::Sum).unwrap();
    out.push(rs_u);
    let mut bv = bv;
    c.all_reduce(&mut bv, ReduceOp::Avg).unwrap();
    out.push(bv);
    let mut fv = d.clone();
    c.reduce_scatter(&d, &mut fv[..211], ReduceOp::Max).unwrap();
    out.push(bytes(&fv[..211]));

    let mut b = data(r, 2000);
    c.broadcast(&mut b, n - 1).unwrap();
    out.push(bytes(&b));
    c.barrier().unwrap();

    // Asynchronous: issue two, then wait, in any order.
    let a1 = c.all_reduce_async(data(r, 4000), ReduceOp::Sum).unwrap();
    let a2 = c
        .all_gather_async(vec![r as i32; 3], vec![0i32; 3 * n])
        .unwrap();
    let g2 = a2.wait().unwrap();
    out.push(bytes(&a1.wait().unwrap()));
    out.push(g2.iter().flat_map(|x| x.to_le_bytes()).collect());

    // Point to point around a ring.
    if n > 1 {
        let mut got = vec![0u8; 3000];
        c.send(&vec![r as u8; 3000], (r + 1) % n).unwrap();
        c.recv(&mut got, (r + n - 1) % n).unwrap();
        out.push(got);
    }
    // In-process ranks abort the group when a handle is dropped: finish together.
    c.barrier().unwrap();
    out
}

fn local_results(n: usize) -> Vec<Vec<Vec<u8>>> {
    on_each(LocalGroup::with_timeout(n, T).into_comms(), |c| program(&c))
}

#[test]
fn tcp_equals_local_bit_for_bit() {
    for n in [1, 2, 3, 4] {
        let want = local_results(n);
        let got = on_each(tcp_job(n, T, |_| {}), |c| program(&c));
        assert_eq!(got, want, "{n} ranks");
        // Every rank agrees on every all-reduce.
        for r in 1..n {
            assert_eq!(got[r][..6], got[0][..6]);
        }
    }
}

#[test]
fn all_reduce_sums_what_it_should() {
    let got = on_each(tcp_job(3, T, |_| {}), |c| {
        let mut v: Vec<f32> = (0..5000).map(|i| (i + c.rank()) as f32).collect();
        c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        v
    });
    for v in got {
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, (3 * i + 3) as f32);
        }
    }
}

#[test]
fn sub_groups_of_a_mesh_match_the_local_backend() {
    let shape = MeshShape::new(2, 1, 2).unwrap();
    let prog = |c: &dyn Communicator| {
        let mesh = Mesh::new(c, shape).unwrap();
        let r = c.rank() as f32;
        let mut tp = vec![r; 3];
        mesh.tp().all_reduce(&mut tp, ReduceOp::Sum).unwrap();
        let mut dp = vec![r * 10.0; 2];
        mesh.dp().all_reduce(&mut dp, ReduceOp::Sum).unwrap();
        // The world is still usable between sub-group collectives.
        let mut w = vec![1i32];
        c.all_reduce(&mut w, ReduceOp::Sum).unwrap();
        let p = mesh.tp().all_reduce_async(vec![r], ReduceOp::Max).unwrap();
        (mesh.coord(), tp, dp, w, p.wait().unwrap())
    };
    let local = on_each(LocalGroup::with_timeout(4, T).into_comms(), |c| prog(&c));
    let tcp = on_each(tcp_job(4, T, |_| {}), |c| prog(&c));
    assert_eq!(local, tcp);
    assert_eq!(tcp[3].1, vec![5.0; 3]); // tp group [2, 3]
    assert_eq!(tcp[3].2, vec![40.0; 2]); // dp group [1, 3]
    assert_eq!(tcp[0].3, vec![4]);
    assert_eq!(tcp[2].4, vec![3.0]);
}

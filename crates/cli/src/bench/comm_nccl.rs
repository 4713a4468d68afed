//! `tessera bench comm --backend nccl`: the latency of the device collectives of tensor-parallel
//! decode, one thread and GPU a rank, each call timed inside a CUDA graph of `CHAIN` calls back to
//! back (as a captured decode step issues them: no host launch between them).
//!
//! `--op all_reduce`: NCCL's all-reduce of a device tensor. `--op all_reduce_add_rms_norm`: a
//! decoder layer's row-parallel sum, residual add and RMSNorm of rows of `--hidden` values, fused
//! over NVLink (unless `TESSERA_P2P_ALLREDUCE=0`) beside its peer measured in the same run,
//! NCCL's all-reduce followed by the `add_rms_norm` kernel (calls above the kernel's 512 KiB say
//! "NCCL's": the model sums those through NCCL).

use std::time::Instant;

use anyhow::{bail, Result};
use tessera_comm::{CommExt, Communicator, LocalGroup, NcclComm, ReduceOp};
use tessera_tensor::cuda::p2p::P2P_MAX_BYTES;
use tessera_tensor::{ops, DType, Device, Tensor};

use super::comm::CommArgs;

/// Calls a graph holds.
const CHAIN: usize = 64;

#[derive(Clone, Copy, PartialEq)]
enum What {
    AllReduce,
    Fused,
    Unfused,
}

pub fn run(a: &CommArgs, sizes: &[usize]) -> Result<()> {
    let dt = match a.dtype.as_str() {
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        d => bail!("--backend nccl: --dtype must be bf16 or f32, got {d:?}"),
    };
    let fused = match a.op.as_str() {
        "all_reduce" => false,
        "all_reduce_add_rms_norm" => true,
        o => bail!("--backend nccl: --op must be all_reduce or all_reduce_add_rms_norm, got {o:?}"),
    };
    if a.nproc < 2 {
        bail!(
            "--backend nccl: --nproc must be at least 2 (a GPU each), got {}",
            a.nproc
        );
    }
    for r in 0..a.nproc {
        Device::Cuda(r).ensure_available()?;
    }
    if a.hidden == 0 || !a.hidden.is_multiple_of(8) {
        bail!(
            "--hidden must be a positive multiple of 8, got {}",
            a.hidden
        );
    }
    let comms = LocalGroup::new(a.nproc).into_comms();
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(ordinal, host)| {
                s.spawn(move || -> Result<()> {
                    // One communicator for every size, or with --fresh-comm one a size, the
                    // earlier ones kept (dropped after any abort, at the end) so that each one's
                    // buffers land at other addresses than theirs.
                    let groups: Vec<&[usize]> = if a.fresh_comm {
                        sizes.chunks(1).collect()
                    } else {
                        vec![sizes]
                    };
                    let mut kept = Vec::new();
                    let mut r = Ok(());
                    for (i, group) in groups.into_iter().enumerate() {
                        let c = NcclComm::new(&host, ordinal)?;
                        r = bench_rank(&c, ordinal, a, dt, fused, group, i == 0);
                        kept.push(c);
                        if r.is_err() {
                            break;
                        }
                    }
                    if let Err(e) = &r {
                        host.abort(&format!("rank {ordinal}: {e}"));
                    }
                    r
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a rank panicked")))
            .collect()
    });
    results.into_iter().collect()
}

fn bench_rank(
    c: &NcclComm,
    ordinal: usize,
    a: &CommArgs,
    dt: DType,
    fused: bool,
    sizes: &[usize],
    header: bool,
) -> Result<()> {
    let rank = c.rank();
    let dev = Device::Cuda(ordinal);
    let es = dt.size_in_bytes();
    let whats: &[What] = if fused {
        &[What::Unfused, What::Fused]
    } else {
        &[What::AllReduce]
    };
    if rank == 0 && header {
        outln!(
            "# tessera bench comm: nccl backend, {} GPUs, {}, {dt}, {CHAIN} calls a CUDA graph{}",
            a.nproc,
            a.op,
            if a.fresh_comm {
                ", a new communicator a size"
            } else {
                ""
            }
        );
        outln!("# fused NVLink sum + norm {}", on(c.fused_norm_active()));
        if fused {
            outln!(
                "# {:>10} {:>6} {:>7} {:>22} {:>14} {:>9}",
                "size(B)",
                "rows",
                "hidden",
                "nccl+add_rms_norm(us)",
                "fused(us)",
                "speedup"
            );
        } else {
            outln!(
                "# {:>10} {:>12} {:>10} {:>10} {:>12}",
                "size(B)",
                "count",
                "time(us)",
                "algbw(GB/s)",
                "busbw(GB/s)"
            );
        }
    }
    for &size in sizes {
        let (rows, count) = if fused {
            let rows = (size / (a.hidden * es)).max(1);
            (rows, rows * a.hidden)
        } else {
            (1, (size / es).max(1))
        };
        let h = if fused { a.hidden } else { count };
        let mut times = Vec::new();
        for &what in whats {
            // Off, or a call larger than the kernel takes (the model then sums through NCCL).
            if what == What::Fused
                && (!c.fused_norm_active() || bytes_of(rows, h, es) > P2P_MAX_BYTES)
            {
                times.push(None);
                continue;
            }
            // Values that stay finite call after call: parts of zeros, a residual of ones.
            let t = |v: f32| Tensor::from_f32(vec![rows, h], vec![v; rows * h], dt)?.to_device(dev);
            let mut part = t(0.0)?;
            let mut x = t(1.0)?;
            let w = Tensor::from_f32(vec![h], vec![1.0; h], dt)?.to_device(dev)?;
            // A call the kernel does not take (rows, row size): the model sums it through NCCL.
            if what == What::Fused
                && c.all_reduce_add_rms_norm(&part, &mut x, &w, 1e-5)?
                    .is_none()
            {
                times.push(None);
                continue;
            }
            let call = |part: &mut Tensor, x: &mut Tensor| -> Result<()> {
                match what {
                    What::AllReduce => c.all_reduce_tensor(part, ReduceOp::Sum)?,
                    What::Unfused => {
                        c.all_reduce_tensor(part, ReduceOp::Sum)?;
                        ops::add_rms_norm(x, part, &w, 1e-5)?;
                    }
                    What::Fused => {
                        if c.all_reduce_add_rms_norm(part, x, &w, 1e-5)?.is_none() {
                            bail!("the fused sum + norm refused {rows} rows of {h}");
                        }
                    }
                }
                Ok(())
            };
            let mut graph = tessera_tensor::cuda::graph::DecodeGraph::capture(ordinal, 1, || {
                (0..CHAIN).try_for_each(|_| call(&mut part, &mut x))
            })?;
            for _ in 0..a.warmup.max(1) {
                graph.replay(&[0], 0)?;
            }
            c.barrier()?;
            let t0 = Instant::now();
            for _ in 0..a.iters {
                graph.replay(&[0], 0)?;
            }
            let mut secs = [t0.elapsed().as_secs_f32() / (a.iters * CHAIN) as f32];
            // The slowest rank sets the pace.
            c.all_reduce(&mut secs, ReduceOp::Max)?;
            times.push(Some(secs[0] as f64));
        }
        if rank == 0 {
            let bytes = count * es;
            if fused {
                let (u, f) = (times[0].unwrap_or(f64::NAN), times[1]);
                outln!(
                    "  {:>10} {:>6} {:>7} {:>22.2} {:>14} {:>9}",
                    bytes,
                    rows,
                    h,
                    u * 1e6,
                    f.map_or(
                        if c.fused_norm_active() {
                            "NCCL's".into()
                        } else {
                            "off".into()
                        },
                        |f| format!("{:.2}", f * 1e6)
                    ),
                    f.map_or("-".into(), |f| format!("{:.2}x", u / f)),
                );
            } else {
                let t = times[0].unwrap_or(f64::NAN);
                let n = a.nproc as f64;
                let algbw = bytes as f64 / t;
                outln!(
                    "  {:>10} {:>12} {:>10.2} {:>10.2} {:>12.2}",
                    bytes,
                    count,
                    t * 1e6,
                    algbw / 1e9,
                    algbw * 2.0 * (n - 1.0) / n / 1e9
                );
            }
        }
    }
    Ok(())
}

fn bytes_of(rows: usize, h: usize, es: usize) -> usize {
    rows * h * es
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

//! `tessera bench comm`: collective bandwidth in the style of nccl-tests (size, time, algbw,
//! busbw), beside a measured ceiling: memcpy bandwidth for the in-process backend, one loopback TCP
//! stream for the TCP backend.
//!
//! busbw = algbw × (2(n-1)/n for all_reduce, (n-1)/n for all_gather and reduce_scatter, 1 for
//! broadcast): the bytes each rank's link carries, comparable with the ceiling whatever n is. As
//! in nccl-tests, the size of all_gather / reduce_scatter is the whole (gathered / scattered)
//! buffer. With `--backend tcp` the benchmark starts `--nproc` ranks of itself, or, when it is
//! already one rank of a launched job, runs as that rank.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use tessera_comm::{CommExt, Communicator, Element, LocalGroup, ReduceOp};

#[derive(clap::Args, Debug)]
pub struct CommArgs {
    /// local (threads, shared memory), tcp (processes, loopback TCP) or nccl (a thread and GPU a
    /// rank, device tensors; built with the cuda feature).
    #[arg(long, default_value = "local")]
    pub backend: String,
    /// all_reduce, all_gather, reduce_scatter or broadcast; with --backend nccl all_reduce or
    /// all_reduce_add_rms_norm (the fused NVLink sum + residual add + RMSNorm beside NCCL's
    /// all-reduce and the norm kernel).
    #[arg(long, default_value = "all_reduce")]
    pub op: String,
    /// Buffer sizes in bytes (K, M, G suffixes: powers of 1024).
    #[arg(long, value_delimiter = ',', default_value = "4K,64K,1M,16M,64M")]
    pub sizes: Vec<String>,
    /// Ranks.
    #[arg(long, default_value_t = 2)]
    pub nproc: usize,
    /// Element type: f32, bf16, f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Timed iterations per size (after --warmup untimed ones).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Values a row of all_reduce_add_rms_norm (--backend nccl): rows = size / (hidden x dtype).
    #[arg(long, default_value_t = 4096)]
    pub hidden: usize,
    /// --backend nccl: a new communicator (NCCL's and the fused kernel's buffers) for each size,
    /// in the same process, the earlier ones kept until the end (so that the new buffers land
    /// elsewhere): whether a size's figure depends on where those buffers landed.
    #[arg(long)]
    pub fresh_comm: bool,
    /// Testing aid: this rank issues a collective one element longer than the others.
    #[arg(long, hide = true)]
    pub fault_mismatch_rank: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Op {
    AllReduce,
    AllGather,
    ReduceScatter,
    Broadcast,
}

fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1usize << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (&t[..], 1),
    };
    let n: usize = num
        .trim_end_matches('B')
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .with_context(|| format!("--sizes: {s:?} is not a size (e.g. 4K, 16M, 1G)"))?;
    n.checked_mul(mult)
        .filter(|b| *b <= 1 << 34)
        .with_context(|| format!("--sizes: {s:?} is too large (at most 16G)"))
}

pub fn run(a: CommArgs) -> Result<()> {
    #[cfg(not(feature = "cuda"))]
    if a.backend == "nccl" {
        bail!("--backend nccl needs a build with the cuda feature");
    }
    let sizes = a
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<Result<Vec<_>>>()?;
    if a.iters == 0 {
        bail!("--iters must be at least 1");
    }
    if a.fresh_comm && a.backend != "nccl" {
        bail!("--fresh-comm needs --backend nccl");
    }
    #[cfg(feature = "cuda")]
    if a.backend == "nccl" {
        return super::comm_nccl::run(&a, &sizes);
    }
    let op = match a.op.as_str() {
        "all_reduce" => Op::AllReduce,
        "all_gather" => Op::AllGather,
        "reduce_scatter" => Op::ReduceScatter,
        "broadcast" => Op::Broadcast,
        o => bail!("--op must be all_reduce, all_gather, reduce_scatter or broadcast, got {o:?}"),
    };
    if a.nproc == 0 || a.nproc > crate::launch_cmd::MAX_LOCAL_RANKS {
        bail!(
            "--nproc must be between 1 and {}, got {}",
            crate::launch_cmd::MAX_LOCAL_RANKS,
            a.nproc
        );
    }
    // Every rank holds a buffer of the largest size and its share (one host's memory).
    let largest = sizes.iter().copied().max().unwrap_or(0) as f64;
    let need = 2.0 * a.nproc as f64 * largest;
    if let Some(total) = tessera_tensor::device::exceeds_host_memory(need) {
        bail!(
            "--nproc {} ranks of {:.1} GB buffers take {:.1} GB, more than this host's {:.1} GB of memory",
            a.nproc,
            largest / 1e9,
            need / 1e9,
            total / 1e9
        );
    }
    match a.dtype.as_str() {
        "f32" => dispatch::<f32>(&a, op, &sizes),
        "bf16" => dispatch::<bf16>(&a, op, &sizes),
        "f16" => dispatch::<f16>(&a, op, &sizes),
        d => bail!("--dtype must be f32, bf16 or f16, got {d:?}"),
    }
}

fn dispatch<T: Element + Default>(a: &CommArgs, op: Op, sizes: &[usize]) -> Result<()> {
    match a.backend.as_str() {
        "local" => {
            let ceiling = memcpy_bandwidth();
            let comms = LocalGroup::new(a.nproc).into_comms();
            let results: Vec<Result<()>> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .map(|c| {
                        s.spawn(move || {
                            bench_rank::<T>(&c, a, op, sizes, ("memcpy, one thread", ceiling))
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| bail!("a rank panicked")))
                    .collect()
            });
            results.into_iter().collect()
        }
        "tcp" => match tessera_comm::process_world()? {
            Some(world) => {
                let ceiling = if world.rank() == 0 {
                    loopback_tcp_bandwidth()?
                } else {
                    0.0
                };
                bench_rank::<T>(&*world, a, op, sizes, ("one loopback TCP stream", ceiling))
            }
            None => {
                if tessera_comm::LaunchEnv::from_env()?.is_some() || a.nproc < 2 {
                    bail!("bench comm --backend tcp needs at least 2 ranks");
                }
                // Start --nproc ranks of this very command; each sees the launch env and runs
                // as its rank.
                let mut cmd = vec!["tessera".to_string()];
                cmd.extend(std::env::args().skip(1));
                super::super::launch_cmd::run_job(super::super::launch_cmd::JobSpec {
                    nproc_per_node: a.nproc,
                    nnodes: 1,
                    node_rank: 0,
                    master_addr: "127.0.0.1".into(),
                    master_port: tessera_comm::rendezvous::free_port()?,
                    job_token: format!("bench-{:016x}", rand::random::<u64>()),
                    extra_env: Vec::new(),
                    cmd,
                })
            }
        },
        b => bail!("--backend must be local, tcp or nccl, got {b:?}"),
    }
}

fn bench_rank<T: Element + Default>(
    c: &dyn Communicator,
    a: &CommArgs,
    op: Op,
    sizes: &[usize],
    ceiling: (&str, f64),
) -> Result<()> {
    let (rank, n) = (c.rank(), c.world_size());
    let es = std::mem::size_of::<T>();
    if rank == 0 {
        outln!(
            "# tessera bench comm: {} backend, {} ranks, {:?}, {}",
            a.backend,
            n,
            op,
            a.dtype
        );
        outln!("# ceiling: {} {:.2} GB/s", ceiling.0, ceiling.1 / 1e9);
        outln!(
            "# {:>12} {:>12} {:>10} {:>12} {:>12} {:>12} {:>9}",
            "size(B)",
            "count(elems)",
            "type",
            "time(us)",
            "algbw(GB/s)",
            "busbw(GB/s)",
            "%ceiling"
        );
    }
    let bus_factor = match op {
        Op::AllReduce => 2.0 * (n as f64 - 1.0) / n as f64,
        Op::AllGather | Op::ReduceScatter => (n as f64 - 1.0) / n as f64,
        Op::Broadcast => 1.0,
    };
    let mut first = true;
    for &size in sizes {
        // Whole elements, and for gather/scatter a multiple of n of them.
        let unit = if matches!(op, Op::AllGather | Op::ReduceScatter) {
            n
        } else {
            1
        };
        let count = (size / es / unit).max(1) * unit;
        let mut extra = 0;
        if first && a.fault_mismatch_rank == Some(rank) {
            extra = unit;
        }
        first = false;
        let mut big = vec![T::default(); count + extra];
        let mut small = vec![T::default(); (count + extra) / unit];
        let mut step = || -> Result<()> {
            match op {
                Op::AllReduce => c.all_reduce(&mut big, ReduceOp::Sum)?,
                Op::AllGather => c.all_gather(&small, &mut big)?,
                Op::ReduceScatter => c.reduce_scatter(&big, &mut small, ReduceOp::Sum)?,
                Op::Broadcast => c.broadcast(&mut big, 0)?,
            }
            Ok(())
        };
        for _ in 0..a.warmup {
            step()?;
        }
        c.barrier()?;
        let t0 = Instant::now();
        for _ in 0..a.iters {
            step()?;
        }
        let mut secs = [t0.elapsed().as_secs_f32() / a.iters as f32];
        // The slowest rank sets the pace.
        c.all_reduce(&mut secs, ReduceOp::Max)?;
        if rank == 0 {
            let bytes = (count * es) as f64;
            let t = secs[0] as f64;
            let algbw = bytes / t;
            let busbw = algbw * bus_factor;
            outln!(
                "  {:>12} {:>12} {:>10} {:>12.1} {:>12.2} {:>12.2} {:>8.0}%",
                count * es,
                count,
                a.dtype,
                t * 1e6,
                algbw / 1e9,
                busbw / 1e9,
                100.0 * busbw / ceiling.1
            );
        }
    }
    Ok(())
}

/// Bytes/s of one thread copying a 256 MiB buffer.
fn memcpy_bandwidth() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let secs = super::median_secs(5, || {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
    });
    n as f64 / secs
}

/// Bytes/s of one TCP stream over loopback (1 GiB in 1 MiB writes, to a reader thread).
fn loopback_tcp_bandwidth() -> Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let total: usize = 1 << 30;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < total {
            let k = s.read(&mut buf)?;
            if k == 0 {
                break;
            }
            got += k;
        }
        s.write_all(&[1])?;
        Ok(got)
    });
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    let chunk = vec![7u8; 1 << 20];
    let t0 = Instant::now();
    for _ in 0..total / chunk.len() {
        s.write_all(&chunk)?;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    let secs = t0.elapsed().as_secs_f64();
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("loopback reader panicked"))??;
    Ok(got as f64 / secs)
}

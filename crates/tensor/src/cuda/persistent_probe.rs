//! What a persistent decode kernel could reach: the probe behind `tessera bench persistent`.
//!
//! A decode step today is a chain of kernels (one GEMV a projection, attention, the fused
//! all-reduce + norm), each starting when the one before lets it. At tp 2 a rank's step is
//! ~0.35 ms slower than its weights alone take to stream, and one rank alone (no exchange) ~0.3
//! ms over its roofline: ramps and tails of short kernels, and exchanges the memory waits for.
//! The design that would remove both is one persistent kernel a step whose warps never stop
//! streaming weights: the weights of the next projection do not depend on the exchange, only its
//! input vector does. Whether that pays is measured here before it is built: one kernel
//! (`persistent_probe.cu`) streams a step's weights in the step's own segments (q/k/v, an
//! attention-sized read, o, gate/up, down a layer, then the LM head), computing each row's dot
//! product with the segment's input vector, and meets the whole grid at the step's dependencies
//! (the input of each segment is the outputs of the one before), exchanging the row-parallel
//! projections' outputs with the peer GPU over NVLink where there is one. Variants:
//!
//! - `stream`: no barrier at all (the inputs are then not waited for): the kernel's own ceiling;
//! - `barriers`: a grid barrier at every dependency, no exchange;
//! - `exchange`: the barriers and the exchanges with the peer (two GPUs);
//! - `ring N`: each warp streams its lines (512 bytes each) through a ring of N in shared
//!   memory (cp.async); `ahead`: it goes on loading the next segments' lines while it waits at
//!   a barrier, else it stops at the end of its share and refills after; `ahead to exchanges`:
//!   across barriers but not across an exchange (as a chain of kernels, whose next GEMV can
//!   prefetch little before the exchange ends).
//!
//! The difference between a variant and `stream` of the same ring is what a persistent step's
//! synchronisation costs; the probe's GEMV arithmetic is the decode GEMV's (bf16 weights, f32 sums).

use std::sync::{Arc, Barrier, Mutex};

use cudarc::driver::{result, sys, CudaFunction, LaunchConfig, PushKernelArg};

use super::{dev_err, GpuDevice};
use crate::TensorError;

/// One decoder step's shapes at one tensor-parallel degree (one rank's share).
#[derive(Clone, Copy, Debug)]
pub struct StepShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub kv_heads: usize,
    pub layers: usize,
    pub vocab: usize,
    pub tp: usize,
}

impl StepShape {
    /// The segments of one rank's step: (rows, k, sync after: 0 none, 1 barrier, 2 barrier +
    /// exchange).
    fn segments(&self) -> Vec<(usize, usize, u32)> {
        let (h, i, t) = (self.hidden, self.intermediate, self.tp);
        let mut v = Vec::new();
        for _ in 0..self.layers {
            v.push(((h + 2 * self.kv_heads * 128) / t, h, 1)); // q/k/v: attention needs them all
            v.push((256, 256, 1)); // attention's cache reads (128 KB), o needs all heads
            v.push((h, h / t, 2)); // o: row-parallel, exchanged
            v.push((2 * i / t, h, 1)); // gate/up: down needs every product
            v.push((h, i / t, 2)); // down: row-parallel, exchanged
        }
        v.push((self.vocab.div_ceil(t), h, 0)); // the LM head
        v
    }

    /// Weight bytes one rank streams a step.
    pub fn bytes(&self) -> usize {
        self.segments().iter().map(|&(r, k, _)| r * k * 2).sum()
    }

    /// Refuses a shape the probe cannot run (before any size is computed from it).
    pub fn check(&self) -> Result<(), String> {
        let t = self.tp;
        if !(1..=65_536).contains(&self.layers) || !(1..=1 << 24).contains(&self.vocab) {
            return Err(format!(
                "the probe takes 1 to 65,536 layers and a vocabulary of 1 to 2^24, got {} and {}",
                self.layers, self.vocab
            ));
        }
        let ok = t >= 1
            && self.hidden <= 16384
            && self.intermediate <= 16384 * t
            && self.hidden.is_multiple_of(256 * t)
            && self.intermediate.is_multiple_of(256 * t)
            && self.kv_heads.is_multiple_of(t)
            && self.vocab >= 1
            // The kernel loads an input vector of at most 16,384 values (8 chunks of 4 a thread)
            // and reads outputs 4 at a time.
            && self
                .segments()
                .iter()
                .all(|&(rows, k, _)| k <= 16384 && rows.is_multiple_of(4));
        if ok {
            Ok(())
        } else {
            Err(format!(
                "the probe needs hidden and intermediate sizes that are multiples of 256 x tp (inputs of at most 16,384), kv heads divisible by tp and a vocabulary share a multiple of 4 (tp {t})"
            ))
        }
    }
}

/// One variant's figures (the first GPU's; with a peer both run in step).
#[derive(Clone, Debug)]
pub struct PersistentTiming {
    pub variant: String,
    /// Lines in flight a warp, and how far they run ahead.
    pub ring: usize,
    pub ahead: Ahead,
    /// Mean milliseconds a step (the output buffer's clearing between steps included).
    pub ms: f64,
    /// Grid barriers and exchanges a step (0 barriers: the stream alone).
    pub barriers: usize,
    pub exchanges: usize,
    /// Blocks of 512 threads on the grid (all resident at once).
    pub blocks: u32,
}

const SOURCE: &str = include_str!("persistent_probe.cu");
const THREADS: u32 = 512;
/// A kernel still waiting at a barrier or for the peer's values this long after it started (each
/// block counts from its own start) ends, reported as an error.
const TIMEOUT_NS: u64 = 2_000_000_000;

struct Variant {
    name: String,
    no_sync: bool,
    exchange: bool,
    /// Lines in flight a warp (a kernel each: `probe_step_rN`).
    ring: usize,
    ahead: Ahead,
}

/// How far a warp's ring may run ahead of the segment it computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ahead {
    /// Not past the end of the segment's share: refilled after each barrier.
    No,
    /// Into every following segment: lines stay in flight across barriers and exchanges.
    Always,
    /// Across barriers but not past the next exchange.
    ToExchange,
}

impl Ahead {
    /// The kernel's `ahead` argument.
    fn code(self) -> i32 {
        match self {
            Ahead::No => 0,
            Ahead::Always => 1,
            Ahead::ToExchange => 2,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Ahead::No => "",
            Ahead::Always => ", ahead",
            Ahead::ToExchange => ", ahead to exchanges",
        }
    }
}

/// The ring sizes `persistent_probe.cu` has a kernel for.
const RINGS: [usize; 3] = [8, 16, 24];

/// Runs every variant for `steps` steps on each GPU of `ordinals` (one, or two exchanging over
/// NVLink), after a warm-up.
pub fn probe_persistent(
    ordinals: &[usize],
    shape: StepShape,
    steps: usize,
) -> Result<Vec<PersistentTiming>, TensorError> {
    let first = ordinals.first().copied().unwrap_or(0);
    if steps == 0 {
        return Err(dev_err(
            first,
            "the persistent probe runs at least one step",
        ));
    }
    let peer = ordinals.len() == 2;
    let mut variants: Vec<Variant> = RINGS
        .map(|ring| Variant {
            name: format!("stream, ring {ring}"),
            no_sync: true,
            exchange: false,
            ring,
            ahead: Ahead::Always,
        })
        .into();
    for exchange in [false, true].into_iter().filter(|&x| !x || peer) {
        let what = if exchange { "exchange" } else { "barriers" };
        let rings = [(16, Ahead::No), (8, Ahead::ToExchange)]
            .into_iter()
            .chain(RINGS.map(|r| (r, Ahead::Always)));
        for (ring, ahead) in rings {
            variants.push(Variant {
                name: format!("{what}, ring {ring}{}", ahead.label()),
                no_sync: false,
                exchange,
                ring,
                ahead,
            });
        }
    }
    let per_gpu = with_sides(ordinals, shape, &variants, |side, v, peer_recv| {
        // A ring whose shared memory does not fit (with the input vector) is left out.
        let Some((blocks, _)) = side.blocks(v.ring)? else {
            return Ok(None);
        };
        let ms = side.run(v, peer_recv, steps)?;
        Ok(Some(PersistentTiming {
            variant: v.name.clone(),
            ring: v.ring,
            ahead: v.ahead,
            ms,
            barriers: if v.no_sync { 0 } else { side.nbar as usize },
            exchanges: if v.exchange { side.nx as usize } else { 0 },
            blocks,
        }))
    })?;
    Ok(per_gpu
        .into_iter()
        .next()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect())
}

/// Every segment's outputs after one step with barriers (and, on two GPUs, the exchanges) through
/// a ring of `ring` lines a warp (8, 16 or 24) running `ahead` as far as it says, a vector a GPU: what the
/// probe computes, for a test against a reference of the same arithmetic ([`probe_reference`]).
pub fn probe_outputs(
    ordinals: &[usize],
    shape: StepShape,
    ring: usize,
    ahead: Ahead,
) -> Result<Vec<Vec<f32>>, TensorError> {
    let first = ordinals.first().copied().unwrap_or(0);
    if !RINGS.contains(&ring) {
        return Err(dev_err(
            first,
            format!("no probe kernel for a ring of {ring}"),
        ));
    }
    let v = Variant {
        name: "outputs".into(),
        no_sync: false,
        exchange: ordinals.len() == 2,
        ring,
        ahead,
    };
    let per_gpu = with_sides(ordinals, shape, &[v], |side, v, peer_recv| {
        side.run(v, peer_recv, 1)?;
        let o = side.dev.ordinal;
        side.dev
            .stream
            .clone_dtoh(&side.y)
            .map_err(|e| dev_err(o, e))
    })?;
    Ok(per_gpu.into_iter().map(|mut v| v.swap_remove(0)).collect())
}

/// What [`probe_outputs`] gives, computed on the CPU in f64 from the same weights (the fill's
/// hash, seeded by each GPU's ordinal): a vector for each of `ordinals`.
pub fn probe_reference(ordinals: &[usize], shape: StepShape) -> Vec<Vec<f32>> {
    let segments = shape.segments();
    let word = |seed: u32, unit: u64, j: u64| -> u32 {
        let mut h = ((unit * 4 + j) as u32).wrapping_mul(2_654_435_761) ^ seed;
        h ^= h >> 15;
        h = h.wrapping_mul(2_246_822_519);
        h ^= h >> 13;
        let lo = 0x3c80 | (h & 0x7f) | ((h >> 7) & 1) << 15;
        let hi = 0x3c80 | ((h >> 8) & 0x7f) | ((h >> 15) & 1) << 15;
        lo | hi << 16
    };
    let weight = |seed: u32, e: u64| -> f64 {
        let w = word(seed, e / 8, (e % 8) / 2);
        let bits = if e.is_multiple_of(2) {
            w & 0xffff
        } else {
            w >> 16
        };
        f32::from_bits(bits << 16) as f64
    };
    let exchange = ordinals.len() == 2;
    let seeds: Vec<u32> = ordinals.iter().map(|&o| fill_seed(o)).collect();
    let mut ys: Vec<Vec<f64>> = vec![vec![]; ordinals.len()];
    let mut prev: Vec<Vec<f64>> = vec![vec![]; ordinals.len()];
    let (mut off, mut prev_sync) = (0u64, 0u32);
    for &(rows, k, sync) in &segments {
        let sums: Vec<f64> = (0..prev[0].len())
            .map(|j| prev.iter().map(|p| p[j]).sum())
            .collect();
        for (r, seed) in seeds.iter().enumerate() {
            let x: Vec<f64> = (0..k)
                .map(|i| {
                    let v = if prev[r].is_empty() {
                        (0.5f32 - (i % 7) as f32 * 0.125) as f64
                    } else if exchange && prev_sync == 2 {
                        sums[i % sums.len()]
                    } else {
                        prev[r][i % prev[r].len()]
                    };
                    v / (1.0 + v.abs())
                })
                .collect();
            let y: Vec<f64> = (0..rows as u64)
                .map(|row| {
                    (0..k as u64)
                        .map(|c| weight(*seed, off + row * k as u64 + c) * x[c as usize])
                        .sum()
                })
                .collect();
            ys[r].extend(&y);
            prev[r] = y;
        }
        off += (rows * k) as u64;
        prev_sync = sync;
    }
    ys.into_iter()
        .map(|y| y.into_iter().map(|v| v as f32).collect())
        .collect()
}

/// The seed of GPU `ordinal`'s random weights (`probe_fill`), which the reference repeats.
fn fill_seed(ordinal: usize) -> u32 {
    0x9e37_79b9 ^ ordinal as u32
}

/// For each job: every GPU of `ordinals` resets its side, the GPUs meet, each runs `f`, and they
/// meet again; the results a GPU, in the jobs' order.
fn with_sides<R: Send>(
    ordinals: &[usize],
    shape: StepShape,
    jobs: &[Variant],
    f: impl Fn(&mut Side, &Variant, Option<u64>) -> Result<R, TensorError> + Sync,
) -> Result<Vec<Vec<R>>, TensorError> {
    let first = ordinals.first().copied().unwrap_or(0);
    shape.check().map_err(|e| dev_err(first, e))?;
    if ordinals.is_empty() || ordinals.len() > 2 {
        return Err(dev_err(
            first,
            "the persistent probe runs on one or two GPUs",
        ));
    }
    let world = ordinals.len();
    let addresses = Mutex::new(vec![0u64; world]);
    let meet = Barrier::new(world);
    let results: Vec<Result<Vec<R>, TensorError>> = std::thread::scope(|s| {
        let hs: Vec<_> = ordinals
            .iter()
            .enumerate()
            .map(|(rank, &o)| {
                let (addresses, meet, f) = (&addresses, &meet, &f);
                s.spawn(move || {
                    let side = Side::new(o, shape, world > 1);
                    // Every rank reaches every meeting below, failed or not (a failed one does
                    // nothing between them), or the other would wait forever; a kernel waiting
                    // for a peer that never launched ends at its deadline.
                    addresses.lock().unwrap_or_else(|e| e.into_inner())[rank] =
                        side.as_ref().map_or(0, |s| s.recv);
                    meet.wait();
                    let peer_recv = (world > 1)
                        .then(|| addresses.lock().unwrap_or_else(|e| e.into_inner())[1 - rank]);
                    let (mut side, mut err) = match side {
                        Ok(s) => (Some(s), None),
                        Err(x) => (None, Some(x)),
                    };
                    if let (Some(s), Some(p), None) = (side.as_mut(), peer_recv, &err) {
                        err = match p {
                            0 => Some(dev_err(o, "the peer GPU's set-up failed")),
                            // Peer access to the GPU the peer's receive buffer is on.
                            _ => super::p2p::enable_peer_access(&s.dev, ordinals[1 - rank]).err(),
                        };
                    }
                    let mut out = Vec::new();
                    for v in jobs {
                        if let (Some(s), None) = (side.as_mut(), &err) {
                            err = s.reset().err();
                        }
                        meet.wait();
                        if let (Some(s), None) = (side.as_mut(), &err) {
                            match f(s, v, peer_recv) {
                                Ok(r) => out.push(r),
                                Err(x) => err = Some(x),
                            }
                        }
                        meet.wait();
                    }
                    match err {
                        Some(x) => Err(x),
                        None => Ok(out),
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(dev_err(first, "a probe thread panicked")))
            })
            .collect()
    });
    results.into_iter().collect()
}

/// One GPU's buffers and kernels.
struct Side {
    dev: Arc<GpuDevice>,
    /// `probe_step_rN` for each ring size of `RINGS`, in its order.
    step_fns: Vec<CudaFunction>,
    weights: sys::CUdeviceptr,
    recv: u64,
    recv_bytes: usize,
    segs: cudarc::driver::CudaSlice<u32>,
    nseg: i32,
    y: cudarc::driver::CudaSlice<f32>,
    bar: cudarc::driver::CudaSlice<u32>,
    failed: cudarc::driver::CudaSlice<i32>,
    nbar: u32,
    nx: u32,
    max_x: i32,
    max_k: usize,
    /// Steps run since the last reset (exchange flags count from it).
    step: u32,
}

impl Side {
    fn new(ordinal: usize, shape: StepShape, peer: bool) -> Result<Self, TensorError> {
        let dev = GpuDevice::get(ordinal)?;
        let e = |x: cudarc::driver::DriverError| dev_err(ordinal, x);
        dev.ctx.bind_to_thread().map_err(e)?;
        let (major, minor) = dev.ctx.compute_capability().map_err(e)?;
        if major < 8 {
            return Err(dev_err(
                ordinal,
                "the persistent probe needs sm_80 or later",
            ));
        }
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(Box::leak(format!("sm_{major}{minor}").into_boxed_str())),
            options: vec!["--std=c++17".into()],
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
            .map_err(|x| dev_err(ordinal, format!("NVRTC could not compile the probe: {x:?}")))?;
        let module = dev.ctx.load_module(ptx).map_err(e)?;
        let step_fns = RINGS
            .iter()
            .map(|r| module.load_function(&format!("probe_step_r{r}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(e)?;
        let fill = module.load_function("probe_fill").map_err(e)?;

        let segments = shape.segments();
        let mut words = Vec::with_capacity(segments.len() * 8);
        let (mut off16, mut y_off) = (0u64, 0u32);
        let (mut prev_y, mut prev_rows) = (0u32, 0u32);
        for &(rows, k, sync) in &segments {
            words.extend([
                off16 as u32,
                (off16 >> 32) as u32,
                rows as u32,
                k as u32,
                sync,
                y_off,
                prev_y,
                prev_rows,
            ]);
            prev_y = y_off;
            prev_rows = rows as u32;
            off16 += (rows * k * 2 / 16) as u64;
            y_off += rows as u32;
        }
        let bytes = off16 as usize * 16;
        let nbar = segments.iter().filter(|s| s.2 != 0).count() as u32;
        let nx = segments.iter().filter(|s| s.2 == 2).count() as u32;
        let max_x = segments
            .iter()
            .filter(|s| s.2 == 2)
            .map(|s| s.0)
            .max()
            .unwrap_or(1);
        let max_k = segments.iter().map(|s| s.1).max().unwrap_or(1);
        let recv_bytes = 2 * max_x * 8;
        let stream = &dev.stream;
        let segs = stream.clone_htod(&words).map_err(e)?;
        let y = stream.alloc_zeros::<f32>(y_off as usize).map_err(e)?;
        let bar = stream.alloc_zeros::<u32>(1).map_err(e)?;
        let failed = stream.alloc_zeros::<i32>(1).map_err(e)?;
        // SAFETY: fresh allocations of the sizes asked, filled before use, freed in Drop (the
        // value owning them is made right after, with nothing between that can fail). The
        // receive buffer is cuMemAlloc'd (not from the stream's pool) so the peer can map it.
        let (weights, recv) = unsafe {
            let w = result::malloc_sync(bytes).map_err(e)?;
            let r = match result::malloc_sync(recv_bytes) {
                Ok(r) => r,
                Err(x) => {
                    let _ = result::free_sync(w);
                    return Err(e(x));
                }
            };
            (w, r)
        };
        let side = Side {
            segs,
            nseg: segments.len() as i32,
            y,
            bar,
            failed,
            step_fns,
            weights,
            recv,
            recv_bytes,
            nbar,
            nx: if peer { nx } else { 0 },
            max_x: max_x as i32,
            max_k,
            step: 0,
            dev: dev.clone(),
        };
        let n16 = (bytes / 16) as u64;
        let seed = fill_seed(ordinal);
        let mut l = stream.launch_builder(&fill);
        l.arg(&side.weights).arg(&n16).arg(&seed);
        let cfg = LaunchConfig {
            grid_dim: (1024, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: probe_fill(uint4* w, u64 n16, u32 seed) over the n16 16-byte units allocated.
        unsafe { l.launch(cfg) }.map_err(e)?;
        stream.synchronize().map_err(e)?;
        Ok(side)
    }

    /// Zeroes the barrier, the failure word and the receive buffer; steps count from 0 again.
    fn reset(&mut self) -> Result<(), TensorError> {
        let o = self.dev.ordinal;
        let e = |x| dev_err(o, x);
        let stream = &self.dev.stream;
        stream.memset_zeros(&mut self.bar).map_err(e)?;
        stream.memset_zeros(&mut self.failed).map_err(e)?;
        // SAFETY: the receive buffer is recv_bytes long; no kernel of this side runs (`run`
        // synchronises its stream on every exit) and the peer's writes to it have ended (its
        // kernels end before it reaches the meeting after a run); the memset is ordered on this
        // stream, synchronised below, before the meeting that lets the peer write again.
        unsafe { result::memset_d8_async(self.recv, 0, self.recv_bytes, stream.cu_stream()) }
            .map_err(e)?;
        stream.synchronize().map_err(e)?;
        self.step = 0;
        Ok(())
    }

    /// The kernel of a ring of `ring` lines.
    fn step_fn(&self, ring: usize) -> &CudaFunction {
        &self.step_fns[RINGS.iter().position(|&r| r == ring).unwrap_or(0)]
    }

    /// Blocks the grid has (every one resident: the occupancy API's count a multiprocessor times
    /// the multiprocessors) and the shared memory each takes (the input vector and the rings),
    /// or `None` where a block does not fit.
    fn blocks(&self, ring: usize) -> Result<Option<(u32, u32)>, TensorError> {
        let o = self.dev.ordinal;
        let smem = (self.max_k * 4).div_ceil(16) * 16 + THREADS as usize / 32 * ring * 512;
        let f = self.step_fn(ring);
        let optin = self
            .dev
            .ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|x| dev_err(o, x))?
            .max(0) as usize;
        if smem > optin {
            return Ok(None);
        }
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|x| dev_err(o, format!("{smem} bytes of shared memory a block: {x}")))?;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None)
            .map_err(|x| dev_err(o, x))?;
        Ok((per_sm > 0).then(|| (per_sm * self.dev.sms as u32, smem as u32)))
    }

    /// Mean milliseconds a step of variant `v` over `steps` steps, after 3 untimed ones. Its
    /// stream is synchronised on every exit, failed or not: no kernel of this side outlives it
    /// (the peer may reset or free its receive buffer after the next meeting).
    fn run(
        &mut self,
        v: &Variant,
        peer_recv: Option<u64>,
        steps: usize,
    ) -> Result<f64, TensorError> {
        let r = self.run_inner(v, peer_recv, steps);
        let synced = self.dev.stream.synchronize();
        let ms = r?;
        synced.map_err(|x| dev_err(self.dev.ordinal, x))?;
        Ok(ms)
    }

    fn run_inner(
        &mut self,
        v: &Variant,
        peer_recv: Option<u64>,
        steps: usize,
    ) -> Result<f64, TensorError> {
        let o = self.dev.ordinal;
        let e = |x| dev_err(o, x);
        let (blocks, smem) = self
            .blocks(v.ring)?
            .ok_or_else(|| dev_err(o, format!("a ring of {} lines does not fit", v.ring)))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        let recv_peer = if v.exchange {
            peer_recv.unwrap_or(0)
        } else {
            0
        };
        let nx = if v.exchange { self.nx } else { 0 };
        let stream = self.dev.stream.clone();
        let one_step = |this: &mut Self| -> Result<(), TensorError> {
            // The outputs are summed into and the barrier counts from 0 in each step.
            stream.memset_zeros(&mut this.y).map_err(e)?;
            stream.memset_zeros(&mut this.bar).map_err(e)?;
            let (ahead, no_sync, max_k) = (v.ahead.code(), v.no_sync as i32, this.max_k as i32);
            let step = this.step;
            let f = this.step_fn(v.ring).clone();
            let mut l = stream.launch_builder(&f);
            l.arg(&this.weights)
                .arg(&this.segs)
                .arg(&this.nseg)
                .arg(&mut this.y)
                .arg(&mut this.bar)
                .arg(&this.recv)
                .arg(&recv_peer)
                .arg(&nx)
                .arg(&this.max_x)
                .arg(&step)
                .arg(&ahead)
                .arg(&no_sync)
                .arg(&TIMEOUT_NS)
                .arg(&mut this.failed)
                .arg(&max_k);
            // SAFETY: the arguments match probe_step's parameters in order and type; the grid
            // is at most what the device holds at once (its barriers need every block resident);
            // the buffers are this side's, the peer's receive buffer is mapped (peer access) and
            // lives until both sides have passed the meeting after the run.
            unsafe { l.launch(cfg) }.map_err(e)?;
            this.step += 1;
            Ok(())
        };
        for _ in 0..3 {
            one_step(self)?;
        }
        let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.dev.ctx.new_event(timed).map_err(e)?;
        let end = self.dev.ctx.new_event(timed).map_err(e)?;
        start.record(&stream).map_err(e)?;
        for _ in 0..steps {
            one_step(self)?;
        }
        end.record(&stream).map_err(e)?;
        end.synchronize().map_err(e)?;
        let failed = stream.clone_dtoh(&self.failed).map_err(e)?;
        if failed[0] != 0 {
            return Err(dev_err(
                o,
                format!(
                    "{}: a barrier or the peer's values did not come within 2 s",
                    v.name
                ),
            ));
        }
        Ok(start.elapsed_ms(&end).map_err(e)? as f64 / steps as f64)
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        let _ = self.dev.stream.synchronize();
        // SAFETY: allocated by malloc_sync in `new`, freed once; no kernel uses them any more.
        unsafe {
            let _ = result::free_sync(self.weights);
            let _ = result::free_sync(self.recv);
        }
    }
}

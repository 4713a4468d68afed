//! The decoder's fused path for the row-parallel outputs (`Communicator::all_reduce_add_rms_norm`:
//! the sum, the residual add and the next norm in one step, as the NVLink kernel of `NcclComm`
//! does on GPUs) gives the same logits as the unfused path at tp 2, bit for bit: here a host
//! communicator fuses them with the same ops, so every branch of the model that takes the fused
//! result (the qkv and gate_up projections, the final norm for all rows and for the last row) runs
//! on the CPU in CI. It also takes the row-parallel projections of one-row forwards
//! (`Communicator::row_parallel_matmul`, which on GPUs hands the outputs to the peers as they are
//! made) and checks the model's side of that contract: the next collective is the fused call, on
//! that very output.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tessera_comm::{CommError, Communicator, ElemKind, LocalGroup, ReduceOp};
use tessera_model::synthetic::{llama_config_json, random_safetensors};
use tessera_model::{Checkpoint, LlamaModel, Logits, ModelConfig, TpRank};
use tessera_tensor::{ops, DType, Tensor};

/// A rank's host communicator that fuses the sum with the add and norm (counting the calls), and
/// makes one-row row-parallel projections itself (counting them, and keeping the output the next
/// collective must be the fused call on).
struct Fused<'a> {
    inner: &'a dyn Communicator,
    calls: AtomicUsize,
    pushes: AtomicUsize,
    pushed: Mutex<Option<Vec<f32>>>,
}

impl Fused<'_> {
    /// A collective other than the fused call on the pushed output came first.
    fn no_push_pending(&self, what: &str) {
        assert!(
            self.pushed.lock().unwrap().is_none(),
            "rank {}: {what} after a pushing projection",
            self.rank()
        );
    }
}

impl Communicator for Fused<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_bytes(&self, b: &mut [u8], k: ElemKind, op: ReduceOp) -> Result<(), CommError> {
        self.no_push_pending("all_reduce");
        self.inner.all_reduce_bytes(b, k, op)
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        self.no_push_pending("all_gather");
        self.inner.all_gather_bytes(send, recv)
    }
    fn broadcast_bytes(&self, b: &mut [u8], root: usize) -> Result<(), CommError> {
        self.inner.broadcast_bytes(b, root)
    }
    fn reduce_scatter_bytes(
        &self,
        send: &[u8],
        recv: &mut [u8],
        k: ElemKind,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.inner.reduce_scatter_bytes(send, recv, k, op)
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.inner.barrier()
    }
    fn send_bytes(&self, b: &[u8], dst: usize) -> Result<(), CommError> {
        self.inner.send_bytes(b, dst)
    }
    fn recv_bytes(&self, b: &mut [u8], src: usize) -> Result<(), CommError> {
        self.inner.recv_bytes(b, src)
    }
    fn sub_group(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>, CommError> {
        self.inner.sub_group(ranks)
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
    fn all_reduce_tensor(&self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        self.no_push_pending("all_reduce_tensor");
        self.inner.all_reduce_tensor(t, op)
    }
    fn all_reduce_add_rms_norm(
        &self,
        part: &Tensor,
        x: &mut Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<Option<Tensor>, CommError> {
        if let Some(p) = self.pushed.lock().unwrap().take() {
            assert!(
                p == part.to_f32_vec(),
                "the fused call is not on the pushed output"
            );
        }
        let mut sum = part.clone();
        self.inner.all_reduce_tensor(&mut sum, ReduceOp::Sum)?;
        let y = ops::add_rms_norm(x, &sum, w, eps).map_err(|e| CommError::Invalid {
            rank: self.rank(),
            msg: e.to_string(),
        })?;
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(Some(y))
    }
    fn row_parallel_matmul(&self, x: &Tensor, w: &Tensor) -> Result<Option<Tensor>, CommError> {
        if x.elem_count() != *x.shape().last().unwrap() {
            return Ok(None);
        }
        self.no_push_pending("a second pushing projection");
        let y = ops::matmul_t(x, w, None).map_err(|e| CommError::Invalid {
            rank: self.rank(),
            msg: e.to_string(),
        })?;
        *self.pushed.lock().unwrap() = Some(y.to_f32_vec());
        self.pushes.fetch_add(1, Ordering::Relaxed);
        Ok(Some(y))
    }
}

/// Every rank's logits of a prefill, two decode steps, a chunk of three whose last row only is
/// kept, a greedy step of two tokens and a lockstep batch, with or without the fused communicator;
/// and how many fused calls and pushing projections it made.
fn run(fused: bool) -> Vec<(Vec<Vec<f32>>, u32, usize, usize)> {
    let layers = 3;
    let json = llama_config_json(100, 48, 96, layers, 4, 2, false);
    let cfg = ModelConfig::from_json_str(&json).unwrap();
    let bytes: &'static [u8] =
        Box::leak(random_safetensors(&cfg, DType::F32, 11).into_boxed_slice());
    let comms = LocalGroup::new(2).into_comms();
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, host)| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let ck = Checkpoint::from_static("mem", bytes).unwrap();
                    let m =
                        LlamaModel::from_checkpoint(&ck, cfg, TpRank { rank, size: 2 }, DType::F32)
                            .unwrap();
                    let f = Fused {
                        inner: &host,
                        calls: AtomicUsize::new(0),
                        pushes: AtomicUsize::new(0),
                        pushed: Mutex::new(None),
                    };
                    let comm: &dyn Communicator = if fused { &f } else { &host };
                    let mut out = Vec::new();
                    let mut c = m.new_cache(24).unwrap();
                    out.push(
                        m.forward(&[3, 14, 15, 92, 65], &mut c, Logits::All, comm)
                            .unwrap(),
                    );
                    for t in [35, 89] {
                        out.push(m.forward(&[t], &mut c, Logits::All, comm).unwrap());
                    }
                    // Three tokens, the last row's logits only; then greedy (the last row too).
                    out.push(m.forward(&[2, 71, 82], &mut c, Logits::Last, comm).unwrap());
                    let greedy = m.forward_greedy(&[79, 8], &mut c, comm).unwrap();
                    let mut cb = m.new_cache_batch(4, 3).unwrap();
                    for toks in [[1, 2, 3], [40, 50, 60]] {
                        out.push(m.forward_lockstep(&toks, &mut cb, comm).unwrap());
                    }
                    f.no_push_pending("the end");
                    let n = |a: &AtomicUsize| a.load(Ordering::Relaxed);
                    (out, greedy, n(&f.calls), n(&f.pushes))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn fused_sum_add_and_norm_give_the_unfused_logits_at_tp_2() {
    let plain = run(false);
    let fused = run(true);
    for (rank, ((want, wg, none, _), (got, gg, calls, pushes))) in
        plain.iter().zip(&fused).enumerate()
    {
        assert_eq!(*none, 0);
        // Two row-parallel outputs a layer (o, and down into the next layer's or the final
        // norm), in each of 7 forwards; pushed by the projection in the two of one row.
        assert_eq!(*calls, 7 * 2 * 3, "rank {rank}: fused calls");
        assert_eq!(*pushes, 2 * 2 * 3, "rank {rank}: pushing projections");
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(g == w, "rank {rank}: forward {i}'s logits differ");
        }
        assert_eq!(gg, wg, "rank {rank}: greedy token");
    }
    // Both ranks hold the same (gathered) logits.
    assert!(fused[0].0 == fused[1].0, "the ranks' logits differ");
}

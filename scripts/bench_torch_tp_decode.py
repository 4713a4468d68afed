"""A PyTorch peer for `tessera bench decode --tp 1|2 --graph`: a gpt-fast-style decoder of the
Llama-3-8B shape (random bf16 weights made on the GPUs), tensor-parallel in the Megatron layout
(fused q/k/v and gate/up column-parallel, o and down row-parallel with one all-reduce each, the LM
head split by vocabulary and gathered), a static KV cache, and the whole decode step captured in
one CUDA graph (the collectives inside it) and replayed back to back. The all-reduces go through
NCCL or (`--allreduce symm`) torch's symmetric-memory one-shot kernel over NVLink, the path vLLM
and SGLang take for small sums; `--compile` has Inductor fuse the small ops first, as gpt-fast
does. One process per GPU (torch.multiprocessing), so tp 2 needs two GPUs.

It answers: what tp 2 / tp 1 ratio does a plain, well-built PyTorch tensor-parallel decoder reach on
the same machine, in the same call as tessera's figures? Per batch it prints ms a step, tokens/s,
the step's bytes of weights and cache per rank over the copy bandwidth measured here (the
roofline), and the first greedy tokens of sequence 0 (tp 1 and tp 2 share the weights: each rank
makes the full tensors from one seed and keeps its slice, so their tokens should agree).

    python3 scripts/bench_torch_tp_decode.py --tp 1,2 --batch 1,8,64 --steps 64
    python3 scripts/bench_torch_tp_decode.py --compile --allreduce symm --tp 2 --batch 1,64
"""
import argparse
import os
import socket
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
import torch.nn.functional as F

DIM, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 32, 8, 128, 128256
THETA, EPS = 500000.0, 1e-5


def full_then_slice(gen, rows, cols, dim, rank, tp, scale=0.02):
    """A [rows, cols] tensor drawn from `gen` (the same on every rank), sliced along `dim`."""
    w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, generator=gen) * scale
    n = w.shape[dim] // tp
    return w.narrow(dim, rank * n, n).contiguous()


class Decoder:
    def __init__(self, tp, rank, layers, seed, functional=False, symm_rows=0):
        self.tp, self.functional = tp, functional
        self.symm = None
        if symm_rows and tp > 1:
            # torch's own NVLink all-reduce (what vLLM's and SGLang's symmetric-memory
            # communicators call): each rank's part in a buffer every rank can read, one kernel
            # that reads the peers' parts and sums them (one-shot).
            import torch.distributed._symmetric_memory as symm_mem
            self.group_name = dist.group.WORLD.group_name
            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.9, deprecated since
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    symm_mem.enable_symm_mem_for_group(self.group_name)
            self.symm = symm_mem.empty(symm_rows * DIM, dtype=torch.bfloat16, device="cuda")
            symm_mem.rendezvous(self.symm, self.group_name)
        self.nh, self.nkv, self.vocab = HEADS // tp, KV_HEADS // tp, VOCAB // tp
        gen = torch.Generator(device="cuda")
        self.layers = []
        for i in range(layers):
            gen.manual_seed(seed * 1000 + i)
            wq = full_then_slice(gen, HEADS * HEAD_DIM, DIM, 0, rank, tp)
            wk = full_then_slice(gen, KV_HEADS * HEAD_DIM, DIM, 0, rank, tp)
            wv = full_then_slice(gen, KV_HEADS * HEAD_DIM, DIM, 0, rank, tp)
            wo = full_then_slice(gen, DIM, HEADS * HEAD_DIM, 1, rank, tp)
            w1 = full_then_slice(gen, INTER, DIM, 0, rank, tp)
            w3 = full_then_slice(gen, INTER, DIM, 0, rank, tp)
            w2 = full_then_slice(gen, DIM, INTER, 1, rank, tp)
            an = 1 + 0.1 * torch.randn(DIM, device="cuda", generator=gen)
            mn = 1 + 0.1 * torch.randn(DIM, device="cuda", generator=gen)
            self.layers.append(dict(wqkv=torch.cat([wq, wk, wv]), wo=wo, w13=torch.cat([w1, w3]), w2=w2,
                                    an=an.bfloat16(), mn=mn.bfloat16()))
            del wq, wk, wv, w1, w3
        gen.manual_seed(seed * 1000 + 999)
        self.emb = torch.randn(VOCAB, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        self.head = full_then_slice(gen, VOCAB, DIM, 0, rank, tp)
        self.fn = (1 + 0.1 * torch.randn(DIM, device="cuda", generator=gen)).bfloat16()
        self.weight_bytes = sum(t.numel() * 2 for layer in self.layers for t in layer.values()) \
            + self.head.numel() * 2

    def caches(self, batch, positions):
        self.batch = batch
        shape = (batch, self.nkv, positions, HEAD_DIM)
        self.kc = [torch.zeros(shape, device="cuda", dtype=torch.bfloat16) for _ in self.layers]
        self.vc = [torch.zeros(shape, device="cuda", dtype=torch.bfloat16) for _ in self.layers]
        inv = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
        ang = torch.outer(torch.arange(positions, device="cuda", dtype=torch.float32), inv)
        self.cos, self.sin = ang.cos().bfloat16(), ang.sin().bfloat16()
        self.arange = torch.arange(positions, device="cuda")
        return 2 * self.kc[0].numel() * 2 * len(self.layers)

    def all_reduce(self, x):
        """The row-parallel sum: through torch's symmetric-memory one-shot kernel (`--allreduce
        symm`), or through NCCL: in place by the process group, or (compiled, as gpt-fast does)
        by the functional collectives the compiler traces."""
        if self.tp == 1:
            return x
        if self.symm is not None:
            buf = self.symm[: x.numel()].view_as(x)
            buf.copy_(x)
            return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", self.group_name)
        if self.functional:
            return funcol.all_reduce(x, "sum", dist.group.WORLD)
        dist.all_reduce(x)
        return x

    def rope(self, x, cos, sin):
        half = HEAD_DIM // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def step(self, tok, pos):
        """One decode step: reads tok [batch] at position pos [1], writes the next tokens into tok
        and pos + 1 into pos (so a captured graph's replays chain)."""
        b = self.batch
        x = self.emb.index_select(0, tok)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        mask = (self.arange <= pos).view(1, 1, 1, -1)
        for i, L in enumerate(self.layers):
            h = F.rms_norm(x, (DIM,), L["an"], EPS)
            q, k, v = (h @ L["wqkv"].t()).split([self.nh * HEAD_DIM, self.nkv * HEAD_DIM, self.nkv * HEAD_DIM], -1)
            q = self.rope(q.view(b, self.nh, HEAD_DIM), cos, sin)
            k = self.rope(k.view(b, self.nkv, HEAD_DIM), cos, sin)
            self.kc[i].index_copy_(2, pos, k.unsqueeze(2))
            self.vc[i].index_copy_(2, pos, v.view(b, self.nkv, 1, HEAD_DIM))
            o = F.scaled_dot_product_attention(q.unsqueeze(2), self.kc[i], self.vc[i], attn_mask=mask,
                                               enable_gqa=True)
            o = o.reshape(b, self.nh * HEAD_DIM) @ L["wo"].t()
            x = x + self.all_reduce(o)
            h = F.rms_norm(x, (DIM,), L["mn"], EPS)
            g, u = (h @ L["w13"].t()).chunk(2, dim=-1)
            d = (F.silu(g) * u) @ L["w2"].t()
            x = x + self.all_reduce(d)
        logits = F.rms_norm(x, (DIM,), self.fn, EPS) @ self.head.t()
        if self.tp > 1 and self.functional:
            parts = funcol.all_gather_tensor(logits, 0, dist.group.WORLD).view(self.tp, b, self.vocab)
            logits = parts.permute(1, 0, 2).reshape(b, VOCAB)
        elif self.tp > 1:
            parts = torch.empty(self.tp, b, self.vocab, device="cuda", dtype=logits.dtype)
            dist.all_gather_into_tensor(parts, logits)
            logits = parts.permute(1, 0, 2).reshape(b, VOCAB)
        tok.copy_(logits.argmax(-1))
        pos.add_(1)


def copy_bandwidth():
    """Bytes read + written per second of a 1 GiB device-to-device copy, best of 5."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(6):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        best = max(best, 2 * a.numel() / (s.elapsed_time(e) * 1e-3))
    return best


def worker(rank, tp, a, port):
    torch.cuda.set_device(rank)
    if tp > 1:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp,
                                device_id=torch.device("cuda", rank))
    bw = copy_bandwidth()
    model = Decoder(tp, rank, a.layers, a.seed, functional=a.compile,
                    symm_rows=max(int(x) for x in a.batch.split(",")) if a.allreduce == "symm" else 0)
    step = model.step
    if a.compile:
        # gpt-fast's way: Inductor fuses the norms, RoPE and the gated activation into Triton
        # kernels (its GEMMs stay cuBLAS); recompiled for each batch (static shapes).
        torch._dynamo.config.cache_size_limit = 64
        torch._dynamo.config.automatic_dynamic_shapes = False
        step = torch.compile(model.step, dynamic=False)
    for batch in [int(x) for x in a.batch.split(",")]:
        prompt = a.prompt
        positions = prompt + 8 + 3 + a.steps + 1
        kv_bytes = model.caches(batch, positions)
        tok = torch.arange(1, batch + 1, device="cuda")
        pos = torch.full((1,), prompt, device="cuda", dtype=torch.long)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        first = []
        t0 = time.perf_counter()
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(8):  # greedy tokens of sequence 0, and warm-up (and compilation)
                step(tok, pos)
                first.append(int(tok[0]))
        warm_s = time.perf_counter() - t0
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            step(tok, pos)
        start = int(pos[0])
        rounds = []
        for _ in range(a.rounds):
            pos.fill_(start)
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            if tp > 1:
                dist.barrier()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(a.steps):
                graph.replay()
            e.record()
            e.synchronize()
            rounds.append(s.elapsed_time(e) / a.steps)
        ms = min(rounds)
        # The step reads each rank's weights once and, on average, half of its cache positions in use.
        read = model.weight_bytes + kv_bytes * (start + 3 + a.steps / 2) / positions
        if rank == 0:
            each = ", ".join(f"{r:.3f}" for r in rounds)
            kind = ("compiled" if a.compile else "torch") + ("-symm" if model.symm is not None else "")
            print(f"{kind} tp {tp} batch {batch:>3}: {ms:7.3f} ms/step {batch / ms * 1e3:10.1f} tok/s, "
                  f"roofline {read / bw * 1e3:.3f} ms ({read / 1e9:.2f} GB a rank at {bw / 1e12:.2f} TB/s) "
                  f"= {read / bw * 1e3 / ms * 100:.1f}%; rounds {each} ms; first tokens {first}; "
                  f"warm-up {warm_s:.1f} s", flush=True)
        del graph
    if tp > 1:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the step (Inductor), then capture it")
    ap.add_argument("--allreduce", choices=["nccl", "symm"], default="nccl",
                    help="the row-parallel sums: NCCL, or torch's symmetric-memory one-shot kernel over NVLink")
    a = ap.parse_args()
    nccl = torch.cuda.nccl.version()
    nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s) "
          f"({torch.cuda.get_device_name(0)}), NCCL {nccl}, "
          f"Llama-3-8B shape ({a.layers} layers), bf16, CUDA graph of the whole step"
          f"{', torch.compile' if a.compile else ''}, all-reduce {a.allreduce}", flush=True)
    for tp in [int(x) for x in a.tp.split(",")]:
        if tp > torch.cuda.device_count():
            print(f"torch tp {tp}: skipped, {torch.cuda.device_count()} GPU(s)")
            continue
        try:
            mp.spawn(worker, args=(tp, a, free_port()), nprocs=tp, join=True)
        except Exception as e:  # one tp failing (e.g. the compiler) still lets the others report
            lines = [l for l in str(e).strip().splitlines() if l.strip()] or [type(e).__name__]
            print(f"torch tp {tp}: failed:", *lines[-12:], sep="\n  ", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    main()

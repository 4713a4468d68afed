"""A PyTorch peer for `tessera bench attention --prefill`: causal prefill attention of one prompt
through torch's scaled_dot_product_attention, with each fused backend this torch offers on the GPU
(flash attention 2, cuDNN's, the memory-efficient one), at the same heads and lengths, counting
FLOPs as tessera's benchmark does (4 hd a query-key pair a query head over the t (t + 1) / 2 pairs
the causal mask keeps). Random bf16 q, k and v of shape (1, heads, t, hd); K and V of the KV heads
repeated to the query heads outside the timing.

    python3 scripts/bench_torch_prefill_attention.py --tokens 2048,8192 --heads 32 --kv-heads 8
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="2048,8192")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    hq, hkv, hd = a.heads, a.kv_heads, a.head_dim
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}: {hq} query / {hkv} KV heads of {hd}")
    backends = [
        ("flash attention 2", SDPBackend.FLASH_ATTENTION),
        ("cuDNN", getattr(SDPBackend, "CUDNN_ATTENTION", None)),
        ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION),
    ]
    print(f"{'tokens':>7} {'backend':>18} {'µs':>10} {'TFLOP/s':>9}")
    for t in [int(x) for x in a.tokens.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(t)
        q = torch.randn(1, hq, t, hd, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, hkv, t, hd, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, hkv, t, hd, device="cuda", dtype=torch.bfloat16, generator=g)
        # Every backend takes K and V repeated to the query heads (not all take `enable_gqa`);
        # the arithmetic is the same.
        kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        flops = 4.0 * hd * hq * t * (t + 1) / 2
        for name, be in backends:
            if be is None:
                continue
            try:
                with sdpa_kernel(be):
                    run = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
                    for _ in range(3):
                        run()
                    torch.cuda.synchronize()
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    for _ in range(a.repeats):
                        run()
                    e.record()
                    e.synchronize()
                secs = s.elapsed_time(e) / 1e3 / a.repeats
                print(f"{t:>7} {name:>18} {secs * 1e6:>10.1f} {flops / secs / 1e12:>9.1f}")
            except RuntimeError as x:
                print(f"{t:>7} {name:>18} not available: {str(x).splitlines()[0][:80]}")


if __name__ == "__main__":
    main()

"""HF transformers decode baseline for `tessera bench decode`: a Llama-3-8B-shaped model with random
bf16 weights on one GPU, greedy decode at several batch sizes through transformers' default
`generate` loop in eager PyTorch (no torch.compile, no CUDA graphs) with its default attention
(printed: sdpa where torch has it). Prints one line per batch: batch, ms/step, tokens/s, the
best of --repeats timings (each printed).

    python3 scripts/bench_hf_decode.py --batch 1,32 --steps 32
"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    print(f"hf transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params bf16, "
          f"attention {getattr(model.config, '_attn_implementation', '?')}")
    def timed(ids, new):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for b in [int(x) for x in a.batch.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (b, a.prompt_len), device="cuda")
        with torch.no_grad():
            timed(ids, 4)  # warm-up
            # The peer's best of `repeats` (a single timing varied by up to 1.7x between calls):
            # each a prefill-only generate, then one of steps + 1 tokens, the difference per step.
            steps = []
            for _ in range(a.repeats):
                prefill = timed(ids, 1)
                steps.append((timed(ids, a.steps + 1) - prefill) / a.steps)
        step = min(steps)
        each = ", ".join(f"{s * 1e3:.2f}" for s in steps)
        print(f"hf batch {b:>3}: {step * 1e3:8.2f} ms/step {b / step:10.1f} tok/s (best of {each} ms)")


if __name__ == "__main__":
    main()

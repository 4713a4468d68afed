#!/usr/bin/env python3
"""PyTorch reference gradients for tessera's explicit backward.

Builds a tiny Llama (GQA, untied head, llama3 rope scaling) with transformers, runs a batch of token
sequences through it in float32 with the eager attention, and writes to
tests/fixtures/train/pytorch_grads/:
  config.json, model.safetensors   the model (HF layout)
  grads.safetensors                d(mean next-token cross-entropy)/d(parameter), same names
  reference.json                   {"tokens": [[...], ...], "loss": x}

Run: /tmp/venv/bin/python3 scripts/make_train_fixtures.py   (torch + transformers, no GPU needed)
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "pytorch_grads")


def main():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
        bos_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    batch, seq = 3, 9
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
    loss.backward()
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    grads = {n: p.grad.detach().contiguous() for n, p in model.named_parameters()}
    save_file(grads, os.path.join(OUT, "grads.safetensors"))
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump({"tokens": tokens.tolist(), "loss": loss.item()}, f)
    for extra in ("generation_config.json",):
        p = os.path.join(OUT, extra)
        if os.path.exists(p):
            os.remove(p)
    print(f"wrote {OUT}: loss {loss.item():.6f}")


if __name__ == "__main__":
    main()

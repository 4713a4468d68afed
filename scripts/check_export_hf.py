#!/usr/bin/env python3
"""Checks that what `tessera export` writes is a model transformers loads and computes as tessera
does: for each exported directory, AutoTokenizer and AutoModelForCausalLM (f32, eager attention)
score a text; `tessera score --json --dtype f32` scores the same text; the token log-probabilities
must agree within 1e-4 (the tolerance of the HF fixtures) and have the same count (the same
tokens). Then greedy generation of 12 tokens: the same ids up to the first end-of-sequence.

    python3 scripts/check_export_hf.py TESSERA_BIN EXPORTED_DIR...

Prints one line per directory and check, OK or FAIL; exits 1 on any FAIL. Needs torch and
transformers (the GPU machine has them); runs on the CPU.
"""
import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east"


def tessera(binary, *args):
    out = subprocess.run([binary, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"tessera {' '.join(args)}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def check(binary, d):
    ok = True
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    hf = [lp[i, ids[0, i + 1]].item() for i in range(ids.shape[1] - 1)]
    ts = tessera(binary, "score", "--model", d, "--text", TEXT, "--dtype", "f32", "--json")["token_logprobs"]
    if len(ts) != len(hf):
        print(f"{d}: score: {len(ts)} log-probs from tessera, {len(hf)} from transformers (other tokens) FAIL")
        ok = False
    else:
        diff = max(abs(a - b) for a, b in zip(ts, hf))
        good = diff < 1e-4
        ok &= good
        print(f"{d}: score: {len(ts)} tokens, max |logprob tessera - transformers| = {diff:.2e}", "OK" if good else "FAIL")
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    mine = tessera(binary, "generate", "--model", d, "--prompt", TEXT, "--max-tokens", "12", "--dtype", "f32", "--json")["tokens"]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def upto_eos(t):
        for i, x in enumerate(t):
            if x in eos:
                return t[: i + 1]
        return t

    same = upto_eos(gen) == upto_eos(mine)
    ok &= same
    print(f"{d}: greedy: transformers {upto_eos(gen)}, tessera {upto_eos(mine)}", "OK" if same else "FAIL")
    return ok


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    binary, dirs = sys.argv[1], sys.argv[2:]
    results = [check(binary, d) for d in dirs]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()

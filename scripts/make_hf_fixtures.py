#!/usr/bin/env python3
"""Build tiny random HuggingFace checkpoints plus HF's own reference outputs.

What it makes (all deterministic: fixed seeds, CPU only):

  <out>/<model>/tokenizer.json, tokenizer_config.json
      A byte-level BPE (vocab 300, special tokens ``<s>`` = bos and ``</s>`` = eos)
      trained with the python ``tokenizers`` library on data/shakespeare/slice.txt,
      with a TemplateProcessing post-processor that prepends ``<s>``.  The same
      files are copied into every model directory.

  <out>/llama/    LlamaForCausalLM, f32, GQA (8 heads / 2 kv heads), llama3 rope
                  scaling, untied lm_head, vocab 320 (> tokenizer's 300), single
                  model.safetensors.  Its config.json is REWRITTEN into the old
                  (transformers-4 / Llama-3 hub) style: top-level ``rope_theta`` +
                  ``rope_scaling``, no ``rope_parameters``; the model is reloaded
                  from disk and the references come from the reloaded model.
  <out>/mistral/  MistralForCausalLM, weights stored as bfloat16, explicit
                  head_dim 16 (12*16 = 192 != hidden 96), 4 kv heads,
                  sliding_window 8, 3 layers.
  <out>/qwen2/    Qwen2ForCausalLM, f32, tied embeddings, q/k/v biases, 1 kv head,
                  rope theta 1e6, saved SHARDED (model.safetensors.index.json +
                  several model-0000x-of-0000y.safetensors).
  <out>/qwen3/    Qwen3ForCausalLM, f32: RMSNorm of each q and k head (q_norm /
                  k_norm) before RoPE, explicit head_dim 32 (4 x 32 = 128 != hidden 96),
                  2 kv heads, no biases, tied embeddings, rope theta 1e6.
  <out>/qwen2_yarn/  Qwen2ForCausalLM, f32, YaRN RoPE (factor 4 from an original
                  context of 256, theta 1e4, head_dim 32), config.json REWRITTEN into
                  the Qwen2.5 hub style (top-level ``rope_theta``, ``rope_scaling``
                  with ``"type": "yarn"``); an extra score case of 300 positions
                  (past the original context).  Its reference.json's "rope" holds
                  HF's inv_freq and attention scaling for the model and for a list
                  of yarn probe configs (DeepSeek mscale, explicit attention_factor,
                  truncate false, betas, a context other than factor x original).

  <out>/<model>/reference.json
      {"versions": {"torch", "transformers", "tokenizers"},
       "score":  [{"tokens", "token_logprobs", "sum_logprob", "bf16_token_logprobs"}],
       "text":   [{"text", "tokens", "token_logprobs", "sum_logprob"}],
       "greedy": [{"prompt_tokens", "max_new_tokens", "tokens", "min_margin"}],
       "greedy_repetition_penalty": [...]  (llama only: the greedy cases' prompts,
                          generate(repetition_penalty=1.3), margins of the processed scores)
       "rope":   {...}   (llama: HF's inv_freq, plus a llama3 probe;
                          qwen2_yarn: inv_freq, attention_scaling, yarn probes)}
      token_logprobs[i] = log p(tokens[i+1] | tokens[0..=i]).
      References are computed on CPU in float64 (model.to(torch.float64),
      eager attention, no_grad) from the model as RELOADED from disk.  Note that
      HF's eager attention still does its softmax in float32 and its rotary
      cos/sin in float32 even for a float64 model; the script logs how much
      that changes the log-probs versus a fully float64 softmax.
      bf16_token_logprobs come from from_pretrained(dtype=torch.bfloat16) on CPU,
      log_softmax taken in float64 of the bf16 logits.

Every Linear/Embedding weight is re-drawn N(0, 0.15), every RMSNorm weight
1 + 0.1*N(0,1), every bias 0.1*N(0,1) (peaky logits -> robust greedy decoding).

Requirements: torch, transformers (5.x), tokenizers, safetensors.
Run (from the repo root):

    python3 scripts/make_hf_fixtures.py --out tests/fixtures/hf [--only qwen2_yarn]
"""

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile

import torch

import tokenizers
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "data", "shakespeare", "slice.txt")
TOKENIZER_VOCAB = 300
TEXT = "To be, or not to be, that is the question:"
MAX_NEW_TOKENS = 12
MIN_MARGIN = 1e-3
SCORE_LENGTHS = [2, 9, 33]
GREEDY_LENGTHS = [5, 11]

REPETITION_PENALTY = 1.3

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(tmpdir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([CORPUS], trainer)
    bos_id = tok.token_to_id("<s>")
    eos_id = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", bos_id)],
    )
    assert tok.get_vocab_size() == TOKENIZER_VOCAB, tok.get_vocab_size()

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
    )
    tokdir = os.path.join(tmpdir, "tokenizer")
    fast.save_pretrained(tokdir)

    # Sanity: the raw tokenizers library and transformers agree and add BOS.
    raw = Tokenizer.from_file(os.path.join(tokdir, "tokenizer.json"))
    raw_ids = raw.encode(TEXT).ids
    hf = AutoTokenizer.from_pretrained(tokdir)
    hf_ids = hf(TEXT)["input_ids"]
    assert raw_ids == hf_ids, (raw_ids, hf_ids)
    assert hf_ids[0] == bos_id, hf_ids
    assert raw.decode(raw_ids, skip_special_tokens=True) == TEXT
    log(f"tokenizer: vocab {raw.get_vocab_size()} bos <s>={bos_id} eos </s>={eos_id}; "
        f"files {sorted(os.listdir(tokdir))}; '{TEXT}' -> {len(hf_ids)} ids")
    return tokdir, bos_id, eos_id


# --------------------------------------------------------------------------- models


def randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for _name, m in model.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.normal_(0.0, 0.15)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.1 * torch.randn_like(m.bias))
            elif "RMSNorm" in type(m).__name__:
                m.weight.copy_(1.0 + 0.1 * torch.randn_like(m.weight))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.1 * torch.randn_like(m.bias))


def new_model(cls, cfg, seed):
    """A model of `cfg` with eager attention and randomized weights (`randomize`), in eval mode."""
    model = cls(cfg)
    model.set_attn_implementation("eager")
    randomize(model, seed)
    model.eval()
    return model


def to_old_style(cpath, rope):
    """Rewrites config.json at `cpath` in the transformers-4 style: `rope_parameters` replaced, in
    place, by the keys of `rope` (e.g. top-level ``rope_theta`` and ``rope_scaling``)."""
    with open(cpath) as f:
        written = json.load(f)
    old = {}
    for k, v in written.items():
        if k == "rope_parameters":
            old.update(rope)
        else:
            old[k] = v
    write_json(cpath, old)
    return written, old


def load(cls, path, dtype):
    m = cls.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    m.eval()
    return m


def inv_freq_of(model):
    return model.model.rotary_emb.inv_freq.detach().clone()


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), (sorted(set(sa) ^ set(sb)))
    for k in sa:
        assert torch.equal(sa[k].to(torch.float64), sb[k].to(torch.float64)), k


# --------------------------------------------------------------------------- references


@contextlib.contextmanager
def full_f64_softmax():
    """Make HF's `softmax(..., dtype=torch.float32)` stay float64 for float64 inputs.
    Only used to MEASURE the effect of HF's internal float32 softmax (not stored)."""
    orig = torch.nn.functional.softmax

    def sm(input, dim=None, _stacklevel=3, dtype=None):
        if dtype is torch.float32 and input.dtype == torch.float64:
            dtype = torch.float64
        return orig(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    torch.nn.functional.softmax = sm
    try:
        yield
    finally:
        torch.nn.functional.softmax = orig


def token_logprobs(model, tokens):
    ids = torch.tensor([tokens], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    lp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    out = [lp[i, tokens[i + 1]].item() for i in range(len(tokens) - 1)]
    return out, logits


def greedy(model, prompt, eos_id, penalty=None):
    """HF's greedy generate and its smallest margin between the two likeliest tokens. Plain: over
    the raw logits, cross-checked against one full forward. With a repetition `penalty` (a logits
    processor: it applies greedy too): over the processed scores."""
    ids = torch.tensor([prompt], dtype=torch.long)
    plain = penalty is None
    with torch.no_grad():
        res = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            return_dict_in_generate=True,
            pad_token_id=eos_id,
            **({"output_logits": True} if plain else {"repetition_penalty": penalty, "output_scores": True}),
        )
    gen = res.sequences[0, len(prompt):].tolist()
    margins = []
    for step, lg in enumerate(res.logits if plain else res.scores):
        top2 = torch.topk(lg[0].to(torch.float64), 2).values
        margins.append((top2[0] - top2[1]).item())
        assert int(lg[0].argmax()) == gen[step], (step, gen)
    if plain:
        # Cross-check the KV-cached generation against a single full forward.
        full = prompt + gen
        _, logits = token_logprobs(model, full)
        for step in range(len(gen)):
            pos = len(prompt) - 1 + step
            assert int(logits[pos].argmax()) == gen[step], ("full-forward argmax differs", step)
    return gen, min(margins)


def make_reference(name, cls, path, vocab, eos_id, seed, extra_score_lengths=()):
    rng = random.Random(seed)
    m64 = load(cls, path, torch.float32).to(torch.float64)
    mbf = load(cls, path, torch.bfloat16)
    log(f"[{name}] reloaded: f64 inv_freq dtype {m64.model.rotary_emb.inv_freq.dtype}, "
        f"bf16-model inv_freq dtype {mbf.model.rotary_emb.inv_freq.dtype}")
    tok = AutoTokenizer.from_pretrained(path)

    ref = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "score": [],
        "text": [],
        "greedy": [],
    }

    max_f32_softmax_effect = 0.0
    max_bf16_diff = 0.0
    for n in list(SCORE_LENGTHS) + list(extra_score_lengths):
        toks = [rng.randrange(vocab) for _ in range(n)]
        lps, _ = token_logprobs(m64, toks)
        bf, _ = token_logprobs(mbf, toks)
        with full_f64_softmax():
            lps_full, _ = token_logprobs(m64, toks)
        max_f32_softmax_effect = max([max_f32_softmax_effect] + [abs(a - b) for a, b in zip(lps, lps_full)])
        max_bf16_diff = max([max_bf16_diff] + [abs(a - b) for a, b in zip(lps, bf)])
        ref["score"].append({
            "tokens": toks,
            "token_logprobs": lps,
            "sum_logprob": math.fsum(lps),
            "bf16_token_logprobs": bf,
        })

    ids = tok(TEXT)["input_ids"]
    lps, _ = token_logprobs(m64, ids)
    ref["text"].append({"text": TEXT, "tokens": ids, "token_logprobs": lps, "sum_logprob": math.fsum(lps)})

    for n in GREEDY_LENGTHS:
        for attempt in range(100):
            prompt = [rng.randrange(vocab) for _ in range(n)]
            gen, margin = greedy(m64, prompt, eos_id)
            if margin >= MIN_MARGIN:
                break
            log(f"[{name}] greedy prompt len {n}: margin {margin:.3g} < {MIN_MARGIN}, redrawing")
        else:
            raise RuntimeError("no prompt with a safe greedy margin")
        ref["greedy"].append({
            "prompt_tokens": prompt,
            "max_new_tokens": MAX_NEW_TOKENS,
            "tokens": gen,
            "min_margin": margin,
        })
        log(f"[{name}] greedy len {n}: generated {len(gen)} tokens, min_margin {margin:.4f}")

    log(f"[{name}] max |logprob(HF f64) - logprob(f64 softmax)| = {max_f32_softmax_effect:.3g}; "
        f"max |logprob f64 - bf16| = {max_bf16_diff:.3g}")
    return ref, m64


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def copy_tokenizer(tokdir, dst):
    for fn in os.listdir(tokdir):
        shutil.copy(os.path.join(tokdir, fn), os.path.join(dst, fn))


# --------------------------------------------------------------------------- per model


def make_llama(out, tokdir, bos, eos):
    name, cls = "llama", LlamaForCausalLM
    d = os.path.join(out, name)
    cfg = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_parameters=dict(rope_theta=10000.0, **LLAMA3_SCALING),
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    model = new_model(cls, cfg, 1001)
    inv0 = inv_freq_of(model)
    model.save_pretrained(d)
    copy_tokenizer(tokdir, d)

    written, old = to_old_style(
        os.path.join(d, "config.json"), {"rope_scaling": dict(LLAMA3_SCALING), "rope_theta": 10000.0})
    log(f"[llama] config.json as written by transformers:\n{json.dumps(written, indent=1)}")
    assert "rope_parameters" not in old and "rope_scaling" in old

    re = load(cls, d, torch.float32)
    inv1 = inv_freq_of(re)
    assert torch.equal(inv0, inv1), (inv0, inv1)
    state_equal(model, re)
    log(f"[llama] reloaded old-style config -> rope_parameters {re.config.rope_parameters}; inv_freq equal: {inv1.tolist()}")

    # default-rope inv_freq, to show that llama3 scaling really changed something
    head_dim = cfg.head_dim
    plain = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    assert not torch.equal(plain, inv1)

    ref, m64 = make_reference(name, cls, d, 320, eos, 2001, extra_score_lengths=(64,))

    # Greedy with a repetition penalty (transformers applies it greedy too), from the greedy
    # cases' prompts: the tokens of one at least differ from the plain greedy ones.
    ref["greedy_repetition_penalty"] = []
    for case in ref["greedy"]:
        gen, margin = greedy(m64, case["prompt_tokens"], eos, REPETITION_PENALTY)
        assert margin >= MIN_MARGIN, margin
        ref["greedy_repetition_penalty"].append({
            "prompt_tokens": case["prompt_tokens"],
            "max_new_tokens": MAX_NEW_TOKENS,
            "repetition_penalty": REPETITION_PENALTY,
            "tokens": gen,
            "min_margin": margin,
        })
        log(f"[llama] greedy, repetition penalty {REPETITION_PENALTY}: {gen} (plain {case['tokens']}), "
            f"min_margin {margin:.4f}")
    assert any(c["tokens"] != g["tokens"] for c, g in zip(ref["greedy_repetition_penalty"], ref["greedy"])), \
        "the penalty changed nothing"
    # A case where the penalty over the PROMPT decides a token: BOS, a greedy prompt and part of
    # its own plain continuation, redrawn until a penalty over the output alone (computed here
    # step by step) gives other tokens than HF's (penalty over all of input_ids).
    def output_only(prompt):
        ids, out = list(prompt), []
        for _ in range(MAX_NEW_TOKENS):
            with torch.no_grad():
                lg = m64(input_ids=torch.tensor([ids])).logits[0, -1].to(torch.float64)
            for t in set(out):
                lg[t] = lg[t] * REPETITION_PENALTY if lg[t] < 0 else lg[t] / REPETITION_PENALTY
            out.append(int(lg.argmax()))
            ids.append(out[-1])
        return out
    found = None
    for case in ref["greedy"]:
        for j in range(1, MAX_NEW_TOKENS):
            prompt = [bos] + case["prompt_tokens"] + case["tokens"][:j]
            gen, margin = greedy(m64, prompt, eos, REPETITION_PENALTY)
            if margin >= MIN_MARGIN and gen != output_only(prompt):
                found = (prompt, gen, margin)
                break
        if found:
            break
    assert found, "no prompt where the penalty over the prompt matters"
    prompt, gen, margin = found
    ref["greedy_repetition_penalty"].append({
        "prompt_tokens": prompt,
        "max_new_tokens": MAX_NEW_TOKENS,
        "repetition_penalty": REPETITION_PENALTY,
        "tokens": gen,
        "min_margin": margin,
        "output_only_tokens": output_only(prompt),
    })
    log(f"[llama] greedy, repetition penalty over the prompt too: {prompt} -> {gen} "
        f"(over the output only: {output_only(prompt)}), min_margin {margin:.4f}")

    # A llama3 rope probe with a larger head_dim so that all three frequency bands
    # (unchanged / smoothed / divided by factor) occur; head_dim 8 at theta 1e4 has no
    # wavelength inside the smoothed band (8, 32).
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    probe_cfg = LlamaConfig(
        hidden_size=64 * 4, num_attention_heads=4, head_dim=64,
        rope_parameters=dict(rope_theta=10000.0, **LLAMA3_SCALING),
    )
    probe_inv, probe_scale = ROPE_INIT_FUNCTIONS["llama3"](probe_cfg, "cpu")
    wl = 2 * math.pi / plain
    ref["rope"] = {
        "note": "inv_freq as HF computes it (float32), for this model and for a llama3 probe config",
        "inv_freq": inv1.tolist(),
        "default_inv_freq": plain.tolist(),
        "wavelengths": wl.tolist(),
        "probe": {
            "head_dim": 64,
            "rope_theta": 10000.0,
            **{k: v for k, v in LLAMA3_SCALING.items()},
            "inv_freq": probe_inv.tolist(),
            "attention_scaling": float(probe_scale),
        },
    }
    write_json(os.path.join(d, "reference.json"), ref)


def make_mistral(out, tokdir, bos, eos):
    name, cls = "mistral", MistralForCausalLM
    d = os.path.join(out, name)
    cfg = MistralConfig(
        vocab_size=300,
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=3,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=8,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    model = new_model(cls, cfg, 1002)
    model = model.to(torch.bfloat16)
    model.save_pretrained(d)
    copy_tokenizer(tokdir, d)
    with open(os.path.join(d, "config.json")) as f:
        log(f"[mistral] config.json:\n{f.read()}")
    ref, m64 = make_reference(name, cls, d, 300, eos, 2002)
    state_equal(model, m64)  # bf16 weights upcast exactly
    # The window must matter: query position q sees keys q-7..=q (8 keys, HF's
    # `kv_idx > q_idx - sliding_window`), so positions 0..=7 match full attention
    # and positions >= 8 must differ.
    long = next(c for c in ref["score"] if len(c["tokens"]) == 33)
    m64.config.sliding_window = None
    nowin, _ = token_logprobs(m64, long["tokens"])
    m64.config.sliding_window = 8
    diffs = [abs(a - b) for a, b in zip(long["token_logprobs"], nowin)]
    assert max(diffs[:8]) < 1e-12, diffs[:8]
    assert min(diffs[8:]) > 1e-6, diffs[8:]
    log(f"[mistral] sliding window matters: positions 0..7 identical, 8.. differ by >= {min(diffs[8:]):.3g}")
    write_json(os.path.join(d, "reference.json"), ref)


def make_qwen2(out, tokdir, bos, eos):
    name, cls = "qwen2", Qwen2ForCausalLM
    d = os.path.join(out, name)
    cfg = Qwen2Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=136,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    model = new_model(cls, cfg, 1003)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    model.save_pretrained(d, max_shard_size="100KB")
    copy_tokenizer(tokdir, d)
    shards = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json")) and len(shards) >= 2, shards
    with open(os.path.join(d, "config.json")) as f:
        log(f"[qwen2] config.json:\n{f.read()}")
    ref, m64 = make_reference(name, cls, d, 320, eos, 2003)
    state_equal(model, m64)
    write_json(os.path.join(d, "reference.json"), ref)


YARN_SCALING = {"factor": 4.0, "original_max_position_embeddings": 256}

# (head_dim, max_position_embeddings, rope_theta, yarn keys): each probe is HF's yarn
# inv_freq and attention scaling for that config, as tessera must compute them.
YARN_PROBES = [
    # Qwen2.5's recipe: the original context equal to max_position_embeddings.
    (128, 32768, 1000000.0, {"factor": 4.0, "original_max_position_embeddings": 32768}),
    # No original context: max_position_embeddings is the one scaled.
    (64, 4096, 10000.0, {"factor": 2.0}),
    # A context that is not factor x original.
    (128, 65536, 500000.0, {"factor": 4.0, "original_max_position_embeddings": 8192}),
    # DeepSeek-V3: mscale and mscale_all_dim equal.
    (64, 163840, 10000.0, {"factor": 40.0, "original_max_position_embeddings": 4096,
                           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # mscale and mscale_all_dim that differ.
    (64, 16384, 10000.0, {"factor": 8.0, "original_max_position_embeddings": 2048,
                          "mscale": 0.707, "mscale_all_dim": 1.0}),
    # gpt-oss: truncate false, its own betas.
    (64, 131072, 150000.0, {"factor": 32.0, "original_max_position_embeddings": 4096,
                            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}),
    # Explicit attention_factor and other betas.
    (32, 2048, 10000.0, {"factor": 8.0, "original_max_position_embeddings": 256,
                         "attention_factor": 1.3, "beta_fast": 16, "beta_slow": 2}),
    # A factor below 1 keeps the attention factor at 1.
    (64, 2048, 10000.0, {"factor": 0.5, "original_max_position_embeddings": 4096}),
]


def yarn_probe(head_dim, max_pos, theta, keys):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = dict(rope_type="yarn", rope_theta=theta, **keys)
    rec = {"head_dim": head_dim, "max_position_embeddings": max_pos, "rope_parameters": params}
    try:
        cfg = LlamaConfig(
            hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
            max_position_embeddings=max_pos, rope_parameters=dict(params),
        )
        inv, scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
        rec["inv_freq"] = inv.tolist()
        rec["attention_scaling"] = float(scale)
    except Exception as e:  # recorded, so that tessera can be checked to refuse it too
        rec["error"] = f"{type(e).__name__}: {e}"
    log(f"[yarn probe] {rec['rope_parameters']} max_pos {max_pos} head_dim {head_dim}: "
        f"{rec.get('attention_scaling', rec.get('error'))}")
    return rec


def make_qwen2_yarn(out, tokdir, bos, eos):
    name, cls = "qwen2_yarn", Qwen2ForCausalLM
    d = os.path.join(out, name)
    cfg = Qwen2Config(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=200,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, **YARN_SCALING),
        use_sliding_window=False,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    model = new_model(cls, cfg, 1004)
    inv0 = inv_freq_of(model)
    scale0 = float(model.model.rotary_emb.attention_scaling)
    model.save_pretrained(d)
    copy_tokenizer(tokdir, d)

    # Rewrite config.json as Qwen2.5's hub configs spell YaRN (transformers-4 style).
    cpath = os.path.join(d, "config.json")
    to_old_style(cpath, {"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", **YARN_SCALING}})
    with open(cpath) as f:
        log(f"[{name}] config.json:\n{f.read()}")

    re = load(cls, d, torch.float32)
    inv1 = inv_freq_of(re)
    scale1 = float(re.model.rotary_emb.attention_scaling)
    assert torch.equal(inv0, inv1) and scale0 == scale1, (inv0, inv1, scale0, scale1)
    state_equal(model, re)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    plain = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    assert not torch.equal(plain, inv1), "yarn left the frequencies unchanged"
    assert scale1 != 1.0, "yarn left the attention scaling at 1"
    log(f"[{name}] reloaded: rope_parameters {re.config.rope_parameters}; attention_scaling {scale1}; "
        f"inv_freq {inv1.tolist()}")

    ref, m64 = make_reference(name, cls, d, 320, eos, 2004, extra_score_lengths=(300,))
    state_equal(model, m64)
    ref["rope"] = {
        "note": "inv_freq and attention_scaling as HF computes them (float32), for this model and yarn probes",
        "inv_freq": inv1.tolist(),
        "attention_scaling": scale1,
        "default_inv_freq": plain.tolist(),
        "probes": [yarn_probe(*p) for p in YARN_PROBES],
    }
    write_json(os.path.join(d, "reference.json"), ref)


def make_qwen3(out, tokdir, bos, eos):
    name, cls = "qwen3", Qwen3ForCausalLM
    d = os.path.join(out, name)
    cfg = Qwen3Config(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        tie_word_embeddings=True,
        attention_bias=False,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    model = new_model(cls, cfg, 1005)
    attn = model.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (32,) and attn.q_proj.bias is None, attn
    assert not torch.equal(attn.q_norm.weight, attn.k_norm.weight)
    model.save_pretrained(d)
    copy_tokenizer(tokdir, d)
    with open(os.path.join(d, "config.json")) as f:
        log(f"[{name}] config.json:\n{f.read()}")
    ref, m64 = make_reference(name, cls, d, 320, eos, 2005)
    state_equal(model, m64)
    # The head norms must matter: with their weights at 1 (still normalising) the log-probs move.
    long = next(c for c in ref["score"] if len(c["tokens"]) == 33)
    with torch.no_grad():
        for layer in m64.model.layers:
            layer.self_attn.q_norm.weight.fill_(1.0)
            layer.self_attn.k_norm.weight.fill_(1.0)
    ones, _ = token_logprobs(m64, long["tokens"])
    diff = max(abs(a - b) for a, b in zip(long["token_logprobs"], ones))
    assert diff > 1e-3, diff
    log(f"[{name}] q/k norm weights matter: log-probs move by up to {diff:.3g} with them at 1")
    write_json(os.path.join(d, "reference.json"), ref)


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory, e.g. tests/fixtures/hf")
    ap.add_argument("--only", nargs="*", choices=sorted(MAKERS), help="make only these models")
    args = ap.parse_args()
    names = args.only or list(MAKERS)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    log(f"torch {torch.__version__} transformers {transformers.__version__} tokenizers {tokenizers.__version__} "
        f"python {sys.version.split()[0]}")

    with tempfile.TemporaryDirectory() as tmp:
        tokdir, bos, eos = build_tokenizer(tmp)
        for name in names:
            d = os.path.join(out, name)
            if os.path.isdir(d):
                shutil.rmtree(d)
            os.makedirs(d)
            MAKERS[name](out, tokdir, bos, eos)

    total = 0
    log("files:")
    for root, _dirs, files in sorted(os.walk(out)):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            sz = os.path.getsize(p)
            total += sz
            log(f"  {os.path.relpath(p, out):45s} {sz:>9d}")
    log(f"total {total} bytes")
    assert total < 4_500_000, total


MAKERS = {
    "llama": make_llama,
    "mistral": make_mistral,
    "qwen2": make_qwen2,
    "qwen2_yarn": make_qwen2_yarn,
    "qwen3": make_qwen3,
}


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Every GPU test and benchmark in one device call. Build first, on the CPU machine:
#   scripts/gpu_build.sh            (puts the binaries in .gpu/)
# then, on the GPU machine (the `device` tool, carrying .gpu):
#   bash scripts/gpu_check.sh        (report in $OUT/gpu_report.txt, or ./gpu_report.txt)
#   STEPS="tests tp2 cli" bash ...   (some steps only: tests bench tp2 sample long hf cli export; default all)
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export TESSERA_REQUIRE_GPU=1 TESSERA_FIXTURES=$PWD/tests/fixtures/hf NCCL_NVLS_ENABLE=0 RUST_BACKTRACE=1
OUTDIR=${OUT:-.}
REPORT=$OUTDIR/gpu_report.txt
STEPS=${STEPS:-all}
NGPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
if [ "$NGPU" -lt 2 ]; then TP=${TP:-1}; fi
# The environment of each tp 2 setting the report compares (the fused path's opt-in variants).
variant_env() {
  case $1 in
    0) echo TESSERA_P2P_ALLREDUCE=0 ;;
    fence) echo TESSERA_P2P_FENCE=1 ;;
    pushed | end) echo TESSERA_P2P_TRIGGER=$1 ;;
    push) echo TESSERA_P2P_PUSH=1 ;;
  esac
}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if [[ $STEPS == all || $STEPS == *tests* ]]; then
    for t in .gpu/test-*; do
      echo "== $t"; timeout 240 "$t" --test-threads=1 --nocapture 2>&1 | grep -E "test |relative error|bf16 mean|graph steps|captured step|one GPU|fused|device sums|draws|panicked|assert|result" | tail -40
    done
    # Small host bytes through NCCL's staging (the default takes the host communicator).
    echo "== .gpu/test-nccl, TESSERA_NCCL_HOST_BYTES=0"
    TESSERA_NCCL_HOST_BYTES=0 timeout 240 .gpu/test-nccl --test-threads=1 2>&1 | grep -E "panicked|assert|result" | tail -10
  fi
  if [[ $STEPS == all || $STEPS == *bench* ]]; then
    echo "== tessera bench decode, Llama-3-8B shape, eager"
    .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp ${TP:-1,2} --batch 1,8,32,64 --steps 32 2>&1
    echo "== tessera bench decode, Llama-3-8B shape, CUDA graphs"
    .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp ${TP:-1,2} --batch 1,2,8,16,32,64 --steps 32 --graph 2>&1
    echo "== tessera bench decode, Llama-3-8B shape, sampled on the host as generate samples (T 0.6, top-p 0.9, top-k 50)"
    .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp ${TP:-1,2} --batch 1,32 --steps 32 --sample 2>&1 | tail -5
    echo "== tessera bench sample (the sampler on this host's CPU, beside a full sort)"
    .gpu/tessera bench sample 2>&1
    echo "== tessera bench score, Llama-3-8B shape, 2048 tokens (vocab-parallel log-probs beside the logits gathered to the host)"
    .gpu/tessera bench score --device cuda --preset llama-3-8b --tp ${TP:-1,2} --tokens 2048 2>&1
    echo "== the same, rank 0 of tp 2 alone (collectives skipped: what a rank's share of the pass cannot go below)"
    .gpu/tessera bench score --device cuda --preset llama-3-8b --one-rank-of 2 --tokens 2048 2>&1 | tail -1
    # Where a captured step's intermediates live (auto: the graph's arena up to batch 32, the pool
    # above): both forced, same binary and call.
    for a in 1 0; do
      echo "== tessera bench decode, Llama-3-8B shape, CUDA graphs, TESSERA_GRAPH_ARENA=$a"
      TESSERA_GRAPH_ARENA=$a .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp 1 --batch 1,32,64 --steps 32 --graph 2>&1 | tail -7
    done
    # The kernel benchmarks need one GPU, at tp 1 and at one rank's share of tp 2.
    echo "== tessera bench gemv, Llama-3-8B shapes"
    .gpu/tessera bench gemv 2>&1
    .gpu/tessera bench gemv --tp 2 2>&1
    echo "== tessera bench gemm, Llama-3-8B shapes (cuBLAS and the fastest cuBLASLt candidate)"
    for t in 1 2; do
      .gpu/tessera bench gemm --tp $t --batch 8,32,64 2>&1 | grep -E "ceiling|layer|cublas|lt 0 |fastest"
    done
    # Whether cuBLASLt's kernels wait for the kernel before them (only such a kernel could start
    # early in a captured step, on a programmatic edge): the last line counts them.
    echo "== tessera bench gemm --probe-pdl (cuBLASLt's kernels waiting for the kernel before)"
    for t in 1 2; do
      .gpu/tessera bench gemm --probe-pdl --tp $t --batch 17,32,64 2>&1 | tail -1
    done
    echo "== tessera bench decode, one rank of tp 2 alone (collectives skipped: the compute a tp-2 step cannot go below)"
    .gpu/tessera bench decode --device cuda --preset llama-3-8b --one-rank-of 2 --batch 1,2,8,16,64 --steps 32 --graph 2>&1 | tail -7
    # The same with each fused all-reduce + norm held 5 µs, a stand-in for its exchange over
    # NVLink: what of an exchange the kernels around it hide, on one GPU.
    echo "== the same, each exchange held 5 us (--hold-us 5)"
    .gpu/tessera bench decode --device cuda --preset llama-3-8b --one-rank-of 2 --batch 1,8,64 --steps 32 --graph --hold-us 5 2>&1 | grep -E "^1/2 "
    echo "== tessera bench persistent --tp 1 (one persistent kernel a step, one GPU)"
    timeout 120 .gpu/tessera bench persistent --tp 1 2>&1
    echo "== tessera bench attention, Llama-3-8B heads (each decode attention kernel)"
    for t in 1 2; do
      .gpu/tessera bench attention --tp $t 2>&1
    done
    # The prefill attention (one prompt, causal) beside cuBLAS's GEMM rate, then torch's
    # scaled_dot_product_attention backends (flash attention 2, cuDNN) at the same heads.
    echo "== tessera bench attention --prefill, Llama-3-8B heads, tp 1 and 2"
    for t in 1 2; do
      .gpu/tessera bench attention --tp $t --prefill 512,2048,8192 2>&1
    done
    echo "== torch scaled_dot_product_attention, the same prompts (scripts/bench_torch_prefill_attention.py)"
    PYTHONWARNINGS=ignore timeout 120 python3 scripts/bench_torch_prefill_attention.py --tokens 512,2048,8192 2>&1
    PYTHONWARNINGS=ignore timeout 120 python3 scripts/bench_torch_prefill_attention.py --tokens 512,2048,8192 --heads 16 --kv-heads 4 2>&1 | tail -9
  fi
  # The tp 2 measurements alone (`STEPS=tp2`: the few minutes that matter when a two-GPU machine
  # is lent): NVLink tests, the collectives' latency, NCCL against the fused path, 70B.
  if [[ $STEPS == all || $STEPS == *bench* || $STEPS == *tp2* ]]; then
    if [ "$NGPU" -ge 2 ]; then
      echo "== NCCL tests with the pushing GEMV on (TESSERA_P2P_PUSH=1)"
      TESSERA_P2P_PUSH=1 timeout 240 .gpu/test-nccl --test-threads=1 --nocapture 2>&1 | grep -E "test result|panicked|pushed|skipped"
      echo "== tessera bench comm, nccl backend: NCCL's all-reduce, and the fused NVLink sum + norm beside NCCL + the norm kernel"
      .gpu/tessera bench comm --backend nccl --dtype bf16 --sizes 8K,64K,512K,1M 2>&1
      .gpu/tessera bench comm --backend nccl --op all_reduce_add_rms_norm --dtype bf16 --sizes 8K,16K,64K,256K,512K,1M 2>&1
      echo "== tessera bench decode, Llama-3-8B shape, tp 1 (the reference of the tp 2 ratios), CUDA graphs"
      .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp 1 --batch 1,8,64 --steps 32 --graph 2>&1 | grep -E "^  1 "
      # tp 2 through NCCL alone against the default (the fused NVLink sum + residual add + norm
      # after each row-parallel projection) and the default's opt-in variants: a fence after its
      # pushes (fence), the next kernel released once the pushes are sent (pushed) or at the
      # kernel's end (end); same binary and call, alternating twice. (The pushing GEMV,
      # TESSERA_P2P_PUSH=1, measured no gain.)
      for round in 1 2; do
        for p in 0 default fence pushed end; do
          echo "== tessera bench decode, Llama-3-8B shape, tp 2, CUDA graphs, $p (round $round)"
          env $(variant_env $p) .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp 2 --batch 1,8,64 --steps 32 --graph 2>&1 | grep -E "^collectives|^  2 |rror"
        done
      done
      # The fused kernel's former stalls (graphs of 8+ rows at ~17 us a row a call, from waiting
      # warps reading the host abort word too soon; fixed): a new communicator a size, in one
      # process, every graph of which should run at 6-9 us a call.
      echo "== tessera bench comm, fused, a new communicator a size (--fresh-comm)"
      .gpu/tessera bench comm --backend nccl --op all_reduce_add_rms_norm --dtype bf16 --fresh-comm --sizes 64K,64K,64K,64K,256K,256K,256K,256K 2>&1 | grep -E "^ +[0-9]|rror"
      # Where the fused kernel's time goes (TESSERA_P2P_STATS=1: to its pushes, the wait for the
      # peer's lines, the row's end; per rank), for the default and each opt-in variant.
      for p in default fence pushed end push; do
        echo "== fused kernel's account, tp 2 batch 1, $p $(variant_env $p)"
        env TESSERA_P2P_STATS=1 $(variant_env $p) .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp 2 --batch 1 --steps 64 --graph 2>&1 | grep -E "^  2 |fused all-reduce|rror"
      done
      echo "== fused kernel's account, bench comm 64K, default and fence"
      for f in 0 1; do
        TESSERA_P2P_STATS=1 TESSERA_P2P_FENCE=$f .gpu/tessera bench comm --backend nccl --op all_reduce_add_rms_norm --dtype bf16 --sizes 64K 2>&1 | grep -E "^ +[0-9]|fused all-reduce"
      done
      # What one persistent kernel a step would reach at tp 2 (barriers and NVLink exchanges
      # inside one kernel), beside the CUDA-graph step of the same call.
      echo "== tessera bench persistent --tp 2 --gpus 2"
      timeout 120 .gpu/tessera bench persistent --tp 2 --gpus 2 2>&1
      echo "== tessera bench decode, Llama-3-70B shape, tp 2, CUDA graphs"
      timeout 300 .gpu/tessera bench decode --device cuda --preset llama-3-70b --tp 2 --batch 1,32 --steps 16 --graph 2>&1
      echo "== the same through NCCL alone (TESSERA_P2P_ALLREDUCE=0)"
      TESSERA_P2P_ALLREDUCE=0 timeout 300 .gpu/tessera bench decode --device cuda --preset llama-3-70b --tp 2 --batch 1,32 --steps 16 --graph 2>&1 | grep -E "^collectives|^  2 "
    else
      echo "(one GPU: the tp 2 benchmarks are skipped)"
    fi
  fi
  # Sampled decode (Llama 3's settings): the ranks' top-k candidates gathered from the devices
  # beside every rank's whole logits gathered to the host, through CUDA graphs (SAMPLE_EAGER=1:
  # eager steps too), with greedy steps of the same call for reference.
  # At tp 2 also with the small host bytes (the greedy step's pairs, the sampled token) through
  # NCCL's staging instead of the host communicator.
  if [[ $STEPS == all || $STEPS == *sample* ]]; then
    GRAPHS=(--graph); [ -n "${SAMPLE_EAGER:-}" ] && GRAPHS+=("")
    for g in "${GRAPHS[@]}"; do
      echo "== tessera bench decode, Llama-3-8B shape, greedy on the devices ${g:-(eager)}"
      .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp ${TP:-1,2} --batch 1,8,32 --steps 32 $g 2>&1 | grep -E "^ *[0-9]+ +[0-9]+ "
      [ -z "${TP:-}" ] && [ -n "$g" ] && { echo "== the same, tp 2, TESSERA_NCCL_HOST_BYTES=0"; TESSERA_NCCL_HOST_BYTES=0 .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp 2 --batch 1,8,32 --steps 32 $g 2>&1 | grep -E "^ *[0-9]+ +[0-9]+ "; }
      for f in "" --full-logits; do
        echo "== tessera bench decode, Llama-3-8B shape, sampled ${g:-(eager)} ${f:-(top-k candidates)}"
        .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp ${TP:-1,2} --batch 1,8,32 --steps 32 --sample $g $f 2>&1 | grep -E "^ *[0-9]+ +[0-9]+ |rank 0:"
        [ -z "${TP:-}" ] && [ -n "$g" ] && [ -z "$f" ] && { echo "== the same, tp 2, TESSERA_NCCL_HOST_BYTES=0"; TESSERA_NCCL_HOST_BYTES=0 .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp 2 --batch 1,8,32 --steps 32 --sample $g 2>&1 | grep -E "^ *[0-9]+ +[0-9]+ |rank 0:"; }
      done
    done
  fi
  if [[ $STEPS == all || $STEPS == *long* ]]; then
    # A 2,048-position cache: the decode attention as the shape picks it (one pass, on tensor
    # cores from 2,048 positions) against the one pass on CUDA cores and on tensor cores
    # forced, the two-pass grouped kernel and the first per-query-head kernel, same binary, same
    # call; then the 70B shape at tp 2 (g = 8: the two-pass kernel against the shape's choice).
    # The kernels alone over such caches; the tensor-core rows print the blocks a multiprocessor
    # holds (the driver's occupancy figure).
    echo "== tessera bench attention, Llama-3-8B heads, 2,048 and 8,192 positions"
    .gpu/tessera bench attention --tp 1 --batch 8,64 --keys 2048,8192 2>&1
    for m in per_head grouped flash mma auto; do
      echo "== tessera bench decode, Llama-3-8B shape, 2048-position cache, CUDA graphs, decode attention $m"
      TESSERA_DECODE_ATTENTION=$m .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp 1 --batch 1,32,64 --steps 32 --prompt-len 2048 --graph 2>&1 | tail -6
    done
    if [ -z "${TP:-}" ]; then
      for m in grouped auto; do
        echo "== tessera bench decode, Llama-3-70B shape, tp 2, 2048-position cache, CUDA graphs, decode attention $m"
        TESSERA_DECODE_ATTENTION=$m timeout 200 .gpu/tessera bench decode --device cuda --preset llama-3-70b --tp 2 --batch 8,32 --steps 16 --prompt-len 2048 --graph 2>&1 | tail -2
      done
    fi
  fi
  if [[ $STEPS == all || $STEPS == *hf* ]]; then
    echo "== HF transformers baseline"
    PYTHONUNBUFFERED=1 python3 scripts/bench_hf_decode.py --batch ${HF_BATCH:-1,32,64} --steps 16 2>&1 | grep -v Warning
  fi
  date -u
} 2>&1 | tee "$REPORT"
if [[ $STEPS == all || $STEPS == *cli* ]]; then
  # CLI on the GPU against the CPU: f32 log-probs within 1e-4, greedy tokens identical (generate
  # decodes through a captured CUDA graph), at tp 1 and, with two GPUs, tp 2 in-process (the fused
  # NVLink sum + norm, NCCL alone, and the pushing GEMVs) and under `tessera launch` (one process per GPU, NCCL
  # through the rendezvous).
  M=tests/fixtures/hf/llama; TOK=0,5,9,77,300,2,18,41,41,7,200,3
  RUNS="tp1"; [ "$NGPU" -ge 2 ] && RUNS="tp1 tp2 tp2nccl tp2push launch"
  {
    echo "== CLI: score / generate on cuda vs cpu ($RUNS)"
    .gpu/tessera score --model $M --tokens $TOK --json > $OUTDIR/score_cpu.json
    a=$(.gpu/tessera generate --model $M --prompt-tokens $TOK --max-tokens 24 --json)
    # Sampled too (temperature, top-k, top-p from one seed): the host's sampler over the device's
    # f32 logits draws the CPU's tokens.
    SAMPLE="--temperature 0.8 --top-k 20 --top-p 0.9 --seed 5 --ignore-eos"
    sa=$(.gpu/tessera generate --model $M --prompt-tokens $TOK --max-tokens 24 --json $SAMPLE)
    # Repetition, presence and frequency penalties and min-p: without a top-k over the whole
    # logits on the host; with one (and greedy) from the devices' candidates and the penalised
    # tokens' logits read there.
    PENAL="--repetition-penalty 1.3 --presence-penalty 0.5 --frequency-penalty 0.3 --min-p 0.05 --temperature 0.9 --seed 7 --ignore-eos"
    pa=$(.gpu/tessera generate --model $M --prompt-tokens $TOK --max-tokens 24 --json $PENAL)
    PENALK="--repetition-penalty 1.2 --presence-penalty -0.4 --frequency-penalty 0.2 --top-k 30 --top-p 0.95 --temperature 1.1 --seed 9 --ignore-eos"
    ka=$(.gpu/tessera generate --model $M --prompt-tokens $TOK --max-tokens 24 --json $PENALK)
    ga=$(.gpu/tessera generate --model $M --prompt-tokens $TOK --max-tokens 24 --json --repetition-penalty 1.3 --ignore-eos)
    # Other model paths: YaRN RoPE (its attention factor in the softmax scale of the decode and
    # prefill kernels) and Qwen3 (the per-head q/k norm kernel).
    OTHERS="qwen2_yarn qwen3"
    declare -A oa
    for o in $OTHERS; do
      .gpu/tessera score --model tests/fixtures/hf/$o --tokens $TOK --json > $OUTDIR/${o}_cpu.json
      oa[$o]=$(.gpu/tessera generate --model tests/fixtures/hf/$o --prompt-tokens $TOK --max-tokens 24 --json --ignore-eos)
    done
    for run in $RUNS; do
      case $run in
        tp1) L=""; T=1 ;;
        tp2) L=""; T=2 ;;
        tp2nccl) L="env TESSERA_P2P_ALLREDUCE=0"; T=2 ;;
        tp2push) L="env TESSERA_P2P_PUSH=1"; T=2 ;;
        launch) L=".gpu/tessera launch --nproc-per-node 2 --"; T=2 ;;
      esac
      $L .gpu/tessera score --model $M --tokens $TOK --json --device cuda --tp $T > $OUTDIR/score_cuda_$run.json
      b=$($L .gpu/tessera generate --model $M --prompt-tokens $TOK --max-tokens 24 --json --device cuda --tp $T)
      [ "$a" == "$b" ] && echo "generate cuda $run: identical to cpu OK" || echo "generate cuda $run: FAIL: $a vs $b"
      sb=$($L .gpu/tessera generate --model $M --prompt-tokens $TOK --max-tokens 24 --json --device cuda --tp $T $SAMPLE)
      [ "$sa" == "$sb" ] && echo "generate cuda $run, sampled: identical to cpu OK" || echo "generate cuda $run, sampled: FAIL: $sa vs $sb"
      pb=$($L .gpu/tessera generate --model $M --prompt-tokens $TOK --max-tokens 24 --json --device cuda --tp $T $PENAL)
      [ "$pa" == "$pb" ] && echo "generate cuda $run, repetition penalty + min-p sampled: identical to cpu OK" || echo "generate cuda $run, repetition penalty + min-p: FAIL: $pa vs $pb"
      kb=$($L .gpu/tessera generate --model $M --prompt-tokens $TOK --max-tokens 24 --json --device cuda --tp $T $PENALK)
      [ "$ka" == "$kb" ] && echo "generate cuda $run, penalties + top-k sampled: identical to cpu OK" || echo "generate cuda $run, penalties + top-k: FAIL: $ka vs $kb"
      gb=$($L .gpu/tessera generate --model $M --prompt-tokens $TOK --max-tokens 24 --json --device cuda --tp $T --repetition-penalty 1.3 --ignore-eos)
      [ "$ga" == "$gb" ] && echo "generate cuda $run, greedy with repetition penalty: identical to cpu OK" || echo "generate cuda $run, greedy with repetition penalty: FAIL: $ga vs $gb"
      for o in $OTHERS; do
        $L .gpu/tessera score --model tests/fixtures/hf/$o --tokens $TOK --json --device cuda --tp $T > $OUTDIR/${o}_cuda_$run.json
        ob=$($L .gpu/tessera generate --model tests/fixtures/hf/$o --prompt-tokens $TOK --max-tokens 24 --json --device cuda --tp $T --ignore-eos)
        [ "${oa[$o]}" == "$ob" ] && echo "generate cuda $run, $o: identical to cpu OK" || echo "generate cuda $run, $o: FAIL: ${oa[$o]} vs $ob"
      done
    done
    # Bad input on the GPU path: an error line (the last), a non-zero exit, no panic.
    echo "== CLI: bad input on cuda"
    bad_input() {
      out=$("$@" 2>&1); rc=$?
      last=$(printf '%s\n' "$out" | tail -1)
      if [ $rc -ne 0 ] && [[ $last == error:* ]] && ! grep -q panicked <<<"$out"; then v=OK; else v=FAIL; fi
      echo "$v (exit $rc): ${*: -6}: $last"
    }
    # The 70B shape alone fits one H200 (141 of 150 GB); with 64 caches of 1,024 positions (21 GB) it does not.
    bad_input .gpu/tessera bench decode --device cuda --preset llama-3-70b --tp 1 --batch 64 --prompt-len 1024 --steps 2
    bad_input .gpu/tessera score --model $M --tokens $TOK --device cuda --tp 3
    bad_input .gpu/tessera score --model $M --tokens $TOK --device cuda:9
    bad_input env TESSERA_P2P_TRIGGER=ends .gpu/tessera generate --model $M --prompt-tokens $TOK --max-tokens 4 --device cuda --tp $T
    bad_input env TESSERA_P2P_ALLREDUCE=norm .gpu/tessera score --model $M --tokens $TOK --device cuda --tp $T
    python3 - "$OUTDIR" $RUNS <<'PY'
import json, sys
d = sys.argv[1]
for model, cpu_file, cuda_file in (("", "score_cpu", "score_cuda"),
                                   *((f", {o}", f"{o}_cpu", f"{o}_cuda") for o in ("qwen2_yarn", "qwen3"))):
    cpu = json.load(open(f"{d}/{cpu_file}.json"))["token_logprobs"]
    for run in sys.argv[2:]:
        got = json.load(open(f"{d}/{cuda_file}_{run}.json"))["token_logprobs"]
        diff = max(abs(a - b) for a, b in zip(cpu, got))
        print(f"score cuda {run}{model}: max |logprob - cpu| = {diff:.2e}", "OK" if diff < 1e-4 and len(got) == len(cpu) else "FAIL")
PY
  } 2>&1 | tee -a "$REPORT"
fi
if [[ $STEPS == all || $STEPS == *export* ]]; then
  # What `tessera export` writes, loaded by transformers (here, where torch is): a small model
  # trained here for 200 steps (CPU), exported in f32 and bf16; transformers' log-probs and greedy
  # tokens against tessera's on each (scripts/check_export_hf.py).
  {
    echo "== export: a model trained here, exported, loaded by transformers"
    W=$(mktemp -d)
    .gpu/tessera data prepare --input data/shakespeare/slice.txt --tokenizer tests/fixtures/hf/llama/tokenizer.json --out $W/data 2>&1 | tail -1
    .gpu/tessera train --config tests/fixtures/train/shakespeare/ds_config.json --model-config tests/fixtures/train/shakespeare \
      --data $W/data --dp 1 --steps 200 --seq-len 64 --save $W/ck --curve $W/curve.svg 2>&1 | tail -1
    for dt in f32 bf16; do .gpu/tessera export --checkpoint $W/ck --out $W/model_$dt --dtype $dt 2>&1; done
    python3 scripts/check_export_hf.py .gpu/tessera $W/model_f32 $W/model_bf16 2>&1 | grep -v -e Warning -e "Loading weights"
    # The same model as Qwen3 (per-head q/k norms, trained and exported with them).
    echo "== export: the same model as Qwen3 (q/k norms), trained here, exported, loaded by transformers"
    mkdir -p $W/qwen3
    python3 -c "import json,sys; c=json.load(open('tests/fixtures/train/shakespeare/config.json')); c.update(architectures=['Qwen3ForCausalLM'], model_type='qwen3', head_dim=c['hidden_size']//c['num_attention_heads']); json.dump(c, open('$W/qwen3/config.json','w'))"
    .gpu/tessera train --config tests/fixtures/train/shakespeare/ds_config.json --model-config $W/qwen3 \
      --data $W/data --dp 2 --zero-stage 3 --steps 200 --seq-len 64 --save $W/ck3 --curve $W/curve3.svg 2>&1 | tail -1
    .gpu/tessera export --checkpoint $W/ck3 --out $W/qwen3_f32 --dtype f32 2>&1
    python3 scripts/check_export_hf.py .gpu/tessera $W/qwen3_f32 2>&1 | grep -v -e Warning -e "Loading weights"
    rm -rf "$W"
  } 2>&1 | tee -a "$REPORT"
fi
# Issue 5's speed targets from this report (the default settings' graph steps, HF's best).
summary=$(python3 scripts/targets_summary.py "$REPORT" 2>&1)
printf '== targets\n%s\n' "$summary" | tee -a "$REPORT"

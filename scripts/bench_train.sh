#!/usr/bin/env bash
# Training throughput on CPU at dp 1 and 2 for every ZeRO stage, and each stage's communication
# per step, on the Shakespeare main-job model. Usage: scripts/bench_train.sh [STEPS] (release build).
set -euo pipefail
STEPS=${1:-30}
T=${TESSERA:-target/release/tessera}
W=$(mktemp -d)
$T data prepare --input data/shakespeare/slice.txt \
  --tokenizer tests/fixtures/hf/llama/tokenizer.json --out "$W/data" 2>/dev/null
printf "%-4s %-6s %12s  %s\n" dp stage "tokens/s" "communication per step (rank 0)"
for dp in 1 2; do
  for stage in 0 1 2 3; do
    out=$($T train --config tests/fixtures/train/shakespeare/ds_config.json \
      --model-config tests/fixtures/train/shakespeare --data "$W/data" --seq-len 64 \
      --steps "$STEPS" --dp "$dp" --zero-stage "$stage" --eval-batches 1 --json \
      --curve "$W/c.svg" 2>"$W/err")
    tps=$(echo "$out" | tail -1 | sed 's/.*"tokens_per_s":\([0-9.]*\).*/\1/')
    comm=$(grep "^communication" "$W/err" | sed 's/communication per step (rank 0): //')
    printf "%-4s %-6s %12.0f  %s\n" "$dp" "$stage" "$tps" "$comm"
  done
done
rm -rf "$W"

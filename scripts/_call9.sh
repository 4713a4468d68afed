#!/usr/bin/env bash
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu:/usr/local/nvidia/lib64
{
date -u
for r in 1 2; do for v in by_head auto; do
  echo "== TESSERA_DECODE_ATTENTION=$v: 8B tp 1 batch 1, 4,000-position prompt filled, graph (round $r)"
  TESSERA_DECODE_ATTENTION=$v timeout 60 .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp 1 --batch 1 --steps 64 --prompt-len 4000 --fill-cache --graph 2>&1 | grep -E "^ *1 "
done; done
for r in 1 2; do for v in by_head auto; do
  echo "== TESSERA_DECODE_ATTENTION=$v: 70B one rank of tp 2, batch 1, 6,000-position prompt filled, graph (round $r)"
  TESSERA_DECODE_ATTENTION=$v timeout 90 .gpu/tessera bench decode --device cuda --preset llama-3-70b --one-rank-of 2 --batch 1 --steps 32 --prompt-len 6000 --fill-cache --graph 2>&1 | grep -E "^1/2 "
done; done
} > $OUT/call9.txt 2>&1
cat $OUT/call9.txt

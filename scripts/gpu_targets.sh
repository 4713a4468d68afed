#!/usr/bin/env bash
# Issue 5's speed targets in one device call (binaries from scripts/gpu_build.sh in .gpu/): tp 1 and tp 2
# alternating two rounds, HF transformers best of 5, a PyTorch tensor-parallel peer (CUDA graphs; eager with
# NCCL, compiled with torch's NVLink all-reduce) at tp 1 and 2, the 70B shape at tp 2, then
# scripts/targets_summary.py (~7 minutes).
#   bash scripts/gpu_targets.sh      (report in $OUT/targets_report.txt, or ./targets_report.txt)
#   QUICK=1 bash scripts/gpu_targets.sh   (without the compiled PyTorch peers: ~4 minutes)
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
R=${OUT:-.}/targets_report.txt
{
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for round in 1 2; do
  for t in 1 2; do
    echo "== tessera bench decode, Llama-3-8B shape, CUDA graphs, round $round, tp $t"
    timeout 120 .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp $t --batch 1,8,32,64 --steps 32 --graph 2>&1 | grep -E "^ +[12] |rror"
  done
done
echo "== HF transformers baseline"
PYTHONUNBUFFERED=1 timeout 300 python3 scripts/bench_hf_decode.py --batch 1,32,64 --steps 16 --repeats 5 2>&1 | grep -v Warning
echo "== PyTorch tensor-parallel peer (scripts/bench_torch_tp_decode.py)"
PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore timeout 150 python3 scripts/bench_torch_tp_decode.py --tp 1,2 --batch 1,64 --steps 64 2>&1 | grep -E "^(torch|compiled)|failed|^  "
# The same compiled by Inductor as gpt-fast does (~45 s of compilation a tp and batch), its tp 2 sums
# through torch's symmetric-memory one-shot all-reduce over NVLink (as vLLM's and SGLang's are).
if [ -z "${QUICK:-}" ]; then
  PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore timeout 200 python3 scripts/bench_torch_tp_decode.py --compile --tp 1 --batch 1,64 --steps 64 2>&1 | grep -E "^(torch|compiled)|failed|^  "
  PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore timeout 170 python3 scripts/bench_torch_tp_decode.py --compile --allreduce symm --tp 2 --batch 1,64 --steps 64 2>&1 | grep -E "^(torch|compiled)|failed|^  "
fi
echo "== tessera bench decode, Llama-3-70B shape, tp 2, CUDA graphs"
timeout 200 .gpu/tessera bench decode --device cuda --preset llama-3-70b --tp 2 --batch 1,32 --steps 16 --graph 2>&1 | grep -E "^ +2 |rror"
date -u
} 2>&1 | tee $R
echo "== targets" | tee -a $R
python3 scripts/targets_summary.py $R 2>&1 | tee -a $R

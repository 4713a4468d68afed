#!/usr/bin/env bash
# Every GPU test and benchmark in one device call. Build first, on the CPU machine:
#   scripts/gpu_build.sh            (puts the binaries in .gpu/)
# then, on the GPU machine (the `device` tool, carrying .gpu):
#   bash scripts/gpu_check.sh        (report in $OUT/gpu_report.txt, or ./gpu_report.txt)
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export TESSERA_REQUIRE_GPU=1 TESSERA_FIXTURES=$PWD/tests/fixtures/hf NCCL_NVLS_ENABLE=0 RUST_BACKTRACE=1
OUTDIR=${OUT:-.}
REPORT=$OUTDIR/gpu_report.txt
STEPS=${STEPS:-all}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if [[ $STEPS == all || $STEPS == *tests* ]]; then
    for t in .gpu/test-*; do
      echo "== $t"; "$t" --test-threads=1 --nocapture 2>&1 | grep -E "test |relative error|bf16 mean|graph steps|panicked|assert|result" | tail -40
    done
  fi
  if [[ $STEPS == all || $STEPS == *bench* ]]; then
    echo "== tessera bench decode (8B shape)"
    .gpu/tessera bench decode --device cuda --preset llama-3-8b --tp ${TP:-1} --steps 32 2>&1
  fi
  if [[ $STEPS == all || $STEPS == *hf* ]]; then
    echo "== HF transformers baseline"
    PYTHONUNBUFFERED=1 python3 scripts/bench_hf_decode.py --batch ${HF_BATCH:-1,32} --steps 16 2>&1 | grep -v Warning
  fi
} 2>&1 | tee "$REPORT"

#!/usr/bin/env bash
# Per-kernel profile of one decode step of `tessera bench decode` under Nsight Compute (GPU machine;
# binaries in .gpu/, see scripts/gpu_build.sh). Kernels run serialised, so the durations are each
# kernel alone: their sum is the step without launch gaps.
#   TP=1 BATCH=1 PROMPT=1 bash scripts/gpu_profile.sh   (table on stdout, raw CSV in $OUT; PROMPT: cached positions)
#   ONE_RANK_OF=2 ...: one rank of tp 2 alone (`--one-rank-of 2`) instead of --tp; TAG=x ...: a
#   suffix for the CSV's name (runs that differ only in an environment switch)
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
OUTDIR=${OUT:-.}
SPLIT=(--tp "${TP:-1}")
[ -n "${ONE_RANK_OF:-}" ] && SPLIT=(--one-rank-of "$ONE_RANK_OF")
CSV=$OUTDIR/ncu_tp${TP:-1}${ONE_RANK_OF:+_one_rank_of_$ONE_RANK_OF}_b${BATCH:-1}${TAG:+_$TAG}.csv
/usr/local/cuda-13.0/bin/ncu --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum \
  --cache-control none --clock-control none .gpu/tessera bench decode --device cuda \
  --preset ${PRESET:-llama-3-8b} "${SPLIT[@]}" --batch ${BATCH:-1} --steps 1 --prompt-len ${PROMPT:-1} > "$CSV" 2>/dev/null
python3 - "$CSV" <<'PY'
import csv, collections, io, sys
lines = open(sys.argv[1]).read().splitlines()
rows = list(csv.DictReader(io.StringIO("\n".join(lines[[i for i, l in enumerate(lines) if l.startswith('"ID"')][0]:]))))
rows = [r for r in rows if r.get("ID", "").isdigit() and r.get("Device", "0") == "0"]
num = lambda s: float(s.replace(",", "")) if s else 0.0
# A step ends with the second (final) argmax pass: take the last full step.
ends = [i for i, r in enumerate(rows) if "argmax" in r["Kernel Name"]][1::2]
step = rows[ends[-2] + 1:ends[-1] + 1]
agg = collections.defaultdict(lambda: [0, 0.0, 0.0])
for r in step:
    a = agg[(r["Kernel Name"][:40], r["Grid Size"], r["Block Size"])]
    a[0] += 1; a[1] += num(r["gpu__time_duration.sum"]); a[2] += num(r["dram__bytes_read.sum"])
total = sum(a[1] for a in agg.values())
print(f"one step: {len(step)} kernels, {total / 1e3:.1f} µs of kernel time, {sum(a[2] for a in agg.values()) / 1e9:.2f} GB read")
print(f"{'calls':>5} {'µs each':>9} {'µs total':>9} {'GB/s':>8}  kernel, grid, block")
for k, (c, t, b) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"{c:5d} {t / c / 1e3:9.2f} {t / 1e3:9.1f} {b / t if t else 0:8.1f}  {k}")
PY

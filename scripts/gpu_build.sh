#!/usr/bin/env bash
# Builds the CUDA binaries the GPU machine runs (the CLI and the GPU test binaries) into .gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu && rm -f .gpu/test-*
# The kernels through CUDA's own NVRTC here first (scripts/nvrtc_check.sh): a compile error stops
# the build, not a GPU call; without the wheels (no PyPI) only a warning.
rc=0
bash scripts/nvrtc_check.sh > .gpu/nvrtc_check.txt 2>&1 || rc=$?
case $rc in
  0) head -1 .gpu/nvrtc_check.txt; grep "^spilling" .gpu/nvrtc_check.txt || true ;;
  2) echo "warning: $(tail -1 .gpu/nvrtc_check.txt); the kernels were not compiled here" ;;
  *) tail -40 .gpu/nvrtc_check.txt; exit 1 ;;
esac
cargo build --release --features cuda -p tessera-cli
cp "${CARGO_TARGET_DIR:-target}/release/tessera" .gpu/tessera
for spec in "tessera-tensor --test cuda_ops" "tessera-comm --test nccl" "tessera-infer --test hf_reference" "tessera-model --test cuda_graph"; do
  set -- $spec
  exe=$(cargo test --release --features "$1/cuda" -p "$1" "${@:2}" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys; print([json.loads(l)["executable"] for l in sys.stdin if "\"executable\":\"" in l][-1])')
  cp "$exe" ".gpu/test-$3"
done
ls -la .gpu

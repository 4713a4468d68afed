#!/usr/bin/env bash
# kernels.cu through CUDA 13.0's own NVRTC and ptxas, on a machine without a GPU: the compile
# errors a GPU call would first show, and each kernel's registers and spills (what limits its
# occupancy). Installs NVIDIA's NVRTC and nvcc wheels (~130 MB, from PyPI) into .nvrtc once.
# Not part of CI (a download); run it before a GPU call that carries kernel changes.
#   bash scripts/nvrtc_check.sh              (sm_90a, what the H200 compiles)
#   ARCH=sm_80 bash scripts/nvrtc_check.sh
# Exit 1: the kernels do not compile; 2: the wheels could not be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${ARCH:-sm_90a}
V=${NVRTC_VENV:-.nvrtc}
if [ ! -x "$V/bin/python" ] || ! "$V/bin/python" -c "import nvidia.cu13" 2>/dev/null; then
  # Exit 2: no compiler to check with (no network to PyPI, no python3 venv), not a kernel error.
  { python3 -m venv "$V" && "$V/bin/pip" install -q "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-nvcc==13.0.*"; } ||
    { echo "nvrtc_check: could not install NVIDIA's NVRTC wheels into $V"; exit 2; }
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The source NVRTC gets (kernels.cu and the skinny GEMM instances), from the host-check test.
TESSERA_KERNEL_SOURCE_OUT="$tmp/kernels.cu" cargo test -q --release -p tessera-tensor \
  --features cuda --lib the_kernels_parse_and_instantiate_on_a_host_compiler > /dev/null
"$V/bin/python" scripts/nvrtc_check.py "$tmp/kernels.cu" "$ARCH"

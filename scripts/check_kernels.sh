#!/usr/bin/env bash
# A check of crates/tensor/src/cuda/kernels.cu on a machine without CUDA: the kernels compile with
# NVRTC only at start-up on a GPU, so a typo would otherwise first show there. The host C++
# compiler parses the file and instantiates every kernel template (through the extern "C"
# entry points) with CUDA's built-ins declared as stubs below: names, types, overloads and
# template arguments are checked; PTX, inline assembly and device limits are not (NVRTC's job).
#   bash scripts/check_kernels.sh      (exit 1 with the compiler's errors; skipped without c++)
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CXX:-c++}
if ! command -v "$CXX" >/dev/null; then
  echo "check_kernels: no host C++ compiler ($CXX), skipped"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/prelude.h" <<'PRELUDE'
#include <math.h>
#include <stddef.h>
#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __shared__
#define __restrict__
#define __launch_bounds__(...)
#define __CUDA_ARCH__ 900
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct int2 { int x, y; };
struct int4 { int x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct dim3 { unsigned x, y, z; };
extern dim3 blockIdx, threadIdx, blockDim, gridDim;
extern int warpSize;
uint4 make_uint4(unsigned, unsigned, unsigned, unsigned);
uint2 make_uint2(unsigned, unsigned);
int2 make_int2(int, int);
float2 make_float2(float, float);
float4 make_float4(float, float, float, float);
float __int_as_float(int);
float __uint_as_float(unsigned);
unsigned __float_as_uint(float);
int __float_as_int(float);
float __fdividef(float, float);
float rsqrtf(float);
void __sincosf(float, float*, float*);
void sincos(double, double*, double*);
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
float __shfl_xor_sync(unsigned, float, int, int = 32);
int __shfl_xor_sync(unsigned, int, int, int = 32);
float __shfl_sync(unsigned, float, int, int = 32);
int __shfl_sync(unsigned, int, int, int = 32);
unsigned __shfl_sync(unsigned, unsigned, int, int = 32);
float __shfl_down_sync(unsigned, float, int, int = 32);
float __shfl_up_sync(unsigned, float, int, int = 32);
int __shfl_up_sync(unsigned, int, int, int = 32);
unsigned __shfl_up_sync(unsigned, unsigned, int, int = 32);
unsigned __match_any_sync(unsigned, int);
unsigned __match_any_sync(unsigned, unsigned);
unsigned __ballot_sync(unsigned, int);
unsigned __activemask();
int __popc(unsigned);
int __ffs(int);
int __clz(int);
void __syncthreads();
int __syncthreads_or(int);
int __syncthreads_and(int);
int __syncthreads_count(int);
void __syncwarp(unsigned = 0xffffffffu);
void __threadfence();
void __threadfence_system();
void __nanosleep(unsigned);
unsigned long long clock64();
size_t __cvta_generic_to_shared(const void*);
int atomicAdd(int*, int);
unsigned atomicAdd(unsigned*, unsigned);
unsigned long long atomicAdd(unsigned long long*, unsigned long long);
float atomicAdd(float*, float);
int atomicMax(int*, int);
unsigned atomicMax(unsigned*, unsigned);
unsigned long long atomicMax(unsigned long long*, unsigned long long);
int atomicCAS(int*, int, int);
unsigned atomicCAS(unsigned*, unsigned, unsigned);
unsigned atomicInc(unsigned*, unsigned);
template <class T> T __ldg(const T*);
PRELUDE
cat "$tmp/prelude.h" crates/tensor/src/cuda/kernels.cu > "$tmp/kernels.cpp"
if "$CXX" -std=c++17 -fsyntax-only -w "$tmp/kernels.cpp" 2> "$tmp/errors"; then
  echo "check_kernels: kernels.cu parses and every kernel template instantiates"
else
  # Line numbers of kernels.cu: the prelude's lines taken off.
  off=$(wc -l < "$tmp/prelude.h")
  awk -v off="$off" -F: '$2 ~ /^[0-9]+$/ && $2 > off { $2 = $2 - off } { print }' OFS=: "$tmp/errors" \
    | sed "s|$tmp/kernels.cpp|crates/tensor/src/cuda/kernels.cu|" | grep -E "error|note: candidate" | head -40
  echo "check_kernels: kernels.cu does not compile (errors above)"
  exit 1
fi

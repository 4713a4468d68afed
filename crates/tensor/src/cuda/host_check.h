// CUDA's built-ins as host declarations, for `the_kernels_parse_and_instantiate_on_a_host_compiler`
// (crates/tensor/src/cuda/mod.rs): a host C++ compiler parses kernels.cu after this prelude, so a
// typo or a wrong overload in a kernel shows on a machine without CUDA (NVRTC compiles the
// kernels only on a GPU, at start-up). Only declarations: nothing here is run.
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
int __any_sync(unsigned, int);
int __all_sync(unsigned, int);
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

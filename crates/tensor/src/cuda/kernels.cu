// tessera's CUDA kernels, compiled at start-up with NVRTC for the device's architecture.
// Every kernel exists for f32 (suffix _f32) and bf16 (_bf16, stored as raw 16-bit words so that no
// CUDA header is needed); math is always f32, results are rounded to the storage type.

typedef unsigned short bf16_t;
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long i) {
    return __uint_as_float(((unsigned)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long i, float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = 0x7fc0; return; }  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                      // round to nearest even
    p[i] = (bf16_t)(u >> 16);
}
__device__ __forceinline__ float rnd(float v, const float*) { return v; }
__device__ __forceinline__ float rnd(float v, const bf16_t*) {
    bf16_t b; st(&b, 0, v); return ld(&b, 0);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum (or max) over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
template <bool MAX>
__device__ float block_reduce(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (blockDim.x >> 5) ? part[lane] : (MAX ? NEG_INF : 0.f);
        s = MAX ? warp_max(s) : warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}
__device__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ float block_max(float v) { return block_reduce<true>(v); }

// Rotate-half RoPE of one head at position `pos`: element i pairs with i + hd/2. Reads `src`, writes
// `dst` (the same buffer for an in-place rotation); threads of the block stride over the pairs.
template <typename T>
__device__ void rotate_head(const T* src, long s0, T* dst, long d0, const float* inv_freq, int hd, double pos) {
    int half = hd / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        double a = (double)inv_freq[i] * pos;
        float c = (float)cos(a), s = (float)sin(a);
        float x0 = ld(src, s0 + i), x1 = ld(src, s0 + i + half);
        st(dst, d0 + i, x0 * c - x1 * s);
        st(dst, d0 + i + half, x1 * c + x0 * s);
    }
}

// y = w * round(x / rms(x)); one block per row.
template <typename T>
__device__ void rms_norm(const T* x, const T* w, T* y, int h, float eps) {
    long row = blockIdx.x;
    const T* xr = x + row * h;
    T* yr = y + row * h;
    float ss = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) { float a = ld(xr, i); ss += a * a; }
    ss = block_sum(ss);
    float inv = rsqrtf(ss / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x)
        st(yr, i, ld(w, i) * rnd(ld(xr, i) * inv, yr));
}

// Rotate-half RoPE in place on x [t, heads, hd]; token i at position start + i. grid (t, heads).
// `pos_ptr`, when not null, holds the start position on the device (CUDA-graph replays).
template <typename T>
__device__ void rope(T* x, const float* inv_freq, int heads, int hd, int start, const int* pos_ptr) {
    if (pos_ptr) start = pos_ptr[0];
    long base = ((long)blockIdx.x * heads + blockIdx.y) * hd;
    rotate_head(x, base, x, base, inv_freq, hd, (double)(start + blockIdx.x));
}

template <typename T>
__device__ void silu_mul(const T* g, const T* u, T* out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float a = ld(g, i);
        st(out, i, rnd(a / (1.f + expf(-a)), out) * ld(u, i));
    }
}

template <typename T>
__device__ void add_inplace(T* a, const T* b, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        st(a, i, ld(a, i) + ld(b, i));
}

// y[r, :] += b for r in rows; n columns.
template <typename T>
__device__ void add_bias(T* y, const T* b, long rows, int n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < rows * n; i += (long)gridDim.x * blockDim.x)
        st(y, i, ld(y, i) + ld(b, i % n));
}

// out[t, :] = table[tok - vstart, :] when the row is this rank's, else 0. grid t.
template <typename T>
__device__ void embedding(const T* table, const unsigned* tokens, T* out, int h, int vstart, int rows) {
    long t = blockIdx.x;
    long r = (long)tokens[t] - vstart;
    bool mine = r >= 0 && r < rows;
    for (int i = threadIdx.x; i < h; i += blockDim.x) st(out, t * h + i, mine ? ld(table, r * h + i) : 0.f);
}

// Causal attention with grouped KV heads and an optional window (0 = none).
// q, out: [t, hq, hd]; k, v: [positions, hkv, hd]. Query i sits at position start + i.
// grid (t, hq); dynamic shared memory: one float per key.
template <typename T>
__device__ void attention(const T* q, const T* k, const T* v, T* out, int hq, int hkv, int hd,
                          int start, int window, float scale, const int* pos_ptr) {
    extern __shared__ float scores[];
    if (pos_ptr) start = pos_ptr[0];
    int ti = blockIdx.x, h = blockIdx.y;
    int kvh = h / (hq / hkv);
    int p = start + ti;
    int lo = window > 0 ? max(0, p + 1 - window) : 0;
    int n = p + 1 - lo;
    const T* qv = q + ((long)ti * hq + h) * hd;
    long krow = (long)hkv * hd;
    // Scores: one warp per key, lanes across head_dim.
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int j = warp; j < n; j += nwarps) {
        const T* kj = k + (long)(lo + j) * krow + (long)kvh * hd;
        float s = 0.f;
        for (int d = lane; d < hd; d += 32) s += ld(qv, d) * ld(kj, d);
        s = warp_sum(s);
        if (lane == 0) scores[j] = s * scale;
    }
    __syncthreads();
    float m = NEG_INF;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = block_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) { float e = expf(scores[j] - m); scores[j] = e; sum += e; }
    sum = block_sum(sum);
    float inv = 1.f / sum;
    T* o = out + ((long)ti * hq + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < n; j++) acc += scores[j] * ld(v + (long)(lo + j) * krow + (long)kvh * hd, d);
        st(o, d, acc * inv);
    }
}

// A step's attention inputs in one kernel: RoPE on q [t, hq, hd] in place; RoPE on k [t, hkv, hd]
// written into the K cache and v copied into the V cache, at positions pos.. (pos_ptr[0] when not
// null, else start). grid (t, hq + hkv).
template <typename T>
__device__ void rope_append(T* q, const T* k, const T* v, T* kc, T* vc, const float* inv_freq,
                            int hq, int hkv, int hd, int start, const int* pos_ptr) {
    if (pos_ptr) start = pos_ptr[0];
    int ti = blockIdx.x, h = blockIdx.y;
    double pos = (double)(start + ti);
    if (h < hq) {
        long base = ((long)ti * hq + h) * hd;
        rotate_head(q, base, q, base, inv_freq, hd, pos);
    } else {
        int kh = h - hq;
        long src = ((long)ti * hkv + kh) * hd;
        long dst = ((long)(start + ti) * hkv + kh) * hd;
        rotate_head(k, src, kc, dst, inv_freq, hd, pos);
        for (int i = threadIdx.x; i < hd; i += blockDim.x) vc[dst + i] = v[src + i];
    }
}

// Deterministic uniform(-scale, scale) + offset from a hash of (seed, index): random weights made on
// the device for benchmarks.
template <typename T>
__device__ void fill_random(T* x, long n, unsigned long long seed, float scale, float offset) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        unsigned long long z = seed + 0x9E3779B97F4A7C15ull * (unsigned long long)(i + 1);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        st(x, i, offset + scale * (2.f * u - 1.f));
    }
}

// Per row of x [rows, n]: the largest value and its index (the lowest index wins a tie). grid rows.
template <typename T>
__device__ void argmax_rows(const T* x, int n, float* out_val, int* out_idx) {
    __shared__ float sv[32];
    __shared__ int si[32];
    long row = blockIdx.x;
    float best = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = ld(x, row * n + i);
        if (v > best || (v == best && i < bi)) { best = v; bi = i; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sv[warp] = best; si[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            if (sv[w] > best || (sv[w] == best && si[w] < bi)) { best = sv[w]; bi = si[w]; }
        out_val[row] = best;
        out_idx[row] = bi;
    }
}

// Decode GEMV, bf16: y[M, n] = x[M, k] @ w[n, k]^T for M rows and k a multiple of 8. One warp
// per weight row, 16-byte loads, several in flight per lane; f32 accumulation. Memory-bound code
// at small M, where a general GEMM wastes most of its tile.
__device__ __forceinline__ void unpack8(uint4 v, float* f) {
    unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        f[2 * j] = __uint_as_float(u[j] << 16);
        f[2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
    }
}
template <int M>
__device__ void gemv_bf16(const bf16_t* x, const bf16_t* w, bf16_t* y, int n, int k) {
    int row = (int)((blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (row >= n) return;
    const uint4* wr = (const uint4*)(w + (long)row * k);
    int k8 = k >> 3;
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; r++) acc[r] = 0.f;
#pragma unroll 4
    for (int i = lane; i < k8; i += 32) {
        float wf[8], xf[8];
        unpack8(__ldg(wr + i), wf);
#pragma unroll
        for (int r = 0; r < M; r++) {
            unpack8(__ldg((const uint4*)(x + (long)r * k) + i), xf);
#pragma unroll
            for (int j = 0; j < 8; j++) acc[r] += wf[j] * xf[j];
        }
    }
#pragma unroll
    for (int r = 0; r < M; r++) {
        float s = warp_sum(acc[r]);
        if (lane == 0) st(y, (long)r * n + row, s);
    }
}
#define GEMV(M) extern "C" __global__ void gemv_bf16_m##M(const bf16_t* x, const bf16_t* w, bf16_t* y, int n, int k) { gemv_bf16<M>(x, w, y, n, k); }
// Measured on an H200 (8B shape): M = 1 beats cuBLAS (5.78 vs 5.99 ms a step), M = 8 loses
// (11.7 vs 6.0 ms: x is re-read per weight row), so only M = 1 is built.
GEMV(1)

#define INSTANTIATE(T, S)                                                                              \
extern "C" __global__ void rms_norm_##S(const T* x, const T* w, T* y, int h, float eps) { rms_norm(x, w, y, h, eps); } \
extern "C" __global__ void rope_##S(T* x, const float* f, int heads, int hd, int start, const int* pp) { rope(x, f, heads, hd, start, pp); } \
extern "C" __global__ void silu_mul_##S(const T* g, const T* u, T* o, long n) { silu_mul(g, u, o, n); } \
extern "C" __global__ void add_inplace_##S(T* a, const T* b, long n) { add_inplace(a, b, n); } \
extern "C" __global__ void add_bias_##S(T* y, const T* b, long rows, int n) { add_bias(y, b, rows, n); } \
extern "C" __global__ void embedding_##S(const T* t, const unsigned* tok, T* o, int h, int vs, int rows) { embedding(t, tok, o, h, vs, rows); } \
extern "C" __global__ void attention_##S(const T* q, const T* k, const T* v, T* o, int hq, int hkv, int hd, int start, int window, float scale, const int* pp) { attention(q, k, v, o, hq, hkv, hd, start, window, scale, pp); } \
extern "C" __global__ void rope_append_##S(T* q, const T* k, const T* v, T* kc, T* vc, const float* f, int hq, int hkv, int hd, int start, const int* pp) { rope_append(q, k, v, kc, vc, f, hq, hkv, hd, start, pp); } \
extern "C" __global__ void argmax_rows_##S(const T* x, int n, float* v, int* i) { argmax_rows(x, n, v, i); } \
extern "C" __global__ void fill_random_##S(T* x, long n, unsigned long long seed, float scale, float offset) { fill_random(x, n, seed, scale, offset); }

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)

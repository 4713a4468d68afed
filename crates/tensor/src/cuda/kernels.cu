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
__device__ __forceinline__ unsigned bf16_bits(float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);                        // round to nearest even
    return u >> 16;
}
__device__ __forceinline__ void st(bf16_t* p, long i, float v) { p[i] = (bf16_t)bf16_bits(v); }
__device__ __forceinline__ float rnd(float v, const float*) { return v; }
__device__ __forceinline__ float rnd(float v, const bf16_t*) {
    bf16_t b; st(&b, 0, v); return ld(&b, 0);
}

// Eight consecutive elements (index a multiple of 8, so 16- or 32-byte aligned) to and from f32.
__device__ __forceinline__ void unpack8(uint4 v, float* f) {
    unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        f[2 * j] = __uint_as_float(u[j] << 16);
        f[2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
    }
}
__device__ __forceinline__ void load8(const bf16_t* p, long i, float* f) { unpack8(*(const uint4*)(p + i), f); }
__device__ __forceinline__ void load8(const float* p, long i, float* f) {
    float4 a = *(const float4*)(p + i), b = *(const float4*)(p + i + 4);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void store8(bf16_t* p, long i, const float* f) {
    bf16_t b[8];
#pragma unroll
    for (int j = 0; j < 8; j++) st(b, j, f[j]);
    uint4 v;
    v.x = b[0] | ((unsigned)b[1] << 16); v.y = b[2] | ((unsigned)b[3] << 16);
    v.z = b[4] | ((unsigned)b[5] << 16); v.w = b[6] | ((unsigned)b[7] << 16);
    *(uint4*)(p + i) = v;
}
__device__ __forceinline__ void store8(float* p, long i, const float* f) {
    *(float4*)(p + i) = make_float4(f[0], f[1], f[2], f[3]);
    *(float4*)(p + i + 4) = make_float4(f[4], f[5], f[6], f[7]);
}

// Eight consecutive elements as loaded (16 bytes of bf16, 32 of f32), unpacked where used: rows in
// flight then hold half the registers in bf16.
template <typename T> struct Raw8;
template <> struct Raw8<bf16_t> { uint4 v; };
template <> struct Raw8<float> { float4 a, b; };
__device__ __forceinline__ Raw8<bf16_t> raw8(const bf16_t* p, long i) { Raw8<bf16_t> r; r.v = *(const uint4*)(p + i); return r; }
__device__ __forceinline__ Raw8<float> raw8(const float* p, long i) {
    Raw8<float> r; r.a = *(const float4*)(p + i); r.b = *(const float4*)(p + i + 4); return r;
}
__device__ __forceinline__ void unraw8(const Raw8<bf16_t>& r, float* f) { unpack8(r.v, f); }
__device__ __forceinline__ void unraw8(const Raw8<float>& r, float* f) {
    f[0] = r.a.x; f[1] = r.a.y; f[2] = r.a.z; f[3] = r.a.w; f[4] = r.b.x; f[5] = r.b.y; f[6] = r.b.z; f[7] = r.b.w;
}

// Programmatic dependent launch (sm_90+): a kernel lets the next one start (`pdl_trigger`), and a
// kernel launched with the PDL attribute waits for its predecessor's results (`pdl_wait`) only
// where it first needs them. Both are no-ops otherwise.
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
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

// A block's softmax numerators over scores[0, n) (shared memory), in place: exp(score - max), the
// max taken over the scores and `floor` (a running max, or -inf). Returns the max and the sum of
// the numerators; every thread gets both.
__device__ float2 block_exp_scores(float* scores, int n, float floor) {
    float m = floor;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = block_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) { float e = expf(scores[j] - m); scores[j] = e; sum += e; }
    return make_float2(m, block_sum(sum));
}

// RoPE's angle for dimension pair i at position `pos` (in double, as the CPU kernel takes it).
__device__ __forceinline__ void rope_angle(const float* inv_freq, int i, double pos, float& c, float& s) {
    double a = (double)inv_freq[i] * pos;
    c = (float)cos(a);
    s = (float)sin(a);
}
// The pair (x0, x1) = (x[i], x[i + hd/2]) rotated by the angle of cosine c and sine s.
__device__ __forceinline__ float rope_lo(float x0, float x1, float c, float s) { return x0 * c - x1 * s; }
__device__ __forceinline__ float rope_hi(float x0, float x1, float c, float s) { return x1 * c + x0 * s; }

// Rotate-half RoPE of one head at position `pos`: element i pairs with i + hd/2. Reads `src`, writes
// `dst` (the same buffer for an in-place rotation); threads of the block stride over the pairs.
template <typename T>
__device__ void rotate_head(const T* src, long s0, T* dst, long d0, const float* inv_freq, int hd, double pos) {
    int half = hd / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float c, s;
        rope_angle(inv_freq, i, pos, c, s);
        float x0 = ld(src, s0 + i), x1 = ld(src, s0 + i + half);
        st(dst, d0 + i, rope_lo(x0, x1, c, s));
        st(dst, d0 + i + half, rope_hi(x0, x1, c, s));
    }
}

// y = w * round(x / rms(x)) per row, after x += delta (rounded, written back) when ADD; one block
// per row. Rows of a multiple of 8 elements take 16-byte loads, C chunks of 8 a thread (1, 2 or 4:
// a kernel each; few unrolled copies of the code, whose fetching is most of a small kernel's
// time), all issued before the first use (a row is latency-bound, not bandwidth-bound); others go
// element by element. Launched with programmatic dependent launch (as the other small kernels of
// a decode step: SiLU, the attention splits' join): it starts while the kernel before finishes
// and waits for it before touching memory, so its launch is off the step's critical path.
template <typename T, bool ADD, int C>
__device__ void add_rms_norm(T* x, const T* delta, const T* w, T* y, int h, float eps) {
    pdl_trigger();
    pdl_wait();
    long row = blockIdx.x;
    T* xr = x + row * h;
    const T* dr = delta + row * h;
    T* yr = y + row * h;
    float ss = 0.f;
    if ((h & 7) == 0 && (h >> 3) <= C * (int)blockDim.x) {
        int nc = h >> 3;
        float v[C][8], g[C][8];
#pragma unroll
        for (int c = 0; c < C; c++) {
            int ch = threadIdx.x + c * blockDim.x;
            if (ch < nc) {
                load8(xr, ch * 8, v[c]);
                load8(w, ch * 8, g[c]);
                if (ADD) {
                    float d[8];
                    load8(dr, ch * 8, d);
#pragma unroll
                    for (int j = 0; j < 8; j++) v[c][j] = rnd(v[c][j] + d[j], xr);
                }
#pragma unroll
                for (int j = 0; j < 8; j++) ss += v[c][j] * v[c][j];
            }
        }
        ss = block_sum(ss);
        float inv = rsqrtf(ss / h + eps);
#pragma unroll
        for (int c = 0; c < C; c++) {
            int ch = threadIdx.x + c * blockDim.x;
            if (ch < nc) {
                if (ADD) store8(xr, ch * 8, v[c]);
#pragma unroll
                for (int j = 0; j < 8; j++) v[c][j] = g[c][j] * rnd(v[c][j] * inv, yr);
                store8(yr, ch * 8, v[c]);
            }
        }
        return;
    }
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float a = ld(xr, i);
        if (ADD) { a = rnd(a + ld(dr, i), xr); st(xr, i, a); }
        ss += a * a;
    }
    ss = block_sum(ss);
    float inv = rsqrtf(ss / h + eps);
    // Each thread reads back only the elements it wrote.
    for (int i = threadIdx.x; i < h; i += blockDim.x)
        st(yr, i, ld(w, i) * rnd(ld(xr, i) * inv, yr));
}

// Qwen3's RMSNorm of each q and k head: y = x with, in every row of `heads` heads of `hd`, heads
// [0, hq) normalised by qw and [hq, hq + hk) by kw (as add_rms_norm rounds: normalise in f32,
// round to T, scale by the weight); the other heads (v) copied. grid (rows, heads), one block of a
// multiple of 32 threads a head.
template <typename T>
__device__ void head_rms_norm(const T* x, const T* qw, const T* kw, T* y, int hq, int hk, int heads, int hd, float eps) {
    pdl_trigger();
    pdl_wait();
    int head = blockIdx.y;
    long base = ((long)blockIdx.x * heads + head) * hd;
    const T* xr = x + base;
    T* yr = y + base;
    if (head >= hq + hk) {
        for (int i = threadIdx.x; i < hd; i += blockDim.x) st(yr, i, ld(xr, i));
        return;
    }
    const T* w = head < hq ? qw : kw;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) { float a = ld(xr, i); ss += a * a; }
    ss = block_sum(ss);
    float inv = rsqrtf(ss / hd + eps);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) st(yr, i, ld(w, i) * rnd(ld(xr, i) * inv, yr));
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
    pdl_trigger();
    pdl_wait();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float a = ld(g, i);
        st(out, i, rnd(a / (1.f + expf(-a)), out) * ld(u, i));
    }
}

// out[r, c] = silu(gu[r, c]) * gu[r, n + c]: the gated MLP on fused gate/up outputs [rows, 2n].
template <typename T>
__device__ void silu_mul_halves(const T* gu, T* out, long rows, int n) {
    pdl_trigger();
    pdl_wait();
    long stride = (long)gridDim.x * blockDim.x;
    if ((n & 7) == 0) {
        int n8 = n >> 3;
        for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < rows * n8; i += stride) {
            long r = i / n8, c = (i % n8) * 8;
            float g[8], u[8];
            load8(gu, r * 2 * n + c, g);
            load8(gu, r * 2 * n + n + c, u);
#pragma unroll
            for (int j = 0; j < 8; j++) g[j] = rnd(g[j] / (1.f + expf(-g[j])), out) * u[j];
            store8(out, r * n + c, g);
        }
        return;
    }
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < rows * n; i += stride) {
        long r = i / n, c = i % n;
        float a = ld(gu, r * 2 * n + c);
        st(out, i, rnd(a / (1.f + expf(-a)), out) * ld(gu, r * 2 * n + n + c));
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
    if ((h & 7) == 0) {
        float f[8];
#pragma unroll 4
        for (int c = threadIdx.x; c < (h >> 3); c += blockDim.x) {
            if (mine) load8(table, r * h + c * 8, f);
            else for (int j = 0; j < 8; j++) f[j] = 0.f;
            store8(out, t * h + c * 8, f);
        }
        return;
    }
    for (int i = threadIdx.x; i < h; i += blockDim.x) st(out, t * h + i, mine ? ld(table, r * h + i) : 0.f);
}

// Keys a block scores at once (shared memory: one float each); longer ranges are walked in chunks
// with an online softmax (running max and sum, the partial output rescaled per chunk), so a
// query's range has no length limit. For ranges up to one chunk the arithmetic is exactly that of
// a plain softmax.
#define ATTN_CHUNK 1024
// Head dims a block's threads hold the output of: 2 per thread at 128 threads.
#define ATTN_MAX_HD 256

// Causal attention with grouped KV heads and an optional window (0 = none).
// q, out: [t, hq, hd]; k, v: [positions, hkv, hd]. Query i sits at position start + i.
// grid (t, hq); block 128; dynamic shared memory ATTN_CHUNK floats.
template <typename T>
__device__ void attention(const T* q, const T* k, const T* v, T* out, int hq, int hkv, int hd,
                          int start, int window, float scale, const int* pos_ptr) {
    extern __shared__ float scores[];
    pdl_trigger();
    if (pos_ptr) start = pos_ptr[0];
    int ti = blockIdx.x, h = blockIdx.y;
    int kvh = h / (hq / hkv);
    int p = start + ti;
    int lo = window > 0 ? max(0, p + 1 - window) : 0;
    int n = p + 1 - lo;
    const T* qv = q + ((long)ti * hq + h) * hd;
    long krow = (long)hkv * hd;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    float m_run = NEG_INF, l_run = 0.f, acc[ATTN_MAX_HD / 32] = {0.f};
    for (int c0 = 0; c0 < n; c0 += ATTN_CHUNK) {
        int cn = min(ATTN_CHUNK, n - c0);
        // Scores: one warp per key, lanes across head_dim.
        for (int j = warp; j < cn; j += nwarps) {
            const T* kj = k + (long)(lo + c0 + j) * krow + (long)kvh * hd;
            float s = 0.f;
            for (int d = lane; d < hd; d += 32) s += ld(qv, d) * ld(kj, d);
            s = warp_sum(s);
            if (lane == 0) scores[j] = s * scale;
        }
        __syncthreads();
        float2 ms = block_exp_scores(scores, cn, m_run);
        float m = ms.x, sum = ms.y;
        float alpha = expf(m_run - m);
        l_run = l_run * alpha + sum;
        m_run = m;
        for (int d = threadIdx.x, r = 0; d < hd; d += blockDim.x, r++) {
            float a = 0.f;
            for (int j = 0; j < cn; j++) a += scores[j] * ld(v + (long)(lo + c0 + j) * krow + (long)kvh * hd, d);
            acc[r] = acc[r] * alpha + a;
        }
        __syncthreads();
    }
    float inv = 1.f / l_run;
    T* o = out + ((long)ti * hq + h) * hd;
    for (int d = threadIdx.x, r = 0; d < hd; d += blockDim.x, r++) st(o, d, acc[r] * inv);
}

// Prefill attention in tiles (flash attention on CUDA cores), same inputs and results as
// `attention` (its arithmetic in f32, softmax online): a block takes FA_BQ consecutive queries
// of one head and walks the keys they see FA_BK at a time through shared memory, so each K/V row
// is read from memory once a block instead of once a query (`attention` reads it t times: 88% of
// an 8B prefill of 2,048 tokens went there). 256 threads, 32 x 8: thread (ty, tx) scores query
// rows 2 ty, 2 ty + 1 against keys 4 tx .. 4 tx + 3 of a tile, and holds those rows' outputs at
// head dims tx + 8 j (j < NJ: hd <= 8 NJ). Rows' running max and sum live in the 8 threads of
// a row pair (one warp), combined by shuffles.
// grid (ceil(t / FA_BQ), hq); block 256; dynamic shared memory `attention_tiled_smem`.
#define FA_BQ 64
#define FA_BK 32
// The keys (x: first, y: last position) that the queries q0 .. q0 + bq - 1 (those below t) of a
// prefill block see: up to its last query (causal), from its first query's window.
__device__ __forceinline__ int2 block_keys(int start, int q0, int bq, int t, int window) {
    return make_int2(window > 0 ? max(0, start + q0 + 1 - window) : 0, start + min(q0 + bq, t) - 1);
}
template <typename T, int NJ>
__device__ void attention_tiled(const T* q, const T* k, const T* v, T* out, int t, int hq, int hkv,
                                int hd, int start, int window, float scale) {
    extern __shared__ float fa[];
    pdl_trigger();
    const int hp = hd + 1;  // padded rows: the 8 tx of a warp read 8 banks apart
    float* qs = fa;                  // [FA_BQ][hp]
    float* ks = qs + FA_BQ * hp;     // [FA_BK][hp]
    float* vs = ks + FA_BK * hp;     // [FA_BK][hd]
    float* ps = vs + FA_BK * hd;     // [FA_BQ][FA_BK + 1]
    int q0 = blockIdx.x * FA_BQ, h = blockIdx.y, kvh = h / (hq / hkv);
    int tid = threadIdx.x, ty = tid >> 3, tx = tid & 7;
    long krow = (long)hkv * hd;
    for (int i = tid; i < FA_BQ * hd; i += blockDim.x) {
        int r = i / hd, d = i - r * hd;
        qs[r * hp + d] = q0 + r < t ? ld(q, ((long)(q0 + r) * hq + h) * hd + d) : 0.f;
    }
    int qa = 2 * ty;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f}, acc[2][NJ];
#pragma unroll
    for (int j = 0; j < NJ; j++) { acc[0][j] = 0.f; acc[1][j] = 0.f; }
    const int2 keys = block_keys(start, q0, FA_BQ, t, window);
    const int last = keys.y;
    for (int j0 = keys.x; j0 <= last; j0 += FA_BK) {
        __syncthreads();
        for (int i = tid; i < FA_BK * hd; i += blockDim.x) {
            int r = i / hd, d = i - r * hd;
            int kp = j0 + r;
            bool in = kp <= last;
            long at = (long)kp * krow + (long)kvh * hd + d;
            ks[r * hp + d] = in ? ld(k, at) : 0.f;
            vs[r * hd + d] = in ? ld(v, at) : 0.f;
        }
        __syncthreads();
        float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        for (int d = 0; d < hd; d++) {
            float a0 = qs[qa * hp + d], a1 = qs[(qa + 1) * hp + d];
#pragma unroll
            for (int c = 0; c < 4; c++) {
                float kv = ks[(tx * 4 + c) * hp + d];
                sc[0][c] += a0 * kv;
                sc[1][c] += a1 * kv;
            }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int qp = start + q0 + qa + r;
            bool row = q0 + qa + r < t;
            float mt = NEG_INF;
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int kp = j0 + tx * 4 + c;
                bool ok = row && kp <= qp && (window <= 0 || kp > qp - window);
                sc[r][c] = ok ? sc[r][c] * scale : NEG_INF;
                mt = fmaxf(mt, sc[r][c]);
            }
            for (int o = 1; o < 8; o <<= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
            float mn = fmaxf(m_run[r], mt);
            float alpha = mn == NEG_INF ? 1.f : expf(m_run[r] - mn);
            float sum = 0.f;
#pragma unroll
            for (int c = 0; c < 4; c++) {
                float e = mn == NEG_INF ? 0.f : expf(sc[r][c] - mn);
                ps[(qa + r) * (FA_BK + 1) + tx * 4 + c] = e;
                sum += e;
            }
            for (int o = 1; o < 8; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            l_run[r] = l_run[r] * alpha + sum;
            m_run[r] = mn;
#pragma unroll
            for (int j = 0; j < NJ; j++) acc[r][j] *= alpha;
        }
        // A row pair's weights were written by its own 8 threads, lanes of one warp.
        __syncwarp();
        for (int jk = 0; jk < FA_BK; jk++) {
            float p0 = ps[qa * (FA_BK + 1) + jk], p1 = ps[(qa + 1) * (FA_BK + 1) + jk];
            const float* vr = vs + jk * hd;
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                int d = tx + 8 * j;
                float x = d < hd ? vr[d] : 0.f;
                acc[0][j] += p0 * x;
                acc[1][j] += p1 * x;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int qi = q0 + qa + r;
        if (qi >= t) continue;
        float inv = 1.f / l_run[r];
        T* o = out + ((long)qi * hq + h) * hd;
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            int d = tx + 8 * j;
            if (d < hd) st(o, d, acc[r][j] * inv);
        }
    }
}

// One decode step's attention straight from the fused projection qkv [batch, hq + 2 hkv, hd] at
// position p (pos_ptr[0] when not null, else start): the block of query head H = b hq + i
// rotates its q and its KV head's k (RoPE) and takes its v into shared memory; the first split of
// the first query head of each KV group writes k and v into the caches ([position, batch, hkv,
// hd]); scores read position p from shared memory (no block waits for another's cache write).
// Split-K over positions (flash decoding): split s = blockIdx.x takes positions lo + s per ..,
// at most `per` (<= ATTN_CHUNK) of them. With one split the block writes the output, with exactly
// the arithmetic of qkv_rope_append + attention; with several it writes its running max, sum
// and unnormalised output to part_m/part_l/part_acc for attention_combine.
// grid (splits, batch hq); block 128; dynamic shared memory 3 hd + per floats.
template <typename T>
__device__ void decode_attention(const T* qkv, T* kc, T* vc, T* out, float* part_m, float* part_l,
                                 float* part_acc, const float* inv_freq, int batch, int hq, int hkv,
                                 int hd, int start, int window, float scale, int per,
                                 const int* pos_ptr) {
    extern __shared__ float sm[];
    pdl_trigger();
    // Launched as the vectorised kernel is (programmatic dependent launch), but nothing of it
    // overlaps the kernel before: it waits for it first.
    pdl_wait();
    int p = pos_ptr ? pos_ptr[0] : start;
    int split = blockIdx.x, splits = gridDim.x;
    int H = blockIdx.y, b = H / hq, i = H % hq, g = hq / hkv, kl = i / g;
    long HKV = (long)batch * hkv, KVH = (long)b * hkv + kl;
    float* qs = sm;
    float* ks = sm + hd;
    float* vs = sm + 2 * hd;
    float* scores = sm + 3 * hd;
    const T* row = qkv + (long)b * (hq + 2 * hkv) * hd;
    int half = hd / 2;
    for (int d = threadIdx.x; d < half; d += blockDim.x) {
        float c, s;
        rope_angle(inv_freq, d, (double)p, c, s);
        float q0 = ld(row, (long)i * hd + d), q1 = ld(row, (long)i * hd + d + half);
        qs[d] = rnd(rope_lo(q0, q1, c, s), out);
        qs[d + half] = rnd(rope_hi(q0, q1, c, s), out);
        float k0 = ld(row, (long)(hq + kl) * hd + d), k1 = ld(row, (long)(hq + kl) * hd + d + half);
        ks[d] = rnd(rope_lo(k0, k1, c, s), out);
        ks[d + half] = rnd(rope_hi(k0, k1, c, s), out);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) vs[d] = ld(row, (long)(hq + hkv + kl) * hd + d);
    __syncthreads();
    long krow = HKV * hd;
    if (split == 0 && i % g == 0) {
        long dst = (long)p * krow + KVH * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) { st(kc, dst + d, ks[d]); st(vc, dst + d, vs[d]); }
    }
    int lo = window > 0 ? max(0, p + 1 - window) : 0;
    int j0 = lo + split * per;
    int n = max(0, min(per, p + 1 - j0));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int j = warp; j < n; j += nwarps) {
        int pj = j0 + j;
        const T* kj = kc + (long)pj * krow + KVH * hd;
        float s = 0.f;
        if (pj == p) for (int d = lane; d < hd; d += 32) s += qs[d] * ks[d];
        else for (int d = lane; d < hd; d += 32) s += qs[d] * ld(kj, d);
        s = warp_sum(s);
        if (lane == 0) scores[j] = s * scale;
    }
    __syncthreads();
    float2 ms = block_exp_scores(scores, n, NEG_INF);
    float m = ms.x, sum = ms.y;
    long slot = (long)H * splits + split;
    if (splits > 1 && threadIdx.x == 0) { part_m[slot] = m; part_l[slot] = sum; }
    float inv = 1.f / sum;
    T* o = out + (long)H * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < n; j++) {
            int pj = j0 + j;
            acc += scores[j] * (pj == p ? vs[d] : ld(vc + (long)pj * krow + KVH * hd, d));
        }
        if (splits > 1) part_acc[slot * hd + d] = acc;
        else st(o, d, acc * inv);
    }
}

// The cached rows of positions j0 + jb + u ngrp + grp (u < UN) that a thread of
// decode_attention_gqa takes, into r: those past n and the step's own position p (in shared
// memory) are skipped.
template <typename T, int UN>
__device__ __forceinline__ void load_rows(Raw8<T> (&r)[UN], const T* base, long krow, int j0,
                                          int jb, int ngrp, int grp, int n, int p) {
#pragma unroll
    for (int u = 0; u < UN; u++) {
        int j = jb + u * ngrp + grp, pj = j0 + j;
        if (j < n && pj != p) r[u] = raw8(base, (long)pj * krow);
    }
}

// Where a block of the grouped decode attention kernels (decode_attention_gqa, _flash, _mma)
// sits in their grid (splits, batch hkv g / gb): query heads h0 .. h0 + gb (slice hb of the g of
// KV head kl) of sequence b, the n positions from j0 of split blockIdx.x (of `per` each, from the
// window's first position), p this step's position (read on the device when a graph replays the
// kernel); KVH = b hkv + kl, krow the elements of a cached position.
struct DecodeBlock {
    int p, b, kl, hb, h0, j0, n;
    long KVH, krow;
};

__device__ __forceinline__ DecodeBlock decode_block(int batch, int hq, int hkv, int hd, int start,
                                                    int window, int per, int gb, const int* pos_ptr) {
    DecodeBlock k;
    k.p = pos_ptr ? pos_ptr[0] : start;
    int g = hq / hkv, ng = g / gb, kvi = blockIdx.y / ng;
    k.hb = blockIdx.y % ng;
    k.b = kvi / hkv;
    k.kl = kvi % hkv;
    k.h0 = k.kl * g + k.hb * gb;
    k.KVH = (long)k.b * hkv + k.kl;
    k.krow = (long)batch * hkv * hd;
    int lo = window > 0 ? max(0, k.p + 1 - window) : 0;
    k.j0 = lo + blockIdx.x * per;
    k.n = max(0, min(per, k.p + 1 - k.j0));
    return k;
}

// The step's own rows for a block of the grouped decode attention kernels, once its first cached
// rows are on their way: RoPE on its gb query heads and its key into qs [gb, hd] and ks [hd]
// (the arithmetic of qkv_rope_append, rounded to T), v into vs [hd], one dimension pair a thread
// (hd <= 256 and 128 threads). The angle needs nothing of the kernel before (the QKV projection,
// still running under programmatic dependent launch): the kernel waits for it only after the
// angle, then loads every value before the first use (GM >= gb: the registers they take). Ends
// with a barrier, after which the block of the first split and head slice writes k and v to the
// cache at p (every other block reads p's rows from shared memory).
template <typename T, int GM>
__device__ __forceinline__ void decode_own_rows(const T* qkv, T* kc, T* vc, const float* inv_freq,
                                                const DecodeBlock& k, int hq, int hkv, int hd,
                                                int gb, float* qs, float* ks, float* vs) {
    const T* row = qkv + (long)k.b * (hq + 2 * hkv) * hd;
    int half = hd / 2, d = threadIdx.x;
    float c = 0.f, s = 0.f;
    if (d < half) rope_angle(inv_freq, d, (double)k.p, c, s);
    pdl_wait();
    if (d < half) {
        float x0[GM + 1], x1[GM + 1];
#pragma unroll
        for (int h = 0; h <= GM; h++) {
            if (h <= gb) {
                long src = (long)(h < gb ? k.h0 + h : hq + k.kl) * hd;
                x0[h] = ld(row, src + d);
                x1[h] = ld(row, src + d + half);
            }
        }
        long vsrc = (long)(hq + hkv + k.kl) * hd;
        float v0 = ld(row, vsrc + d), v1 = ld(row, vsrc + d + half);
#pragma unroll
        for (int h = 0; h <= GM; h++) {
            if (h <= gb) {
                float* dst = h < gb ? qs + h * hd : ks;
                dst[d] = rnd(rope_lo(x0[h], x1[h], c, s), qkv);
                dst[d + half] = rnd(rope_hi(x0[h], x1[h], c, s), qkv);
            }
        }
        vs[d] = v0;
        vs[d + half] = v1;
    }
    __syncthreads();
    if (blockIdx.x == 0 && k.hb == 0) {
        long dst = (long)k.p * k.krow + k.KVH * hd;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) {
            st(kc, dst + i, ks[i]);
            st(vc, dst + i, vs[i]);
        }
    }
}

// decode_attention with 16-byte loads and many rows in flight, one block per (split, sequence b,
// KV head, slice of its query heads): the block takes gb of the KV head's g = hq / hkv query heads
// (gb divides g; gb = g reads each cached K and V row once per split, gb = 1 gives g times more
// blocks for small batches). Same arguments, outputs and split layout as decode_attention, plus
// gb. GM is the most query heads a block may take (1, 2, 4 or 8: the accumulators are sized by
// it). The host uses it when hd / 8 is a power of two, hd <= 256 and gb hd <= 1024 (the
// shared-memory partial sums), and falls back to decode_attention otherwise.
// Scores: hd / 8 lanes per key, 8 dimensions each, UN keys a thread in flight; softmax: one warp
// per query head; P V: hd / 8 lanes per position, each thread summing its positions for every
// head, then across the block.
// grid (splits, batch hkv g / gb); block 128; dynamic shared memory
// (gb hd + 2 hd + gb per + 4 gb hd + 2 gb) floats.
template <typename T, int GM>
__device__ void decode_attention_gqa(const T* qkv, T* kc, T* vc, T* out, float* part_m,
                                     float* part_l, float* part_acc, const float* inv_freq,
                                     int batch, int hq, int hkv, int hd, int start, int window,
                                     float scale, int per, int gb, const int* pos_ptr) {
    // Rows a thread loads before the first is used: fewer accumulators leave room for more.
    constexpr int UN = GM <= 2 ? 8 : 4;
    extern __shared__ float sm[];
    pdl_trigger();
    const DecodeBlock blk = decode_block(batch, hq, hkv, hd, start, window, per, gb, pos_ptr);
    const int p = blk.p, split = blockIdx.x, splits = gridDim.x, b = blk.b, h0 = blk.h0;
    const int j0 = blk.j0, n = blk.n;
    const long KVH = blk.KVH, krow = blk.krow;
    int nwarps = blockDim.x >> 5, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* qs = sm;                        // [gb, hd]
    float* ks = qs + gb * hd;              // [hd]
    float* vs = ks + hd;                   // [hd]
    float* scores = vs + hd;               // [gb, per]
    float* red = scores + gb * per;        // [nwarps, gb, hd]
    float* stat = red + nwarps * gb * hd;  // max [gb], sum [gb]
    int L = hd >> 3, sub = threadIdx.x % L, grp = threadIdx.x / L, ngrp = blockDim.x / L;
    const T* kbase = kc + KVH * hd + sub * 8;
    const T* vbase = vc + KVH * hd + sub * 8;
    // Thread (grp, sub) takes positions j = jb + u ngrp + grp, u < UN, of each batch jb; the row at
    // p is this step's (shared memory), every other was written by an earlier step. With one
    // query head a block (PRE), the first batch of K and V rows is loaded together with this
    // step's q, k, v: one memory round trip before the first use for caches of up to UN ngrp
    // positions (-1 µs a call at batch 1-8); with more heads the V rows held through the scores
    // cost more than they save (`tessera bench attention`).
    constexpr bool PRE = GM == 1;
    Raw8<T> kr[UN], vr[UN];
    if (PRE) {
        load_rows(kr, kbase, krow, j0, 0, ngrp, grp, n, p);
        load_rows(vr, vbase, krow, j0, 0, ngrp, grp, n, p);
    }
    // The step's q, k, v (RoPE'd) into shared memory, waiting for the QKV projection only there.
    decode_own_rows<T, GM>(qkv, kc, vc, inv_freq, blk, hq, hkv, hd, gb, qs, ks, vs);
    // Scores. The loop bounds are the same for every thread, so each warp's shuffles are complete.
    {
        float qr[GM][8];
#pragma unroll
        for (int h = 0; h < GM; h++)
#pragma unroll
            for (int e = 0; e < 8; e++) qr[h][e] = h < gb ? qs[h * hd + sub * 8 + e] : 0.f;
        for (int jb = 0; jb < n; jb += UN * ngrp) {
            if (jb > 0 || !PRE) load_rows(kr, kbase, krow, j0, jb, ngrp, grp, n, p);
#pragma unroll
            for (int u = 0; u < UN; u++) {
                int j = jb + u * ngrp + grp, pj = j0 + j;
                if (jb + u * ngrp >= n) break;  // the same for every thread
                float kf[8];
                if (j < n && pj != p) {
                    unraw8(kr[u], kf);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; e++) kf[e] = j < n ? ks[sub * 8 + e] : 0.f;
                }
#pragma unroll
                for (int h = 0; h < GM; h++) {
                    if (h < gb) {
                        float s = 0.f;
#pragma unroll
                        for (int e = 0; e < 8; e++) s += qr[h][e] * kf[e];
                        for (int o = L >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                        if (j < n && sub == 0) scores[h * per + j] = s * scale;
                    }
                }
            }
        }
    }
    __syncthreads();
    for (int h = warp; h < gb; h += nwarps) {
        float* sc = scores + h * per;
        float m = NEG_INF;
        for (int j = lane; j < n; j += 32) m = fmaxf(m, sc[j]);
        m = warp_max(m);
        float sum = 0.f;
        for (int j = lane; j < n; j += 32) { float e = expf(sc[j] - m); sc[j] = e; sum += e; }
        sum = warp_sum(sum);
        if (lane == 0) { stat[h] = m; stat[gb + h] = sum; }
    }
    __syncthreads();
    float acc[GM][8];
#pragma unroll
    for (int h = 0; h < GM; h++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[h][e] = 0.f;
    for (int jb = 0; jb < n; jb += UN * ngrp) {
        if (jb > 0 || !PRE) load_rows(vr, vbase, krow, j0, jb, ngrp, grp, n, p);
#pragma unroll
        for (int u = 0; u < UN; u++) {
            int j = jb + u * ngrp + grp, pj = j0 + j;
            if (j < n) {
                float vf[8];
                if (pj != p) {
                    unraw8(vr[u], vf);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; e++) vf[e] = vs[sub * 8 + e];
                }
#pragma unroll
                for (int h = 0; h < GM; h++) {
                    if (h < gb) {
                        float w = scores[h * per + j];
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[h][e] += w * vf[e];
                    }
                }
            }
        }
    }
    // Positions of one warp, then of the block.
    for (int o = L; o < 32; o <<= 1)
#pragma unroll
        for (int h = 0; h < GM; h++)
            if (h < gb)  // the same for every thread: the shuffles stay complete
#pragma unroll
                for (int e = 0; e < 8; e++) acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], o);
    if (lane < L)
#pragma unroll
        for (int h = 0; h < GM; h++)
            if (h < gb)
#pragma unroll
                for (int e = 0; e < 8; e++) red[(warp * gb + h) * hd + sub * 8 + e] = acc[h][e];
    __syncthreads();
    for (int x = threadIdx.x; x < gb * hd; x += blockDim.x) {
        int h = x / hd, d = x % hd;
        float a = 0.f;
        for (int w = 0; w < nwarps; w++) a += red[(w * gb + h) * hd + d];
        long H = (long)b * hq + h0 + h;
        long slot = H * splits + split;
        if (splits > 1) {
            part_acc[slot * hd + d] = a;
            if (d == 0) { part_m[slot] = stat[h]; part_l[slot] = stat[gb + h]; }
        } else {
            st(out, H * hd + d, a * (1.f / stat[gb + h]));
        }
    }
}

// 16 bytes a peer wrote (volatile: read from memory each time, never from a register).
__device__ __forceinline__ uint4 ld_volatile16(const void* p) {
    uint4 v;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
}
// acc[j] += the j-th of the 16 bytes' values (8 bf16 or 4 f32).
__device__ __forceinline__ void add16(const uint4& u, float* acc, const bf16_t*) {
    float f[8];
    unpack8(u, f);
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j] += f[j];
}
__device__ __forceinline__ void add16(const uint4& u, float* acc, const float*) {
    acc[0] += __uint_as_float(u.x); acc[1] += __uint_as_float(u.y);
    acc[2] += __uint_as_float(u.z); acc[3] += __uint_as_float(u.w);
}
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// The row-parallel projection's all-reduce, the residual add and the RMSNorm after it in one
// kernel, for tensor-parallel decode over NVLink: x += sum over ranks of `part`, then
// y = w * round(x / rms(x)), every rank getting the same x and y. One block a row, each thread
// owning the same C chunks of 8 values as add_rms_norm's threads (so the sum of squares adds in
// its order: with two ranks the result is bit for bit NCCL's all-reduce followed by add_rms_norm). The exchange is NCCL's LL protocol: a thread pushes its chunk of `part` into
// every peer's receive slot as 16-byte lines {data, flag, data, flag} (8 bytes of values a line,
// one store), the flag being the call's number; it then polls its own slot's lines until both
// flags of each equal the number. No fence and no separate flag: a line is complete when seen.
// Slots alternate by the call's parity (a rank can be one call ahead of a peer, not two: call
// k + 1 needs every peer's push of k + 1, made after that peer finished k). Call numbers are per
// row, in device memory (counter[row]), so a CUDA graph can replay the kernel. A peer later than
// 2 ms makes the thread look at `word` (abort from the host), and one later than timeout_ns sets
// it; x and y are then left unwritten.
// ll[r] = rank r's receive area (on its GPU): [2 parity][world src][slot_lines] lines of 16 bytes,
// a row taking its chunks' lines rounded up to groups of 32 chunks (`line_of`) from row * that.
// grid (rows); block (h / 8 / C threads).
__device__ __forceinline__ void st_volatile16(void* p, unsigned a, unsigned b, unsigned c, unsigned d) {
    asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
// A chunk of 8 values as 32-bit words (4 for bf16, 8 for f32) and back to floats.
template <typename T> struct ChunkWords { static constexpr int N = 2 * sizeof(T); };
template <typename T>
__device__ __forceinline__ void load_words(const T* p, long i, unsigned* w) {
    const uint4* q = (const uint4*)(p + i);
#pragma unroll
    for (int k = 0; k < ChunkWords<T>::N / 4; k++) {
        uint4 v = q[k];
        w[4 * k] = v.x; w[4 * k + 1] = v.y; w[4 * k + 2] = v.z; w[4 * k + 3] = v.w;
    }
}
// acc[j] += the chunk's j-th value, 16 bytes at a time (`add16`).
template <typename T>
__device__ __forceinline__ void add_words(const unsigned* w, float* acc, const T* tag) {
#pragma unroll
    for (int k = 0; k < ChunkWords<T>::N / 4; k++)
        add16(make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]), acc + k * (16 / sizeof(T)), tag);
}
// Line j of chunk ch within its row: groups of 32 chunks, the group's line j side by side.
__device__ __forceinline__ long line_of(long ch, int j, int lines) {
    return (ch >> 5) * 32 * lines + j * 32 + (ch & 31);
}
// The address of `line` (from the start of the slot) in the slot of source rank `src` for calls
// of `parity`, in the receive area `area` of some rank: [2 parity][world src][slot_lines] lines.
__device__ __forceinline__ char* slot_line(unsigned long long area, long parity, int world, int src,
                                           long slot_lines, long line) {
    return (char*)area + ((parity * world + src) * slot_lines + line) * 16;
}
// Polls a line until both its flags are `g`; false when the host aborted (word set) or the peer
// is later than timeout_ns (this sets word). Out of line: one copy of the loop for every line.
// The abort word is host memory: after the first 2 ms the waiting threads of a warp look at it
// once every ~1 ms, one of them reading it for all. Not sooner: reads of host memory by waiting
// warps hold up the peers' NVLink stores, which makes the waits longer and so the reads more, a
// state a CUDA graph kept for all its replays (with the first look at 20 µs and one every ~65 µs,
// most `bench comm` graphs of 8 or more rows ran at ~17 µs a row a call instead of 6-9 µs a call;
// with these, none of 22). An abort is seen within ~3 ms.
__device__ __noinline__ bool wait_line(const char* p, unsigned g, uint4* q, unsigned* word,
                                       unsigned long long timeout_ns) {
    const unsigned long long t0 = global_ns();
    unsigned long long epoch = ~0ull;  // the first look at `word` as soon as 2 ms have passed
    while (true) {
        *q = ld_volatile16(p);
        if (q->y == g && q->w == g) return true;
        const unsigned long long now = global_ns(), waited = now - t0;
        // Past the first µs a thread rests between looks, so that thousands of waiting threads
        // do not keep the L2 lines busy that the peers' stores are to land in.
        if (waited > 1000) __nanosleep(64);
        if (waited > timeout_ns) { *(volatile unsigned*)word = 2u; return false; }
        if (waited < 2000000) continue;
        const unsigned m = __activemask();
        const bool due = (waited >> 20) != epoch;
        epoch = waited >> 20;
        const unsigned d = __ballot_sync(m, due);
        if (d == 0) continue;
        const int leader = __ffs(d) - 1;
        unsigned v = 0;
        if ((int)(threadIdx.x & 31) == leader) v = *(volatile unsigned*)word;
        if (__shfl_sync(m, v, leader) != 0) return false;
    }
}
template <typename T, int C>
__device__ void all_reduce_add_rms_norm(const T* part, T* x, const T* w, T* y, int h, float eps,
                                        const unsigned long long* ll, long slot_lines,
                                        unsigned* counter, int rank, int world, unsigned* word,
                                        unsigned long long timeout_ns, int pushed, unsigned hold_ns,
                                        unsigned long long* stats, int opts) {
    __shared__ unsigned gen;
    __shared__ int bail;
    constexpr int NW = ChunkWords<T>::N, LINES = NW / 2;
    const long row = blockIdx.x;
    const int nc = h >> 3;
    T* xr = x + row * h;
    T* yr = y + row * h;
    // The norm's scale is a weight: loaded before the wait. Then this rank's values, x and the
    // call number all at once (one memory round trip).
    float gw[C][8];
#pragma unroll
    for (int c = 0; c < C; c++) {
        int ch = threadIdx.x + c * blockDim.x;
        if (ch < nc) load8(w, ch * 8, gw[c]);
    }
    pdl_wait();
    // opts: bit 0 a system-scope fence after the pushes (TESSERA_P2P_FENCE=1); bits 1-2 where
    // the kernel after is released (TESSERA_P2P_TRIGGER's `wait`, `pushed`, `end`): 0 here, 1
    // once the pushes are sent, 2 at this kernel's end (no early loads of the next GEMV while the
    // lines travel).
    const bool fence = opts & 1;
    const int release = (opts >> 1) & 3;
    // The kernel after (a GEMV) may start only now, not at this one's start: its blocks then
    // take their first weights (PF stretches into shared memory) while this kernel waits for
    // the peers, not while the GEMV before still streams its own (one rank of tp 2 on one H200
    // with each exchange held 5 us: 2.55 -> 2.31 ms a step with PF 2; on two H200s tp 2 batch 1
    // and 8 gain 1-3%). The other places, measured on two H200s (tp 2 batch 1): released after
    // the pushes (`pushed`), this kernel's loads and pushes take 1.2 µs instead of 2.3-2.8 (the
    // next GEMV's early loads slow them), at its end (`end`) the whole call takes 3.6 µs instead
    // of 7.0 (its lines then land in 1.5 µs, not 3.1-3.3); but the step is no faster (2.57-2.64 /
    // 2.65-2.70 ms against 2.57-2.61): what the exchange loses to the early loads, the next
    // GEMV's head start wins back.
    if (release == 0) pdl_trigger();
    const unsigned long long began = hold_ns || stats ? global_ns() : 0;
    unsigned g0 = 0;
    if (threadIdx.x == 0) g0 = counter[row];
    unsigned mine[C][NW];
    float v[C][8];
#pragma unroll
    for (int c = 0; c < C; c++) {
        int ch = threadIdx.x + c * blockDim.x;
        if (ch >= nc) continue;
        load_words(part + row * h, ch * 8, mine[c]);
        load8(xr, ch * 8, v[c]);
    }
    if (threadIdx.x == 0) { gen = g0 + 1; counter[row] = g0 + 1; bail = 0; }
    __syncthreads();
    const unsigned g = gen;
    // A row's lines: chunks in groups of 32, line j of a group's chunks side by side, so that a
    // warp's store (or load) of its line j covers 512 contiguous bytes; a row takes whole groups.
    const long row_lines = (long)((nc + 31) >> 5) * 32 * LINES;
    const long parity = g & 1;
    // Push this rank's chunks to every peer (unless the GEMV before did, `pushed`): the stores
    // travel while the peers' are awaited.
#pragma unroll
    for (int c = 0; c < C && !pushed; c++) {
        int ch = threadIdx.x + c * blockDim.x;
        if (ch >= nc) continue;
        for (int p = 0; p < world; p++) {
            if (p == rank) continue;
#pragma unroll
            for (int j = 0; j < LINES; j++)
                st_volatile16(slot_line(ll[p], parity, world, rank, slot_lines, row * row_lines + line_of(ch, j, LINES)),
                              mine[c][2 * j], g, mine[c][2 * j + 1], g);
        }
    }
    // `fence` (TESSERA_P2P_FENCE=1): the pushes made visible system-wide before the wait. On two
    // H200s in decode the fence takes ~3.7 µs, after which the peer's lines are there in ~0.9:
    // the stores do not sit in a write buffer, they take that long to land (the call is 8.2 µs
    // instead of 7.0); nor did it stop the `bench comm` stalls the abort word's reads caused.
    if (fence && !pushed && world > 1) asm volatile("membar.sys;" ::: "memory");
    if (release == 1) pdl_trigger();
    const unsigned long long pushed_at = stats ? global_ns() : 0;
    // The ranks' values added in rank order, then rounded once (NCCL's sum of two). A peer's
    // lines for all of this thread's chunks are read at once; only those not there yet are
    // polled (out of line).
    float acc[C][8];
#pragma unroll
    for (int c = 0; c < C; c++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[c][j] = 0.f;
    bool ok = true;
    for (int src = 0; src < world && ok; src++) {
        if (src == rank) {
#pragma unroll
            for (int c = 0; c < C; c++)
                if (threadIdx.x + c * blockDim.x < nc) add_words(mine[c], acc[c], xr);
            continue;
        }
        const char* in = slot_line(ll[rank], parity, world, src, slot_lines, row * row_lines);
        uint4 q[C][LINES];
#pragma unroll
        for (int c = 0; c < C; c++) {
            long ch = threadIdx.x + c * blockDim.x;
            if (ch >= nc) continue;
#pragma unroll
            for (int j = 0; j < LINES; j++) q[c][j] = ld_volatile16(in + line_of(ch, j, LINES) * 16);
        }
#pragma unroll
        for (int c = 0; c < C; c++) {
            long ch = threadIdx.x + c * blockDim.x;
            if (ch >= nc) continue;
            unsigned got[NW];
#pragma unroll
            for (int j = 0; j < LINES; j++) {
                if ((q[c][j].y != g || q[c][j].w != g) && ok)
                    ok = wait_line(in + line_of(ch, j, LINES) * 16, g, &q[c][j], word, timeout_ns);
                got[2 * j] = q[c][j].x;
                got[2 * j + 1] = q[c][j].z;
            }
            add_words(got, acc[c], xr);
        }
    }
    // A group of one held as long as an exchange would take (a measurement's stand-in for
    // NVLink: `bench decode --one-rank-of N --hold-us T`), from when the row's block passed its
    // wait (rows beyond one wave of resident blocks pay it again).
    if (world == 1 && hold_ns)
        while (global_ns() - began < hold_ns) {}
    const unsigned long long arrived_at = stats ? global_ns() : 0;
    float ss = 0.f;
#pragma unroll
    for (int c = 0; c < C; c++) {
        if (threadIdx.x + c * blockDim.x >= nc) continue;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            v[c][j] = rnd(v[c][j] + rnd(acc[c][j], xr), xr);
            ss += v[c][j] * v[c][j];
        }
    }
    if (!ok) bail = 1;
    ss = block_sum(ss);
    // Where the call's time goes (`TESSERA_P2P_STATS=1`), thread 0 of each row: from the kernel
    // before's end to its pushes sent, then until its lines from every peer are there (or the
    // hold is over), and until the whole row has them (the block's sum); sums over calls and the
    // longest wait. "The kernel before's end" is when the row's block passed its wait: for the
    // rows of a first wave of blocks (all of decode's up to 64), not for blocks that start later.
    if (stats && threadIdx.x == 0) {
        const unsigned long long done = global_ns();
        atomicAdd(stats, pushed_at - began);
        atomicAdd(stats + 1, arrived_at - pushed_at);
        atomicAdd(stats + 2, done - began);
        atomicAdd(stats + 3, 1ull);
        atomicMax(stats + 4, arrived_at - pushed_at);
    }
    if (bail) return;
    float inv = rsqrtf(ss / h + eps);
#pragma unroll
    for (int c = 0; c < C; c++) {
        int ch = threadIdx.x + c * blockDim.x;
        if (ch >= nc) continue;
        store8(xr, ch * 8, v[c]);
#pragma unroll
        for (int j = 0; j < 8; j++) v[c][j] = gw[c][j] * rnd(v[c][j] * inv, yr);
        store8(yr, ch * 8, v[c]);
    }
}

// Joins decode_attention's splits: out[H] = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
// grid (batch hq); block 128.
template <typename T>
__device__ void attention_combine(const float* part_m, const float* part_l, const float* part_acc,
                                  T* out, int splits, int hd) {
    pdl_trigger();
    pdl_wait();
    long H = blockIdx.x;
    const float* pm = part_m + H * splits;
    const float* pl = part_l + H * splits;
    float M = NEG_INF;
    for (int s = 0; s < splits; s++) M = fmaxf(M, pm[s]);
    float L = 0.f;
    for (int s = 0; s < splits; s++) L += pl[s] * expf(pm[s] - M);
    float inv = 1.f / L;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.f;
        for (int s = 0; s < splits; s++) o += part_acc[(H * splits + s) * hd + d] * expf(pm[s] - M);
        st(out, H * hd + d, o * inv);
    }
}

// A step's attention inputs in one kernel, from the fused projection qkv [rows, hq + 2 hkv, hd]
// (per row: q heads, k heads, v heads). Row r is token r / batch of sequence r % batch, at
// position start + r / batch (pos_ptr[0] when not null). RoPE on q into q_out [rows, hq, hd]; RoPE
// on k into the K cache and v copied into the V cache, laid out [position, batch, hkv, hd].
// grid (rows, hq + hkv).
template <typename T>
__device__ void qkv_rope_append(const T* qkv, T* q, T* kc, T* vc, const float* inv_freq, int batch,
                                int hq, int hkv, int hd, int start, const int* pos_ptr) {
    if (pos_ptr) start = pos_ptr[0];
    int r = blockIdx.x, h = blockIdx.y;
    int ti = r / batch, b = r % batch;
    double pos = (double)(start + ti);
    long src = (long)r * (hq + 2 * hkv) * hd;
    if (h < hq) {
        rotate_head(qkv, src + (long)h * hd, q, ((long)r * hq + h) * hd, inv_freq, hd, pos);
    } else {
        int kh = h - hq;
        long dst = (((long)(start + ti) * batch + b) * hkv + kh) * hd;
        rotate_head(qkv, src + (long)(hq + kh) * hd, kc, dst, inv_freq, hd, pos);
        const T* vs = qkv + src + (long)(hq + hkv + kh) * hd;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) vc[dst + i] = vs[i];
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

// (value, index) pairs: keep the larger value, the lower index on a tie. A NaN counts as larger
// than any number (as torch.argmax takes it), so a row holding one gives a NaN, never a token.
__device__ __forceinline__ void better(float& best, int& bi, float v, int i) {
    bool vn = v != v, bn = best != best;
    if (vn != bn ? vn : (v > best || ((v == best || vn) && i < bi))) { best = v; bi = i; }
}
// Per row of x [rows, n], per column slice blockIdx.y of `per` columns: the largest value and its
// index, written to out_val/out_idx [rows, gridDim.y]. With src_val/src_idx (not null) the inputs
// are such pairs [rows, n] from a first pass instead of x. grid (rows, slices).
template <typename T>
__device__ void argmax_rows(const T* x, const float* src_val, const int* src_idx, int n, int per,
                            float* out_val, int* out_idx) {
    __shared__ float sv[32];
    __shared__ int si[32];
    long row = blockIdx.x;
    int lo = blockIdx.y * per, hi = min(n, lo + per);
    float best = NEG_INF;
    int bi = 0x7fffffff;
#pragma unroll 8
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        if (src_val) better(best, bi, src_val[row * n + i], src_idx[row * n + i]);
        else better(best, bi, ld(x, row * n + i), i);
    }
    for (int o = 16; o > 0; o >>= 1)
        better(best, bi, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, bi, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sv[warp] = best; si[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) better(best, bi, sv[w], si[w]);
        out_val[row * gridDim.y + blockIdx.y] = best;
        out_idx[row * gridDim.y + blockIdx.y] = bi;
    }
}

// f32::total_cmp's order as unsigned bits: a larger value, a larger key (NaNs at the ends).
__device__ __forceinline__ unsigned order_key(float v) {
    unsigned b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
// Per row of x [rows, n]: every value at least the row's k-th largest (1 <= k <= n, ranked by
// order_key, compared with >=), out[row] = [count, 1 where the row holds a NaN or +inf, then up
// to cap (value, column) pairs in no order] in f32. The k-th largest's key is selected 8 bits at a
// time, most significant first: a histogram of the next 8 bits of the keys that share the bits
// chosen so far (lanes of a warp with the same bin add once), then the bin where the count from
// the top reaches k. Four passes over the row (from L2), then one writing. One block of 1024 a row.
template <typename T>
__device__ void top_k_rows(const T* x, int n, int k, int cap, float* out) {
    __shared__ unsigned hist[256];
    __shared__ unsigned pick[2];
    __shared__ unsigned count;
    __shared__ int bad_row;
    const T* r = x + (long)blockIdx.x * n;
    float* o = out + (long)blockIdx.x * (2 + 2 * (long)cap);
    int lane = threadIdx.x & 31;
    unsigned prefix = 0, mask = 0, want = k;
    bool bad = false;
    if (threadIdx.x == 0) { count = 0; bad_row = 0; }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        // Every lane of a warp goes round as often (the match below takes the whole warp).
        for (int base = 0; base < n; base += blockDim.x) {
            int i = base + threadIdx.x;
            unsigned bin = 256;
            if (i < n) {
                float v = ld(r, i);
                if (shift == 24 && (v != v || v == __int_as_float(0x7f800000))) bad = true;
                unsigned key = order_key(v);
                if ((key & mask) == prefix) bin = (key >> shift) & 255u;
            }
            unsigned peers = __match_any_sync(0xffffffffu, bin);
            if (bin < 256 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], (unsigned)__popc(peers));
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            // Lane l sums bins 255 - 8l down to 248 - 8l; the lane whose running count from the
            // top reaches `want` finds the bin.
            unsigned c[8], sum = 0;
            for (int j = 0; j < 8; j++) { c[j] = hist[255 - 8 * lane - j]; sum += c[j]; }
            unsigned incl = sum;
            for (int d = 1; d < 32; d <<= 1) {
                unsigned t = __shfl_up_sync(0xffffffffu, incl, d);
                if (lane >= d) incl += t;
            }
            unsigned acc = incl - sum;
            if (acc < want && want <= incl) {
                int j = 0;
                for (; j < 7; j++) {
                    if (acc + c[j] >= want) break;
                    acc += c[j];
                }
                pick[0] = prefix | ((unsigned)(255 - 8 * lane - j) << shift);
                pick[1] = want - acc;
            }
        }
        __syncthreads();
        prefix = pick[0];
        want = pick[1];
        mask |= 255u << shift;
    }
    float kth = key_value(prefix);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = ld(r, i);
        if (v >= kth) {
            unsigned p = atomicAdd(&count, 1u);
            if (p < (unsigned)cap) { o[2 + 2 * p] = v; o[3 + 2 * p] = (float)i; }
        }
    }
    if (bad) bad_row = 1;
    __syncthreads();
    if (threadIdx.x == 0) { o[0] = (float)count; o[1] = bad_row ? 1.f : 0.f; }
}

// A running (max, sum of exp(x - max)) pair taking in another one.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    // A NaN anywhere stays (its sum is NaN).
    if (s != s) return;
    if (s2 != s2) { s = s2; return; }
    if (m2 > m) { s = s * expf(m - m2) + s2; m = m2; }
    else if (m2 != NEG_INF) { s += s2 * expf(m2 - m); }
}
// Per row of x [rows, n]: its largest value m, sum of exp(x - m) s (NaN where the row holds a
// NaN), and the value at column targets[row] (NaN where that is outside [0, n): another rank's
// vocabulary), in one pass with a running max a thread, in f32 (the log-probabilities of
// `score`, the row never leaving the device). One block of 1024 a row.
template <typename T>
__device__ void lse_rows(const T* x, const int* targets, int n, float* out_m, float* out_s, float* out_t) {
    __shared__ float sm[32], ss[32];
    long row = blockIdx.x;
    float m = NEG_INF, s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = ld(x, row * n + i);
        if (v != v) s = v;  // NaN: the sum stays NaN whatever follows
        else if (v > m) { s = s * expf(m - v) + 1.f; m = v; }
        else if (v != NEG_INF) { s += expf(v - m); }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) lse_merge(m, s, sm[w], ss[w]);
        int t = targets[row];
        out_m[row] = m;
        out_s[row] = s;
        out_t[row] = (t >= 0 && t < n) ? ld(x, row * n + t) : __int_as_float(0x7fc00000);
    }
}

// The values of x at the flat indices `at` (m of them), as f32: the logits a draw needs beside a
// row's top-k candidates. grid ceil(m / 256); block 256.
template <typename T>
__device__ void gather_values(const T* x, const long long* at, int m, float* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < m) out[i] = ld(x, (long)at[i]);
}

// A 16-byte weight load that bypasses L1 (weights are read once; x stays cached).
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Decode GEMV, bf16, one row of x: y[n] = x[k] @ w[n, k]^T for k a multiple of 8. A warp takes R
// weight rows; 16-byte loads that bypass L1 (NOL1), software-pipelined: the U loads per row of the
// next step are issued before the current ones are used, and the first ones before waiting for
// the previous kernel (PDL), so the weight stream starts while the kernel before still runs. f32
// accumulation. Memory-bound code, where a general GEMM wastes most of its tile.
// GATED (R = 2): w holds 2n rows (gate rows, then up rows), the warp takes gate row i and up row
// i, and y[i] = silu(gate_i) * up_i, each product rounded as the unfused ops round it (the gated
// MLP in one pass over its weights).
// `tessera bench gemv` (H200, Llama-3-8B shapes) measured the variants kept below and others:
// pipelining and bypassing L1 gain 5-15% on short rows, more loads in flight per lane (U = 8, 16)
// lose. KS > 1 (split-K): the KS warps of a row group (all in one block) take interleaved
// 512-byte stretches of the rows, and the first of them adds their partial sums in a fixed order.
// Four rows a warp, one load each in flight, four warps a group (R = 4, U = 1, KS = 4) is the
// fastest or within 2% of it at every shape of the 8B model at tp 1 and 2 (the narrow tp-2 shapes
// gain most: qkv 11.1 -> 7.8 us, o 6.4 -> 5.4 us against R = 2, U = 2, KS = 1).
// NORM (the RMSNorm before a projection, fused): 1 normalises x with the weights `nw` first, 2
// adds `delta` to x first and block 0 writes the sum to `xo` (the residual stream). Every block
// computes the row's norm into shared memory (k bf16 values, dynamic) while its first
// weight loads are in flight; the values are rounded as `add_rms_norm` rounds them (its sum of
// squares is added in another order, so a value may differ from it in the last bit).
// PUSH (plain, R a multiple of 4, n a multiple of 8, one row of x): the outputs also go to every
// peer's receive slot of the fused all-reduce + norm that follows (`all_reduce_add_rms_norm`,
// called with `pushed`), as the LL lines it would push itself, so the exchange travels while the
// GEMV's other warps still work: 4 outputs a line, the call number that kernel will take
// (counter[0] + 1: the one before it has finished when this one passes pdl_wait).
// PF (plain or pushing, U = 1, NORM = 0): before the PDL wait each warp also copies its next PF
// stretches of its rows into shared memory (`cp.async`, PF x R x 512 bytes a warp, dynamic), so a
// resident block holds (PF + 1) stretches a row, not one, when the kernel before ends: the
// weights stream while that kernel (attention, or the fused all-reduce waiting on NVLink) still
// runs, and the first stretches after the wait come from shared memory.
struct GemvPush {
    const unsigned long long* ll;
    long slot_lines;
    const unsigned* counter;
    int rank, world;
};
// 16 bytes from global to shared memory without passing through registers (`cp.async`, L2
// only), in groups committed and waited for; before sm_80 a plain copy (commit and wait then
// have nothing to do). Used by the GEMV's prefetch (PF) and the skinny GEMM.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
#else
    *(uint4*)smem = *(const uint4*)gmem;
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}
// 2^x by the hardware's approximation (relative error below 2^-22; 2^-inf = 0).
__device__ __forceinline__ float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// One step of a running softmax over scores held in m16n8 mma accumulator fragments: each lane
// holds rows r and r + 8 of the tile (elements 0-1 and 2-3 of each of NS n-blocks), a row spread
// over the 4 lanes of a quad. From this step's masked scores s and the lane's maxima of them (mx0,
// mx1): the rows' new maxima m0, m1 (over the quad), the weights exp(s - max) written back into s,
// the sums l0, l1 and the NB output fragments o rescaled to the new maxima. B2: scores in base-2
// units (ex2.approx), else natural ones (expf). HI: rows 8-15 hold queries; without, only rows
// 0-7 are kept (their weights zeroed, their state and outputs left alone: the decode kernel's
// groups of at most 8 heads). The outputs are rescaled only when some row's maximum moved in the
// warp (a factor of exactly 1 otherwise: the same values, without the NB x 4 products that are
// most of a step's work once the maxima settle over a long cache).
template <bool B2, bool HI, int NS, int NB>
__device__ __forceinline__ void softmax_step_frag(float (&s)[NS][4], float mx0, float mx1, float& m0,
                                                  float& m1, float& l0, float& l1, float (&o)[NB][4]) {
    auto ex = [](float x) {
        if constexpr (B2) return ex2_approx(x);
        else return expf(x);
    };
    for (int w = 1; w < 4; w <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, w));
        if constexpr (HI) mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, w));
    }
    float mn0 = fmaxf(m0, mx0), mn1 = HI ? fmaxf(m1, mx1) : m1;
    float al0 = mn0 == NEG_INF ? 1.f : ex(m0 - mn0);
    float al1 = !HI || mn1 == NEG_INF ? 1.f : ex(m1 - mn1);
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int nb = 0; nb < NS; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if (!HI && e >= 2) {
                s[nb][e] = 0.f;
                continue;
            }
            float mn = e < 2 ? mn0 : mn1;
            float x = mn == NEG_INF ? 0.f : ex(s[nb][e] - mn);
            s[nb][e] = x;
            if (e < 2) sum0 += x;
            else sum1 += x;
        }
    l0 = l0 * al0 + sum0;
    m0 = mn0;
    if constexpr (HI) {
        l1 = l1 * al1 + sum1;
        m1 = mn1;
    }
    if (__any_sync(0xffffffffu, al0 != 1.f || al1 != 1.f)) {
#pragma unroll
        for (int nb = 0; nb < NB; nb++) {
            o[nb][0] *= al0;
            o[nb][1] *= al0;
            if constexpr (HI) {
                o[nb][2] *= al1;
                o[nb][3] *= al1;
            }
        }
    }
}
// Four 8 x 8 matrices of 16-bit values from shared memory into mma fragments (`ldmatrix`): lanes
// 8i-8i+7 give the addresses of matrix i's 8 rows (16 bytes each, 16-byte aligned), and register
// i of each lane gets its part of matrix i as an mma operand takes it: row lane / 4, columns
// 2 (lane % 4) and the next (TR: transposed, column lane / 4, rows 2 (lane % 4) and the next).
template <bool TR>
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* p) {
#if __CUDA_ARCH__ >= 800
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    if constexpr (TR)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a)
                     : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a)
                     : "memory");
#endif
}
// The end of a one-pass decode attention block (decode_attention_flash, decode_attention_mma):
// `ng` partial states of each of its `gb` query heads, each a running max in base 2
// (`gm[q * stride + h]`), a sum (`gl[...]`) and unnormalised outputs
// (`go[(q * stride + h) * hd + d]`), joined: the block's max, then each state's sum and outputs
// scaled to it. With several splits the block writes its part for attention_combine (whose
// maxima are natural logs), with one the output of query head `H0 + h`.
template <typename T>
__device__ __forceinline__ void decode_join_states(const float* gm, const float* gl, const float* go,
                                                   int ng, int stride, int gb, int hd, long H0,
                                                   int split, int splits, float* part_m,
                                                   float* part_l, float* part_acc, T* out) {
    constexpr float LN2 = 0.6931471805599453f;
    for (int x = threadIdx.x; x < gb * hd; x += blockDim.x) {
        int h = x / hd, dd = x - h * hd;
        float M = NEG_INF;
        for (int q = 0; q < ng; q++) M = fmaxf(M, gm[q * stride + h]);
        float Ls = 0.f, a = 0.f;
        if (M != NEG_INF)
            for (int q = 0; q < ng; q++) {
                float w = ex2_approx(gm[q * stride + h] - M);
                Ls += gl[q * stride + h] * w;
                a += go[(q * stride + h) * hd + dd] * w;
            }
        long H = H0 + h;
        long slot = H * splits + split;
        if (splits > 1) {
            part_acc[slot * hd + dd] = a;
            if (dd == 0) { part_m[slot] = M * LN2; part_l[slot] = Ls; }
        } else {
            st(out, H * hd + dd, a * (1.f / Ls));
        }
    }
}
// The attention over the cache of decode_attention_gqa in one pass (flash decoding within the
// block), its K and V rows streamed through shared memory. Each group of hd / 8 lanes takes
// positions jb + u ngrp + grp (u < UN) of each tile jb, as the gqa kernel does; a thread copies
// its own 8-value chunks of those rows' K and V (`cp.async`, no registers held) into its own
// slots of a two-stage ring, the next tile's while it works on this one, and keeps a running
// softmax (max, sum, unnormalised output a query head) instead of writing every score to shared
// memory and reading the V rows after a second barrier. A thread reads back only what it copied,
// so the ring needs no barrier. Scores are kept in base-2 units (scale log2 e folded in) and
// exponentiated by ex2.approx. The groups' states are joined at the end (shared memory, over the
// ring's bytes). Same arguments, outputs and split layout as decode_attention_gqa; GM <= 4.
// grid (splits, batch hkv g / gb); block 128; dynamic shared memory (`flash_smem` on the host):
// (gb hd + 2 hd) floats rounded up to 16 bytes, then 32 KB of ring (the join's
// (2 ngrp gb + ngrp gb hd) floats, ngrp = 128 / (hd / 8), fit in it).
template <typename T, int GM>
__device__ void decode_attention_flash(const T* qkv, T* kc, T* vc, T* out, float* part_m,
                                       float* part_l, float* part_acc, const float* inv_freq,
                                       int batch, int hq, int hkv, int hd, int start, int window,
                                       float scale, int per, int gb, const int* pos_ptr) {
    // Positions a thread takes a tile (16 KB of K and V a stage for the block in either dtype),
    // and the 16-byte copies of a chunk.
    constexpr int UN = sizeof(T) == 2 ? 4 : 2, CW = 8 * sizeof(T) / 16;
    constexpr float LOG2E = 1.4426950408889634f;
    const float scale2 = scale * LOG2E;
    extern __shared__ float sm[];
    pdl_trigger();
    const DecodeBlock blk = decode_block(batch, hq, hkv, hd, start, window, per, gb, pos_ptr);
    const int p = blk.p, split = blockIdx.x, splits = gridDim.x, b = blk.b, h0 = blk.h0;
    const int j0 = blk.j0, n = blk.n;
    const long KVH = blk.KVH, krow = blk.krow;
    int L = hd >> 3, sub = threadIdx.x % L, grp = threadIdx.x / L, ngrp = blockDim.x / L;
    const int tid = threadIdx.x, nt = blockDim.x;
    float* qs = sm;                      // [gb, hd]
    float* ks = qs + gb * hd;            // [hd]
    float* vs = ks + hd;                 // [hd]
    // The ring: [stage][K, V][u][thread] chunks of CW 16-byte words.
    uint4* ring = (uint4*)(sm + ((gb * hd + 2 * hd + 3) & ~3));
    const T* kbase = kc + KVH * hd + sub * 8;
    const T* vbase = vc + KVH * hd + sub * 8;
    const int tile = UN * ngrp;
    // Copies tile t's chunks of this thread into ring stage t & 1 (rows past n and the step's own
    // position p are not copied: p's are in shared memory), then commits the group (empty or not:
    // every thread's groups stay counted alike).
    auto issue = [&](int t) {
        const int stage = t & 1;
#pragma unroll
        for (int u = 0; u < UN; u++) {
            int j = t * tile + u * ngrp + grp, pj = j0 + j;
            if (j < n && pj != p) {
                long off = (long)pj * krow;
                uint4* sk = ring + (((stage * 2 + 0) * UN + u) * nt + tid) * CW;
                uint4* sv = ring + (((stage * 2 + 1) * UN + u) * nt + tid) * CW;
#pragma unroll
                for (int w = 0; w < CW; w++) {
                    cp_async16(sk + w, (const uint4*)(kbase + off) + w);
                    cp_async16(sv + w, (const uint4*)(vbase + off) + w);
                }
            }
        }
        cp_async_commit();
    };
    // The first tile: rows of earlier steps, copied before the wait for the QKV projection (as in
    // decode_attention_gqa).
    if (n > 0) issue(0);
    decode_own_rows<T, GM>(qkv, kc, vc, inv_freq, blk, hq, hkv, hd, gb, qs, ks, vs);
    float qr[GM][8], m[GM], l[GM], acc[GM][8];
#pragma unroll
    for (int h = 0; h < GM; h++) {
        m[h] = NEG_INF;
        l[h] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            qr[h][e] = h < gb ? qs[h * hd + sub * 8 + e] : 0.f;
            acc[h][e] = 0.f;
        }
    }
    // The loop bounds are the same for every thread, so each warp's shuffles are complete.
    for (int t = 0; t * tile < n; t++) {
        const int stage = t & 1, jb = t * tile;
        // The next tile on its way, then this one's copies awaited (all but the newest group).
        if (jb + tile < n) {
            issue(t + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        float sc[GM][UN];
#pragma unroll
        for (int u = 0; u < UN; u++) {
            int j = jb + u * ngrp + grp, pj = j0 + j;
            float kf[8];
            if (j < n && pj != p) {
                Raw8<T> r = *(const Raw8<T>*)(ring + (((stage * 2 + 0) * UN + u) * nt + tid) * CW);
                unraw8(r, kf);
            } else {
#pragma unroll
                for (int e = 0; e < 8; e++) kf[e] = j < n ? ks[sub * 8 + e] : 0.f;
            }
#pragma unroll
            for (int h = 0; h < GM; h++) {
                float a = 0.f;
#pragma unroll
                for (int e = 0; e < 8; e++) a += qr[h][e] * kf[e];
                sc[h][u] = a;
            }
        }
        for (int o = L >> 1; o > 0; o >>= 1)
#pragma unroll
            for (int h = 0; h < GM; h++)
                if (h < gb)  // the same for every thread
#pragma unroll
                    for (int u = 0; u < UN; u++) sc[h][u] += __shfl_xor_sync(0xffffffffu, sc[h][u], o);
        // The running softmax of each query head over this group's positions so far.
#pragma unroll
        for (int h = 0; h < GM; h++) {
            if (h >= gb) continue;
            float mx = m[h];
#pragma unroll
            for (int u = 0; u < UN; u++) {
                int j = jb + u * ngrp + grp;
                sc[h][u] = j < n ? sc[h][u] * scale2 : NEG_INF;
                mx = fmaxf(mx, sc[h][u]);
            }
            if (mx == NEG_INF) {
#pragma unroll
                for (int u = 0; u < UN; u++) sc[h][u] = 0.f;
                continue;
            }
            float corr = ex2_approx(m[h] - mx);
            m[h] = mx;
            l[h] *= corr;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[h][e] *= corr;
#pragma unroll
            for (int u = 0; u < UN; u++) {
                float w = ex2_approx(sc[h][u] - mx);
                sc[h][u] = w;
                l[h] += w;
            }
        }
#pragma unroll
        for (int u = 0; u < UN; u++) {
            int j = jb + u * ngrp + grp, pj = j0 + j;
            if (j >= n) continue;
            float vf[8];
            if (pj != p) {
                Raw8<T> r = *(const Raw8<T>*)(ring + (((stage * 2 + 1) * UN + u) * nt + tid) * CW);
                unraw8(r, vf);
            } else {
#pragma unroll
                for (int e = 0; e < 8; e++) vf[e] = vs[sub * 8 + e];
            }
#pragma unroll
            for (int h = 0; h < GM; h++)
                if (h < gb)
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[h][e] += sc[h][u] * vf[e];
        }
    }
    // The groups' states joined (over the ring, once every thread is done with it): the block's
    // max, then each group's sum and output scaled to it.
    float* gst = (float*)ring;           // max [ngrp, gb], then sum [ngrp, gb]
    float* gacc = gst + 2 * ngrp * gb;   // [ngrp, gb, hd]
    __syncthreads();
    if (sub == 0)
#pragma unroll
        for (int h = 0; h < GM; h++)
            if (h < gb) { gst[grp * gb + h] = m[h]; gst[(ngrp + grp) * gb + h] = l[h]; }
#pragma unroll
    for (int h = 0; h < GM; h++)
        if (h < gb)
#pragma unroll
            for (int e = 0; e < 8; e++) gacc[(grp * gb + h) * hd + sub * 8 + e] = acc[h][e];
    __syncthreads();
    decode_join_states(gst, gst + ngrp * gb, gacc, ngrp, gb, gb, hd, (long)b * hq + h0, split, splits,
                       part_m, part_l, part_acc, out);
}
template <int R, int U, bool GATED, bool NOL1, int KS, int NORM, bool PUSH = false, int PF = 0>
__device__ void gemv1p(const bf16_t* x, const bf16_t* delta, const bf16_t* nw, bf16_t* xo, float eps,
                       const bf16_t* w, bf16_t* y, int n, int k, GemvPush push = GemvPush{}) {
    static_assert(KS == 1 || KS == 2 || KS == 4 || KS == 8, "KS divides the 8 warps of a block");
    static_assert(PF == 0 || (U == 1 && NORM == 0), "prefetch into shared memory: U = 1, no fused norm");
    pdl_trigger();
    int warp = (int)((blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    // GATED: the warp's R / 2 outputs, gate rows first, then their up rows.
    constexpr int OUTS = GATED ? R / 2 : R;
    int split = warp % KS;
    int group = warp / KS;
    int row0 = group * OUTS;
    bool dead = row0 >= n;
    if (KS == 1 && NORM == 0 && dead) { pdl_wait(); return; }
    const uint4* wr[R];
    bool live[R];
#pragma unroll
    for (int j = 0; j < R; j++) {
        int out = row0 + j % OUTS;
        int rj = GATED && j >= OUTS ? n + out : out;
        live[j] = !dead && out < n;
        wr[j] = (const uint4*)(w + (long)(live[j] ? rj : (dead ? 0 : row0)) * k);
    }
    int k8 = dead ? 0 : k >> 3;
    constexpr int STEP = 32 * KS;
    float acc[R];
#pragma unroll
    for (int j = 0; j < R; j++) acc[j] = 0.f;
    // PF: stretches 0 .. PF - 1 into this warp's shared memory [PF][R][32 lanes], stretch PF
    // into registers; the loop below then starts at stretch PF.
    extern __shared__ uint4 pfs[];
    uint4* mine = pfs + (long)(threadIdx.x >> 5) * PF * R * 32 + lane;
    if (PF > 0) {
#pragma unroll
        for (int t = 0; t < PF; t++) {
            int i = split * 32 + lane + t * STEP;
            if (i < k8) {
#pragma unroll
                for (int j = 0; j < R; j++) cp_async16(mine + (t * R + j) * 32, wr[j] + i);
            }
        }
        cp_async_commit();
    }
    const int first = split * 32 + lane + PF * STEP;
    uint4 nxt[R][U];
#pragma unroll
    for (int u = 0; u < U; u++) {
        int i = first + u * STEP;
        if (i < k8) {
#pragma unroll
            for (int j = 0; j < R; j++) nxt[j][u] = NOL1 ? ld_stream(wr[j] + i) : __ldg(wr[j] + i);
        }
    }
    pdl_wait();
    const uint4* xv = (const uint4*)x;
    if (PF > 0) {
        // Each lane reads back only the 16-byte units it copied itself.
        cp_async_wait<0>();
#pragma unroll
        for (int t = 0; t < PF; t++) {
            int i = split * 32 + lane + t * STEP;
            if (i < k8) {
                float xf[8], wf[8];
                unpack8(__ldg(xv + i), xf);
#pragma unroll
                for (int j = 0; j < R; j++) {
                    unpack8(mine[(t * R + j) * 32], wf);
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[j] += wf[e] * xf[e];
                }
            }
        }
    }
    if (NORM) {
        // Two passes over the row, each thread over its own chunks (few registers: the weight
        // loads in flight keep theirs): x (+ delta) into shared memory and the sum of squares,
        // then the normalised values in place. All 256 threads take chunks: the sum of squares
        // is added in another order than add_rms_norm's block of norm_threads(k) threads adds it
        // (taking the chunks as that block does made a step 0.15 ms slower, 4.45 -> 4.60 ms).
        extern __shared__ uint4 xs[];
        int kc = k >> 3;
        float ss = 0.f;
        for (int c = threadIdx.x; c < kc; c += blockDim.x) {
            float v[8];
            load8(x, (long)c * 8, v);
            if (NORM == 2) {
                float d[8];
                load8(delta, (long)c * 8, d);
#pragma unroll
                for (int e = 0; e < 8; e++) v[e] = rnd(v[e] + d[e], x);
                if (blockIdx.x == 0) store8(xo, (long)c * 8, v);
            }
            store8((bf16_t*)xs, (long)c * 8, v);
#pragma unroll
            for (int e = 0; e < 8; e++) ss += v[e] * v[e];
        }
        ss = block_sum(ss);
        float inv = rsqrtf(ss / k + eps);
        for (int c = threadIdx.x; c < kc; c += blockDim.x) {
            float v[8], g[8];
            unpack8(xs[c], v);
            load8(nw, (long)c * 8, g);
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] = g[e] * rnd(v[e] * inv, x);
            store8((bf16_t*)xs, (long)c * 8, v);
        }
        __syncthreads();
        xv = xs;
    }
    for (int base = first; base < k8; base += STEP * U) {
        uint4 cur[R][U];
#pragma unroll
        for (int u = 0; u < U; u++) {
#pragma unroll
            for (int j = 0; j < R; j++) cur[j][u] = nxt[j][u];
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int i = base + STEP * U + u * STEP;
            if (i < k8) {
#pragma unroll
                for (int j = 0; j < R; j++) nxt[j][u] = NOL1 ? ld_stream(wr[j] + i) : __ldg(wr[j] + i);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int i = base + u * STEP;
            if (i < k8) {
                float xf[8], wf[8];
                unpack8(NORM ? xv[i] : __ldg(xv + i), xf);
#pragma unroll
                for (int j = 0; j < R; j++) {
                    unpack8(cur[j][u], wf);
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[j] += wf[e] * xf[e];
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < R; j++) acc[j] = warp_sum(acc[j]);
    if (KS > 1) {
        // Partial sums of the block's warps, then the first warp of each group adds them.
        __shared__ float part[8][R];
        int wb = threadIdx.x >> 5;
        if (lane == 0) {
#pragma unroll
            for (int j = 0; j < R; j++) part[wb][j] = acc[j];
        }
        __syncthreads();
        if (split != 0 || dead) return;
#pragma unroll
        for (int j = 0; j < R; j++) {
            float s = 0.f;
#pragma unroll
            for (int q = 0; q < KS; q++) s += part[wb + q][j];
            acc[j] = s;
        }
    }
    if (lane != 0) return;
    if (GATED) {
#pragma unroll
        for (int o = 0; o < OUTS; o++) {
            if (!live[o]) continue;
            float g = rnd(acc[o], y), u = rnd(acc[OUTS + o], y);
            st(y, row0 + o, rnd(g / (1.f + expf(-g)), y) * u);
        }
    } else {
#pragma unroll
        for (int j = 0; j < R; j++)
            if (live[j]) st(y, row0 + j, acc[j]);
        if (PUSH) {
            static_assert(!PUSH || (R % 4 == 0 && !GATED && NORM == 0), "a pushing GEMV is plain, 4 outputs a line");
            const unsigned g = push.counter[0] + 1;
            const long parity = g & 1;
#pragma unroll
            for (int q = 0; q < R / 4; q++) {
                const int v0 = row0 + 4 * q;
                const unsigned w0 = bf16_bits(acc[4 * q]) | (bf16_bits(acc[4 * q + 1]) << 16);
                const unsigned w1 = bf16_bits(acc[4 * q + 2]) | (bf16_bits(acc[4 * q + 3]) << 16);
                const long line = line_of(v0 >> 3, (v0 >> 2) & 1, 2);
                for (int p = 0; p < push.world; p++) {
                    if (p == push.rank) continue;
                    st_volatile16(slot_line(push.ll[p], parity, push.world, push.rank, push.slot_lines, line), w0, g, w1, g);
                }
            }
        }
    }
}

// The first GEMV (one warp a row, unroll 4, loads through L1), kept for the comparison in
// `tessera bench gemv`.
__device__ void gemv_legacy(const bf16_t* x, const bf16_t* w, bf16_t* y, int n, int k) {
    pdl_trigger();
    pdl_wait();
    int row = (int)((blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (row >= n) return;
    const uint4* wr = (const uint4*)(w + (long)row * k);
    int k8 = k >> 3;
    float acc = 0.f;
#pragma unroll 4
    for (int i = lane; i < k8; i += 32) {
        float wf[8], xf[8];
        unpack8(__ldg(wr + i), wf);
        unpack8(__ldg((const uint4*)x + i), xf);
#pragma unroll
        for (int j = 0; j < 8; j++) acc += wf[j] * xf[j];
    }
    acc = warp_sum(acc);
    if (lane == 0) st(y, row, acc);
}

extern "C" __global__ void gemv_legacy_r1(const bf16_t* x, const bf16_t* w, bf16_t* y, int n, int k) { gemv_legacy(x, w, y, n, k); }
#define GEMV_PIPED(NAME, R, U, G, N, KS)                                                                  \
extern "C" __global__ void gemv_##NAME(const bf16_t* x, const bf16_t* w, bf16_t* y, int n, int k) {   \
    gemv1p<R, U, G, N, KS, 0>(x, nullptr, nullptr, nullptr, 0.f, w, y, n, k); }                        \
extern "C" __global__ void gemv_norm_##NAME(const bf16_t* x, const bf16_t* d, const bf16_t* nw, bf16_t* xo, float eps, const bf16_t* w, bf16_t* y, int n, int k) { \
    gemv1p<R, U, G, N, KS, 1>(x, d, nw, xo, eps, w, y, n, k); }                                          \
extern "C" __global__ void gemv_addnorm_##NAME(const bf16_t* x, const bf16_t* d, const bf16_t* nw, bf16_t* xo, float eps, const bf16_t* w, bf16_t* y, int n, int k) { \
    gemv1p<R, U, G, N, KS, 2>(x, d, nw, xo, eps, w, y, n, k); }
#define GEMV_PUSH(NAME, R, U, KS, PF)                                                                     \
extern "C" __global__ void gemv_push_##NAME(const bf16_t* x, const bf16_t* w, bf16_t* y, int n, int k, GemvPush push) { \
    gemv1p<R, U, false, true, KS, 0, true, PF>(x, nullptr, nullptr, nullptr, 0.f, w, y, n, k, push); }
// A variant whose plain kernel prefetches PF stretches into shared memory (`<base>p<PF>`); its
// fused-norm kernels are its base's, which the host loads under that name (the norm's row takes
// the shared memory there).
#define GEMV_PREFETCH(NAME, R, G, KS, PF)                                                                \
extern "C" __global__ void gemv_##NAME(const bf16_t* x, const bf16_t* w, bf16_t* y, int n, int k) {   \
    gemv1p<R, 1, G, true, KS, 0, false, PF>(x, nullptr, nullptr, nullptr, 0.f, w, y, n, k); }
GEMV_PUSH(r4u1s4, 4, 1, 4, 0)
GEMV_PUSH(r8u1s4, 8, 1, 4, 0)
GEMV_PUSH(r4u1, 4, 1, 1, 0)
GEMV_PUSH(r4u1s4p2, 4, 1, 4, 2)
GEMV_PREFETCH(r4u1s4p1, 4, false, 4, 1)
GEMV_PREFETCH(r4u1s4p2, 4, false, 4, 2)
GEMV_PREFETCH(gated_r4u1s4p1, 4, true, 4, 1)
GEMV_PREFETCH(gated_r4u1s4p2, 4, true, 4, 2)
GEMV_PIPED(r2u2, 2, 2, false, true, 1)
GEMV_PIPED(r2u2s4, 2, 2, false, true, 4)
GEMV_PIPED(r4u1, 4, 1, false, true, 1)
GEMV_PIPED(r4u1s2, 4, 1, false, true, 2)
GEMV_PIPED(r4u1s4, 4, 1, false, true, 4)
GEMV_PIPED(r4u1s8, 4, 1, false, true, 8)
GEMV_PIPED(r8u1s4, 8, 1, false, true, 4)
GEMV_PIPED(gated_u2, 2, 2, true, true, 1)
GEMV_PIPED(gated_u2s4, 2, 2, true, true, 4)
GEMV_PIPED(gated_r4u1, 4, 1, true, true, 1)
GEMV_PIPED(gated_r4u1s2, 4, 1, true, true, 2)
GEMV_PIPED(gated_r4u1s4, 4, 1, true, true, 4)

// Skinny GEMM on tensor cores, bf16: y[m, n] = x[m, k] @ w[n, k]^T for a decode batch (m <= 8 MT
// rows) against weights streamed once from memory. A block of NWARP warps takes NWARP x WR weight
// rows (WR / 16 m16 tiles of mma.m16n8k16 a warp, the batch as its n side in MT tiles of 8) over a
// k range of `kper` (blockIdx.y splits k; the partial sums go to `part` [splits, m, n] and
// `skinny_reduce` adds them in order), in steps of KC k, NW steps in flight:
// - weights: each warp copies its WR rows x KC k a step into its own shared-memory stage with
//   cp.async, whole runs of KC contiguous values a row (the memory sees whole lines; runs of 64
//   bytes a row measured half as fast); the 16-byte units of odd rows trade places with the unit
//   4 away (64 bytes), so the row pairs a quarter-warp reads fall on distinct banks;
// - x: the step's KC k of the batch's rows, copied by the whole block in the step's group (the
//   first steps' in one group after the PDL wait; rows padded by 64 bytes for the same reason);
//   rows >= m are never copied: they feed only outputs that are not stored;
// - the sum over k does not care in which order k is walked, so each lane reads 8 consecutive k
//   of its weight rows and batch row and hands the first 4 to one mma and the last 4 to a second,
//   for both operands alike.
// The weight copies of the first steps start before the kernel before is waited for (PDL: weights
// are never written by a recent kernel); x only after. sm_80 and later (cp.async, bf16 mma); the
// host launches it only there. The instances (`skinny_<name>`) are generated from
// `SKINNY_VARIANTS` of cuda/mod.rs, which also sizes their shared memory.
#if __CUDA_ARCH__ >= 800
// Not volatile (its outputs are its only effect), so the compiler may schedule it among the mma of
// other accumulators.
__device__ __forceinline__ void mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#endif

template <int MT, int WR, int NWARP, int NW, int KC>
__device__ void skinny_gemm(const bf16_t* x, const bf16_t* w, bf16_t* y, float* part, int m, int n, int k, int kper) {
#if __CUDA_ARCH__ >= 800
    static_assert(KC == 64 || KC == 128, "a step is 128 or 256 bytes of a row");
    static_assert(WR % 16 == 0 && NW >= 2, "whole m16 tiles, two stages at least");
    extern __shared__ uint4 smem[];
    constexpr int UPR = KC / 8;                            // 16-byte units a row and step
    constexpr int WSTAGE = WR * UPR;                       // a warp's step of weights, in units
    constexpr int XS = KC + 32;                            // padded x row, bf16 values
    constexpr int XBUF = 8 * MT * XS;                      // a step of x, bf16 values
    constexpr int RPI = 32 / UPR;                          // rows a copy instruction
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    uint4* wsm = smem + warp * NW * WSTAGE;                // this warp's [NW][WR rows][UPR units]
    bf16_t* xsm = (bf16_t*)(smem + NWARP * NW * WSTAGE);   // [NW][8 MT rows][XS]
    pdl_trigger();
    int row0 = (blockIdx.x * NWARP + warp) * WR;
    int k0 = blockIdx.y * kper;
    int steps = (min(k0 + kper, k) - k0) / KC;
    // The copies of this lane: rows RPI i + lane / UPR of the warp's WR, unit lane % UPR of each
    // (a row past n copies row n - 1 instead; its outputs are not stored).
    int cu = lane % UPR, cr = lane / UPR;
    const bf16_t* wsrc = w + k0 + cu * 8;
    auto load_w = [&](int s) {
        if (s < steps) {
            uint4* d = wsm + (s % NW) * WSTAGE;
#pragma unroll
            for (int i = 0; i < WR / RPI; i++) {
                int r = RPI * i + cr;
                cp_async16(d + r * UPR + (cu ^ ((r & 1) << 2)), wsrc + (long)min(row0 + r, n - 1) * k + s * KC);
            }
        }
    };
    auto load_x = [&](int s) {
        if (s < steps) {
            bf16_t* d = xsm + (s % NW) * XBUF;
            int kc = k0 + s * KC;
            for (int i = tid; i < m * UPR; i += NWARP * 32) {
                int r = i / UPR, u = i % UPR;
                cp_async16(d + r * XS + u * 8, x + (long)r * k + kc + u * 8);
            }
        }
    };
#pragma unroll
    for (int s = 0; s < NW - 1; s++) {
        load_w(s);
        cp_async_commit();
    }
    pdl_wait();
    for (int s = 0; s < NW - 1; s++) load_x(s);
    cp_async_commit();
    // Everything so far (the first NW - 1 steps' weights, issued earlier, and their x) before the
    // first step; from there on NW - 2 groups stay in flight while a step computes.
    cp_async_wait<0>();
    __syncthreads();
    float acc[WR / 16][MT][4];
#pragma unroll
    for (int i = 0; i < WR / 16; i++)
#pragma unroll
        for (int j = 0; j < MT; j++) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
    for (int s = 0; s < steps; s++) {
        // Step s's copies are in the group committed NW - 1 iterations ago (or the prologue's).
        cp_async_wait<NW - 2>();
        __syncthreads();  // step s visible to all; all are done with step s - 1, reloaded below
        load_w(s + NW - 1);
        load_x(s + NW - 1);
        cp_async_commit();
        const uint4* ws = wsm + (s % NW) * WSTAGE;
        const bf16_t* xc = xsm + (s % NW) * XBUF + t * 8;
#pragma unroll
        for (int q = 0; q < KC / 32; q++) {
            // Rows g + 8 i (all of one parity: g's).
            int pu = (q * 4 + t) ^ ((g & 1) << 2);
            uint4 a[WR / 8], X[MT];
#pragma unroll
            for (int i = 0; i < WR / 8; i++) a[i] = ws[(g + 8 * i) * UPR + pu];
#pragma unroll
            for (int j = 0; j < MT; j++) X[j] = *(const uint4*)(xc + (j * 8 + g) * XS + q * 32);
            // The first halves of every accumulator, then the second halves: no two mma in a
            // row wait on each other.
#pragma unroll
            for (int j = 0; j < MT; j++)
#pragma unroll
                for (int i = 0; i < WR / 16; i++)
                    mma_bf16(acc[i][j], a[2 * i].x, a[2 * i + 1].x, a[2 * i].y, a[2 * i + 1].y, X[j].x, X[j].y);
#pragma unroll
            for (int j = 0; j < MT; j++)
#pragma unroll
                for (int i = 0; i < WR / 16; i++)
                    mma_bf16(acc[i][j], a[2 * i].z, a[2 * i + 1].z, a[2 * i].w, a[2 * i + 1].w, X[j].z, X[j].w);
        }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < WR / 16; i++)
#pragma unroll
        for (int j = 0; j < MT; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) {
                int b = j * 8 + 2 * t + (q & 1), r = row0 + i * 16 + g + (q >> 1) * 8;
                if (b >= m || r >= n) continue;
                if (gridDim.y == 1) st(y, (long)b * n + r, acc[i][j][q]);
                else part[((long)blockIdx.y * m + b) * n + r] = acc[i][j][q];
            }
#endif
}

// Prefill attention on tensor cores (bf16; flash attention 2's arithmetic): a block of 4 warps
// takes 64 MT consecutive queries of one head, 16 MT a warp (MT m16 tiles), and walks the keys
// they see 64 at a time through a two-stage ring in shared memory: the next tile's K and V rows
// are copied (`cp.async`) while the warps work on this one, one barrier a tile. The block's
// queries wait in shared memory too, and each tile's A fragments come from there through
// `ldmatrix`, so that a warp reads each K and V fragment once for its MT tiles (MT = 2 halves the
// shared-memory reads a product; MT = 1 makes twice the blocks for short prompts). A warp's
// scores of its queries against a tile are 8 n-blocks of mma m16n8k16 over the head dim a tile of
// queries (K through `ldmatrix`), in base-2 units (scale log2 e folded in, ex2.approx); its
// running max and sum per row live in the 4 lanes of a row's fragment; and the tile's weights,
// rounded to bf16, are the A fragments of the product with V (V through `ldmatrix.trans`),
// accumulated in f32. The masks (causal, window, past the last key) are applied only to the
// tiles that cross them for the warp; a warp skips a tile none of its queries sees. The grid runs
// the heads fastest and the query tiles from the last, so that every head's latest queries (which
// see the most keys) go first: the longest blocks start in the first wave. Same inputs, masks and
// results as `attention` but for that rounding of the weights (as flash attention rounds them).
// sm_80 and later; the host launches it only there, for bf16 at head dims 64 and 128
// (`TESSERA_MMA_ATTENTION=0`: the CUDA-core tiled kernel).
// grid (hq, ceil(t / (64 MT))); block 128; dynamic shared memory `mma_prefill_smem` on the host:
// the queries (64 MT rows), then two stages of a K and a V tile of 64 rows, rows of HD + 8 bf16
// (padded so that `ldmatrix`'s eight rows fall in distinct banks). The launch's `hd` (HD) is not
// read: the arguments are the CUDA-core tiled kernel's.
#define FM_BK 64
// Two floats as bf16 in one word, lo in the low half: round to nearest even, as bf16_bits (NaN
// aside: the hardware's canonical NaN), in one instruction (`cvt.rn.bf16x2.f32`, sm_80).
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return bf16_bits(lo) | (bf16_bits(hi) << 16);
#endif
}
template <int HD, int MT>
__device__ void attention_mma(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* out, int t,
                              int hq, int hkv, int start, int window, float scale) {
#if __CUDA_ARCH__ >= 800
    constexpr int KS = HD + 8, NB = HD / 8, KC = HD / 16, CPR = HD / 8, BQ = 64 * MT;
    constexpr int STAGE = 2 * FM_BK * KS;
    constexpr float LOG2E = 1.4426950408889634f;
    const float scale2 = scale * LOG2E;
    extern __shared__ uint4 fm[];
    bf16_t* qs = (bf16_t*)fm;      // [BQ][KS]
    bf16_t* ring = qs + BQ * KS;   // [stage][K, V][FM_BK][KS]
    pdl_trigger();
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    int q0 = (gridDim.y - 1 - blockIdx.y) * BQ, h = blockIdx.x, kvh = h / (hq / hkv);
    const long krow = (long)hkv * HD;
    const bf16_t* kh = k + (long)kvh * HD;
    const bf16_t* vh = v + (long)kvh * HD;
    const int2 keys = block_keys(start, q0, BQ, t, window);
    const int first = keys.x, last = keys.y, tiles = (last - first) / FM_BK + 1;
    // The block's queries (rows past t zeroed), in the first copy group with tile 0.
    for (int x = tid; x < BQ * CPR; x += blockDim.x) {
        int r = x / CPR, u = x - r * CPR;
        bf16_t* d = qs + r * KS + u * 8;
        if (q0 + r < t) cp_async16(d, q + ((long)(q0 + r) * hq + h) * HD + u * 8);
        else *(uint4*)d = make_uint4(0u, 0u, 0u, 0u);
    }
    // Copies tile i's K and V rows into stage i & 1 (rows past the last key zeroed: their weights
    // are 0, and 0 times a stale value could be a NaN), then commits the group.
    auto issue = [&](int i) {
        bf16_t* kd0 = ring + (i & 1) * STAGE;
        const int j0 = first + i * FM_BK;
        for (int x = tid; x < FM_BK * CPR; x += blockDim.x) {
            int r = x / CPR, u = x - r * CPR, kp = j0 + r;
            bf16_t* kd = kd0 + r * KS + u * 8;
            bf16_t* vd = kd + FM_BK * KS;
            if (kp <= last) {
                long at = (long)kp * krow + u * 8;
                cp_async16(kd, kh + at);
                cp_async16(vd, vh + at);
            } else {
                *(uint4*)kd = make_uint4(0u, 0u, 0u, 0u);
                *(uint4*)vd = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        cp_async_commit();
    };
    issue(0);
    // The warp's rows: qw + mt 16 + g and + 8 of its tile mt.
    const int qw = q0 + warp * 16 * MT;
    float o[MT][NB][4], m0[MT], m1[MT], l0[MT], l1[MT];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        m0[mt] = m1[mt] = NEG_INF;
        l0[mt] = l1[mt] = 0.f;
#pragma unroll
        for (int nb = 0; nb < NB; nb++) o[mt][nb][0] = o[mt][nb][1] = o[mt][nb][2] = o[mt][nb][3] = 0.f;
    }
    // The warp's first and last query positions (for a warp with a query: qw < t).
    const int qlo = start + qw, qhi = start + min(qw + 16 * MT, t) - 1;
    // The lanes' ldmatrix rows: the queries as A (matrices: rows 0-7 | 8-15 x columns 0-7 | 8-15
    // of 16), K as the B operand of the scores (keys 0-7 | 8-15 of a pair of n-blocks x columns
    // 0-7 | 8-15 of 16), V transposed as the B operand of the outputs (keys 0-7 | 8-15 of 16 x
    // columns 0-7 | 8-15 of a pair of n-blocks).
    const int ql = (warp * 16 * MT + (lane & 7) + ((lane >> 3) & 1) * 8) * KS + (lane >> 4) * 8;
    const int kl = ((lane >> 4) * 8 + (lane & 7)) * KS + ((lane >> 3) & 1) * 8;
    const int vl = (((lane >> 3) & 1) * 8 + (lane & 7)) * KS + (lane >> 4) * 8;
    for (int i = 0; i < tiles; i++) {
        // Tile i (and the queries) landed for every thread, and every warp done with tile i - 1,
        // whose stage the copies of tile i + 1 take.
        cp_async_wait<0>();
        __syncthreads();
        if (i + 1 < tiles) issue(i + 1);
        const int j0 = first + i * FM_BK;
        // None of the warp's queries sees the tile: the warp has none (its rows past t), or the
        // tile is causally after the last, or before the first one's window.
        if (qw >= t || j0 > qhi || (window > 0 && j0 + FM_BK - 1 <= qlo - window)) continue;
        const bf16_t* kt = ring + (i & 1) * STAGE;
        const bf16_t* vt = kt + FM_BK * KS;
        float s[MT][8][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int nb = 0; nb < 8; nb++) s[mt][nb][0] = s[mt][nb][1] = s[mt][nb][2] = s[mt][nb][3] = 0.f;
#pragma unroll
        for (int c = 0; c < KC; c++) {
            unsigned qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) ldsm_x4<false>(qa[mt], qs + ql + mt * 16 * KS + c * 16);
#pragma unroll
            for (int np = 0; np < 4; np++) {
                unsigned kb[4];
                ldsm_x4<false>(kb, kt + kl + np * 16 * KS + c * 16);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_bf16(s[mt][2 * np], qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3], kb[0], kb[1]);
                    mma_bf16(s[mt][2 * np + 1], qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3], kb[2], kb[3]);
                }
            }
        }
        // Every query of the warp sees every key of the tile: no mask (keys past the last are
        // after the first query, so such a tile is masked).
        const bool whole = j0 + FM_BK - 1 <= qlo && (window <= 0 || j0 > qhi - window);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            const int p0 = start + qw + mt * 16 + g, p1 = p0 + 8;
            float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
            for (int nb = 0; nb < 8; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float x = s[mt][nb][e] * scale2;
                    if (!whole) {
                        int kp = j0 + nb * 8 + tq * 2 + (e & 1);
                        int qp = e < 2 ? p0 : p1;
                        if (kp > qp || (window > 0 && kp <= qp - window)) x = NEG_INF;
                    }
                    s[mt][nb][e] = x;
                    if (e < 2) mx0 = fmaxf(mx0, x);
                    else mx1 = fmaxf(mx1, x);
                }
            softmax_step_frag<true, true>(s[mt], mx0, mx1, m0[mt], m1[mt], l0[mt], l1[mt], o[mt]);
        }
#pragma unroll
        for (int c = 0; c < 4; c++) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                a[mt][0] = pack_bf16(s[mt][2 * c][0], s[mt][2 * c][1]);
                a[mt][1] = pack_bf16(s[mt][2 * c][2], s[mt][2 * c][3]);
                a[mt][2] = pack_bf16(s[mt][2 * c + 1][0], s[mt][2 * c + 1][1]);
                a[mt][3] = pack_bf16(s[mt][2 * c + 1][2], s[mt][2 * c + 1][3]);
            }
#pragma unroll
            for (int nb = 0; nb < NB; nb += 2) {
                unsigned vb[4];
                ldsm_x4<true>(vb, vt + vl + c * 16 * KS + nb * 8);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_bf16(o[mt][nb], a[mt][0], a[mt][1], a[mt][2], a[mt][3], vb[0], vb[1]);
                    mma_bf16(o[mt][nb + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], vb[2], vb[3]);
                }
            }
        }
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        float L0 = l0[mt], L1 = l1[mt];
        for (int w = 1; w < 4; w <<= 1) {
            L0 += __shfl_xor_sync(0xffffffffu, L0, w);
            L1 += __shfl_xor_sync(0xffffffffu, L1, w);
        }
        const float i0 = 1.f / L0, i1 = 1.f / L1;
        const int r0 = qw + mt * 16 + g, r1 = r0 + 8;
#pragma unroll
        for (int nb = 0; nb < NB; nb++) {
            int col = nb * 8 + tq * 2;
            if (r0 < t)
                *(unsigned*)(out + ((long)r0 * hq + h) * HD + col) = pack_bf16(o[mt][nb][0] * i0, o[mt][nb][1] * i0);
            if (r1 < t)
                *(unsigned*)(out + ((long)r1 * hq + h) * HD + col) = pack_bf16(o[mt][nb][2] * i1, o[mt][nb][3] * i1);
        }
    }
#endif
}
// Prefill attention on Hopper's warpgroup tensor cores (`wgmma`, sm_90a; bf16 at head dims HD 64
// and 128): attention_mma's arithmetic and masks (the weights rounded to bf16 for the product with V, f32
// sums, base-2 online softmax), with a block of NWG warpgroups (4 warps, 16 queries each) taking
// 64 NWG consecutive queries of one head, the warpgroups sharing each K and V tile (a warpgroup
// skips a tile none of its queries sees). Each key tile of 64 is scored in one m64n64 product per 16
// dims (Q and K both read by the tensor cores from shared memory through descriptors), and its
// weights, left in the registers in the layout of wgmma's A fragments, multiply the tile's V in
// one m64n(HD) product per 16 keys (V read from shared memory, transposed by the instruction), so
// no `ldmatrix` is issued. Q, K and V tiles sit in shared memory in the 128-byte-swizzled layout
// the instruction reads (a row of 64 dims is 128 bytes; 16-byte chunk c of row r at c ^ (r & 7);
// at head dim 128 in two halves of 64 rows x 128 bytes), written by `cp.async` in a two-stage ring
// as attention_mma's. Same grid order (every head's latest queries first), inputs and results as
// attention_mma at 16 queries a warp, but for the order of the sums inside the products.
// grid (hq, ceil(t / (64 NWG))); block 128 NWG; dynamic shared memory `wg_prefill_smem` on the
// host: 1 KB of alignment, the queries' NWG tiles, then two stages of a K and a V tile, each tile
// 64 HD bf16 (16 KB at head dim 128). (Flash attention 3's order inside a warpgroup, tile i's
// product with V overlapped with tile i + 1's scores and softmax, measured slower at 2 and at 1
// block a multiprocessor: the registers it holds more spill or halve the blocks; BENCHMARKS.md.)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_ATTENTION 1
// A shared-memory matrix descriptor, 128-byte swizzle: address, leading and stride byte offsets.
__device__ __forceinline__ unsigned long long wg_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Ties registers to this point of the program: their uses stay after a wgmma wait, and their
// writes before a wgmma fence.
template <int N>
__device__ __forceinline__ void wg_hold(float (&d)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(d[j][e])::"memory");
}
// d[64 x 64] += A[64 x 16] B[64 x 16]^T, both K-major in shared memory.
__device__ __forceinline__ void wg_m64n64k16_ss(float (&d)[8][4], unsigned long long a, unsigned long long b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, 1, 1, 1, 0, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "l"(a), "l"(b));
}
// d[64 x 128] += A[64 x 16] (registers, mma's A fragment layout per warp) B[16 x 128] (shared
// memory, the 128 columns contiguous: transposed by the instruction).
__device__ __forceinline__ void wg_m64n128k16_rs(float (&d)[16][4], const unsigned (&a)[4], unsigned long long b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, 1, 1, 1, 1;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
// d[64 x 64] += A[64 x 16] (registers) B[16 x 64] (shared memory, transposed by the instruction).
__device__ __forceinline__ void wg_m64n64k16_rs(float (&d)[8][4], const unsigned (&a)[4], unsigned long long b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, 1, 1, 1, 1;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
// O += P V for the head dim: one m64n(HD) product.
template <int HD>
__device__ __forceinline__ void wg_pv(float (&d)[HD / 8][4], const unsigned (&a)[4], unsigned long long b) {
    if constexpr (HD == 128) wg_m64n128k16_rs(d, a, b);
    else wg_m64n64k16_rs(d, a, b);
}
#endif
template <int HD, int NWG>
__device__ void attention_wg_body(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* out, int t,
                                     int hq, int hkv, int start, int window, float scale) {
#if defined(WG_ATTENTION)
    // A tile: 64 rows of HD bf16 (two halves of 64 dims at HD 128).
    constexpr int NB = HD / 8, CPR = HD / 8, BQ = 64 * NWG, WG_TILE = 64 * HD * 2;
    constexpr float LOG2E = 1.4426950408889634f;
    const float scale2 = scale * LOG2E;
    extern __shared__ uint4 fm[];
    const unsigned raw = (unsigned)__cvta_generic_to_shared(fm);
    const unsigned base = (raw + 1023u) & ~1023u;  // the swizzle's 1 KB atoms
    char* const sb = (char*)fm + (base - raw);
    pdl_trigger();
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3, wg = warp >> 2;
    int q0 = (gridDim.y - 1 - blockIdx.y) * BQ, h = blockIdx.x, kvh = h / (hq / hkv);
    const long krow = (long)hkv * HD;
    const bf16_t* kh = k + (long)kvh * HD;
    const bf16_t* vh = v + (long)kvh * HD;
    const int2 keys = block_keys(start, q0, BQ, t, window);
    const int first = keys.x, last = keys.y, tiles = (last - first) / 64 + 1;
    // Byte offset of 16-byte chunk u (of 16) of row r in a swizzled tile.
    auto sw = [](int r, int u) { return (u >> 3) * (64 * 128) + r * 128 + (((u & 7) ^ (r & 7)) << 4); };
    // The queries, a tile a warpgroup.
    for (int x = tid; x < BQ * CPR; x += blockDim.x) {
        int r = x / CPR, u = x - r * CPR;
        char* d = sb + (r >> 6) * WG_TILE + sw(r & 63, u);
        if (q0 + r < t) cp_async16(d, q + ((long)(q0 + r) * hq + h) * HD + u * 8);
        else *(uint4*)d = make_uint4(0u, 0u, 0u, 0u);
    }
    auto issue = [&](int i) {
        char* kd0 = sb + (NWG + (i & 1) * 2) * WG_TILE;
        const int j0 = first + i * 64;
        for (int x = tid; x < 64 * CPR; x += blockDim.x) {
            int r = x / CPR, u = x - r * CPR, kp = j0 + r;
            char* kd = kd0 + sw(r, u);
            char* vd = kd + WG_TILE;
            if (kp <= last) {
                long at = (long)kp * krow + u * 8;
                cp_async16(kd, kh + at);
                cp_async16(vd, vh + at);
            } else {
                *(uint4*)kd = make_uint4(0u, 0u, 0u, 0u);
                *(uint4*)vd = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        cp_async_commit();
    };
    issue(0);
    // The warp's 16 rows from qw; its warpgroup's 64 from wq (positions wlo to whi).
    const int wq = q0 + wg * 64, qw = wq + (warp & 3) * 16;
    const int wlo = start + wq, whi = start + min(wq + 64, t) - 1;
    const unsigned qt = base + wg * WG_TILE;
    float o[NB][4], m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
#pragma unroll
    for (int nb = 0; nb < NB; nb++) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.f;
    const int qlo = start + qw, qhi = start + min(qw + 16, t) - 1;
    for (int i = 0; i < tiles; i++) {
        // Tile i (and the queries) landed, made visible to the tensor cores' reads, and every
        // thread done with tile i - 1 (its products waited for), whose stage tile i + 1 takes.
        cp_async_wait<0>();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        if (i + 1 < tiles) issue(i + 1);
        const int j0 = first + i * 64;
        // None of the warpgroup's queries sees the tile: it has none (rows past t), or the tile
        // is causally after the last, or before the first one's window.
        if (wq >= t || j0 > whi || (window > 0 && j0 + 63 <= wlo - window)) continue;
        const unsigned kt = base + (NWG + (i & 1) * 2) * WG_TILE, vt = kt + WG_TILE;
        // The scores' accumulators zeroed before the fence (wgmma must see no register written
        // after it): tied to this point, ahead of the fence, by wg_hold.
        float s[8][4];
#pragma unroll
        for (int nb = 0; nb < 8; nb++) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
        wg_hold(s);
        wg_fence();
#pragma unroll
        for (int c = 0; c < HD / 16; c++) {
            const unsigned off = (c >> 2) * (64 * 128) + (c & 3) * 32;
            wg_m64n64k16_ss(s, wg_desc(qt + off, 16, 1024), wg_desc(kt + off, 16, 1024));
        }
        wg_commit();
        wg_wait0();
        wg_hold(s);
        // The warp's rows see every key of the tile: no mask.
        const bool whole = j0 + 63 <= qlo && (window <= 0 || j0 > qhi - window);
        const int p0 = start + qw + g, p1 = p0 + 8;
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int nb = 0; nb < 8; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float x = s[nb][e] * scale2;
                if (!whole) {
                    int kp = j0 + nb * 8 + tq * 2 + (e & 1);
                    int qp = e < 2 ? p0 : p1;
                    if (kp > qp || (window > 0 && kp <= qp - window)) x = NEG_INF;
                }
                s[nb][e] = x;
                if (e < 2) mx0 = fmaxf(mx0, x);
                else mx1 = fmaxf(mx1, x);
            }
        softmax_step_frag<true, true>(s, mx0, mx1, m0, m1, l0, l1, o);
        unsigned a[4][4];
#pragma unroll
        for (int c = 0; c < 4; c++) {
            a[c][0] = pack_bf16(s[2 * c][0], s[2 * c][1]);
            a[c][1] = pack_bf16(s[2 * c][2], s[2 * c][3]);
            a[c][2] = pack_bf16(s[2 * c + 1][0], s[2 * c + 1][1]);
            a[c][3] = pack_bf16(s[2 * c + 1][2], s[2 * c + 1][3]);
        }
        wg_hold(o);
        wg_fence();
#pragma unroll
        for (int c = 0; c < 4; c++) wg_pv<HD>(o, a[c], wg_desc(vt + c * 16 * 128, 64 * 128, 1024));
        wg_commit();
        wg_wait0();
        wg_hold(o);
    }
    float L0 = l0, L1 = l1;
    for (int w = 1; w < 4; w <<= 1) {
        L0 += __shfl_xor_sync(0xffffffffu, L0, w);
        L1 += __shfl_xor_sync(0xffffffffu, L1, w);
    }
    const float i0 = 1.f / L0, i1 = 1.f / L1;
    const int r0 = qw + g, r1 = r0 + 8;
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
        int col = nb * 8 + tq * 2;
        if (r0 < t) *(unsigned*)(out + ((long)r0 * hq + h) * HD + col) = pack_bf16(o[nb][0] * i0, o[nb][1] * i0);
        if (r1 < t) *(unsigned*)(out + ((long)r1 * hq + h) * HD + col) = pack_bf16(o[nb][2] * i1, o[nb][3] * i1);
    }
#endif
}
// Decode attention on tensor cores for a KV head's query heads (bf16, head dims 64 and 128,
// sm_80 and later): the block's gb <= 16 query heads are the rows of an m16n8k16 product (rows
// past gb zero), as attention_mma's 16 queries are. Same blocks, splits, arguments and outputs as
// decode_attention_flash. Each of the 4 warps takes 16 of every 64 positions of its split: it
// copies their K and V rows (`cp.async`) into its own two-stage ring of 16-row tiles (rows padded
// by 8 values), the next tile's while it works on this one (the row of this step's position
// written from shared memory, rows past the split zeroed), scores them against the query heads
// (2 n-blocks of mma over the head dim), keeps a running softmax per head in base-2 units in the
// 4 lanes of a row's fragment, and adds the weights (rounded to bf16, as attention_mma and flash
// attention round them) times V (HD / 8 n-blocks of mma). K and V reach the mma operands through
// `ldmatrix` (V transposed), four 8 x 8 matrices an instruction. HI: more than 8 heads, rows 8-15
// in use (`decode_attention_mma64w` / `128w`); without, a row's softmax state is kept for rows
// 0-7 alone (`decode_attention_mma64` / `128`: Llama 3 8B's and 70B's groups of 4 and 8). The
// warps' states are joined at the end in shared memory over the rings.
// grid (splits, batch hkv g / gb); block 128; dynamic shared memory (`mma_decode_smem` on the
// host): (gb HD + 2 HD) floats rounded up to 16 bytes, then 4 x 2 x 2 tiles of 16 x (HD + 8) bf16.
template <int HD, bool HI>
__device__ __forceinline__ void decode_attention_mma(const bf16_t* qkv, bf16_t* kc, bf16_t* vc, bf16_t* out,
                                     float* part_m, float* part_l, float* part_acc,
                                     const float* inv_freq, int batch, int hq, int hkv, int start,
                                     int window, float scale, int per, int gb, const int* pos_ptr) {
#if __CUDA_ARCH__ >= 800
    constexpr int KS = HD + 8, NB = HD / 8, KC = HD / 16, CPR = HD / 8;
    constexpr float LOG2E = 1.4426950408889634f;
    const float scale2 = scale * LOG2E;
    extern __shared__ float sm[];
    pdl_trigger();
    const DecodeBlock blk = decode_block(batch, hq, hkv, HD, start, window, per, gb, pos_ptr);
    const int p = blk.p, split = blockIdx.x, splits = gridDim.x, b = blk.b, h0 = blk.h0;
    const int j0 = blk.j0, n = blk.n;
    const long KVH = blk.KVH, krow = blk.krow;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
    float* qs = sm;                // [gb, HD]
    float* ks = qs + gb * HD;      // [HD]
    float* vs = ks + HD;           // [HD]
    bf16_t* ring = (bf16_t*)(sm + ((gb * HD + 2 * HD + 3) & ~3));
    // This warp's K tile of tile t (its V tile follows): positions t 64 + warp 16 + r, r < 16.
    auto ktile = [&](int t) { return ring + (warp * 2 + (t & 1)) * 2 * 16 * KS; };
    // The row of this step's position p into tile t, where this warp holds it (from shared memory:
    // p's k and v are not in the cache yet).
    auto put_p = [&](int t) {
        int r = p - j0 - t * 64 - warp * 16;
        if (r < 0 || r >= 16 || p - j0 >= n) return;
        bf16_t* kt = ktile(t);
        for (int d = lane; d < HD; d += 32) {
            kt[r * KS + d] = (bf16_t)bf16_bits(ks[d]);
            kt[(16 + r) * KS + d] = (bf16_t)bf16_bits(vs[d]);
        }
    };
    // Copies this warp's rows of tile t (rows past n zeroed, p's left to put_p), then commits the
    // group (empty or not: every lane's groups stay counted alike).
    auto issue = [&](int t) {
        bf16_t* kt = ktile(t);
        for (int i = lane; i < 16 * CPR; i += 32) {
            int r = i / CPR, u = i - r * CPR;
            int j = t * 64 + warp * 16 + r, pj = j0 + j;
            bf16_t* kd = kt + r * KS + u * 8;
            bf16_t* vd = kd + 16 * KS;
            if (j >= n) {
                *(uint4*)kd = make_uint4(0u, 0u, 0u, 0u);
                *(uint4*)vd = make_uint4(0u, 0u, 0u, 0u);
            } else if (pj != p) {
                long at = (long)pj * krow + KVH * HD + u * 8;
                cp_async16(kd, kc + at);
                cp_async16(vd, vc + at);
            }
        }
        cp_async_commit();
    };
    const int tiles = (n + 63) / 64;
    // The first tile: rows of earlier steps, copied before the wait for the QKV projection (as in
    // decode_attention_gqa).
    if (tiles > 0) issue(0);
    decode_own_rows<bf16_t, 16>(qkv, kc, vc, inv_freq, blk, hq, hkv, HD, gb, qs, ks, vs);
    if (tiles > 0) put_p(0);
    // The query heads as A fragments: rows gq and gq + 8 of each 16 columns of the head dim.
    unsigned qa[KC][4];
    const int r0 = gq, r1 = gq + 8;
#pragma unroll
    for (int cc = 0; cc < KC; cc++) {
        int col = cc * 16 + tq * 2;
        qa[cc][0] = r0 < gb ? pack_bf16(qs[r0 * HD + col], qs[r0 * HD + col + 1]) : 0u;
        qa[cc][1] = HI && r1 < gb ? pack_bf16(qs[r1 * HD + col], qs[r1 * HD + col + 1]) : 0u;
        qa[cc][2] = r0 < gb ? pack_bf16(qs[r0 * HD + col + 8], qs[r0 * HD + col + 9]) : 0u;
        qa[cc][3] = HI && r1 < gb ? pack_bf16(qs[r1 * HD + col + 8], qs[r1 * HD + col + 9]) : 0u;
    }
    float o[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; nb++) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    for (int t = 0; t < tiles; t++) {
        if (t + 1 < tiles) {
            issue(t + 1);
            put_p(t + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncwarp();
        const bf16_t* kt = ktile(t);
        const bf16_t* vt = kt + 16 * KS;
        float sc[2][4];
#pragma unroll
        for (int nb = 0; nb < 2; nb++) sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.f;
        // K as the B operand: matrices (positions 0-7 | 8-15) x (columns cc 16 + 0-7 | 8-15), row
        // (lane & 7) of matrix lane / 8 from this lane: b0, b1 of n-block 0, then of n-block 1.
        const bf16_t* kl = kt + ((lane >> 4) * 8 + (lane & 7)) * KS + ((lane >> 3) & 1) * 8;
#pragma unroll
        for (int cc = 0; cc < KC; cc++) {
            unsigned kb[4];
            ldsm_x4<false>(kb, kl + cc * 16);
            mma_bf16(sc[0], qa[cc][0], qa[cc][1], qa[cc][2], qa[cc][3], kb[0], kb[1]);
            mma_bf16(sc[1], qa[cc][0], qa[cc][1], qa[cc][2], qa[cc][3], kb[2], kb[3]);
        }
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int nb = 0; nb < 2; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int j = t * 64 + warp * 16 + nb * 8 + tq * 2 + (e & 1);
                float x = j < n ? sc[nb][e] * scale2 : NEG_INF;
                sc[nb][e] = x;
                if (e < 2) mx0 = fmaxf(mx0, x);
                else mx1 = fmaxf(mx1, x);
            }
        softmax_step_frag<true, HI>(sc, mx0, mx1, m0, m1, l0, l1, o);
        unsigned a0 = pack_bf16(sc[0][0], sc[0][1]), a1 = HI ? pack_bf16(sc[0][2], sc[0][3]) : 0u;
        unsigned a2 = pack_bf16(sc[1][0], sc[1][1]), a3 = HI ? pack_bf16(sc[1][2], sc[1][3]) : 0u;
        // V as the B operand, transposed: matrices (columns nb 8 + 0-7 | nb 8 + 8-15) x
        // (positions 0-7 | 8-15), positions varying fastest: b0, b1 of n-block nb, then of nb + 1.
        const bf16_t* vl = vt + (((lane >> 3) & 1) * 8 + (lane & 7)) * KS + (lane >> 4) * 8;
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            unsigned vb[4];
            ldsm_x4<true>(vb, vl + nb * 8);
            mma_bf16(o[nb], a0, a1, a2, a3, vb[0], vb[1]);
            mma_bf16(o[nb + 1], a0, a1, a2, a3, vb[2], vb[3]);
        }
        // Every lane done with this stage before the copies of tile t + 2 overwrite it.
        __syncwarp();
    }
    for (int w = 1; w < 4; w <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, w);
        l1 += __shfl_xor_sync(0xffffffffu, l1, w);
    }
    // The warps' states joined (over the rings, once every warp is done with its own).
    float* wm = (float*)ring;   // max [4 warps][16 rows], base 2
    float* wl = wm + 64;        // sums [4][16]
    float* wo = wl + 64;        // outputs [4][16][HD]
    __syncthreads();
    if (tq == 0) {
        wm[warp * 16 + r0] = m0;
        wm[warp * 16 + r1] = m1;
        wl[warp * 16 + r0] = l0;
        wl[warp * 16 + r1] = l1;
    }
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
        int col = nb * 8 + tq * 2;
        wo[(warp * 16 + r0) * HD + col] = o[nb][0];
        wo[(warp * 16 + r0) * HD + col + 1] = o[nb][1];
        if constexpr (HI) {
            wo[(warp * 16 + r1) * HD + col] = o[nb][2];
            wo[(warp * 16 + r1) * HD + col + 1] = o[nb][3];
        }
    }
    __syncthreads();
    decode_join_states(wm, wl, wo, 4, 16, gb, HD, (long)b * hq + h0, split, splits, part_m, part_l,
                       part_acc, out);
#endif
}
extern "C" __global__ void __launch_bounds__(128) decode_attention_mma64(const bf16_t* qkv, bf16_t* kc, bf16_t* vc, bf16_t* o, float* pm, float* pl, float* pa, const float* f, int batch, int hq, int hkv, int hd, int start, int window, float scale, int per, int gb, const int* pp) { decode_attention_mma<64, false>(qkv, kc, vc, o, pm, pl, pa, f, batch, hq, hkv, start, window, scale, per, gb, pp); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_mma64w(const bf16_t* qkv, bf16_t* kc, bf16_t* vc, bf16_t* o, float* pm, float* pl, float* pa, const float* f, int batch, int hq, int hkv, int hd, int start, int window, float scale, int per, int gb, const int* pp) { decode_attention_mma<64, true>(qkv, kc, vc, o, pm, pl, pa, f, batch, hq, hkv, start, window, scale, per, gb, pp); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_mma128(const bf16_t* qkv, bf16_t* kc, bf16_t* vc, bf16_t* o, float* pm, float* pl, float* pa, const float* f, int batch, int hq, int hkv, int hd, int start, int window, float scale, int per, int gb, const int* pp) { decode_attention_mma<128, false>(qkv, kc, vc, o, pm, pl, pa, f, batch, hq, hkv, start, window, scale, per, gb, pp); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_mma128w(const bf16_t* qkv, bf16_t* kc, bf16_t* vc, bf16_t* o, float* pm, float* pl, float* pa, const float* f, int batch, int hq, int hkv, int hd, int start, int window, float scale, int per, int gb, const int* pp) { decode_attention_mma<128, true>(qkv, kc, vc, o, pm, pl, pa, f, batch, hq, hkv, start, window, scale, per, gb, pp); }
extern "C" __global__ void __launch_bounds__(128) attention_mma64_r16(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, int t, int hq, int hkv, int hd, int start, int window, float scale) { attention_mma<64, 1>(q, k, v, o, t, hq, hkv, start, window, scale); }
extern "C" __global__ void __launch_bounds__(128) attention_mma64_r32(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, int t, int hq, int hkv, int hd, int start, int window, float scale) { attention_mma<64, 2>(q, k, v, o, t, hq, hkv, start, window, scale); }
extern "C" __global__ void __launch_bounds__(128) attention_mma128_r16(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, int t, int hq, int hkv, int hd, int start, int window, float scale) { attention_mma<128, 1>(q, k, v, o, t, hq, hkv, start, window, scale); }
extern "C" __global__ void __launch_bounds__(128) attention_mma128_r32(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, int t, int hq, int hkv, int hd, int start, int window, float scale) { attention_mma<128, 2>(q, k, v, o, t, hq, hkv, start, window, scale); }
extern "C" __global__ void __launch_bounds__(128) attention_wg64_q64(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, int t, int hq, int hkv, int hd, int start, int window, float scale) { attention_wg_body<64, 1>(q, k, v, o, t, hq, hkv, start, window, scale); }
extern "C" __global__ void __launch_bounds__(256, 2) attention_wg64_q128(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, int t, int hq, int hkv, int hd, int start, int window, float scale) { attention_wg_body<64, 2>(q, k, v, o, t, hq, hkv, start, window, scale); }
extern "C" __global__ void __launch_bounds__(128) attention_wg128_q64(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, int t, int hq, int hkv, int hd, int start, int window, float scale) { attention_wg_body<128, 1>(q, k, v, o, t, hq, hkv, start, window, scale); }
extern "C" __global__ void __launch_bounds__(256, 2) attention_wg128_q128(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, int t, int hq, int hkv, int hd, int start, int window, float scale) { attention_wg_body<128, 2>(q, k, v, o, t, hq, hkv, start, window, scale); }

// One instance `skinny_<NAME>`; the host appends one line of this for each of SKINNY_VARIANTS.
#define SKINNY(NAME, MT, WR, NWARP, NW, KC) \
extern "C" __global__ void __launch_bounds__(NWARP * 32) skinny_##NAME(const bf16_t* x, const bf16_t* w, bf16_t* y, float* p, int m, int n, int k, int kper) { skinny_gemm<MT, WR, NWARP, NW, KC>(x, w, y, p, m, n, k, kper); }

// y = the sum over `splits` of part [splits, len], in order (the skinny GEMM's split-K).
extern "C" __global__ void skinny_reduce(const float* part, bf16_t* y, int splits, long len) {
    pdl_trigger();
    pdl_wait();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < len; i += (long)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int p = 0; p < splits; p++) s += part[p * len + i];
        st(y, i, s);
    }
}

// The probe of whether a library's kernel waits for the kernel before it (`pdl_probe.rs`): lets
// the kernel after it start at once, waits `ns` nanoseconds, then copies n16 units of 16 bytes
// from src to dst. A kernel behind it on a programmatic graph edge that reads dst without
// `griddepcontrol.wait` reads what dst held before. With ns = 0 it is the probe's own check: a
// copy that waits for the kernel before it first (wait = 1) or does not (0).
extern "C" __global__ void pdl_probe_delay(const uint4* src, uint4* dst, long n16, unsigned long long ns, int wait) {
    pdl_trigger();
    if (wait) pdl_wait();
    if (threadIdx.x == 0) {
        unsigned long long t0 = global_ns();
        while (global_ns() - t0 < ns) {}
    }
    __syncthreads();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n16; i += (long)gridDim.x * blockDim.x) dst[i] = src[i];
}

#define INSTANTIATE(T, S)                                                                              \
extern "C" __global__ void __launch_bounds__(512) rms_norm1_##S(const T* x, const T* w, T* y, int h, float eps) { add_rms_norm<T, false, 1>((T*)x, x, w, y, h, eps); } \
extern "C" __global__ void __launch_bounds__(512) add_rms_norm1_##S(T* x, const T* d, const T* w, T* y, int h, float eps) { add_rms_norm<T, true, 1>(x, d, w, y, h, eps); } \
extern "C" __global__ void __launch_bounds__(512) rms_norm2_##S(const T* x, const T* w, T* y, int h, float eps) { add_rms_norm<T, false, 2>((T*)x, x, w, y, h, eps); } \
extern "C" __global__ void __launch_bounds__(512) add_rms_norm2_##S(T* x, const T* d, const T* w, T* y, int h, float eps) { add_rms_norm<T, true, 2>(x, d, w, y, h, eps); } \
extern "C" __global__ void __launch_bounds__(512) rms_norm4_##S(const T* x, const T* w, T* y, int h, float eps) { add_rms_norm<T, false, 4>((T*)x, x, w, y, h, eps); } \
extern "C" __global__ void __launch_bounds__(512) add_rms_norm4_##S(T* x, const T* d, const T* w, T* y, int h, float eps) { add_rms_norm<T, true, 4>(x, d, w, y, h, eps); } \
extern "C" __global__ void head_rms_norm_##S(const T* x, const T* qw, const T* kw, T* y, int hq, int hk, int heads, int hd, float eps) { head_rms_norm(x, qw, kw, y, hq, hk, heads, hd, eps); } \
extern "C" __global__ void rope_##S(T* x, const float* f, int heads, int hd, int start, const int* pp) { rope(x, f, heads, hd, start, pp); } \
extern "C" __global__ void silu_mul_##S(const T* g, const T* u, T* o, long n) { silu_mul(g, u, o, n); } \
extern "C" __global__ void silu_mul_halves_##S(const T* gu, T* o, long rows, int n) { silu_mul_halves(gu, o, rows, n); } \
extern "C" __global__ void add_inplace_##S(T* a, const T* b, long n) { add_inplace(a, b, n); } \
extern "C" __global__ void add_bias_##S(T* y, const T* b, long rows, int n) { add_bias(y, b, rows, n); } \
extern "C" __global__ void embedding_##S(const T* t, const unsigned* tok, T* o, int h, int vs, int rows) { embedding(t, tok, o, h, vs, rows); } \
extern "C" __global__ void attention_##S(const T* q, const T* k, const T* v, T* o, int hq, int hkv, int hd, int start, int window, float scale, const int* pp) { attention(q, k, v, o, hq, hkv, hd, start, window, scale, pp); } \
extern "C" __global__ void decode_attention_##S(const T* qkv, T* kc, T* vc, T* o, float* pm, float* pl, float* pa, const float* f, int batch, int hq, int hkv, int hd, int start, int window, float scale, int per, const int* pp) { decode_attention(qkv, kc, vc, o, pm, pl, pa, f, batch, hq, hkv, hd, start, window, scale, per, pp); } \
extern "C" __global__ void decode_attention_gqa1_##S(const T* qkv, T* kc, T* vc, T* o, float* pm, float* pl, float* pa, const float* f, int batch, int hq, int hkv, int hd, int start, int window, float scale, int per, int gb, const int* pp) { decode_attention_gqa<T, 1>(qkv, kc, vc, o, pm, pl, pa, f, batch, hq, hkv, hd, start, window, scale, per, gb, pp); } \
extern "C" __global__ void decode_attention_gqa2_##S(const T* qkv, T* kc, T* vc, T* o, float* pm, float* pl, float* pa, const float* f, int batch, int hq, int hkv, int hd, int start, int window, float scale, int per, int gb, const int* pp) { decode_attention_gqa<T, 2>(qkv, kc, vc, o, pm, pl, pa, f, batch, hq, hkv, hd, start, window, scale, per, gb, pp); } \
extern "C" __global__ void __launch_bounds__(128, 6) decode_attention_gqa4_##S(const T* qkv, T* kc, T* vc, T* o, float* pm, float* pl, float* pa, const float* f, int batch, int hq, int hkv, int hd, int start, int window, float scale, int per, int gb, const int* pp) { decode_attention_gqa<T, 4>(qkv, kc, vc, o, pm, pl, pa, f, batch, hq, hkv, hd, start, window, scale, per, gb, pp); } \
extern "C" __global__ void decode_attention_gqa8_##S(const T* qkv, T* kc, T* vc, T* o, float* pm, float* pl, float* pa, const float* f, int batch, int hq, int hkv, int hd, int start, int window, float scale, int per, int gb, const int* pp) { decode_attention_gqa<T, 8>(qkv, kc, vc, o, pm, pl, pa, f, batch, hq, hkv, hd, start, window, scale, per, gb, pp); } \
extern "C" __global__ void decode_attention_flash1_##S(const T* qkv, T* kc, T* vc, T* o, float* pm, float* pl, float* pa, const float* f, int batch, int hq, int hkv, int hd, int start, int window, float scale, int per, int gb, const int* pp) { decode_attention_flash<T, 1>(qkv, kc, vc, o, pm, pl, pa, f, batch, hq, hkv, hd, start, window, scale, per, gb, pp); } \
extern "C" __global__ void decode_attention_flash2_##S(const T* qkv, T* kc, T* vc, T* o, float* pm, float* pl, float* pa, const float* f, int batch, int hq, int hkv, int hd, int start, int window, float scale, int per, int gb, const int* pp) { decode_attention_flash<T, 2>(qkv, kc, vc, o, pm, pl, pa, f, batch, hq, hkv, hd, start, window, scale, per, gb, pp); } \
extern "C" __global__ void decode_attention_flash4_##S(const T* qkv, T* kc, T* vc, T* o, float* pm, float* pl, float* pa, const float* f, int batch, int hq, int hkv, int hd, int start, int window, float scale, int per, int gb, const int* pp) { decode_attention_flash<T, 4>(qkv, kc, vc, o, pm, pl, pa, f, batch, hq, hkv, hd, start, window, scale, per, gb, pp); } \
extern "C" __global__ void __launch_bounds__(512, 2) all_reduce_add_rms_norm1_##S(const T* p, T* x, const T* w, T* y, int h, float eps, const unsigned long long* ll, long sl, unsigned* c, int rank, int world, unsigned* word, unsigned long long tns, int pushed, unsigned hold, unsigned long long* st, int opts) { all_reduce_add_rms_norm<T, 1>(p, x, w, y, h, eps, ll, sl, c, rank, world, word, tns, pushed, hold, st, opts); } \
extern "C" __global__ void __launch_bounds__(512, 1) all_reduce_add_rms_norm2_##S(const T* p, T* x, const T* w, T* y, int h, float eps, const unsigned long long* ll, long sl, unsigned* c, int rank, int world, unsigned* word, unsigned long long tns, int pushed, unsigned hold, unsigned long long* st, int opts) { all_reduce_add_rms_norm<T, 2>(p, x, w, y, h, eps, ll, sl, c, rank, world, word, tns, pushed, hold, st, opts); } \
extern "C" __global__ void __launch_bounds__(512, 1) all_reduce_add_rms_norm4_##S(const T* p, T* x, const T* w, T* y, int h, float eps, const unsigned long long* ll, long sl, unsigned* c, int rank, int world, unsigned* word, unsigned long long tns, int pushed, unsigned hold, unsigned long long* st, int opts) { all_reduce_add_rms_norm<T, 4>(p, x, w, y, h, eps, ll, sl, c, rank, world, word, tns, pushed, hold, st, opts); } \
extern "C" __global__ void attention_combine_##S(const float* pm, const float* pl, const float* pa, T* o, int splits, int hd) { attention_combine(pm, pl, pa, o, splits, hd); } \
extern "C" __global__ void qkv_rope_append_##S(const T* qkv, T* q, T* kc, T* vc, const float* f, int batch, int hq, int hkv, int hd, int start, const int* pp) { qkv_rope_append(qkv, q, kc, vc, f, batch, hq, hkv, hd, start, pp); } \
extern "C" __global__ void __launch_bounds__(256) attention_tiled8_##S(const T* q, const T* k, const T* v, T* o, int t, int hq, int hkv, int hd, int start, int window, float scale) { attention_tiled<T, 8>(q, k, v, o, t, hq, hkv, hd, start, window, scale); } \
extern "C" __global__ void __launch_bounds__(256) attention_tiled16_##S(const T* q, const T* k, const T* v, T* o, int t, int hq, int hkv, int hd, int start, int window, float scale) { attention_tiled<T, 16>(q, k, v, o, t, hq, hkv, hd, start, window, scale); } \
extern "C" __global__ void __launch_bounds__(256) attention_tiled32_##S(const T* q, const T* k, const T* v, T* o, int t, int hq, int hkv, int hd, int start, int window, float scale) { attention_tiled<T, 32>(q, k, v, o, t, hq, hkv, hd, start, window, scale); } \
extern "C" __global__ void __launch_bounds__(1024) lse_rows_##S(const T* x, const int* t, int n, float* m, float* s, float* v) { lse_rows(x, t, n, m, s, v); } \
extern "C" __global__ void __launch_bounds__(1024) top_k_rows_##S(const T* x, int n, int k, int cap, float* o) { top_k_rows(x, n, k, cap, o); } \
extern "C" __global__ void gather_values_##S(const T* x, const long long* at, int m, float* o) { gather_values(x, at, m, o); } \
extern "C" __global__ void argmax_rows_##S(const T* x, const float* sv, const int* si, int n, int per, float* v, int* i) { argmax_rows(x, sv, si, n, per, v, i); } \
extern "C" __global__ void fill_random_##S(T* x, long n, unsigned long long seed, float scale, float offset) { fill_random(x, n, seed, scale, offset); }

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)

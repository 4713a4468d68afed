// A decode step's weight stream in one persistent kernel: the probe behind `tessera bench
// persistent` (see persistent_probe.rs). Compiled with NVRTC on its own, only when the probe runs.
//
// The kernel walks a list of segments (one projection each: `rows` rows of `k` bf16 weights),
// every warp of the grid taking one contiguous share of a segment's 512-byte lines and summing
// each row's products with the segment's input vector into the row's output (atomically: a share
// may start or end inside a row). Between two segments it meets the whole grid where the step
// has a dependency (a grid barrier; the input vector of the next segment is the outputs of the
// one before, so none may start before all have ended) and, at the two row-parallel projections
// of a layer, exchanges the outputs with the peer GPU (each block pushes a slice as value/flag
// pairs into the peer's receive buffer over NVLink; every block of the peer polls all of them
// into its next input). Each warp streams its lines through a ring in shared memory; running
// `ahead`, it goes on loading the next segments' lines while it waits at a barrier: the weights
// do not depend on the barrier, only the input vector does.

typedef unsigned short bf16_t;

#define SEG_WORDS 8

__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint4 ld_volatile4(const uint4* p) {
    uint4 v;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_volatile2(uint2* p, uint2 v) {
    asm volatile("st.volatile.global.v2.u32 [%0], {%1, %2};" :: "l"(p), "r"(v.x), "r"(v.y) : "memory");
}

__device__ __forceinline__ float squash(float v) { return v / (1.0f + fabsf(v)); }

__device__ __forceinline__ float dot8(uint4 w, const float* x) {
    unsigned u[4] = {w.x, w.y, w.z, w.w};
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        s += __uint_as_float(u[j] << 16) * x[2 * j];
        s += __uint_as_float(u[j] & 0xffff0000u) * x[2 * j + 1];
    }
    return s;
}

// Random bf16 weights in about [-0.03, 0.03] (a hash of the index), never zero.
extern "C" __global__ void probe_fill(uint4* w, unsigned long long n16, unsigned seed) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n16;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned v[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            unsigned h = (unsigned)(i * 4 + j) * 2654435761u ^ seed;
            h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
            // Two bf16: sign and a mantissa over an exponent of 2^-6 .. 2^-5.
            unsigned lo = 0x3c80u | (h & 0x7fu) | ((h >> 7) & 1u) << 15;
            unsigned hi = 0x3c80u | ((h >> 8) & 0x7fu) | ((h >> 15) & 1u) << 15;
            v[j] = lo | hi << 16;
        }
        w[i] = make_uint4(v[0], v[1], v[2], v[3]);
    }
}

// The whole grid meets: block b's thread 0 adds one to `bar` and waits until every block has
// (target = blocks x barriers so far in this step: the counter is zeroed before each step). On
// timeout it sets `failed` and goes on.
__device__ __forceinline__ void grid_barrier(unsigned* bar, unsigned target, unsigned long long deadline,
                                             int* failed) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(bar, 1u);
        unsigned spins = 0;
        while (ld_acquire(bar) < target) {
            if (++spins % 1024 == 0 && now_ns() > deadline) { atomicExch(failed, 1); break; }
        }
    }
    __syncthreads();
}

// segs: SEG_WORDS words a segment: weight offset in 16-byte units (lo, hi), rows, k, sync after
// (0 none, 1 barrier, 2 barrier + exchange), its outputs' offset in y, the outputs its input is
// made of (offset in y, count; count 0: a fixed input).
// y: this step's outputs and bar its barrier counter (both zeroed before the step). recv_mine /
// recv_peer: this GPU's and the peer's receive buffers, 2 x max_x pairs (exchanges alternate
// halves); recv_peer 0: no peer (an exchange is then a barrier alone). step: the step's number
// from 0 (exchange flags count on from it). max_k: the largest k (floats of the input vector in
// shared memory, before the rings).
//
// Weights stream through a ring of RING lines a warp in shared memory (cp.async, one group a
// line): a line is consumed, then the slot refilled with the warp's next line. `ahead` 1: the
// next line may belong to the segments after this one, so lines stay in flight while the grid
// meets; 0: a warp stops issuing at the end of its share and refills after the barrier; 2: it runs
// ahead across barriers but stops at each exchange (what a chain of kernels keeps across one).
template <int RING>
__device__ __forceinline__ void probe_step_impl(
    const uint4* __restrict__ w, const unsigned* __restrict__ segs, int nseg, float* y,
    unsigned* bar, uint2* recv_mine, uint2* recv_peer, unsigned nx, int max_x,
    unsigned step, int ahead, int no_sync, unsigned long long timeout_ns, int* failed, int max_k) {
    extern __shared__ __align__(16) unsigned char smem[];
    if (*(volatile int*)failed) return;  // a step before timed out: end at once
    float* xs = (float*)smem;
    const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // This lane's 16 bytes of each of the warp's RING lines.
    uint4* ring = (uint4*)(smem + ((size_t)max_k * 4 + 15) / 16 * 16) + (size_t)warp * RING * 32 + lane;
    const unsigned long long gw = (unsigned long long)blockIdx.x * warps + warp;
    const unsigned long long nw = (unsigned long long)gridDim.x * warps;
    const unsigned long long deadline = now_ns() + timeout_ns;
    // This warp's share of segment s: lines [a, b) (512 bytes: 32 lanes x 16).
    auto share = [&](int s, unsigned long long& a, unsigned long long& b) {
        const unsigned* g = segs + s * SEG_WORDS;
        const unsigned long long lines = (unsigned long long)g[2] * (g[3] / 256);
        a = lines * gw / nw;
        b = lines * (gw + 1) / nw;
    };
    auto base = [&](int s) {
        const unsigned* g = segs + s * SEG_WORDS;
        return w + (g[0] | (unsigned long long)g[1] << 32) + lane;
    };
    // The producer: the next line to issue (segment ps, line pl of its share ending at pb).
    int ps = 0;
    unsigned long long pl, pb, issued = 0, consumed = 0;
    share(0, pl, pb);
    const uint4* pw = base(0);
    // Issues the warp's next line if it belongs to a segment up to `limit`.
    auto issue = [&](int limit) {
        while (ps < nseg && pl >= pb) {
            if (++ps < nseg) { share(ps, pl, pb); pw = base(ps); }
        }
        if (ps >= nseg || ps > limit) return;
        unsigned dst = (unsigned)__cvta_generic_to_shared(ring + (issued % RING) * 32);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(pw + pl * 32) : "memory");
        asm volatile("cp.async.commit_group;" ::: "memory");
        pl++;
        issued++;
    };
    // The last segment whose lines may be in flight while segment s runs.
    auto limit_at = [&](int s) {
        if (ahead == 1) return nseg;
        if (ahead == 0) return s;
        int e = s;
        while (e < nseg - 1 && segs[e * SEG_WORDS + 4] != 2) e++;
        return e;
    };
    for (int j = 0; j < RING; j++) issue(limit_at(0));
    unsigned bi = 0, xi = 0;
    for (int s = 0; s < nseg; s++) {
        const unsigned* g = segs + s * SEG_WORDS;
        const unsigned rows = g[2], k = g[3], sync = g[4], y_off = g[5], x_off = g[6], x_len = g[7];
        const int limit = limit_at(s);
        if (ahead != 1)
            for (int j = (int)(issued - consumed); j < RING; j++) issue(limit);
        // The input vector: fixed for the first segment, else the outputs before (plus the
        // peer's, received, after an exchange), squashed to keep the values bounded.
        const bool after_exchange = s > 0 && segs[(s - 1) * SEG_WORDS + 4] == 2 && recv_peer != 0;
        const unsigned seq = step * nx + xi;  // the exchange before this segment (xi counted)
        const uint2* rin = recv_mine + (size_t)(xi & 1) * max_x;
        // Four values a thread a chunk, every chunk's loads issued before any is used (k is at
        // most 8 x 4 x the block's threads).
        {
            const unsigned k4 = k / 4;
            float4 xv[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const unsigned i4 = threadIdx.x + u * blockDim.x;
                if (i4 < k4 && x_len != 0) xv[u] = __ldcg((const float4*)(y + x_off + (i4 * 4) % x_len));
            }
            if (after_exchange && !no_sync) {
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const unsigned i4 = threadIdx.x + u * blockDim.x;
                    if (i4 >= k4) continue;
                    const uint4* p = (const uint4*)(rin + (i4 * 4) % x_len);
                    uint4 lo = ld_volatile4(p), hi = ld_volatile4(p + 1);
                    unsigned spins = 0;
                    while (lo.y != seq || lo.w != seq || hi.y != seq || hi.w != seq) {
                        if (++spins % 1024 == 0 && now_ns() > deadline) { atomicExch(failed, 1); break; }
                        lo = ld_volatile4(p);
                        hi = ld_volatile4(p + 1);
                    }
                    xv[u].x += __uint_as_float(lo.x);
                    xv[u].y += __uint_as_float(lo.z);
                    xv[u].z += __uint_as_float(hi.x);
                    xv[u].w += __uint_as_float(hi.z);
                }
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const unsigned i4 = threadIdx.x + u * blockDim.x;
                if (i4 >= k4) continue;
                float4 r;
                if (x_len == 0) {
                    const unsigned i = i4 * 4;
                    r = make_float4(squash(0.5f - (float)(i % 7) * 0.125f),
                                    squash(0.5f - (float)((i + 1) % 7) * 0.125f),
                                    squash(0.5f - (float)((i + 2) % 7) * 0.125f),
                                    squash(0.5f - (float)((i + 3) % 7) * 0.125f));
                } else {
                    r = make_float4(squash(xv[u].x), squash(xv[u].y), squash(xv[u].z), squash(xv[u].w));
                }
                ((float4*)xs)[i4] = r;
            }
        }
        __syncthreads();
        unsigned long long a, b;
        share(s, a, b);
        const unsigned lpr = k / 256;
        // Row and line within it, counted on (no division a line).
        unsigned row = (unsigned)(a / lpr), c = (unsigned)(a % lpr);
        float acc = 0.0f;
        bool open = false;  // acc holds a part of `row` not yet added
        for (unsigned long long l = a; l < b; l++) {
            if (issued - consumed >= RING) asm volatile("cp.async.wait_group %0;" :: "n"(RING - 1) : "memory");
            else asm volatile("cp.async.wait_all;" ::: "memory");
            uint4 line = ring[(consumed % RING) * 32];
            acc += dot8(line, xs + c * 256 + lane * 8);
            consumed++;
            issue(limit);  // after the line is used: the slot is free
            open = true;
            if (++c == lpr) {
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                if (lane == 0) atomicAdd(y + y_off + row, acc);
                acc = 0.0f;
                open = false;
                c = 0;
                row++;
            }
        }
        if (open) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
            if (lane == 0) atomicAdd(y + y_off + row, acc);
        }
        if (no_sync || sync == 0) {
            __syncthreads();  // xs is rewritten by the next segment
            continue;
        }
        bi++;
        grid_barrier(bar, bi * gridDim.x, deadline, failed);
        if (sync == 2 && recv_peer != 0) {
            // Push this segment's outputs to the peer: value and flag in one 8-byte store.
            xi++;
            uint2* rout = recv_peer + (size_t)(xi & 1) * max_x;
            const unsigned seq_out = step * nx + xi;
            for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < rows; i += gridDim.x * blockDim.x)
                st_volatile2(rout + i, make_uint2(__float_as_uint(__ldcg(y + y_off + i)), seq_out));
        }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
}

#define PROBE_STEP(R)                                                                            \
    extern "C" __global__ void __launch_bounds__(512, 1) probe_step_r##R(                       \
        const uint4* __restrict__ w, const unsigned* __restrict__ segs, int nseg, float* y,     \
        unsigned* bar, uint2* recv_mine, uint2* recv_peer, unsigned nx,                         \
        int max_x, unsigned step, int ahead, int no_sync, unsigned long long timeout_ns,         \
        int* failed, int max_k) {                                                                \
        probe_step_impl<R>(w, segs, nseg, y, bar, recv_mine, recv_peer, nx, max_x, step,        \
                           ahead, no_sync, timeout_ns, failed, max_k);                           \
    }
PROBE_STEP(8)
PROBE_STEP(16)
PROBE_STEP(24)

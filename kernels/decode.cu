// The kernels of the CUDA decode path (crates/infer-core/src/models/cuda_step.rs): steps of at most
// GEMV_MAX_M = 8 token rows (decode batches, speculative verification), dense f32/f16/bf16 weights,
// every buffer preallocated, one launch per step of the layer:
//
//   embed        x[m, hidden] (f32) = table[ids[m]]
//   rmsnorm_in   y[r, n] (T) = rmsnorm(x[rows[r], n]) · w          (rows: optional gather, f32 in)
//   gemv_mM      out[m, N] (f32) = x[m, K] (T) · [W0; W1; W2]ᵀ (+ bias), stored or added (residual)
//   glu_mM       act[m, N] (T) = silu(x · Wgᵀ) · (x · Wuᵀ)
//   rope_qkv     qkv[m, (nh + 2·nkv)·hd] (f32) → q[m, nh, hd] (T) rotated (optional per-head
//                RMSNorm first), k rotated and v copied into the paged caches at slots[m]
//
// GEMV: one warp per output row (or 2-4 warps splitting its K when the matrix has few rows), 16-byte
// weight loads (8 bf16/f16 or 4 f32 values), UNROLL loads in flight per lane before any arithmetic,
// f32 accumulation, the activations read through L1 (a few KiB, shared by every warp). K must be a
// multiple of 8 and rows 16-byte aligned (checked by the host).
#include "common.cuh"
#include <math_constants.h>

#define GEMV_WARPS 4
// 16-byte weight loads in flight per lane: 8 for 1-2 rows, 4 from 3 rows on (registers).
#define GEMV_UNROLL(M) ((M) <= 2 ? 8 : 4)
#define ROPE_MAX_HD 256

// Programmatic dependent launch (Hopper; no-ops before): the host may launch a kernel before the
// previous one has finished (crates/infer-kernels/src/cuda/decode.rs). Each kernel here lets the next
// one start as soon as all its own blocks run (pdl_trigger, at entry), and waits for the previous
// kernel to complete (pdl_wait) before it reads or writes anything another kernel touches: the GEMVs
// issue their first weight loads (read-only, written by no kernel) before waiting. Every thread calls
// pdl_wait on every path, so no kernel completes before the one it follows.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// The 16/sizeof(T) values of a 16-byte load as floats.
template <typename T> struct Lanes;
template <> struct Lanes<float> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void unpack(const uint4 v, float* f) {
        f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y); f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
    }
};
template <> struct Lanes<__nv_bfloat16> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void pair(uint32_t u, float* f) {
        f[0] = __uint_as_float(u << 16);
        f[1] = __uint_as_float(u & 0xffff0000u);
    }
    static __device__ __forceinline__ void unpack(const uint4 v, float* f) {
        pair(v.x, f); pair(v.y, f + 2); pair(v.z, f + 4); pair(v.w, f + 6);
    }
};
template <> struct Lanes<__half> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void pair(uint32_t u, float* f) {
        __half2 h;
        memcpy(&h, &u, 4);
        const float2 p = __half22float2(h);
        f[0] = p.x; f[1] = p.y;
    }
    static __device__ __forceinline__ void unpack(const uint4 v, float* f) {
        pair(v.x, f); pair(v.y, f + 2); pair(v.z, f + 4); pair(v.w, f + 6);
    }
};

// This thread's next U weight chunks c0, c0 + stride, ... (zeros past the row), all in flight before
// any is used; on its first chunks, then the wait for the previous kernel (the weights are read-only,
// x is that kernel's output).
template <int U>
__device__ __forceinline__ void load_chunks(const uint4* __restrict__ w, int c0, int first, int stride, int chunks,
                                            uint4* wv) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = c0 + stride * u;
        wv[u] = c < chunks ? __ldcs(w + c) : make_uint4(0, 0, 0, 0);
    }
    if (c0 == first) pdl_wait();
}

// acc[i] += w_row · x[i] over K (chunks of 16 bytes), for rows i < m (M: the compile-time bound);
// this thread takes chunks first, first + stride, ... (a warp, or `split` warps, per row).
template <typename T, int M>
__device__ __forceinline__ void row_dot(const uint4* __restrict__ w, const T* __restrict__ x, int chunks, int k, int m,
                                        int first, int stride, float* acc) {
    constexpr int V = Lanes<T>::N, U = GEMV_UNROLL(M);
    for (int c0 = first; c0 < chunks; c0 += stride * U) {
        uint4 wv[U];
        load_chunks<U>(w, c0, first, stride, chunks, wv);
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + stride * u;
            if (c < chunks) {
                float wf[V];
                Lanes<T>::unpack(wv[u], wf);
#pragma unroll
                for (int i = 0; i < M; i++) {
                    if (i < m) {
                        float xf[V];
                        Lanes<T>::unpack(reinterpret_cast<const uint4*>(x + (size_t)i * k)[c], xf);
#pragma unroll
                        for (int e = 0; e < V; e++) acc[i] = fmaf(wf[e], xf[e], acc[i]);
                    }
                }
            }
        }
    }
}

// Sums acc over the warp, then over the `split` warps of a row (warps g·split .. g·split + split − 1
// of the block); the row's first warp's lane 0 ends up with the totals. Every thread of the block
// must call it (it synchronizes the block when split > 1).
template <int M>
__device__ __forceinline__ void row_sum(float* acc, int split) {
    __shared__ float red[GEMV_WARPS][M];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = warp_sum(acc[i]);
    if (split == 1) return;
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < M; i++) red[warp][i] = acc[i];
    }
    __syncthreads();
    if (lane == 0 && warp % split == 0) {
#pragma unroll
        for (int i = 0; i < M; i++) {
            float t = 0.0f;
            for (int p = 0; p < split; p++) t += red[warp + p][i];
            acc[i] = t;
        }
    }
}

// Stacked row r of [W0; W1; W2] (n0 and n1 rows in the first two): its matrix, bias and row there.
template <typename T> struct SegRow {
    const T* w;
    const T* b;
    int r;
};
template <typename T>
__device__ __forceinline__ SegRow<T> seg_row(const T* w0, const T* w1, const T* w2, const T* b0, const T* b1,
                                             const T* b2, int n0, int n1, int r) {
    if (r >= n0 + n1) return {w2, b2, r - n0 - n1};
    if (r >= n0) return {w1, b1, r - n0};
    return {w0, b0, r};
}

// out[i, r] (row stride n) = or += acc[i] + bias, for rows i < m.
template <int M>
__device__ __forceinline__ void store_rows(float* out, int n, int r, const float* acc, float bias, int m, int add) {
#pragma unroll
    for (int i = 0; i < M; i++) {
        if (i < m) {
            float* o = out + (size_t)i * n + r;
            *o = add ? *o + acc[i] + bias : acc[i] + bias;
        }
    }
}

// A GLU's epilogue (every thread of the block calls it): lane 0 of each warp holds its row's dot
// products (after row_sum), the gate row's first warp g·split·2 and the up row's first warp
// g·split·2 + split; act[i, r] = silu(gate) · up.
template <typename T, int M>
__device__ __forceinline__ void glu_out(const float* acc, int split, int r, int n, int m, T* act) {
    __shared__ float dots[GEMV_WARPS][M];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < M; i++) dots[warp][i] = acc[i];
    }
    __syncthreads();
    if (r < n && lane == 0 && warp % (2 * split) == 0) {
#pragma unroll
        for (int i = 0; i < M; i++) {
            const float g = dots[warp][i], u = dots[warp + split][i];
            if (i < m) act[(size_t)i * n + r] = from_f32<T>(g / (1.0f + __expf(-g)) * u);
        }
    }
}

// out[i, r] (row stride n) = or += x[i] · W[r] (+ bias[r]) for the rows r of [W0; W1; W2]
// (n0 + n1 + n2 = n rows; W1, W2 unused when n0 or n0 + n1 covers n). `split` (1, 2 or 4) warps per
// row share its K: GEMV_WARPS / split rows per block (more warps in flight for matrices of few rows).
template <typename T, int M>
__device__ void gemv(const T* w0, const T* w1, const T* w2, const T* b0, const T* b1, const T* b2, int n0, int n1,
                     int n, int k, const T* x, int m, float* out, int add, int split) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.x * (GEMV_WARPS / split) + warp / split;
    const SegRow<T> sr = seg_row(w0, w1, w2, b0, b1, b2, n0, n1, r);
    const T *w = sr.w, *b = sr.b;
    const int rr = sr.r;
    float acc[M];
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = 0.0f;
    pdl_trigger();
    if (r < n) {
        row_dot<T, M>(reinterpret_cast<const uint4*>(w + (size_t)rr * k), x, k / Lanes<T>::N, k, m,
                      (warp % split) * 32 + lane, 32 * split, acc);
    }
    pdl_wait();
    row_sum<M>(acc, split);
    if (r < n && lane == 0 && warp % split == 0) {
        store_rows<M>(out, n, r, acc, b ? to_f32(b[rr]) : 0.0f, m, add);
    }
}

// act[i, r] = silu(x[i] · Wg[r]) · (x[i] · Wu[r]), r < n. `split` (1 or 2) warps per gate row and
// as many per up row, in the same block (2·split warps per output, GEMV_WARPS / (2·split) outputs
// per block): the two rows stream side by side.
template <typename T, int M>
__device__ void glu(const T* wg, const T* wu, int n, int k, const T* x, int m, T* act, int split) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, per = 2 * split;
    const int r = blockIdx.x * (GEMV_WARPS / per) + warp / per;
    const bool up = warp % per >= split;
    float acc[M];
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = 0.0f;
    pdl_trigger();
    if (r < n) {
        row_dot<T, M>(reinterpret_cast<const uint4*>((up ? wu : wg) + (size_t)r * k), x, k / Lanes<T>::N, k, m,
                      (warp % split) * 32 + lane, 32 * split, acc);
    }
    pdl_wait();
    row_sum<M>(acc, split);
    glu_out<T, M>(acc, split, r, n, m, act);
}

// ---- The same with the RMSNorm before the matrix folded in (steps of 1-2 rows) ----
//
// norm(x)·W[r] = rsqrt(mean(x²) + eps) · Σ_j W[r, j]·g[j]·x[j]: the scale factors out of the dot
// product, so each row's warps read the f32 residual x and the norm gain g alongside the weights and
// sum x² over the same chunks; no norm kernel, no normalized copy of x. (Per 16 bytes of weights
// this reads 32 bytes of x and 16 of g per row through L1; from 3-4 rows on, the separate norm and
// T activations read less, hence 1-2 rows only.)

// acc[i] += Σ W[j]·g[j]·x[i, j] and, with SS, ss[i] += Σ x[i, j]² over this thread's chunks.
template <typename T, int M, bool SS>
__device__ __forceinline__ void row_dot_norm(const uint4* __restrict__ w, const float* __restrict__ x,
                                             const T* __restrict__ g, int chunks, int k, int m, int first,
                                             int stride, float* acc, float* ss) {
    constexpr int V = Lanes<T>::N, U = GEMV_UNROLL(M);
    for (int c0 = first; c0 < chunks; c0 += stride * U) {
        uint4 wv[U];
        load_chunks<U>(w, c0, first, stride, chunks, wv);
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + stride * u;
            if (c < chunks) {
                float wf[V], gf[V];
                Lanes<T>::unpack(wv[u], wf);
                Lanes<T>::unpack(reinterpret_cast<const uint4*>(g)[c], gf);
#pragma unroll
                for (int e = 0; e < V; e++) wf[e] *= gf[e];
#pragma unroll
                for (int i = 0; i < M; i++) {
                    if (i < m) {
                        const float4* xr = reinterpret_cast<const float4*>(x + (size_t)i * k + (size_t)c * V);
#pragma unroll
                        for (int q = 0; q < V / 4; q++) {
                            const float4 xv = xr[q];
                            acc[i] = fmaf(wf[4 * q], xv.x, fmaf(wf[4 * q + 1], xv.y, fmaf(wf[4 * q + 2], xv.z, fmaf(wf[4 * q + 3], xv.w, acc[i]))));
                            if (SS) ss[i] += xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
                        }
                    }
                }
            }
        }
    }
}

// The rows' acc[0..M) scaled by their rsqrt(mean(x²) + eps), from ss[0..M) (totals, in the thread
// that row_sum left them in).
template <int M>
__device__ __forceinline__ void apply_norm(float* acc, const float* ss, int k, float eps) {
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] *= rsqrtf(ss[i] / (float)k + eps);
}

// gemv (out stored or added, f32) of norm(x)·g for x the f32 residual rows.
template <typename T, int M>
__device__ void gemv_norm(const T* w0, const T* w1, const T* w2, const T* b0, const T* b1, const T* b2, int n0,
                          int n1, int n, int k, const float* x, const T* gain, float eps, int m, float* out, int add,
                          int split) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.x * (GEMV_WARPS / split) + warp / split;
    const SegRow<T> sr = seg_row(w0, w1, w2, b0, b1, b2, n0, n1, r);
    const T *w = sr.w, *b = sr.b;
    const int rr = sr.r;
    float acc[2 * M];  // dot products, then sums of squares
#pragma unroll
    for (int i = 0; i < 2 * M; i++) acc[i] = 0.0f;
    pdl_trigger();
    if (r < n) {
        row_dot_norm<T, M, true>(reinterpret_cast<const uint4*>(w + (size_t)rr * k), x, gain, k / Lanes<T>::N, k, m,
                                 (warp % split) * 32 + lane, 32 * split, acc, acc + M);
    }
    pdl_wait();
    row_sum<2 * M>(acc, split);
    if (r < n && lane == 0 && warp % split == 0) {
        apply_norm<M>(acc, acc + M, k, eps);
        store_rows<M>(out, n, r, acc, b ? to_f32(b[rr]) : 0.0f, m, add);
    }
}

// glu of norm(x)·g for x the f32 residual rows (warps as in glu; each sums x² over its chunks).
template <typename T, int M>
__device__ void glu_norm(const T* wg, const T* wu, int n, int k, const float* x, const T* gain, float eps, int m,
                         T* act, int split) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, per = 2 * split;
    const int r = blockIdx.x * (GEMV_WARPS / per) + warp / per;
    const bool up = warp % per >= split;
    float acc[2 * M];  // dot products, then sums of squares
#pragma unroll
    for (int i = 0; i < 2 * M; i++) acc[i] = 0.0f;
    pdl_trigger();
    if (r < n) {
        row_dot_norm<T, M, true>(reinterpret_cast<const uint4*>((up ? wu : wg) + (size_t)r * k), x, gain,
                                 k / Lanes<T>::N, k, m, (warp % split) * 32 + lane, 32 * split, acc, acc + M);
    }
    pdl_wait();
    row_sum<2 * M>(acc, split);
    if (lane == 0) apply_norm<M>(acc, acc + M, k, eps);
    glu_out<T, M>(acc, split, r, n, m, act);
}

// q|k|v projection of norm(x)·g with RoPE and the cache write in its epilogue (no per-head norm):
// one block per pair of output dims of a head, two warps per dim; the pair is the RoPE pair
// ((i, i + rot/2), or (2i, 2i + 1) interleaved) for the rotated dims of q and k heads, else two
// neighbouring dims (partial-rotary tails, v heads) passed through. Rows [q; k; v] as in gemv.
template <typename T, int M>
__device__ void qkv_rope_norm(const T* w0, const T* w1, const T* w2, const T* b0, const T* b1, const T* b2, int k,
                              const float* x, const T* gain, float eps, int m, const uint32_t* pos,
                              const uint32_t* slots, const float* inv_freq, T* q_out, T* kc, T* vc, int nh, int nkv,
                              int hd, int rot, int interleaved) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int half_hd = hd / 2, half_rot = rot / 2;
    const int h = blockIdx.x / half_hd, j = blockIdx.x % half_hd;
    const bool rotated = h < nh + nkv && j < half_rot;
    const int da = rotated && !interleaved ? j : 2 * j;
    const int db = rotated && !interleaved ? j + half_rot : 2 * j + 1;
    const int which = warp / 2;  // 0: dim da, 1: dim db
    const int r = h * hd + (which ? db : da);
    const int n0 = nh * hd, n1 = nkv * hd;
    const SegRow<T> sr = seg_row(w0, w1, w2, b0, b1, b2, n0, n1, r);
    const T *w = sr.w, *b = sr.b;
    const int rr = sr.r;
    float acc[2 * M];
#pragma unroll
    for (int i = 0; i < 2 * M; i++) acc[i] = 0.0f;
    pdl_trigger();
    row_dot_norm<T, M, true>(reinterpret_cast<const uint4*>(w + (size_t)rr * k), x, gain, k / Lanes<T>::N, k, m,
                             (warp % 2) * 32 + lane, 64, acc, acc + M);
    pdl_wait();
    row_sum<2 * M>(acc, 2);
    __shared__ float val[2][M];
    if (lane == 0 && warp % 2 == 0) {
        apply_norm<M>(acc, acc + M, k, eps);
        const float bias = b ? to_f32(b[rr]) : 0.0f;
#pragma unroll
        for (int i = 0; i < M; i++) val[which][i] = acc[i] + bias;
    }
    __syncthreads();
    if (threadIdx.x >= m) return;
    const int t = threadIdx.x;  // one thread per token row
    float va = val[0][t], vb = val[1][t];
    if (rotated) {
        float sn, cs;
        sincosf((float)pos[t] * inv_freq[j], &sn, &cs);
        const float a = va * cs - vb * sn;
        vb = vb * cs + va * sn;
        va = a;
    }
    T* dst;
    if (h < nh) dst = q_out + ((size_t)t * nh + h) * hd;
    else if (h < nh + nkv) dst = kc + ((size_t)slots[t] * nkv + (h - nh)) * hd;
    else dst = vc + ((size_t)slots[t] * nkv + (h - nh - nkv)) * hd;
    dst[da] = from_f32<T>(va);
    dst[db] = from_f32<T>(vb);
}

#define NORM_M(SUFFIX, T, M)                                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_norm_m##M##_##SUFFIX(                   \
        const T* w0, const T* w1, const T* w2, const T* b0, const T* b1, const T* b2, int n0, int n1, int n,   \
        int k, const float* x, const T* gain, float eps, int m, float* out, int add, int split) {              \
        gemv_norm<T, M>(w0, w1, w2, b0, b1, b2, n0, n1, n, k, x, gain, eps, m, out, add, split);               \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) glu_norm_m##M##_##SUFFIX(                    \
        const T* wg, const T* wu, int n, int k, const float* x, const T* gain, float eps, int m, T* act,        \
        int split) {                                                                                           \
        glu_norm<T, M>(wg, wu, n, k, x, gain, eps, m, act, split);                                             \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) qkv_rope_norm_m##M##_##SUFFIX(               \
        const T* w0, const T* w1, const T* w2, const T* b0, const T* b1, const T* b2, int k, const float* x,   \
        const T* gain, float eps, int m, const uint32_t* pos, const uint32_t* slots, const float* inv_freq,    \
        T* q_out, T* kc, T* vc, int nh, int nkv, int hd, int rot, int interleaved) {                           \
        qkv_rope_norm<T, M>(w0, w1, w2, b0, b1, b2, k, x, gain, eps, m, pos, slots, inv_freq, q_out, kc, vc,   \
                            nh, nkv, hd, rot, interleaved);                                                    \
    }

#define GEMV_M(SUFFIX, T, M)                                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                              \
        gemv_m##M##_##SUFFIX(const T* w0, const T* w1, const T* w2, const T* b0, const T* b1, const T* b2,     \
                             int n0, int n1, int n, int k, const T* x, int m, float* out, int add, int split) { \
        gemv<T, M>(w0, w1, w2, b0, b1, b2, n0, n1, n, k, x, m, out, add, split);                               \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                              \
        glu_m##M##_##SUFFIX(const T* wg, const T* wu, int n, int k, const T* x, int m, T* act, int split) {    \
        glu<T, M>(wg, wu, n, k, x, m, act, split);                                                             \
    }

// x[i] = table[ids[i]] (f32), one block per row.
template <typename T>
__device__ void embed(const T* table, const uint32_t* ids, float* x, int n) {
    pdl_wait();
    pdl_trigger();
    const size_t i = blockIdx.x;
    const T* row = table + (size_t)ids[i] * n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) x[i * n + j] = to_f32(row[j]);
}

// y[i] = rmsnorm(x[rows ? rows[i] : i]) · w; x in f32 (the residual stream), y in T.
template <typename T>
__device__ void rmsnorm_in(const float* x, const uint32_t* rows, const T* w, T* y, int n, float eps) {
    pdl_wait();
    pdl_trigger();
    const size_t i = blockIdx.x;
    const float* xr = x + (size_t)(rows ? rows[i] : i) * n;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) ss += xr[j] * xr[j];
    const float inv = rsqrtf(block_sum(ss) / (float)n + eps);
    for (int j = threadIdx.x; j < n; j += blockDim.x) y[i * n + j] = from_f32<T>(xr[j] * inv * to_f32(w[j]));
}

// One block per (token, head) of the fused q|k|v row: the head's values (f32) through the optional
// per-head RMSNorm (Qwen3's q_norm / k_norm), then RoPE on the first `rot` dimensions of q and k
// (pairs (i, i + rot/2), or (2i, 2i + 1) interleaved), written as T: q to q_out, k and v to the
// caches at the token's slot (layout [slot, nkv, hd]).
template <typename T>
__device__ void rope_qkv(const float* qkv, const uint32_t* pos, const uint32_t* slots, const float* inv_freq,
                         const T* q_norm, const T* k_norm, float eps, T* q_out, T* kc, T* vc, int nh, int nkv,
                         int hd, int rot, int interleaved) {
    pdl_wait();
    pdl_trigger();
    const int t = blockIdx.x, h = blockIdx.y;
    const bool is_q = h < nh, is_k = !is_q && h < nh + nkv;
    const float* src = qkv + (size_t)t * (nh + 2 * nkv) * hd + (size_t)h * hd;
    __shared__ float s[ROPE_MAX_HD];
    float ss = 0.0f;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        s[d] = src[d];
        ss += s[d] * s[d];
    }
    const T* nw = is_q ? q_norm : is_k ? k_norm : nullptr;
    if (nw) {  // uniform over the block
        const float inv = rsqrtf(block_sum(ss) / (float)hd + eps);
        for (int d = threadIdx.x; d < hd; d += blockDim.x) s[d] = to_f32(from_f32<T>(s[d] * inv * to_f32(nw[d])));
    }
    __syncthreads();
    T* dst;
    if (is_q) dst = q_out + ((size_t)t * nh + h) * hd;
    else if (is_k) dst = kc + ((size_t)slots[t] * nkv + (h - nh)) * hd;
    else dst = vc + ((size_t)slots[t] * nkv + (h - nh - nkv)) * hd;
    const float p = (float)pos[t];
    const int half = rot / 2;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float v = s[d];
        if (!(is_q || is_k) || d >= rot) {
            dst[d] = from_f32<T>(v);
            continue;
        }
        const int i = interleaved ? d / 2 : d % half;
        const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        float sn, cs;
        sincosf(p * inv_freq[i], &sn, &cs);
        v = d == a ? s[a] * cs - s[b] * sn : s[b] * cs + s[a] * sn;
        dst[d] = from_f32<T>(v);
    }
}

#define DECODE(SUFFIX, T)                                                                                       \
    GEMV_M(SUFFIX, T, 1)                                                                                        \
    GEMV_M(SUFFIX, T, 2)                                                                                        \
    GEMV_M(SUFFIX, T, 4)                                                                                        \
    GEMV_M(SUFFIX, T, 8)                                                                                        \
    NORM_M(SUFFIX, T, 1)                                                                                        \
    NORM_M(SUFFIX, T, 2)                                                                                        \
    extern "C" __global__ void embed_##SUFFIX(const T* table, const uint32_t* ids, float* x, int n) {           \
        embed<T>(table, ids, x, n);                                                                             \
    }                                                                                                           \
    extern "C" __global__ void rmsnorm_in_##SUFFIX(const float* x, const uint32_t* rows, const T* w, T* y,      \
                                                   int n, float eps) {                                          \
        rmsnorm_in<T>(x, rows, w, y, n, eps);                                                                   \
    }                                                                                                           \
    extern "C" __global__ void rope_qkv_##SUFFIX(const float* qkv, const uint32_t* pos, const uint32_t* slots,  \
                                                 const float* inv_freq, const T* q_norm, const T* k_norm,       \
                                                 float eps, T* q_out, T* kc, T* vc, int nh, int nkv, int hd,    \
                                                 int rot, int interleaved) {                                    \
        rope_qkv<T>(qkv, pos, slots, inv_freq, q_norm, k_norm, eps, q_out, kc, vc, nh, nkv, hd, rot,            \
                    interleaved);                                                                               \
    }
INFER_FOR_EACH_DTYPE(DECODE)

// ---- Attention for decode steps ----
//
// One block per (row, KV head, partition of part_len positions, a multiple of 32): the block serves
// the G ≤ ATT_MAX_G query heads that share the KV head, so each key and value row is read once for
// all of them. Each warp takes chunks of 32 positions: a lane per position for the scores (the lane
// reads its key row, 16 bytes at a time, against the G queries held in shared memory), an online
// softmax per chunk, then a lane per head_dim slice for the values (each position's value row read
// once, coalesced).
// Partials (max, sum, weighted values) per (row, head, partition) as attention.cu's, merged by its
// attention_combine; with one partition the output is written directly. head_dim a multiple of 32,
// at most 256 (checked by the host).
#define ATT_WARPS 4
#define ATT_MAX_G 8
#define ATT_MAX_HD 256

template <typename T>
__device__ void attention_decode(const T* q, const T* kc, const T* vc, const uint32_t* tables, const uint32_t* row_table,
                                 const uint32_t* row_len, float* part_m, float* part_l, float* part_acc, T* o,
                                 int num_heads, int num_kv_heads, int head_dim, int block_size, float scale,
                                 float softcap, int window, int parts, int part_len) {
    constexpr int V = Lanes<T>::N;
    pdl_wait();
    pdl_trigger();
    const int row = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g_count = num_heads / num_kv_heads;
    const int len = row_len[row];
    const int first = window > 0 && len > window ? len - window : 0;
    const int p0 = max(first, part * part_len), p1 = min(len, (part + 1) * part_len);
    const uint32_t* table = tables + row_table[row];
    const size_t kv_row = (size_t)num_kv_heads * head_dim;
    const int epl = head_dim / 32;  // value dims per lane

    __shared__ float qs[ATT_MAX_G][ATT_MAX_HD];        // scaled queries
    __shared__ float ps[ATT_WARPS][ATT_MAX_G][32];     // a chunk's probabilities
    for (int i = threadIdx.x; i < g_count * head_dim; i += blockDim.x) {
        const int g = i / head_dim, d = i % head_dim;
        qs[g][d] = to_f32(q[((size_t)row * num_heads + kvh * g_count + g) * head_dim + d]) * scale;
    }
    __syncthreads();

    float m[ATT_MAX_G], l[ATT_MAX_G], acc[ATT_MAX_G][ATT_MAX_HD / 32];
#pragma unroll
    for (int g = 0; g < ATT_MAX_G; g++) {
        m[g] = -CUDART_INF_F;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < ATT_MAX_HD / 32; e++) acc[g][e] = 0.0f;
    }
    for (int c0 = p0 + warp * 32; c0 < p1; c0 += ATT_WARPS * 32) {
        const int p = c0 + lane;
        const bool valid = p < p1;
        size_t slot = 0;
        float s[ATT_MAX_G];
#pragma unroll
        for (int g = 0; g < ATT_MAX_G; g++) s[g] = 0.0f;
        if (valid) {
            slot = (size_t)table[p / block_size] * block_size + p % block_size;
            const uint4* kr = reinterpret_cast<const uint4*>(kc + slot * kv_row + (size_t)kvh * head_dim);
#pragma unroll 4
            for (int c = 0; c < head_dim / V; c++) {
                float kf[V];
                Lanes<T>::unpack(kr[c], kf);
#pragma unroll
                for (int g = 0; g < ATT_MAX_G; g++) {
                    if (g < g_count) {
#pragma unroll
                        for (int e = 0; e < V; e++) s[g] = fmaf(qs[g][c * V + e], kf[e], s[g]);
                    }
                }
            }
        }
#pragma unroll
        for (int g = 0; g < ATT_MAX_G; g++) {
            if (g >= g_count) continue;
            float sg = s[g];
            if (softcap > 0.0f) sg = softcap * tanhf(sg / softcap);  // Gemma 2's logit soft-capping
            sg = valid ? sg : -CUDART_INF_F;
            const float m_new = fmaxf(m[g], warp_max(sg));
            const float corr = __expf(m[g] - m_new);
            const float pr = valid ? __expf(sg - m_new) : 0.0f;
            l[g] = l[g] * corr + warp_sum(pr);
            m[g] = m_new;
#pragma unroll
            for (int e = 0; e < ATT_MAX_HD / 32; e++) acc[g][e] *= corr;
            ps[warp][g][lane] = pr;
        }
        __syncwarp();
        const int n = min(32, p1 - c0);
        for (int j = 0; j < n; j++) {
            const size_t sj = __shfl_sync(0xffffffffu, slot, j);
            const T* vr = vc + sj * kv_row + (size_t)kvh * head_dim + lane * epl;
            float vf[ATT_MAX_HD / 32];
#pragma unroll
            for (int e = 0; e < ATT_MAX_HD / 32; e++) vf[e] = e < epl ? to_f32(vr[e]) : 0.0f;
#pragma unroll
            for (int g = 0; g < ATT_MAX_G; g++) {
                if (g < g_count) {
                    const float pj = ps[warp][g][j];
#pragma unroll
                    for (int e = 0; e < ATT_MAX_HD / 32; e++) acc[g][e] = fmaf(pj, vf[e], acc[g][e]);
                }
            }
        }
        __syncwarp();
    }
    // Merge the warps' states per head (shared memory reused: sacc holds one head at a time).
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS], sacc[ATT_WARPS][ATT_MAX_HD];
#pragma unroll
    for (int g = 0; g < ATT_MAX_G; g++) {  // unrolled: m, l and acc stay in registers
        if (g >= g_count) break;
        __syncthreads();
        if (lane == 0) {
            sm[warp] = m[g];
            sl[warp] = l[g];
        }
#pragma unroll
        for (int e = 0; e < ATT_MAX_HD / 32; e++) {
            if (e < epl) sacc[warp][lane * epl + e] = acc[g][e];
        }
        __syncthreads();
        float mt = -CUDART_INF_F;
        for (int w = 0; w < ATT_WARPS; w++) mt = fmaxf(mt, sm[w]);
        float lt = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) lt += sm[w] == -CUDART_INF_F ? 0.0f : sl[w] * __expf(sm[w] - mt);
        const int head = kvh * g_count + g;
        const size_t out = ((size_t)row * num_heads + head) * parts + part;
        if (o) {
            const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
            for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
                float a = 0.0f;
                for (int w = 0; w < ATT_WARPS; w++) a += sm[w] == -CUDART_INF_F ? 0.0f : sacc[w][d] * __expf(sm[w] - mt);
                o[((size_t)row * num_heads + head) * head_dim + d] = from_f32<T>(a * inv);
            }
        } else {
            if (threadIdx.x == 0) {
                part_m[out] = mt;
                part_l[out] = lt;
            }
            for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
                float a = 0.0f;
                for (int w = 0; w < ATT_WARPS; w++) a += sm[w] == -CUDART_INF_F ? 0.0f : sacc[w][d] * __expf(sm[w] - mt);
                part_acc[out * head_dim + d] = a;
            }
        }
    }
}

#define ATTENTION_DECODE(SUFFIX, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attention_decode_##SUFFIX(                      \
        const T* q, const T* kc, const T* vc, const uint32_t* tables, const uint32_t* row_table,                \
        const uint32_t* row_len, float* part_m, float* part_l, float* part_acc, T* o, int num_heads,            \
        int num_kv_heads, int head_dim, int block_size, float scale, float softcap, int window, int parts,      \
        int part_len) {                                                                                         \
        attention_decode<T>(q, kc, vc, tables, row_table, row_len, part_m, part_l, part_acc, o, num_heads,      \
                            num_kv_heads, head_dim, block_size, scale, softcap, window, parts, part_len);       \
    }
INFER_FOR_EACH_DTYPE(ATTENTION_DECODE)

// Attention over the paged KV cache, the same layout and block tables as the CPU kernel:
// per layer, K and V are [num_blocks, block_size, num_kv_heads, head_dim]; token t of a sequence sits
// in block table[t / block_size] at offset t % block_size.
//
// The query rows of one forward pass are a ragged batch (prefill chunks and decode steps mixed).
// Per row the host gives the number of keys it sees (its position + 1, causal) and where its
// sequence's block table starts in one flat array of tables.
//
// Flash-decoding: the keys a row sees are cut into partitions of PART positions; one thread block
// per (row, head, partition) keeps a running max, sum and weighted V in registers (online softmax,
// one pass over K and V), its warps splitting the partition; `attention_combine` merges the
// partitions (with one partition and `o` given, the partial pass writes the output itself). Long
// contexts thus spread over many blocks even for one decode row, and a prefill row's partitions run
// in parallel. Grouped-query attention: head h reads KV head h / group.
#include "common.cuh"
#include <math_constants.h>

#define PART 256
#define WARPS 4
#define MAX_HD 256
#define EPL (MAX_HD / 32)  // head-dim elements per lane (at most)

// cache[slots[t]] = src[t] for each token row (K and V are written by two launches).
template <typename T>
__device__ void write_cache(const T* src, const uint32_t* slots, T* cache, int tokens, int row) {
    const size_t total = (size_t)tokens * row;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / row, e = i % row;
        cache[(size_t)slots[t] * row + e] = src[i];
    }
}

// Partial results per (row, head, partition): m = max score, l = Σ exp(score − m),
// acc = Σ exp(score − m) · v (head_dim floats).
template <typename T>
__device__ void attention_partial(const T* q, const T* kc, const T* vc, const uint32_t* tables,
                                  const uint32_t* row_table, const uint32_t* row_len, float* part_m,
                                  float* part_l, float* part_acc, int num_heads, int num_kv_heads,
                                  int head_dim, int block_size, float scale, float softcap, int window, int parts,
                                  T* o) {
    const int row = blockIdx.x, head = blockIdx.y, part = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int len = row_len[row];
    const int first = window > 0 && len > window ? len - window : 0;
    const int p0 = max(first, part * PART), p1 = min(len, (part + 1) * PART);
    const size_t out = ((size_t)row * num_heads + head) * parts + part;

    const int kvh = head / (num_heads / num_kv_heads);
    const uint32_t* table = tables + row_table[row];
    const size_t kv_row = (size_t)num_kv_heads * head_dim;

    float qr[EPL], acc[EPL];
#pragma unroll
    for (int e = 0; e < EPL; e++) {
        const int d = lane + 32 * e;
        qr[e] = d < head_dim ? to_f32(q[((size_t)row * num_heads + head) * head_dim + d]) * scale : 0.0f;
        acc[e] = 0.0f;
    }
    float m = -CUDART_INF_F, l = 0.0f;
    // Warp w takes positions p0 + w, p0 + w + WARPS, ...
    for (int p = p0 + warp; p < p1; p += WARPS) {
        const size_t slot = (size_t)table[p / block_size] * block_size + p % block_size;
        const T* kr = kc + slot * kv_row + (size_t)kvh * head_dim;
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            const int d = lane + 32 * e;
            if (d < head_dim) s += qr[e] * to_f32(kr[d]);
        }
        s = warp_sum(s);
        if (softcap > 0.0f) s = softcap * tanhf(s / softcap);  // Gemma 2's logit soft-capping
        const float m_new = fmaxf(m, s);
        const float corr = __expf(m - m_new), w = __expf(s - m_new);
        l = l * corr + w;
        const T* vr = vc + slot * kv_row + (size_t)kvh * head_dim;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            const int d = lane + 32 * e;
            acc[e] = acc[e] * corr + (d < head_dim ? w * to_f32(vr[d]) : 0.0f);
        }
        m = m_new;
    }
    // Merge the warps' running states.
    __shared__ float sm[WARPS], sl[WARPS], sacc[WARPS][MAX_HD];
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
#pragma unroll
    for (int e = 0; e < EPL; e++) {
        const int d = lane + 32 * e;
        if (d < head_dim) sacc[warp][d] = acc[e];
    }
    __syncthreads();
    float mt = -CUDART_INF_F;
    for (int w = 0; w < WARPS; w++) mt = fmaxf(mt, sm[w]);
    float lt = 0.0f;
    for (int w = 0; w < WARPS; w++) lt += sm[w] == -CUDART_INF_F ? 0.0f : sl[w] * __expf(sm[w] - mt);
    if (o) {
        // One partition (parts == 1): the normalized output directly, no combine pass.
        const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float a = 0.0f;
            for (int w = 0; w < WARPS; w++) a += sm[w] == -CUDART_INF_F ? 0.0f : sacc[w][d] * __expf(sm[w] - mt);
            o[((size_t)row * num_heads + head) * head_dim + d] = from_f32<T>(a * inv);
        }
        return;
    }
    if (threadIdx.x == 0) {
        part_m[out] = mt;
        part_l[out] = lt;
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < WARPS; w++) a += sm[w] == -CUDART_INF_F ? 0.0f : sacc[w][d] * __expf(sm[w] - mt);
        part_acc[out * head_dim + d] = a;
    }
}

// out[row, head] = Σ_p e^(m_p − M) acc_p / Σ_p e^(m_p − M) l_p. One block per (row, head).
template <typename T>
__device__ void attention_combine(const float* part_m, const float* part_l, const float* part_acc, T* o,
                                  int num_heads, int head_dim, int parts) {
    const int row = blockIdx.x, head = blockIdx.y;
    const size_t base = ((size_t)row * num_heads + head) * parts;
    float mt = -CUDART_INF_F;
    for (int p = 0; p < parts; p++) mt = fmaxf(mt, part_m[base + p]);
    float lt = 0.0f;
    for (int p = 0; p < parts; p++) lt += part_m[base + p] == -CUDART_INF_F ? 0.0f : part_l[base + p] * __expf(part_m[base + p] - mt);
    const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.0f;
        for (int p = 0; p < parts; p++) {
            const float mp = part_m[base + p];
            if (mp != -CUDART_INF_F) a += part_acc[(base + p) * head_dim + d] * __expf(mp - mt);
        }
        o[((size_t)row * num_heads + head) * head_dim + d] = from_f32<T>(a * inv);
    }
}

#define ATTENTION(SUFFIX, T)                                                                                  \
    extern "C" __global__ void write_cache_##SUFFIX(const T* src, const uint32_t* slots, T* cache, int tokens, \
                                                    int row) {                                                \
        write_cache<T>(src, slots, cache, tokens, row);                                                       \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) attention_partial_##SUFFIX(                      \
        const T* q, const T* kc, const T* vc, const uint32_t* tables, const uint32_t* row_table,              \
        const uint32_t* row_len, float* part_m, float* part_l, float* part_acc, int num_heads,                \
        int num_kv_heads, int head_dim, int block_size, float scale, float softcap, int window, int parts,    \
        T* o) {                                                                                               \
        attention_partial<T>(q, kc, vc, tables, row_table, row_len, part_m, part_l, part_acc, num_heads,      \
                             num_kv_heads, head_dim, block_size, scale, softcap, window, parts, o);           \
    }                                                                                                         \
    extern "C" __global__ void attention_combine_##SUFFIX(const float* part_m, const float* part_l,           \
                                                          const float* part_acc, T* o, int num_heads,         \
                                                          int head_dim, int parts) {                          \
        attention_combine<T>(part_m, part_l, part_acc, o, num_heads, head_dim, parts);                        \
    }
INFER_FOR_EACH_DTYPE(ATTENTION)

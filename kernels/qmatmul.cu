// Quantized matrix-vector products for decode and small batches: y[t, r] = Σ_k x[t, k] · W[r, k] with
// W in GGUF blocks of 32 (Q8_0: f16 d + 32 int8; Q4_0: f16 d + 16 bytes of nibbles, value = d·(q − 8)),
// read in place as the file stores them. Activations are first quantized to 8-bit blocks
// (`quantize_q8`), then each warp computes one weight row for up to MAX_M tokens with integer dot
// products (dp4a), one lane per block.
#include "common.cuh"

#define QK 32
#define MAX_M 8

// One warp per block of 32 activations: int8 values, scale d and d·Σq (for the Q4_0 offset).
template <typename T>
__device__ void quantize_q8(const T* x, int8_t* xq, float* xd, float* xs, size_t blocks) {
    const size_t b = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (b >= blocks) return;
    const float v = to_f32(x[b * QK + lane]);
    const float amax = warp_max(fabsf(v));
    // v · (1/d), rounded to nearest even: the CPU kernels' formula, so both give the same 8-bit values.
    const float d = amax / 127.0f;
    const float id = d > 0.0f ? 1.0f / d : 0.0f;
    const int q = __float2int_rn(v * id);
    xq[b * QK + lane] = (int8_t)q;
    const float s = warp_sum((float)q);
    if (lane == 0) { xd[b] = d; xs[b] = d * s; }
}

// Four bytes of a block that is only 2-byte aligned.
__device__ __forceinline__ int load_i32_b2(const uint8_t* p) {
    const uint16_t* h = (const uint16_t*)p;
    return (int)h[0] | ((int)h[1] << 16);
}

template <typename T, int Q4>
__device__ void gemv(const uint8_t* w, const int8_t* xq, const float* xd, const float* xs, T* y, int rows,
                     int cols, int m) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int nb = cols / QK;
    const int bb = Q4 ? 18 : 34;
    const uint8_t* wr = w + (size_t)row * nb * bb;
    float acc[MAX_M];
#pragma unroll
    for (int t = 0; t < MAX_M; t++) acc[t] = 0.0f;
    for (int b = lane; b < nb; b += 32) {
        const uint8_t* blk = wr + (size_t)b * bb;
        const float d = __half2float(*(const __half*)blk);
        int wq[8];
#pragma unroll
        for (int i = 0; i < (Q4 ? 4 : 8); i++) wq[i] = load_i32_b2(blk + 2 + 4 * i);
#pragma unroll
        for (int t = 0; t < MAX_M; t++) {
            if (t >= m) break;
            const size_t xb = (size_t)t * nb + b;
            const int* xi = (const int*)(xq + xb * QK);
            int dot = 0;
            if (Q4) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    dot = __dp4a(wq[i] & 0x0F0F0F0F, xi[i], dot);
                    dot = __dp4a((wq[i] >> 4) & 0x0F0F0F0F, xi[i + 4], dot);
                }
                acc[t] += d * (xd[xb] * (float)dot - 8.0f * xs[xb]);
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++) dot = __dp4a(wq[i], xi[i], dot);
                acc[t] += d * xd[xb] * (float)dot;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MAX_M; t++) {
        if (t >= m) break;
        const float s = warp_sum(acc[t]);
        if (lane == 0) y[(size_t)t * rows + row] = from_f32<T>(s);
    }
}

#define QMATMUL(SUFFIX, T)                                                                                  \
    extern "C" __global__ void quantize_q8_##SUFFIX(const T* x, int8_t* xq, float* xd, float* xs,           \
                                                    size_t blocks) {                                        \
        quantize_q8<T>(x, xq, xd, xs, blocks);                                                              \
    }                                                                                                       \
    extern "C" __global__ void gemv_q8_0_##SUFFIX(const uint8_t* w, const int8_t* xq, const float* xd,      \
                                                  const float* xs, T* y, int rows, int cols, int m) {       \
        gemv<T, 0>(w, xq, xd, xs, y, rows, cols, m);                                                        \
    }                                                                                                       \
    extern "C" __global__ void gemv_q4_0_##SUFFIX(const uint8_t* w, const int8_t* xq, const float* xd,      \
                                                  const float* xs, T* y, int rows, int cols, int m) {       \
        gemv<T, 1>(w, xq, xd, xs, y, rows, cols, m);                                                        \
    }
INFER_FOR_EACH_DTYPE(QMATMUL)

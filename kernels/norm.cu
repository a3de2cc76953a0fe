// RMSNorm, alone or fused with the residual add that precedes it in a decoder layer.
//   rmsnorm:     y = x / sqrt(mean(x²) + eps) · w
//   add_rmsnorm: s = x + r (written to `sum`, the new residual stream), y = rmsnorm(s)
// One thread block per row; statistics in f32 whatever the storage type.
#include "common.cuh"

template <typename T>
__device__ void rmsnorm_row(const T* x, const T* r, T* sum, const T* w, T* y, int n, float eps) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = to_f32(x[i]);
        if (r) {
            v += to_f32(r[i]);
            const T s = from_f32<T>(v);
            sum[i] = s;
            v = to_f32(s);  // normalize what the residual stream holds
        }
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / (float)n + eps);
    const T* src = r ? sum : x;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        y[i] = from_f32<T>(to_f32(src[i]) * inv * to_f32(w[i]));
    }
}

#define RMSNORM(SUFFIX, T)                                                                            \
    extern "C" __global__ void rmsnorm_##SUFFIX(const T* x, const T* w, T* y, int n, float eps) {     \
        const size_t row = blockIdx.x;                                                                \
        rmsnorm_row<T>(x + row * n, nullptr, nullptr, w, y + row * n, n, eps);                        \
    }                                                                                                 \
    extern "C" __global__ void add_rmsnorm_##SUFFIX(const T* x, const T* r, T* sum, const T* w, T* y, \
                                                    int n, float eps) {                               \
        const size_t row = blockIdx.x;                                                                \
        rmsnorm_row<T>(x + row * n, r + row * n, sum + row * n, w, y + row * n, n, eps);              \
    }
INFER_FOR_EACH_DTYPE(RMSNORM)

// SiLU(gate) · up, the gated MLP activation. Gate and up may be two tensors or the two halves of a
// fused gate_up projection: row r of gate starts at r·gate_stride, of up at r·up_stride.
#include "common.cuh"

template <typename T>
__device__ void silu_mul(const T* gate, const T* up, T* out, int rows, int n, int gate_stride, int up_stride) {
    const size_t total = (size_t)rows * n;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / n, c = i % n;
        const float g = to_f32(gate[r * gate_stride + c]);
        const float u = to_f32(up[r * up_stride + c]);
        out[i] = from_f32<T>(g / (1.0f + expf(-g)) * u);
    }
}

#define SILU_MUL(SUFFIX, T)                                                                       \
    extern "C" __global__ void silu_mul_##SUFFIX(const T* gate, const T* up, T* out, int rows, int n, \
                                                 int gate_stride, int up_stride) {                \
        silu_mul<T>(gate, up, out, rows, n, gate_stride, up_stride);                              \
    }
INFER_FOR_EACH_DTYPE(SILU_MUL)

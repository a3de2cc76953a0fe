// Rotary position embedding: y = rope(x) for x = [tokens, heads, head_dim] (y may be x). Angles are computed
// in f32 from each token's position and the layer's inverse frequencies (which carry any rope
// scaling), on the first `rot_dim` dimensions. Pairs are (i, i + rot_dim/2) ("neox", Llama in HF
// layout) or (2i, 2i + 1) (interleaved, GPT-J / GGUF Llama before permutation).
#include "common.cuh"

template <typename T>
__device__ void rope(const T* x, T* y, const uint32_t* pos, const float* inv_freq, int tokens, int heads, int head_dim,
                     int rot_dim, int interleaved) {
    const int half = rot_dim / 2;
    const size_t total = (size_t)tokens * heads * half;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int p = i % half;
        const size_t th = i / half;  // token · heads + head
        const size_t t = th / heads;
        float s, c;
        sincosf((float)pos[t] * inv_freq[p], &s, &c);
        const T* row = x + th * head_dim;
        T* out = y + th * head_dim;
        const int a = interleaved ? 2 * p : p;
        const int b = interleaved ? 2 * p + 1 : p + half;
        const float x0 = to_f32(row[a]), x1 = to_f32(row[b]);
        out[a] = from_f32<T>(x0 * c - x1 * s);
        out[b] = from_f32<T>(x1 * c + x0 * s);
    }
}

#define ROPE(SUFFIX, T)                                                                                 \
    extern "C" __global__ void rope_##SUFFIX(const T* x, T* y, const uint32_t* pos, const float* inv_freq, int tokens, \
                                             int heads, int head_dim, int rot_dim, int interleaved) {   \
        rope<T>(x, y, pos, inv_freq, tokens, heads, head_dim, rot_dim, interleaved);                       \
    }
INFER_FOR_EACH_DTYPE(ROPE)

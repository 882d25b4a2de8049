/* Rotary position embedding in place, "rotate-half" layout (Llama / Hugging Face):
 *   x'[j]        = x[j] cos(a) - x[j+d/2] sin(a)
 *   x'[j + d/2]  = x[j+d/2] cos(a) + x[j] sin(a),   a = angle(position, j), j < d/2
 * `sign` = -1 rotates by -a (the backward pass: a rotation's transpose is its inverse).
 * One thread per (token, head, j): reads and writes each element once; the cos/sin tables
 * [positions, d/2] (f32) are small and stay in cache.
 */
template <typename T>
__device__ void rope(T* x, const int* positions, const float* cos_t, const float* sin_t, int tokens, int heads,
                     int head_dim, float sign) {
    int half = head_dim / 2;
    u64 total = (u64)tokens * heads * half;
    for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (u64)gridDim.x * blockDim.x) {
        int j = (int)(idx % half);
        u64 th = idx / half; /* token * heads + head */
        int token = (int)(th / heads);
        int p = positions[token];
        float c = cos_t[(u64)p * half + j];
        float s = sign * sin_t[(u64)p * half + j];
        T* h = x + th * head_dim;
        float a = load_f32(h[j]), b = load_f32(h[j + half]);
        h[j] = store_f32<T>(a * c - b * s);
        h[j + half] = store_f32<T>(b * c + a * s);
    }
}

#define ROPE_KERNELS(S, T)                                                                                   \
    extern "C" __global__ void rope_##S(T* x, const int* positions, const float* cos_t, const float* sin_t, \
                                        int tokens, int heads, int head_dim, float sign) {                   \
        rope<T>(x, positions, cos_t, sin_t, tokens, heads, head_dim, sign);                                  \
    }
FOR_EACH_DTYPE(ROPE_KERNELS)

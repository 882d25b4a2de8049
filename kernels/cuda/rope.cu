/* Rotary position embedding, "rotate-half" layout (Llama / Hugging Face):
 *   y[j]        = x[j] cos(a) - x[j+d/2] sin(a)
 *   y[j + d/2]  = x[j+d/2] cos(a) + x[j] sin(a),   a = angle(position, j), j < d/2
 * `sign` = -1 rotates by -a (the backward pass: a rotation's transpose is its inverse).
 *   rope_<t>:            in place (y = x).
 *   rope_from_f32_<t>:   x f32 into y of dtype t: attention backward's f32 dQ accumulator rotated
 *                        back and rounded in one pass (per bf16 element 4 bytes read and 2 written,
 *                        against 10 for a cast pass and then an in-place rotation).
 * One thread per (token, head, 8 consecutive j) when d/2 is a multiple of 8 (16-byte accesses,
 * load8/store8), else per (token, head, j): each element read and written once; the cos/sin tables
 * [positions, d/2] (f32) are small and stay in cache.
 */
template <typename S, typename T>
__device__ void rope(const S* x, T* y, const int* positions, const float* cos_t, const float* sin_t, int tokens,
                     int heads, int head_dim, float sign) {
    int half = head_dim / 2;
    if (half % 8 == 0 && aligned16(x) && aligned16(y) && aligned16(cos_t) && aligned16(sin_t)) {
        int per_head = half / 8;
        u64 total = (u64)tokens * heads * per_head;
        for (u64 idx = THREAD_INDEX; idx < total; idx += GRID_STRIDE) {
            int j0 = (int)(idx % per_head) * 8;
            u64 th = idx / per_head; /* token * heads + head */
            int p = positions[th / heads];
            float c[8], s[8], a[8], b[8];
            load8(cos_t, ((u64)p * half + j0) / 8, c);
            load8(sin_t, ((u64)p * half + j0) / 8, s);
            u64 lo = (th * head_dim + j0) / 8, hi = lo + half / 8;
            load8(x, lo, a);
            load8(x, hi, b);
            float ra[8], rb[8];
            for (int j = 0; j < 8; j++) {
                float sn = sign * s[j];
                ra[j] = a[j] * c[j] - b[j] * sn;
                rb[j] = b[j] * c[j] + a[j] * sn;
            }
            store8(y, lo, ra);
            store8(y, hi, rb);
        }
        return;
    }
    u64 total = (u64)tokens * heads * half;
    for (u64 idx = THREAD_INDEX; idx < total; idx += GRID_STRIDE) {
        int j = (int)(idx % half);
        u64 th = idx / half; /* token * heads + head */
        int token = (int)(th / heads);
        int p = positions[token];
        float c = cos_t[(u64)p * half + j];
        float s = sign * sin_t[(u64)p * half + j];
        const S* h = x + th * head_dim;
        T* out = y + th * head_dim;
        float a = load_f32(h[j]), b = load_f32(h[j + half]);
        out[j] = store_f32<T>(a * c - b * s);
        out[j + half] = store_f32<T>(b * c + a * s);
    }
}

#define ROPE_KERNELS(S, T)                                                                                   \
    extern "C" __global__ void rope_##S(T* x, const int* positions, const float* cos_t, const float* sin_t, \
                                        int tokens, int heads, int head_dim, float sign) {                   \
        rope<T, T>(x, x, positions, cos_t, sin_t, tokens, heads, head_dim, sign);                            \
    }                                                                                                        \
    extern "C" __global__ void rope_from_f32_##S(const float* x, T* y, const int* positions,                 \
                                                 const float* cos_t, const float* sin_t, int tokens,         \
                                                 int heads, int head_dim, float sign) {                      \
        rope<float, T>(x, y, positions, cos_t, sin_t, tokens, heads, head_dim, sign);                        \
    }
FOR_EACH_DTYPE(ROPE_KERNELS)

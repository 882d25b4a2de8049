/* SwiGLU, element-wise over [N, inter]:
 *   forward:  out = silu(g) * u,  silu(g) = g * sigmoid(g)
 *   backward: dg = dout * u * s * (1 + g (1 - s)),  du = dout * g * s,  s = sigmoid(g),
 *             and out again (the forward's expression, so its bits) in dout's place: the down
 *             projection's dA reads it, and the backward need not keep or recompute it.
 * Pure streaming: forward reads 2 and writes 1 element, backward reads 3 and writes 3, 8 elements
 * (16 bytes of bf16) per access in a grid-stride loop (load8/store8), single elements for a tail.
 */
__device__ __forceinline__ float sigmoidf(float g) { return 1.0f / (1.0f + __expf(-g)); }

template <typename T>
__device__ void swiglu_forward(const T* gate, const T* up, T* out, u64 n) {
    u64 chunks = aligned16(gate) && aligned16(up) && aligned16(out) ? n / 8 : 0;
    for (u64 c = THREAD_INDEX; c < chunks; c += GRID_STRIDE) {
        float g[8], u[8], o[8];
        load8(gate, c, g);
        load8(up, c, u);
        for (int j = 0; j < 8; j++) o[j] = g[j] * sigmoidf(g[j]) * u[j];
        store8(out, c, o);
    }
    for (u64 i = chunks * 8 + THREAD_INDEX; i < n; i += GRID_STRIDE) {
        float g = load_f32(gate[i]);
        out[i] = store_f32<T>(g * sigmoidf(g) * load_f32(up[i]));
    }
}

template <typename T>
__device__ void swiglu_backward(T* dout, T* gate, T* up, u64 n) {
    bool vec = aligned16(dout) && aligned16(gate) && aligned16(up);
    u64 chunks = vec ? n / 8 : 0;
    for (u64 c = THREAD_INDEX; c < chunks; c += GRID_STRIDE) {
        float g[8], u[8], d[8], dg[8], du[8], o[8];
        load8(gate, c, g);
        load8(up, c, u);
        load8(dout, c, d);
        for (int j = 0; j < 8; j++) {
            float s = sigmoidf(g[j]);
            du[j] = d[j] * g[j] * s;
            dg[j] = d[j] * u[j] * s * (1.0f + g[j] * (1.0f - s));
            o[j] = g[j] * s * u[j];
        }
        store8(up, c, du);
        store8(gate, c, dg);
        store8(dout, c, o);
    }
    for (u64 i = chunks * 8 + THREAD_INDEX; i < n; i += GRID_STRIDE) {
        float g = load_f32(gate[i]), u = load_f32(up[i]), d = load_f32(dout[i]);
        float s = sigmoidf(g);
        up[i] = store_f32<T>(d * g * s);
        gate[i] = store_f32<T>(d * u * s * (1.0f + g * (1.0f - s)));
        dout[i] = store_f32<T>(g * s * u);
    }
}
#define SWIGLU_KERNELS(S, T)                                                                               \
    extern "C" __global__ void swiglu_forward_##S(const T* gate, const T* up, T* out, u64 n) {            \
        swiglu_forward<T>(gate, up, out, n);                                                              \
    }                                                                                                     \
    extern "C" __global__ void swiglu_backward_##S(T* dout, T* gate, T* up, u64 n) {                     \
        swiglu_backward<T>(dout, gate, up, n);                                                            \
    }
FOR_EACH_DTYPE(SWIGLU_KERNELS)

/* SwiGLU, element-wise over [N, inter]:
 *   forward:  out = silu(g) * u,  silu(g) = g * sigmoid(g)
 *   backward: dg = dout * u * s * (1 + g (1 - s)),  du = dout * g * s,  s = sigmoid(g)
 * Pure streaming: forward reads 2 and writes 1 element, backward reads 3 and writes 2; a
 * grid-stride loop keeps every thread busy whatever N is.
 */
__device__ __forceinline__ float sigmoidf(float g) { return 1.0f / (1.0f + __expf(-g)); }

template <typename T>
__device__ void swiglu_forward(const T* gate, const T* up, T* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float g = load_f32(gate[i]);
        out[i] = store_f32<T>(g * sigmoidf(g) * load_f32(up[i]));
    }
}

template <typename T>
__device__ void swiglu_backward(const T* dout, const T* gate, const T* up, T* dgate, T* dup, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float g = load_f32(gate[i]), u = load_f32(up[i]), d = load_f32(dout[i]);
        float s = sigmoidf(g);
        dup[i] = store_f32<T>(d * g * s);
        dgate[i] = store_f32<T>(d * u * s * (1.0f + g * (1.0f - s)));
    }
}

#define SWIGLU_KERNELS(S, T)                                                                               \
    extern "C" __global__ void swiglu_forward_##S(const T* gate, const T* up, T* out, u64 n) {            \
        swiglu_forward<T>(gate, up, out, n);                                                              \
    }                                                                                                     \
    extern "C" __global__ void swiglu_backward_##S(const T* dout, const T* gate, const T* up, T* dgate,   \
                                                   T* dup, u64 n) {                                       \
        swiglu_backward<T>(dout, gate, up, dgate, dup, n);                                                \
    }
FOR_EACH_DTYPE(SWIGLU_KERNELS)

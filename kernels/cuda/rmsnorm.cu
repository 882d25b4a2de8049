/* RMSNorm forward and backward, one block per row of `hidden` elements.
 *   forward:  r = 1/sqrt(mean(x^2) + eps),  y = w * (x * r),  rstd[row] = r (f32)
 *   backward: dx += r * (w*dy - xhat * mean(w*dy*xhat)),  xhat = x * r   (adds into dx)
 * Memory traffic: forward reads x once and writes y once (w stays in L1/L2); backward reads dy, x
 * and dx once and writes dx once. The row is read twice from cache (reduction, then output), which
 * keeps the kernel simple and still bandwidth-bound for hidden <= 8192.
 */
template <typename T>
__device__ void rms_norm_forward(const T* x, const T* w, T* y, float* rstd, int hidden, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (u64)blockIdx.x * hidden;
    T* yr = y + (u64)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = load_f32(xr[i]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float r = rsqrtf(ss / hidden + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        yr[i] = store_f32<T>(load_f32(w[i]) * (load_f32(xr[i]) * r));
    }
}

template <typename T>
__device__ void rms_norm_backward(const T* dy, const T* x, const T* w, const float* rstd, T* dx, int hidden) {
    __shared__ float scratch[32];
    u64 base = (u64)blockIdx.x * hidden;
    float r = rstd[blockIdx.x];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        acc += load_f32(dy[base + i]) * load_f32(w[i]) * load_f32(x[base + i]) * r;
    }
    float mean_gx = block_sum(acc, scratch) / hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float xh = load_f32(x[base + i]) * r;
        float g = load_f32(w[i]) * load_f32(dy[base + i]);
        dx[base + i] = store_f32<T>(load_f32(dx[base + i]) + r * (g - xh * mean_gx));
    }
}

#define RMSNORM_KERNELS(S, T)                                                                             \
    extern "C" __global__ void rms_norm_forward_##S(const T* x, const T* w, T* y, float* rstd, int hidden, \
                                                    float eps) {                                          \
        rms_norm_forward<T>(x, w, y, rstd, hidden, eps);                                                  \
    }                                                                                                     \
    extern "C" __global__ void rms_norm_backward_##S(const T* dy, const T* x, const T* w, const float* rstd, \
                                                     T* dx, int hidden) {                                 \
        rms_norm_backward<T>(dy, x, w, rstd, dx, hidden);                                                 \
    }
FOR_EACH_DTYPE(RMSNORM_KERNELS)

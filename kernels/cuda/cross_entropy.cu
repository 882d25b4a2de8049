/* The softmax step of the chunked LM head + cross-entropy. The host computes one chunk of f32
 * logits z [rows, vocab] with cuBLAS, this kernel turns each row into
 *   lse = log sum_v exp(z_v),  logp[row] = z_t - lse                     (0 where t = IGNORE_INDEX)
 *   dz[row, v] = w_row * (exp(z_v - lse) - [v == t])   (compute dtype; 0 for ignored rows)
 * and the host multiplies dz by W for dhidden before the next chunk reuses the buffer, so only
 * [chunk, vocab] logits ever exist. dz takes the logits' own storage: row r's gradient starts where
 * row r's logits do (a row stride of vocab f32s, i.e. 2 vocab halves in 16 bits), so no second
 * [chunk, vocab] buffer is needed. In 16 bits, dz[v] overwrites the bytes of z[v/2]: every z the
 * writes of a pass over 512 columns could reach (v/2 < v) has been read by the end of that pass's
 * reads, so each pass reads into registers, meets a barrier, then writes. One block per row: one
 * read of z for the max, one for the sum, one more (plus one write) for the gradient; the row
 * (128 KiB at vocab 32k) stays in L2.
 * Row weights: `row_weights` (DPO) when not null, else `scale` for every row. The gradient is
 * stored times `gain` (the host multiplies it back out through the GEMM's alpha) so that in f16
 * the softmax probabilities (~1/vocab) and small weights (1/tokens) stay above f16's subnormals.
 */
#define IGNORE_INDEX (-100)

template <typename T>
__device__ void softmax_cross_entropy(float* z, const int* targets, const float* row_weights, float scale,
                                      float gain, int want_grad, float* logp, int vocab) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    const float* zr = z + (u64)row * vocab;
    int t = targets[row];
    T* dzr = (T*)(z + (u64)row * vocab);
    if (t == IGNORE_INDEX) {
        if (threadIdx.x == 0) logp[row] = 0.0f;
        if (want_grad)
            for (int v = threadIdx.x; v < vocab; v += blockDim.x) dzr[v] = store_f32<T>(0.0f);
        return;
    }
    float mx = -F32_INF;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) mx = fmaxf(mx, zr[v]);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) sum += __expf(zr[v] - mx);
    sum = block_sum(sum, scratch);
    float lse = mx + logf(sum);
    if (threadIdx.x == 0) logp[row] = zr[t] - lse;
    if (want_grad) {
        float w = (row_weights ? row_weights[row] : scale) * gain;
        /* Every thread runs every pass (the barrier), the columns past vocab idle. */
        for (int base = 0; base < vocab; base += blockDim.x) {
            const int v = base + threadIdx.x;
            float g = 0.0f;
            if (v < vocab) {
                g = w * __expf(zr[v] - lse);
                if (v == t) g -= w;
            }
            __syncthreads();
            if (v < vocab) dzr[v] = store_f32<T>(g);
        }
    }
}

#define CE_KERNELS(S, T)                                                                                   \
    extern "C" __global__ void softmax_cross_entropy_##S(float* z, const int* targets,                     \
                                                         const float* row_weights, float scale,            \
                                                         float gain, int want_grad, float* logp,           \
                                                         int vocab) {                                      \
        softmax_cross_entropy<T>(z, targets, row_weights, scale, gain, want_grad, logp, vocab);            \
    }
FOR_EACH_DTYPE(CE_KERNELS)

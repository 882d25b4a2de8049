/* RMSNorm forward and backward over rows of `hidden` elements: one block a row for long rows, one
 * warp a row (rows_per_block rows a block) for short ones.
 *   forward:  r = 1/sqrt(mean(x^2) + eps),  y = w * (x * r),  rstd[row] = r (f32)
 *   backward: dx += r * (w*dy - xhat * mean(w*dy*xhat)),  xhat = x * r   (adds into dx)
 * x, dy and dx are dense [rows, hidden]; y's rows are y_ld >= hidden elements apart, of which
 * only the first hidden columns are written (LoRA's padded input x' = [x | s t]: the norm fills
 * x, another op the pad columns).
 * Memory traffic: forward reads x once and writes rows * hidden elements of y (w stays in L1/L2);
 * backward reads dy, x and dx once and writes dx once. The row is read twice
 * from cache (reduction, then output), which keeps the kernel simple and still bandwidth-bound for
 * hidden <= 8192. When hidden is a multiple of 8 the sums run over chunks of 8 elements: one
 * 16-byte load where the row's pointer is 16-byte aligned (load8), else one element at a time in
 * the same order (load8_or_each), so rstd and y do not depend on y's row stride to the bit. The
 * backward moves 8 elements per access when every row pointer is aligned.
 * The forward's output moves in chunks where x, w and the y row are aligned, else element by
 * element (each y is one product, so its bits do not depend on the path), threads side by side so
 * the stores stay coalesced. With `beside` (non-null, [rows, y_ld - hidden] dense) the forward also
 * copies its row into y's pad columns: y[row, hidden + j] = beside[row, j] (a checkpoint's kept
 * LoRA t), 2 (y_ld - hidden) bytes a row more, where a place_block launch would follow.
 */
/* Which row a thread works on. rows_per_block == 1: the block's threads share row blockIdx.x (the
 * sums by block_sum). rows_per_block > 1: warp w of the block takes row blockIdx.x * rows_per_block
 * + w alone (the sums by warp_sum, no barrier). By blocks a per-head norm's 128-element rows kept
 * 16 of a block's threads busy and each block to one row: on an H100 (session 31, 4096 tokens x 32
 * heads) the forward ran at 0.78 TB/s by blocks and 2.0 by warps, the backward at 1.2 and 2.5; a
 * 4096-element row's forward is faster by blocks (2.5 TB/s against 1.7 by warps). */
struct NormRow {
    int row, lane, step;
};
__device__ __forceinline__ NormRow norm_row(int rows_per_block) {
    if (rows_per_block == 1) return {(int)blockIdx.x, (int)threadIdx.x, (int)blockDim.x};
    return {(int)blockIdx.x * rows_per_block + (int)(threadIdx.x >> 5), (int)(threadIdx.x & 31), 32};
}
__device__ __forceinline__ float norm_row_sum(float v, float* scratch, int rows_per_block) {
    return rows_per_block == 1 ? block_sum(v, scratch) : warp_sum(v);
}

template <typename T>
__device__ void rms_norm_forward(const T* x, const T* w, T* y, int y_ld, float* rstd, int rows, int rows_per_block,
                                 int hidden, float eps, const T* beside) {
    __shared__ float scratch[32];
    const NormRow at = norm_row(rows_per_block);
    if (at.row >= rows) return; /* a whole warp (rows_per_block > 1 only): its sums stay within it */
    const T* xr = x + (u64)at.row * hidden;
    T* yr = y + (u64)at.row * y_ld;
    const int chunks = hidden % 8 == 0 ? hidden / 8 : 0;
    const bool vx = aligned16(xr), vw = aligned16(w), vy = aligned16(yr);
    float ss = 0.0f;
    for (int c = at.lane; c < chunks; c += at.step) {
        float v[8];
        load8_or_each(xr, c, v, vx);
        for (int j = 0; j < 8; j++) ss += v[j] * v[j];
    }
    for (int i = chunks * 8 + at.lane; i < hidden; i += at.step) {
        float v = load_f32(xr[i]);
        ss += v * v;
    }
    ss = norm_row_sum(ss, scratch, rows_per_block);
    float r = rsqrtf(ss / hidden + eps);
    if (at.lane == 0) rstd[at.row] = r;
    /* Each output is its own product: chunks where every row pointer is aligned, else the
     * threads' single elements side by side, which keeps a misaligned y row's stores coalesced. */
    const int out_chunks = vx && vw && vy ? chunks : 0;
    for (int c = at.lane; c < out_chunks; c += at.step) {
        float v[8], wv[8];
        load8(xr, c, v);
        load8(w, c, wv);
        for (int j = 0; j < 8; j++) v[j] = wv[j] * (v[j] * r);
        store8(yr, c, v);
    }
    for (int i = out_chunks * 8 + at.lane; i < hidden; i += at.step) {
        yr[i] = store_f32<T>(load_f32(w[i]) * (load_f32(xr[i]) * r));
    }
    if (beside != nullptr) {
        const int width = y_ld - hidden;
        const T* br = beside + (u64)at.row * width;
        for (int j = at.lane; j < width; j += at.step) yr[hidden + j] = br[j];
    }
}

template <typename T>
__device__ void rms_norm_backward(const T* dy, const T* x, const T* w, const float* rstd, T* dx, int rows,
                                  int rows_per_block, int hidden) {
    __shared__ float scratch[32];
    const NormRow at = norm_row(rows_per_block);
    if (at.row >= rows) return; /* as in the forward */
    u64 base = (u64)at.row * hidden;
    const T *dyr = dy + base, *xr = x + base;
    T* dxr = dx + base;
    const int chunks =
        hidden % 8 == 0 && aligned16(dyr) && aligned16(xr) && aligned16(dxr) && aligned16(w) ? hidden / 8 : 0;
    float r = rstd[at.row];
    float acc = 0.0f;
    for (int c = at.lane; c < chunks; c += at.step) {
        float d[8], xv[8], wv[8];
        load8(dyr, c, d);
        load8(xr, c, xv);
        load8(w, c, wv);
        for (int j = 0; j < 8; j++) acc += d[j] * wv[j] * xv[j] * r;
    }
    for (int i = chunks * 8 + at.lane; i < hidden; i += at.step) {
        acc += load_f32(dyr[i]) * load_f32(w[i]) * load_f32(xr[i]) * r;
    }
    float mean_gx = norm_row_sum(acc, scratch, rows_per_block) / hidden;
    for (int c = at.lane; c < chunks; c += at.step) {
        float d[8], xv[8], wv[8], o[8];
        load8(dyr, c, d);
        load8(xr, c, xv);
        load8(w, c, wv);
        load8(dxr, c, o);
        for (int j = 0; j < 8; j++) o[j] += r * (wv[j] * d[j] - xv[j] * r * mean_gx);
        store8(dxr, c, o);
    }
    for (int i = chunks * 8 + at.lane; i < hidden; i += at.step) {
        float xh = load_f32(xr[i]) * r;
        float g = load_f32(w[i]) * load_f32(dyr[i]);
        dxr[i] = store_f32<T>(load_f32(dxr[i]) + r * (g - xh * mean_gx));
    }
}

#define RMSNORM_KERNELS(S, T)                                                                              \
    extern "C" __global__ void rms_norm_forward_##S(const T* x, const T* w, T* y, int y_ld, float* rstd,   \
                                                    int rows, int rows_per_block, int hidden, float eps,   \
                                                    const T* beside) {                                     \
        rms_norm_forward<T>(x, w, y, y_ld, rstd, rows, rows_per_block, hidden, eps, beside);               \
    }                                                                                                      \
    extern "C" __global__ void rms_norm_backward_##S(const T* dy, const T* x, const T* w,                  \
                                                     const float* rstd, T* dx, int rows,                   \
                                                     int rows_per_block, int hidden) {                     \
        rms_norm_backward<T>(dy, x, w, rstd, dx, rows, rows_per_block, hidden);                            \
    }
FOR_EACH_DTYPE(RMSNORM_KERNELS)

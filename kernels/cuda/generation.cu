/* Generation with a KV cache (forward only).
 *
 * write_cache: cache[r, at + j, :] = src[r, j, :] for every row r and new column j < new, caches
 *   [rows, capacity, width]; a grid-stride copy.
 *
 * attention_cached: query column c = filled - new + j of row r attends to key columns
 *   max(first_key[r], c - W + 1) ..= c of the caches [rows, capacity, hkv, d] (W = window, 0 = none):
 *   out = Σ_c softmax_c(q·k_c / sqrt(d)) v_c. One warp per (query token, head): lanes split the
 *   head dimension (d ≤ 256, 8 per lane), the score is a warp sum, and the softmax is the online
 *   one (running max m, running sum l, output rescaled by exp(m_old - m_new)) so keys are read once.
 */
template <typename T>
__device__ void write_cache(const T* src, T* cache, u64 rows, u64 new_cols, u64 capacity, u64 width, u64 at) {
    u64 per_row = new_cols * width, n = rows * per_row;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / per_row, rem = i % per_row;
        cache[(r * capacity + at) * width + rem] = src[i];
    }
}

#define CACHED_PER_LANE 8

template <typename T>
__device__ void attention_cached(const T* q, const T* k_cache, const T* v_cache, const int* first_key, T* out,
                                 int new_cols, int filled, int capacity, int window, int heads, int kv_heads,
                                 int d) {
    int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    int row = t / new_cols, j = t % new_cols;
    int col = filled - new_cols + j;
    int first = max(first_key[row], 0);
    if (window > 0) first = max(first, col + 1 - window);
    int kvh = h / (heads / kv_heads);
    float scale = 1.0f / sqrtf((float)d);
    const T* qp = q + ((u64)t * heads + h) * d;
    float qv[CACHED_PER_LANE], acc[CACHED_PER_LANE];
    for (int i = 0; i < CACHED_PER_LANE; i++) {
        int e = lane + 32 * i;
        qv[i] = e < d ? load_f32(qp[e]) : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -F32_INF, l = 0.0f;
    for (int c = first; c <= col; c++) {
        u64 base = (((u64)row * capacity + c) * kv_heads + kvh) * d;
        float s = 0.0f;
        for (int i = 0; i < CACHED_PER_LANE; i++) {
            int e = lane + 32 * i;
            if (e < d) s += qv[i] * load_f32(k_cache[base + e]);
        }
        s = warp_sum(s) * scale;
        float m_new = fmaxf(m, s);
        float correction = expf(m - m_new), p = expf(s - m_new);
        l = l * correction + p;
        for (int i = 0; i < CACHED_PER_LANE; i++) {
            int e = lane + 32 * i;
            if (e < d) acc[i] = acc[i] * correction + p * load_f32(v_cache[base + e]);
        }
        m = m_new;
    }
    T* op = out + ((u64)t * heads + h) * d;
    for (int i = 0; i < CACHED_PER_LANE; i++) {
        int e = lane + 32 * i;
        if (e < d) op[e] = store_f32<T>(acc[i] / l);
    }
}

#define GENERATION_KERNELS(S, T)                                                                           \
    extern "C" __global__ void write_cache_##S(const T* src, T* cache, u64 rows, u64 new_cols, u64 capacity, \
                                               u64 width, u64 at) {                                         \
        write_cache<T>(src, cache, rows, new_cols, capacity, width, at);                                    \
    }                                                                                                       \
    extern "C" __global__ void attention_cached_##S(const T* q, const T* k_cache, const T* v_cache,         \
                                                    const int* first_key, T* out, int new_cols, int filled, \
                                                    int capacity, int window, int heads, int kv_heads,      \
                                                    int d) {                                                \
        attention_cached<T>(q, k_cache, v_cache, first_key, out, new_cols, filled, capacity, window, heads, \
                            kv_heads, d);                                                                   \
    }
FOR_EACH_DTYPE(GENERATION_KERNELS)

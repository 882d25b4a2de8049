/* What the tensor-core attention kernels (attention_fwd.cu, attention_bwd.cu and their Hopper versions)
 * share. The visibility rule: key j is visible to query i of the same row iff first_i <= j <= i, with
 * first_i the first token of i's document, or later inside a sliding window (window = 0: none). The
 * register-level steps on accumulators in mma.sync's m16n8 layout (which is also wgmma's, four warps
 * high): a warp's rows g and g + 8 of its 16 (g = lane / 4), columns 8i + 2t and 8i + 2t + 1 of block i
 * (t = lane % 4) in elements 0, 1 (row g) and 2, 3 (row g + 8). */
#define LOG2E 1.4426950408889634f

/* The first key query qi sees, given its document's first token. */
__device__ __forceinline__ int first_visible(int doc_first, int qi, int window) {
    return window > 0 ? max(doc_first, qi + 1 - window) : doc_first;
}
/* The same from the row's document starts (doc_start[t] = first token of t's document). */
__device__ __forceinline__ int first_key_of(const int* doc_start, u64 tok0, int qi, int window) {
    return first_visible(doc_start[tok0 + qi], qi, window);
}

/* Which block of the grid (gridDim.x blocks along the sequence, y heads, z rows) this one is, taken in
 * the order blocks are dispatched (blockIdx.x fastest) so that the heaviest run first. Under the causal
 * mask a block's work falls linearly along x (the forward's last query block sees every key, the
 * backward's first key block every query); the scheduler starts blocks in launch order as
 * multiprocessors free up, so with x fastest each (head, row)'s heavy block starts only after the
 * previous pairs' light ones, and the last pairs' heavy blocks run alone at the end (session 19's Nsight
 * Compute: the busiest multiprocessor 12 % above the average). Longest-processing-time-first order
 * ends within one light block of the mean. Taken over groups of HEAVY_FIRST_GROUP (head, row) pairs
 * (heads adjacent, so GQA's query heads of one kv head share it), so that a group's Q, K, V, dO (and
 * dQ's f32 sums) stay in L2 (8 pairs × 2048 tokens × 128 × 2 bytes × 4 = 16 MiB of 50): within a
 * group every pair's heaviest block, then every pair's next. In a list-scheduling model of the
 * b2 × 2048 × 32-head grid on 132 multiprocessors (block cost = its tiles + 1): 159 → 144 units, ideal
 * 140. `rank` 0 is the heaviest; the kernel maps it to its query or key block. The wgmma kernels only:
 * a block index from divisions is no longer a uniform register, and ptxas gives the mma.sync kernels
 * 5-40 more registers for it (sm_80 forward D 128: 174 → 214; sm_75 f16 D 64 spills 16 bytes), where
 * the wgmma ones keep their fixed split. */
#define HEAVY_FIRST_GROUP 8
struct GridBlock {
    int rank, y, row;
};
__device__ __forceinline__ GridBlock heavy_first_block() {
    const int nx = gridDim.x, pairs = gridDim.y * gridDim.z;
    const int lin = blockIdx.x + nx * (blockIdx.y + gridDim.y * blockIdx.z);
    const int p0 = lin / (nx * HEAVY_FIRST_GROUP) * HEAVY_FIRST_GROUP; /* the group's first pair */
    const int size = min(HEAVY_FIRST_GROUP, pairs - p0), within = lin - p0 * nx;
    const int pair = p0 + within % size;
    return GridBlock{within / size, pair % (int)gridDim.y, pair / (int)gridDim.y};
}

/* The heads a backward block (grid y = `y`) covers: without the GQA parts, kv head y and all its query
 * heads; with them (split), query head y alone, its dK and dV going to f32 parts (the mma.sync kernel's
 * [N, heads, D], which attention_backward_group_sum adds up; the wgmma kernel's sums [N, kv_heads, D]). */
struct BackwardHeads {
    int kvh, h_first, n_heads;
};
__device__ __forceinline__ BackwardHeads backward_heads(bool split, int y, int heads, int kv_heads) {
    const int per_kv = heads / kv_heads;
    return split ? BackwardHeads{y / per_kv, y, 1} : BackwardHeads{y, y * per_kv, per_kv};
}

/* The backward's per-query vectors of queries first..first+R-1 of head h (lse, D = dout . out, and the
 * first token of each query's document) into shared memory by cp.async (threads 0..R-1; zeros past seq). */
template <int R>
__device__ __forceinline__ void load_query_vectors(float* lse_dst, float* dl_dst, int* doc_dst, const float* lse,
                                                   const float* delta, const int* doc_start, u64 tok0, int first,
                                                   int seq, int heads, int h) {
    if (threadIdx.x < R) {
        const int qi = first + threadIdx.x;
        const bool valid = qi < seq;
        const u64 at = valid ? (tok0 + qi) * heads + h : 0;
        cp_async4(lse_dst + threadIdx.x, lse + at, valid);
        cp_async4(dl_dst + threadIdx.x, delta + at, valid);
        cp_async4(doc_dst + threadIdx.x, doc_start + (valid ? tok0 + qi : 0), valid);
    }
}

/* The 16-bit bits of bf16 rounded by integer arithmetic, f16 by cvt: the mma.sync backward's (with the
 * cvt its 255 registers spill, common.cuh). */
template <typename T> __device__ __forceinline__ u16 bits_int(float f);
template <> __device__ __forceinline__ u16 bits_int<bf16>(float f) { return f32_to_bf16_bits_int(f); }
template <> __device__ __forceinline__ u16 bits_int<f16>(float f) { return f32_to_f16_bits(f); }
template <typename T> __device__ __forceinline__ u32 pack2_int(float lo, float hi) {
    return (u32)bits_int<T>(lo) | ((u32)bits_int<T>(hi) << 16);
}

/* One key tile of the forward's online softmax (FlashAttention-2, Dao 2023) on the S accumulators of
 * a warp's rows row_a, row_b (keys key0 + 8n + 2t + e&1): S to log2 units, masked where `masked` (key j
 * visible to row r iff fk_r <= j <= r), the running maxima m and sums l updated, O rescaled by
 * exp2(m_old - m_new), and P = exp2(S - m) packed into the A fragments of O += P V, 16 keys each. */
template <typename T, int NT, int DT>
__device__ __forceinline__ void softmax_tile(float (&s)[NT][4], float (&o)[DT][4], u32 (&pa)[NT / 2][4], float& m_a,
                                             float& m_b, float& l_a, float& l_b, bool masked, int key0, int tq,
                                             int fk_a, int fk_b, int row_a, int row_b, float scale_log2) {
    if (masked) {
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int key = key0 + 8 * n + 2 * tq + e;
                bool va = key >= fk_a && key <= row_a, vb = key >= fk_b && key <= row_b;
                s[n][e] = va ? s[n][e] * scale_log2 : -F32_INF;
                s[n][2 + e] = vb ? s[n][2 + e] * scale_log2 : -F32_INF;
            }
        }
    } else {
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] *= scale_log2;
    }
    float mx_a = -F32_INF, mx_b = -F32_INF;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
        mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) { /* 4 lanes share a row */
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
    }
    float new_a = fmaxf(m_a, mx_a), new_b = fmaxf(m_b, mx_b);
    float ref_a = new_a == -F32_INF ? 0.0f : new_a, ref_b = new_b == -F32_INF ? 0.0f : new_b;
    float alpha_a = exp2f(m_a - ref_a), alpha_b = exp2f(m_b - ref_b);
    m_a = new_a;
    m_b = new_b;
    l_a *= alpha_a;
    l_b *= alpha_b;
#pragma unroll
    for (int i = 0; i < DT; i++) {
        o[i][0] *= alpha_a;
        o[i][1] *= alpha_a;
        o[i][2] *= alpha_b;
        o[i][3] *= alpha_b;
    }
#pragma unroll
    for (int n = 0; n < NT; n++) {
        s[n][0] = exp2f(s[n][0] - ref_a);
        s[n][1] = exp2f(s[n][1] - ref_a);
        s[n][2] = exp2f(s[n][2] - ref_b);
        s[n][3] = exp2f(s[n][3] - ref_b);
        l_a += s[n][0] + s[n][1];
        l_b += s[n][2] + s[n][3];
        pa[n / 2][2 * (n & 1)] = pack2<T>(s[n][0], s[n][1]);
        pa[n / 2][2 * (n & 1) + 1] = pack2<T>(s[n][2], s[n][3]);
    }
}

/* The forward's end for a warp's rows row_a, row_b of head h: out = O / l (l summed over the 4 lanes
 * of a row) and lse = (m + log2 l) ln 2. */
template <typename T, int D>
__device__ __forceinline__ void store_output_rows(const float (&o)[D / 8][4], float m_a, float m_b, float l_a, float l_b,
                                                  T* out, float* lse, u64 tok0, int row_a, int row_b, int seq,
                                                  int heads, int h, int tq) {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
    }
    float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f, inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
    u16* og = (u16*)out;
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        int d = 8 * i + 2 * tq;
        if (row_a < seq) *(u32*)(og + ((tok0 + row_a) * heads + h) * D + d) = pack2<T>(o[i][0] * inv_a, o[i][1] * inv_a);
        if (row_b < seq) *(u32*)(og + ((tok0 + row_b) * heads + h) * D + d) = pack2<T>(o[i][2] * inv_b, o[i][3] * inv_b);
    }
    if (tq == 0) {
        const float ln2 = 0.6931471805599453f;
        if (row_a < seq) lse[(tok0 + row_a) * heads + h] = (m_a + log2f(l_a)) * ln2;
        if (row_b < seq) lse[(tok0 + row_b) * heads + h] = (m_b + log2f(l_b)) * ln2;
    }
}

/* The backward's end for a warp's keys key_a, key_b (rows g, g + 8): dK (times the softmax scale)
 * and dV into dk, dv [N, kv_heads, D] as T (bf16 by integer rounding where INT_ROUNDING), or with
 * the f32 parts [N, heads, D] of GQA (dk_part non-null) into query head h_first's part. */
template <typename T, int D, bool INT_ROUNDING>
__device__ __forceinline__ void store_key_gradients(const float (&dkacc)[D / 8][4], const float (&dvacc)[D / 8][4],
                                                    float scale, T* dk, T* dv, float* dk_part, float* dv_part,
                                                    u64 tok0, int key_a, int key_b, int seq, int heads, int kv_heads,
                                                    int kvh, int h_first, int tq) {
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        const int d = 8 * i + 2 * tq;
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int key = half ? key_b : key_a;
            if (key >= seq) continue;
            const float k0 = dkacc[i][2 * half] * scale, k1 = dkacc[i][2 * half + 1] * scale;
            const float v0 = dvacc[i][2 * half], v1 = dvacc[i][2 * half + 1];
            if (dk_part != nullptr) {
                const u64 at = ((tok0 + key) * heads + h_first) * D + d;
                *(float2*)(dk_part + at) = make_float2(k0, k1);
                *(float2*)(dv_part + at) = make_float2(v0, v1);
            } else {
                const u64 at = ((tok0 + key) * kv_heads + kvh) * D + d;
                *(u32*)((u16*)dk + at) = INT_ROUNDING ? pack2_int<T>(k0, k1) : pack2<T>(k0, k1);
                *(u32*)((u16*)dv + at) = INT_ROUNDING ? pack2_int<T>(v0, v1) : pack2<T>(v0, v1);
            }
        }
    }
}

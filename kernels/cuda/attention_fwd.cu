/* Causal self-attention forward, flash-attention style: never writes a seq x seq matrix.
 * For query i (head h, kv head h / (heads/kv_heads)) and each visible key j:
 *   s_j = (q_i . k_j) / sqrt(d),  out_i = sum_j exp(s_j - lse_i) v_j,  lse_i = log sum_j exp(s_j)
 * Key j is visible iff first_i <= j <= i within the row, first_i = max(doc_start_i, i + 1 - window)
 * (window = 0: none). This covers causal masking, padding and packed documents (AttentionLayout).
 *
 * attention_forward_mma_<t>_d<D> (bf16/f16, D = 64 or 128), FlashAttention-2 (Dao 2023) on mma.sync:
 * a block owns 128 queries of one (row, head); each of its 8 warps holds 16 query rows as tensor-core
 * A fragments for the whole run. Key/value tiles of 64 rows stream through shared memory by cp.async,
 * two stages deep (the next tile loads while this one is used), and reach the tensor cores through
 * ldmatrix (V with .trans), padded rows (D + 8 halves) keeping the 8 row reads of each ldmatrix on
 * distinct banks. S = Q K^T and O += P V run on m16n8k16 with f32 accumulators; the online softmax
 * (running max m, running sum l) rescales O in registers, and P goes from the S accumulators straight
 * into A fragments. Masking is applied only to tiles that cross the diagonal or a document start;
 * a warp skips tiles none of its rows sees, a block the tiles before its earliest visible key.
 * Blocks run latest queries first, so the longest causal rows start early and the tail is short (in
 * launch order: heavy_first_block, the wgmma kernels' order, costs these kernels 5-40 registers).
 * Traffic: Q, O once; K, V once per 128-query block (GQA: the kv head is indexed, never copied).
 * Shared memory: 2 stages x (K + V) x 64 x (D + 8) halves = 69,632 bytes at D = 128.
 *
 * attention_forward_simple_<t>: one warp per (query, head), lanes split the head dimension
 * (D <= 256); the f32 mode's path and the fallback for other head sizes.
 */
#define ATTN_BM 128
#define ATTN_BN 64
#define ATTN_WARPS 8

/* Queues the K and V tiles of keys kt..kt+63 into one stage (rows past the sequence read as zero). */
template <int D>
__device__ __forceinline__ void load_kv_tile(u16* ks, u16* vs, const u16* k, const u16* v, u64 tok0, int kt,
                                             int seq, int kv_heads, int kvh) {
    constexpr int LD = D + 8, CHUNKS = D / 8;
    for (int c = threadIdx.x; c < ATTN_BN * CHUNKS; c += ATTN_WARPS * 32) {
        int r = c / CHUNKS, col = (c % CHUNKS) * 8, key = kt + r;
        bool valid = key < seq;
        u64 at = valid ? ((tok0 + key) * kv_heads + kvh) * D + col : 0;
        cp_async16(ks + r * LD + col, k + at, valid);
        cp_async16(vs + r * LD + col, v + at, valid);
    }
    cp_async_commit();
}

template <typename T, int D>
__device__ void attention_forward_mma(const T* q, const T* k, const T* v, const int* doc_start, T* out, float* lse,
                                      int seq, int heads, int kv_heads, int window, float scale) {
    constexpr int LD = D + 8; /* +16 bytes per row: ldmatrix's 8 rows land on different banks */
    constexpr int KSTEPS = D / 16, DTILES = D / 8, NTILES = ATTN_BN / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* kbuf = (u16*)smem_raw;           /* [2 stages][BN][LD] */
    u16* vbuf = kbuf + 2 * ATTN_BN * LD;  /* [2 stages][BN][LD] */
    __shared__ int fk[ATTN_BM];
    __shared__ int lo_s;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * ATTN_BM, h = blockIdx.y, row = blockIdx.z;
    const int kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const u64 tok0 = (u64)row * seq;
    const float scale_log2 = scale * LOG2E;

    if (threadIdx.x < ATTN_BM) {
        int qi = q0 + threadIdx.x;
        fk[threadIdx.x] = qi < seq ? first_key_of(doc_start, tok0, qi, window) : (1 << 30);
    }
    __syncthreads();
    if (warp == 0) {
        int m = min(min(fk[lane], fk[lane + 32]), min(fk[lane + 64], fk[lane + 96]));
        for (int o = 16; o > 0; o >>= 1) m = min(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0) lo_s = m;
    }

    /* This warp's 16 query rows as A fragments: rows g and g+8, columns 2tq.. of each 16-wide step. */
    const int wq0 = q0 + warp * 16, qa_row = wq0 + g, qb_row = qa_row + 8;
    u32 qf[KSTEPS][4];
    {
        const u16* qg = (const u16*)q;
        for (int s = 0; s < KSTEPS; s++) {
            int d = 16 * s + 2 * tq;
            u64 ia = ((tok0 + qa_row) * heads + h) * D + d, ib = ((tok0 + qb_row) * heads + h) * D + d;
            qf[s][0] = qa_row < seq ? *(const u32*)(qg + ia) : 0u;
            qf[s][1] = qb_row < seq ? *(const u32*)(qg + ib) : 0u;
            qf[s][2] = qa_row < seq ? *(const u32*)(qg + ia + 8) : 0u;
            qf[s][3] = qb_row < seq ? *(const u32*)(qg + ib + 8) : 0u;
        }
    }
    float o[DTILES][4];
    for (int i = 0; i < DTILES; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_a = -F32_INF, m_b = -F32_INF, l_a = 0.0f, l_b = 0.0f;
    const int fk_a = fk[warp * 16 + g], fk_b = fk[warp * 16 + g + 8];
    /* The warp's earliest and latest first-visible key: tiles wholly before the earliest are invisible
     * to every row of the warp; tiles from the latest on (and not past the diagonal) need no mask. */
    int w_lo = min(fk_a, fk_b), w_hi = max(fk_a, fk_b);
    for (int off = 4; off < 32; off <<= 1) {
        w_lo = min(w_lo, __shfl_xor_sync(0xffffffffu, w_lo, off));
        w_hi = max(w_hi, __shfl_xor_sync(0xffffffffu, w_hi, off));
    }
    __syncthreads();
    const int k_begin = (lo_s / ATTN_BN) * ATTN_BN, k_end = min(q0 + ATTN_BM, seq);
    const u16 *kg = (const u16*)k, *vg = (const u16*)v;

    int stage = 0;
    if (k_begin < k_end) load_kv_tile<D>(kbuf, vbuf, kg, vg, tok0, k_begin, seq, kv_heads, kvh);
    for (int kt = k_begin; kt < k_end; kt += ATTN_BN) {
        if (kt + ATTN_BN < k_end) {
            load_kv_tile<D>(kbuf + (stage ^ 1) * ATTN_BN * LD, vbuf + (stage ^ 1) * ATTN_BN * LD, kg, vg, tok0,
                            kt + ATTN_BN, seq, kv_heads, kvh);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const u16* ks = kbuf + stage * ATTN_BN * LD;
        const u16* vs = vbuf + stage * ATTN_BN * LD;
        if (kt <= wq0 + 15 && kt + ATTN_BN > w_lo) {
            float s[NTILES][4];
            for (int n = 0; n < NTILES; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
            /* S = Q K^T: per 16-wide step of d, one ldmatrix.x4 gives the B fragments of 16 keys. */
            for (int st = 0; st < KSTEPS; st++) {
                for (int np = 0; np < NTILES / 2; np++) {
                    u32 b[4];
                    ldm_b2(b, ks, LD, st * 16, np * 16);
                    mma_16x8x16(s[2 * np], qf[st], b, (T*)0);
                    mma_16x8x16(s[2 * np + 1], qf[st], b + 2, (T*)0);
                }
            }
            /* The online softmax, masked where the tile crosses the diagonal or a document start. */
            u32 pa[NTILES / 2][4];
            softmax_tile<T>(s, o, pa, m_a, m_b, l_a, l_b, kt + ATTN_BN - 1 > wq0 || kt < w_hi, kt, tq, fk_a, fk_b,
                            qa_row, qb_row, scale_log2);
            /* O += P V: P's accumulators are already A fragments, 16 keys per step; one
             * ldmatrix.x4.trans gives the B fragments of 16 output dimensions. */
            for (int j = 0; j < ATTN_BN / 16; j++) {
                for (int dp = 0; dp < DTILES / 2; dp++) {
                    u32 b[4];
                    ldm_b2_t(b, vs, LD, 16 * j, dp * 16);
                    mma_16x8x16(o[2 * dp], pa[j], b, (T*)0);
                    mma_16x8x16(o[2 * dp + 1], pa[j], b + 2, (T*)0);
                }
            }
        }
        __syncthreads(); /* every warp is done with this stage before it is refilled */
        stage ^= 1;
    }
    store_output_rows<T, D>(o, m_a, m_b, l_a, l_b, out, lse, tok0, qa_row, qb_row, seq, heads, h, tq);
}

/* One warp per (token, head); lane c holds dimensions c, c+32, ... (up to 8 of them). */
template <typename T>
__device__ void attention_forward_simple(const T* q, const T* k, const T* v, const int* doc_start, T* out, float* lse,
                                         int rows, int seq, int heads, int kv_heads, int d, int window, float scale) {
    const int lane = threadIdx.x & 31;
    const u64 pair = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (pair >= (u64)rows * seq * heads) return;
    const u64 tok = pair / heads;
    const int h = (int)(pair % heads), kvh = h / (heads / kv_heads);
    const int qi = (int)(tok % seq);
    const u64 tok0 = tok - qi;
    const int first = first_key_of(doc_start, tok0, qi, window);
    float qv[8], acc[8];
    for (int c = 0; c < 8; c++) {
        int dim = lane + 32 * c;
        qv[c] = dim < d ? load_f32(q[(tok * heads + h) * d + dim]) * scale : 0.0f;
        acc[c] = 0.0f;
    }
    float m = -F32_INF, l = 0.0f;
    for (int j = first; j <= qi; j++) {
        const u64 at = ((tok0 + j) * kv_heads + kvh) * d;
        float part = 0.0f;
        for (int c = 0; c < 8; c++) {
            int dim = lane + 32 * c;
            if (dim < d) part += qv[c] * load_f32(k[at + dim]);
        }
        float s = warp_sum(part);
        float nm = fmaxf(m, s);
        float alpha = __expf(m - nm), p = __expf(s - nm);
        l = l * alpha + p;
        for (int c = 0; c < 8; c++) {
            int dim = lane + 32 * c;
            acc[c] = acc[c] * alpha + (dim < d ? p * load_f32(v[at + dim]) : 0.0f);
        }
        m = nm;
    }
    for (int c = 0; c < 8; c++) {
        int dim = lane + 32 * c;
        if (dim < d) out[(tok * heads + h) * d + dim] = store_f32<T>(acc[c] / l);
    }
    if (lane == 0) lse[tok * heads + h] = m + logf(l);
}

#define ATTN_FWD_MMA(S, T, D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_forward_mma_##S##_d##D(                      \
        const T* q, const T* k, const T* v, const int* doc_start, T* out, float* lse, int seq, int heads,      \
        int kv_heads, int window, float scale) {                                                               \
        attention_forward_mma<T, D>(q, k, v, doc_start, out, lse, seq, heads, kv_heads, window, scale);        \
    }
ATTN_FWD_MMA(bf16, bf16, 64)
ATTN_FWD_MMA(bf16, bf16, 128)
ATTN_FWD_MMA(f16, f16, 64)
ATTN_FWD_MMA(f16, f16, 128)

#define ATTN_FWD_SIMPLE(S, T)                                                                                  \
    extern "C" __global__ void attention_forward_simple_##S(const T* q, const T* k, const T* v,                \
                                                            const int* doc_start, T* out, float* lse, int rows, \
                                                            int seq, int heads, int kv_heads, int d, int window, \
                                                            float scale) {                                     \
        attention_forward_simple<T>(q, k, v, doc_start, out, lse, rows, seq, heads, kv_heads, d, window, scale); \
    }
FOR_EACH_DTYPE(ATTN_FWD_SIMPLE)

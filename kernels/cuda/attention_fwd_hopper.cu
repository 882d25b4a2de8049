/* Causal self-attention forward on Hopper's warpgroup MMA (wgmma, sm_90a), the math and visibility
 * rule of attention_fwd.cu (FlashAttention-2's online softmax, Dao 2023):
 *   s_j = (q_i . k_j) / sqrt(d),  out_i = sum_j exp(s_j - lse_i) v_j,  lse_i = log sum_j exp(s_j).
 *
 * attention_forward_wgmma_<t>_d<D> (bf16/f16, D = 64 or 128): a block owns 128 queries of one
 * (row, head), 64 per warpgroup. Q sits in shared memory for the whole run; key/value tiles of 64
 * rows stream in by cp.async, two stages deep, all in wgmma's 128-byte swizzled layout (wgmma.cuh).
 * Per tile and warpgroup: S = Q K^T as D/16 wgmma m64n64k16 from shared memory (K-major both), the
 * online softmax on the accumulators in registers (their layout is mma.sync's, so the masking and
 * rescaling code is attention_fwd.cu's), then O += P V as four wgmma m64nDk16 with P from registers
 * and V read MN-major. A warpgroup skips a tile none of its 64 queries sees (the wgmma runs per
 * warpgroup, so the skip is decided per warpgroup); masking is applied only where a tile crosses
 * the diagonal or a document start. Blocks run latest queries first.
 * Traffic: Q, O once; K, V once per 128-query block.
 * Shared memory: Q 128 x D + 2 stages x (K + V) x 64 x D halves + 1 KiB to align = 97 KiB at D = 128,
 * so that two blocks share a multiprocessor (128 registers a thread).
 * H200, b2 x 2048, 32 heads, D 128 (session 9): 0.265 ms, 259 TFLOP/s (mma.sync kernel: 0.383 ms).
 */
#define HFWD_BM 128 /* queries per block, 64 per warpgroup */
#define HFWD_BN 64  /* keys per tile */

template <typename T, int D>
__device__ void attention_forward_wgmma(const T* q, const T* k, const T* v, const int* doc_start, T* out, float* lse,
                                        int seq, int heads, int kv_heads, int window, float scale) {
#if WGMMA_AVAILABLE
    constexpr int KSTEPS = D / 16, DTILES = D / 8, NTILES = HFWD_BN / 8;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    u16* qs = (u16*)align_1024(smem_raw); /* [BM][D] */
    u16* kbuf = qs + HFWD_BM * D;        /* [2 stages][BN][D] */
    u16* vbuf = kbuf + 2 * HFWD_BN * D;  /* [2 stages][BN][D] */
    __shared__ int fk[HFWD_BM];
    __shared__ int group_lo[2], group_hi[2];
    const int q0 = (gridDim.x - 1 - blockIdx.x) * HFWD_BM, h = blockIdx.y, row = blockIdx.z;
    const int kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int group = warp >> 2;
    const u64 tok0 = (u64)row * seq;
    const float scale_log2 = scale * LOG2E;

    load_rows<D, HFWD_BM>(qs, nullptr, q, nullptr, tok0, q0, seq, heads, h);
    cp_async_commit();
    if (threadIdx.x < HFWD_BM) {
        int qi = q0 + threadIdx.x;
        fk[threadIdx.x] = qi < seq ? first_key_of(doc_start, tok0, qi, window) : (1 << 30);
    }
    __syncthreads();
    /* Each warpgroup's earliest and latest first-visible key (one warp of each reduces its 64). */
    if ((warp & 3) == 0) {
        int a = fk[group * 64 + lane], b = fk[group * 64 + lane + 32];
        int lo = min(a, b), hi = max(a, b);
        for (int o = 16; o > 0; o >>= 1) {
            lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
            hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        }
        if (lane == 0) {
            group_lo[group] = lo;
            group_hi[group] = hi;
        }
    }
    __syncthreads();
    const int wq0 = q0 + warp * 16, qa_row = wq0 + g, qb_row = qa_row + 8;
    const int gq0 = q0 + group * 64, g_lo = group_lo[group];
    const int fk_a = fk[warp * 16 + g], fk_b = fk[warp * 16 + g + 8];
    /* This warp's latest first-visible key: tiles from it on (and not past the diagonal) need no mask. */
    int w_hi = max(fk_a, fk_b);
    for (int off = 4; off < 32; off <<= 1) w_hi = max(w_hi, __shfl_xor_sync(0xffffffffu, w_hi, off));
    const int k_begin = (min(group_lo[0], group_lo[1]) / HFWD_BN) * HFWD_BN, k_end = min(q0 + HFWD_BM, seq);

    float o[DTILES][4];
#pragma unroll
    for (int i = 0; i < DTILES; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_a = -F32_INF, m_b = -F32_INF, l_a = 0.0f, l_b = 0.0f;
    auto load_kv = [&](int kt, int stage) {
        load_rows<D, HFWD_BN>(kbuf + stage * HFWD_BN * D, vbuf + stage * HFWD_BN * D, k, v, tok0, kt, seq, kv_heads, kvh);
        cp_async_commit();
    };

    int stage = 0;
    if (k_begin < k_end) load_kv(k_begin, 0);
    for (int kt = k_begin; kt < k_end; kt += HFWD_BN) {
        if (kt + HFWD_BN < k_end) {
            load_kv(kt + HFWD_BN, stage ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        fence_proxy_async();
        __syncthreads();
        const u16* ks = kbuf + stage * HFWD_BN * D;
        const u16* vs = vbuf + stage * HFWD_BN * D;
        if (kt <= gq0 + 63 && kt + HFWD_BN > g_lo) {
            float s[NTILES][4];
#pragma unroll
            for (int n = 0; n < NTILES; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
            /* S = Q K^T: the group's 64 query rows times the tile's 64 keys. */
            wgmma_fence();
#pragma unroll
            for (int st = 0; st < KSTEPS; st++)
                wgmma_ss<0, 0>(s, kmajor_desc(qs, D, group * 64, 16 * st), kmajor_desc(ks, D, 0, 16 * st), 1, (T*)0);
            wgmma_commit();
            wgmma_wait<0>();
            /* The online softmax, masked where the tile crosses the diagonal or a document start. */
            u32 pa[HFWD_BN / 16][4];
            softmax_tile<T>(s, o, pa, m_a, m_b, l_a, l_b, kt + HFWD_BN - 1 > wq0 || kt < w_hi, kt, tq, fk_a, fk_b,
                            qa_row, qb_row, scale_log2);
            /* O += P V: P's accumulators are already A fragments, 16 keys a step; V read MN-major. */
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < HFWD_BN / 16; j++) wgmma_rs<1>(o, pa[j], mnmajor_desc(vs, D, 16 * j, 0), 1, (T*)0);
            wgmma_commit();
            wgmma_wait<0>();
        }
        __syncthreads(); /* every warp is done with this stage before it is refilled */
        stage ^= 1;
    }
    store_output_rows<T, D>(o, m_a, m_b, l_a, l_b, out, lse, tok0, qa_row, qb_row, seq, heads, h, tq);
#else
    __trap(); /* wgmma needs sm_90a; the host launches this kernel only on compute capability 9.0 */
#endif
}

#define ATTN_FWD_WGMMA(S, T, D)                                                                                \
    extern "C" __global__ void __launch_bounds__(HFWD_BM * 2) attention_forward_wgmma_##S##_d##D(               \
        const T* q, const T* k, const T* v, const int* doc_start, T* out, float* lse, int seq, int heads,      \
        int kv_heads, int window, float scale) {                                                               \
        attention_forward_wgmma<T, D>(q, k, v, doc_start, out, lse, seq, heads, kv_heads, window, scale);      \
    }
ATTN_FWD_WGMMA(bf16, bf16, 64)
ATTN_FWD_WGMMA(bf16, bf16, 128)
ATTN_FWD_WGMMA(f16, f16, 64)
ATTN_FWD_WGMMA(f16, f16, 128)

/* Causal self-attention forward on Hopper's warpgroup MMA (wgmma, sm_90a), the math and visibility
 * rule of attention_fwd.cu (FlashAttention-2's online softmax, Dao 2023):
 *   s_j = (q_i . k_j) / sqrt(d),  out_i = sum_j exp(s_j - lse_i) v_j,  lse_i = log sum_j exp(s_j).
 *
 * attention_forward_wgmma_<t>_d<D> (bf16/f16, D = 64 or 128), FlashAttention-3's warp-specialized
 * pipeline (Shah et al. 2024, sections 3.1-3.2): a block of 384 threads owns 128 queries of one
 * (row, head). Warps 0-7 are two consumer warpgroups of 64 queries each; warps 8-11 the producer,
 * which loads Q once, then key and value tiles of 128 rows into three stages each by cp.async, all in
 * wgmma's 128-byte swizzled layout (wgmma.cuh). After the start no block-wide barrier: mbarriers say
 * "tile landed" (each producer thread's cp.async arrive on completion, 128 arrivals) and "stage free"
 * (each consumer warp once its wgmma reading the stage is complete, 8 arrivals), K and V apart, so
 * that a key tile can be in use while the value tile before it is still read.
 * Per key tile t and consumer warpgroup (intra-warpgroup overlap, FA3 Algorithm 2):
 *   issue S_t = Q K_t^T (D/16 wgmma m64n128k16, both operands from shared memory, K-major),
 *   issue O += P_{t-1} V_{t-1} (8 wgmma m64nDk16, P from registers, V read MN-major),
 *   wait for S_t; its online softmax (masked only where the tile crosses the diagonal or a document
 *   start) while the tensor cores do P_{t-1} V_{t-1}; wait for that; O *= exp2(m_old - m_new) and
 *   P_t packed into A fragments for the next round.
 * Between the warpgroups, ping-pong (FA3 section 3.1): they take turns issuing those wgmma, so that
 * one's softmax runs while the other's products do. A turn: wait for the tiles (K_t, V_{t-1}), then
 * bar.sync on the own barrier (named barrier 1 for warpgroup 0, 2 for warpgroup 1, 256 consumer
 * threads each, the producer takes no part), issue, bar.arrive at the other's. Warpgroup 1 arrives at
 * barrier 1 once at the start, so warpgroup 0 goes first. Each takes n_tiles + 1 turns: round t
 * (0 <= t <= n_tiles) issues S_t and / or P_{t-1} V_{t-1} of the tiles it sees, and is an empty turn
 * (sync, arrive) where there is neither (a skipped tile is waited for after its empty turn);
 * warpgroup 0 syncs once more on barrier 1 after its store to take warpgroup 1's last arrival.
 * The scores stay raw in the accumulators: p = exp2(s scale log2(e) - m) is one FMA and one exp2.
 * A warpgroup skips the tiles none of its 64 queries sees (it still waits for them and frees their
 * stages, which keeps the mbarrier phases in step). Blocks run heaviest (latest queries) first, over
 * groups of 8 (head, row) pairs (heavy_first_block in attention.cuh).
 * Traffic: Q, O once; K, V once per 128-query block.
 * Shared memory: Q 128 x D + 3 stages x (K + V) x 128 x D halves + 1 KiB to align = 225 KiB at D = 128
 * (113 KiB at D = 64; two stages: 161 and 81 KiB), one block a multiprocessor; the kernel traps where
 * the host gives it less. Registers: 168 a thread at launch (65536 / 384), moved by setmaxnreg to 232
 * for a consumer, which holds O (D/2), S (64) and P (32) at once, and 40 for the producer (ptxas: no
 * spills).
 * H200, b2 x 2048, 32 heads, D 128 (session 18): 0.219 ms, 314 TFLOP/s, 8.83 ms for the 32 calls of a
 * Llama-2-7B step; ping-pong with two stages 0.222 ms (309), neither (session 17) 0.233-0.235 ms (293-
 * 295), 8.98-9.24 ms in the step. The kernel before (256 threads, 64-key tiles, all threads loading, no
 * overlap inside a warpgroup): 0.266 ms, 258 TFLOP/s, 10.0-10.3 ms in the step.
 */
#define HFWD_BM 128               /* queries per block, 64 per consumer warpgroup */
#define HFWD_BN 128               /* keys per tile */
#define HFWD_STAGES 3             /* K and V tiles in flight */
#define HFWD_THREADS 384          /* two consumer warpgroups and the producer warpgroup */
#define HFWD_CONSUMERS 256        /* threads 0-255 consume, 256-383 load */
#define HFWD_PRODUCERS 128
#define HFWD_CONSUMER_WARPS 8
/* Registers a thread after the split (setmaxnreg): 40 x 128 + 232 x 256 = 168 x 384, the block's
 * share (FlashAttention-3 takes 24 / 240; the cp.async producer spills at 24). */
#define HFWD_PRODUCER_REGS 40
#define HFWD_CONSUMER_REGS 232
static_assert(REGISTER_SPLIT_FITS(HFWD_THREADS, HFWD_PRODUCERS, HFWD_PRODUCER_REGS, HFWD_CONSUMERS, HFWD_CONSUMER_REGS),
              "the setmaxnreg split asks for more registers than the block holds at launch (wgmma.cuh)");
/* Named barriers 1 and 2 (0 is __syncthreads'), of the 256 consumer threads: HFWD_TURN_BARRIER + g is
 * consumer warpgroup g's turn on the tensor cores, which it syncs on and the other warpgroup arrives at. */
#define HFWD_TURN_BARRIER 1

/* The softmax half of one key tile on a warp's raw scores S (rows row_a, row_b, keys key0 + 8n + 2t +
 * e&1), masked where `masked` (key j visible to row r iff fk_r <= j <= r): the running maxima m (log2
 * units) and sums l updated, alpha = exp2(m_old - m_new) returned for O, and S replaced by P =
 * exp2(S scale_log2 - m). O itself is left alone: the tensor cores may still be adding into it.
 * (attention.cuh's softmax_tile does both halves at once for the mma.sync forward; composed of these
 * two it holds more registers there: 207 against 174 at d 128 on sm_80, spills at d 64.) */
template <int NT>
__device__ __forceinline__ void softmax_scores(float (&s)[NT][4], float& m_a, float& m_b, float& l_a, float& l_b,
                                               float& alpha_a, float& alpha_b, bool masked, int key0, int tq,
                                               int fk_a, int fk_b, int row_a, int row_b, float scale_log2) {
    if (masked) {
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int key = key0 + 8 * n + 2 * tq + e;
                if (!(key >= fk_a && key <= row_a)) s[n][e] = -F32_INF;
                if (!(key >= fk_b && key <= row_b)) s[n][2 + e] = -F32_INF;
            }
        }
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
    /* The scale is positive, so the maximum of the scaled scores is the scaled maximum. */
    float new_a = fmaxf(m_a, mx_a * scale_log2), new_b = fmaxf(m_b, mx_b * scale_log2);
    float ref_a = new_a == -F32_INF ? 0.0f : new_a, ref_b = new_b == -F32_INF ? 0.0f : new_b;
    alpha_a = exp2f(m_a - ref_a);
    alpha_b = exp2f(m_b - ref_b);
    m_a = new_a;
    m_b = new_b;
    l_a *= alpha_a;
    l_b *= alpha_b;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        s[n][0] = exp2f(fmaf(s[n][0], scale_log2, -ref_a));
        s[n][1] = exp2f(fmaf(s[n][1], scale_log2, -ref_a));
        s[n][2] = exp2f(fmaf(s[n][2], scale_log2, -ref_b));
        s[n][3] = exp2f(fmaf(s[n][3], scale_log2, -ref_b));
        l_a += s[n][0] + s[n][1];
        l_b += s[n][2] + s[n][3];
    }
}

/* The other half, once the tensor cores are done with O: O *= alpha, and P packed into the A
 * fragments of O += P V, 16 keys each. */
template <typename T, int NT, int DT>
__device__ __forceinline__ void rescale_and_pack(float (&o)[DT][4], const float (&s)[NT][4], u32 (&pa)[NT / 2][4],
                                                 float alpha_a, float alpha_b) {
#pragma unroll
    for (int i = 0; i < DT; i++) {
        o[i][0] *= alpha_a;
        o[i][1] *= alpha_a;
        o[i][2] *= alpha_b;
        o[i][3] *= alpha_b;
    }
#pragma unroll
    for (int n = 0; n < NT; n++) {
        pa[n / 2][2 * (n & 1)] = pack2<T>(s[n][0], s[n][1]);
        pa[n / 2][2 * (n & 1) + 1] = pack2<T>(s[n][2], s[n][3]);
    }
}

/* Pins registers that wgmma writes or reads asynchronously at this point of the program, so that the
 * compiler moves no access to them across the wgmma_wait before it (CUTLASS's warpgroup_fence_operand). */
template <int N> __device__ __forceinline__ void fence_registers(float (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(r[i][e])::"memory");
}
template <int N> __device__ __forceinline__ void fence_registers(u32 (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+r"(r[i][e])::"memory");
}

/* Key tile t's stage, and the parity of the mbarrier phase in which that stage holds it. */
__device__ __forceinline__ int stage_of(int t) { return (unsigned)t % HFWD_STAGES; }
__device__ __forceinline__ u32 parity_of(int t) { return ((unsigned)t / HFWD_STAGES) & 1; }

template <typename T, int D>
__device__ void attention_forward_wgmma(const T* q, const T* k, const T* v, const int* doc_start, T* out, float* lse,
                                        int seq, int heads, int kv_heads, int window, float scale) {
#if WGMMA_AVAILABLE
    constexpr int KSTEPS = D / 16, DTILES = D / 8, NTILES = HFWD_BN / 8, PSTEPS = HFWD_BN / 16;
    constexpr int CHUNKS = D / 8; /* 16-byte chunks a row */
    extern __shared__ __align__(128) unsigned char smem_raw[];
    u16* qs = (u16*)align_1024(smem_raw); /* [BM][D] */
    u16* kbuf = qs + HFWD_BM * D;                  /* [STAGES][BN][D] */
    u16* vbuf = kbuf + HFWD_STAGES * HFWD_BN * D;  /* [STAGES][BN][D] */
    __shared__ int fk[HFWD_BM];
    __shared__ int group_lo[2];
    /* q_full; k_full, v_full (producer -> consumers); k_free, v_free (consumers -> producer); per stage. */
    __shared__ __align__(8) u64 q_full, k_full[HFWD_STAGES], v_full[HFWD_STAGES], k_free[HFWD_STAGES],
        v_free[HFWD_STAGES];
    const GridBlock blk = heavy_first_block(); /* rank 0: the last query block, which sees every key */
    const int q0 = (gridDim.x - 1 - blk.rank) * HFWD_BM, h = blk.y, row = blk.row;
    const int kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const u64 tok0 = (u64)row * seq;
    if (blockDim.x != HFWD_THREADS) __trap(); /* an older host's 256 threads would leave the loads undone */
    u32 smem_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(smem_bytes));
    if (smem_bytes < (u32)(HFWD_BM + 2 * HFWD_STAGES * HFWD_BN) * D * 2 + 1024) __trap(); /* a two-stage host's */

    if (threadIdx.x < HFWD_BM) {
        int qi = q0 + threadIdx.x;
        fk[threadIdx.x] = qi < seq ? first_key_of(doc_start, tok0, qi, window) : (1 << 30);
    }
    if (threadIdx.x == 0) {
        mbarrier_init(&q_full, HFWD_PRODUCERS);
        for (int s = 0; s < HFWD_STAGES; s++) {
            mbarrier_init(&k_full[s], HFWD_PRODUCERS);
            mbarrier_init(&v_full[s], HFWD_PRODUCERS);
            mbarrier_init(&k_free[s], HFWD_CONSUMER_WARPS);
            mbarrier_init(&v_free[s], HFWD_CONSUMER_WARPS);
        }
    }
    __syncthreads();
    /* Each warpgroup's earliest first-visible key (one warp of each reduces its 64). */
    if (warp < HFWD_CONSUMER_WARPS && (warp & 3) == 0) {
        const int group = warp >> 2;
        int lo = min(fk[group * 64 + lane], fk[group * 64 + lane + 32]);
        for (int o = 16; o > 0; o >>= 1) lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        if (lane == 0) group_lo[group] = lo;
    }
    __syncthreads();
    const int k_begin = (min(group_lo[0], group_lo[1]) / HFWD_BN) * HFWD_BN, k_end = min(q0 + HFWD_BM, seq);
    const int n_tiles = k_begin < k_end ? (k_end - k_begin + HFWD_BN - 1) / HFWD_BN : 0;

    if (threadIdx.x >= HFWD_CONSUMERS) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(HFWD_PRODUCER_REGS));
        const int p = threadIdx.x - HFWD_CONSUMERS;
        /* Rows first.. of one head of [N, heads, D] into a swizzled [R][D] tile, zeros past seq; the
         * barrier hears of it when all of this thread's copies so far have landed. A thread copies
         * chunk j of rows r0, r0 + STEP, ... (STEP a multiple of 8, so the swizzle stays put). */
        constexpr int STEP = HFWD_PRODUCERS / CHUNKS;
        const int r0 = p / CHUNKS, j = p % CHUNKS;
        auto load = [&](u16* tile, const T* src, int first, int rows, int n_heads, int head, u64* landed) {
            const u64 stride = (u64)STEP * n_heads * D;
            const u16* from = (const u16*)src + ((tok0 + first + r0) * n_heads + head) * D + 8 * j;
            unsigned char* to = (unsigned char*)tile + swz_chunk(r0, j, D);
            for (int r = first + r0; r < first + rows; r += STEP) {
                const bool valid = r < seq;
                cp_async16(to, valid ? from : (const u16*)src, valid);
                from += stride;
                to += (STEP / 8) * (D / 64) * 1024;
            }
            mbarrier_cp_async_arrive(landed);
        };
        load(qs, q, q0, HFWD_BM, heads, h, &q_full);
        for (int t = 0; t < n_tiles; t++) {
            const int st = stage_of(t), kt = k_begin + t * HFWD_BN;
            const u32 free_parity = parity_of(t) ^ 1; /* the release of tile t - STAGES */
            mbarrier_wait(&k_free[st], free_parity);
            load(kbuf + st * HFWD_BN * D, k, kt, HFWD_BN, kv_heads, kvh, &k_full[st]);
            mbarrier_wait(&v_free[st], free_parity);
            load(vbuf + st * HFWD_BN * D, v, kt, HFWD_BN, kv_heads, kvh, &v_full[st]);
        }
        cp_async_commit();
        cp_async_wait<0>();
        return; /* no block-wide barrier follows */
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(HFWD_CONSUMER_REGS));
    /* Consumers: warpgroup `group`, queries gq0.. (64); this warp's rows qa_row, qb_row. */
    const int group = warp >> 2;
    const int wq0 = q0 + warp * 16, qa_row = wq0 + g, qb_row = qa_row + 8;
    const int gq0 = q0 + group * 64, g_lo = group_lo[group];
    const int fk_a = fk[warp * 16 + g], fk_b = fk[warp * 16 + g + 8];
    /* This warp's latest first-visible key: tiles from it on (and not past the diagonal) need no mask. */
    int w_hi = max(fk_a, fk_b);
    for (int off = 4; off < 32; off <<= 1) w_hi = max(w_hi, __shfl_xor_sync(0xffffffffu, w_hi, off));
    const float scale_log2 = scale * LOG2E;
    /* The tiles this warpgroup sees: [t_first, t_last); the others it only waits for and frees. */
    const int t_first = min(n_tiles, (g_lo - k_begin) / HFWD_BN);
    const int t_last = max(t_first, gq0 + 63 < k_begin ? 0 : min(n_tiles, (gq0 + 63 - k_begin) / HFWD_BN + 1));

    auto release = [&](u64* bar) {
        __syncwarp();
        if (lane == 0) mbarrier_arrive(bar);
    };
    auto skip_tile = [&](int t) {
        const int st = stage_of(t);
        const u32 parity = parity_of(t);
        mbarrier_wait(&k_full[st], parity);
        release(&k_free[st]);
        mbarrier_wait(&v_full[st], parity);
        release(&v_free[st]);
    };
    /* Ping-pong: the warpgroups take turns issuing their wgmma, one turn a round, warpgroup 0 first
     * (warpgroup 1 arrives at warpgroup 0's barrier once at the start), so that one's softmax runs while
     * the other's products do. Both take n_tiles + 1 turns, empty ones included, and wait for no tile
     * inside a turn. */
    auto turn_begin = [&]() { /* constant ids: ptxas then reserves 3 barriers, not all 16 */
        if (group == 0) named_barrier(HFWD_TURN_BARRIER, HFWD_CONSUMERS);
        else named_barrier(HFWD_TURN_BARRIER + 1, HFWD_CONSUMERS);
    };
    auto turn_end = [&]() {
        if (group == 0) named_barrier_arrive(HFWD_TURN_BARRIER + 1, HFWD_CONSUMERS);
        else named_barrier_arrive(HFWD_TURN_BARRIER, HFWD_CONSUMERS);
    };
    auto empty_turn = [&]() {
        turn_begin();
        turn_end();
    };
    auto keys_landed = [&](int t) { mbarrier_wait(&k_full[stage_of(t)], parity_of(t)); };
    auto values_landed = [&](int t) { mbarrier_wait(&v_full[stage_of(t)], parity_of(t)); };
    /* S = Q K^T for tile t, landed: the group's 64 query rows times the tile's 128 keys (committed, not
     * waited). */
    auto issue_scores = [&](float (&s)[NTILES][4], int t) {
        const u16* ks = kbuf + stage_of(t) * HFWD_BN * D;
        fence_proxy_async(); /* the producer's cp.async writes, seen through the tensor cores */
        wgmma_fence();
#pragma unroll
        for (int st = 0; st < KSTEPS; st++)
            wgmma_ss<0, 0>(s, kmajor_desc(qs, D, group * 64, 16 * st), kmajor_desc(ks, D, 0, 16 * st), st > 0, (T*)0);
        wgmma_commit();
    };
    /* O += P V for tile t, landed: P's accumulators are already A fragments, 16 keys a step; V read MN-major. */
    auto issue_values = [&](float (&o)[DTILES][4], const u32 (&pa)[PSTEPS][4], int t) {
        const u16* vs = vbuf + stage_of(t) * HFWD_BN * D;
        fence_proxy_async();
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < PSTEPS; j++) wgmma_rs<1>(o, pa[j], mnmajor_desc(vs, D, 16 * j, 0), 1, (T*)0);
        wgmma_commit();
    };
    auto masked = [&](int kt) { return kt + HFWD_BN - 1 > wq0 || kt < w_hi; };

    float o[DTILES][4];
#pragma unroll
    for (int i = 0; i < DTILES; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_a = -F32_INF, m_b = -F32_INF, l_a = 0.0f, l_b = 0.0f;

    if (group == 1) turn_end(); /* the first turn is warpgroup 0's */
    for (int t = 0; t < t_first; t++) {
        empty_turn();
        skip_tile(t);
    }
    if (t_first < t_last) {
        float s[NTILES][4], alpha_a, alpha_b;
        u32 pa[PSTEPS][4];
        mbarrier_wait(&q_full, 0);
        /* The first tile alone: S, its softmax, P. */
        keys_landed(t_first);
        turn_begin();
        issue_scores(s, t_first);
        turn_end();
        wgmma_wait<0>();
        fence_registers(s);
        release(&k_free[stage_of(t_first)]);
        int kt = k_begin + t_first * HFWD_BN;
        softmax_scores(s, m_a, m_b, l_a, l_b, alpha_a, alpha_b, masked(kt), kt, tq, fk_a, fk_b, qa_row, qb_row,
                       scale_log2);
        rescale_and_pack<T>(o, s, pa, alpha_a, alpha_b);
        for (int t = t_first + 1; t < t_last; t++) {
            keys_landed(t);
            values_landed(t - 1);
            turn_begin();
            issue_scores(s, t);
            issue_values(o, pa, t - 1);
            turn_end();
            wgmma_wait<1>(); /* S_t is in; P_{t-1} V_{t-1} may still run */
            fence_registers(s);
            kt = k_begin + t * HFWD_BN;
            softmax_scores(s, m_a, m_b, l_a, l_b, alpha_a, alpha_b, masked(kt), kt, tq, fk_a, fk_b, qa_row, qb_row,
                           scale_log2);
            /* K_t's stage is free since the wait above; freeing it only now also keeps ptxas from
             * hoisting the wait below above the softmax (the branch ends the basic block). */
            release(&k_free[stage_of(t)]);
            wgmma_wait<0>();
            fence_registers(o);
            fence_registers(pa);
            release(&v_free[stage_of(t - 1)]);
            rescale_and_pack<T>(o, s, pa, alpha_a, alpha_b);
        }
        values_landed(t_last - 1);
        turn_begin();
        issue_values(o, pa, t_last - 1);
        turn_end();
        wgmma_wait<0>();
        fence_registers(o);
        release(&v_free[stage_of(t_last - 1)]);
    } else {
        empty_turn(); /* in place of the last P V */
    }
    for (int t = t_last; t < n_tiles; t++) {
        empty_turn();
        skip_tile(t);
    }
    store_output_rows<T, D>(o, m_a, m_b, l_a, l_b, out, lse, tok0, qa_row, qb_row, seq, heads, h, tq);
    /* Warpgroup 1's last turn_end is one more arrival than warpgroup 0 has turns: taken here, so that
     * no barrier is left half passed. */
    if (group == 0) turn_begin();
#else
    __trap(); /* wgmma needs sm_90a; the host launches this kernel only on compute capability 9.0 */
#endif
}

#define ATTN_FWD_WGMMA(S, T, D)                                                                                \
    extern "C" __global__ void __launch_bounds__(HFWD_THREADS, 1) attention_forward_wgmma_##S##_d##D(          \
        const T* q, const T* k, const T* v, const int* doc_start, T* out, float* lse, int seq, int heads,      \
        int kv_heads, int window, float scale) {                                                               \
        attention_forward_wgmma<T, D>(q, k, v, doc_start, out, lse, seq, heads, kv_heads, window, scale);      \
    }
ATTN_FWD_WGMMA(bf16, bf16, 64)
ATTN_FWD_WGMMA(bf16, bf16, 128)
ATTN_FWD_WGMMA(f16, f16, 64)
ATTN_FWD_WGMMA(f16, f16, 128)

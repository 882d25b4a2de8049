/* Causal self-attention backward on Hopper's warpgroup MMA (wgmma, sm_90a), the math of
 * attention_bwd.cu (FlashAttention-2, Dao 2023), P recomputed from the saved lse:
 *   p_ij = exp(s_ij - lse_i),  dP_ij = dout_i . v_j,  dS_ij = p_ij (dP_ij - D_i)
 *   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,  dv_j = sum_i p_ij dout_i
 *
 * attention_backward_wgmma_<t>_d<D> (bf16/f16, D = 64 or 128), FlashAttention-3's warp-specialized
 * pipeline (Shah et al. 2024, section 3.1) on the backward: a block of 384 threads owns 128 keys of one
 * (row, kv head) and walks the query tiles of 64 that see them (every query head of the GQA group, or
 * one with the f32 parts, as attention_bwd.cu). Warps 0-7 are two consumer warpgroups of 64 keys each;
 * warps 8-11 the producer, which loads K and V once, then each tile's Q, dO, lse, D and document
 * starts into a ring of HBWD_STAGES stages by cp.async, all in wgmma's 128-byte swizzled layout
 * (wgmma.cuh). After the start no block-wide barrier: mbarriers say "tile landed" (each producer
 * thread's cp.async arrive on completion, 128 arrivals) and "stage free" (each consumer warp once the
 * products reading the stage are complete, 8 arrivals); the two consumer warpgroups meet at one named
 * barrier a tile (dS complete in shared memory). Per tile and consumer warpgroup:
 *   S^T = K Q^T, dP^T = V dO^T      2 x D/16 wgmma m64n64k16 from shared memory (K-major both), once
 *                                   the last tile's products are done (its stage freed); between the
 *                                   two, the last tile's dQ reductions into the f32 accumulator
 *                                   (red.global.add.v2.f32) behind S^T (not behind dP^T too: dQ and
 *                                   dP^T together would not fit the consumers' registers);
 *                                   P^T = exp(S^T - lse) computed while dP^T runs;
 *   dS^T = P^T (dP^T - D)           in registers, mma.sync's layout (attention_bwd.cu's code), with an
 *                                   unmasked path for tiles every query of which sees every key;
 *   dV += P^T dO, dK += dS^T Q      4 + 4 wgmma m64nDk16, A from those registers, B read MN-major,
 *                                   dK and dV accumulated in registers over the whole walk;
 *   dS^T (times the scale) to shared memory with key rows (one 4-byte store per query pair; two
 *   buffers, by processed tile, so that a warpgroup writes the next dS while the other's dQ may still
 *   read this one), then dQ = dS K for half of the head dimension per warpgroup: 8 wgmma m64n(D/2)k16,
 *   A = dS^T read M-major, B = K MN-major, left in flight. The reductions cost the 256-thread kernel
 *   18 % (0.797 against 0.655 ms without them, session 16); staging dQ in shared memory and adding it
 *   by one bulk reduction per query row (cp.reduce.async.bulk) measured no faster (0.797 against 0.785).
 * Tiles no query of which sees the block's keys are skipped (the same decision in every warp; the
 * consumers still wait for them and free their stages, which keeps the mbarrier phases in step).
 * Blocks run heaviest (earliest keys, which every later query sees) first, over groups of 8 (head,
 * row) pairs (heavy_first_block in attention.cuh).
 * GQA (dk_part non-null): a block per query head, its dK and dV added into f32 sums per kv head
 * [N, kv_heads, D] (dk_part, dv_part, zeroed by the host and rounded into dk, dv after) by bulk
 * reductions from shared memory, one per key row.
 * Shared memory: K, V 128 x D; 3 stages x (Q, dO 64 x D; lse, D, document starts 64 words each);
 *   2 x dS 128 x 64 halves; 1 KiB to align = 199,936 bytes at D = 128, 118,016 at D = 64; one block a
 *   multiprocessor. Registers: 168 a thread at launch (65536 / 384), moved by setmaxnreg to 232 for a
 *   consumer, which holds dK, dV (D/2 each), S^T and dQ or dP^T (32 each) at once, and 40 for the
 *   producer: 40 x 128 + 232 x 256 = 168 x 384 (ptxas: no spills; 240 / 24 spills the producer, and
 *   the consumers need more than 240 with dQ's reductions behind both products).
 * H200, b2 x 2048, 32 heads, D 128 (session 17): 0.700 ms, 245 TFLOP/s; the 256-thread kernel before it
 *   (all threads loading, two stages, __syncthreads a tile): 0.785 ms, 219 TFLOP/s. In the Mistral-7B
 *   step 24.5 ms for 32 calls, where the 256-thread kernel took 27.2.
 */
#define HBWD_BM 64               /* queries per tile */
#define HBWD_BN 128              /* keys per block, 64 per consumer warpgroup */
#define HBWD_STAGES 3            /* query tiles in flight */
#define HBWD_THREADS 384         /* two consumer warpgroups and the producer warpgroup */
#define HBWD_CONSUMERS 256       /* threads 0-255 consume, 256-383 load */
#define HBWD_PRODUCERS 128
#define HBWD_CONSUMER_WARPS 8
/* Registers a thread after the split (setmaxnreg): 40 x 128 + 232 x 256 = 168 x 384, the block's share. */
#define HBWD_PRODUCER_REGS 40
#define HBWD_CONSUMER_REGS 232
static_assert(REGISTER_SPLIT_FITS(HBWD_THREADS, HBWD_PRODUCERS, HBWD_PRODUCER_REGS, HBWD_CONSUMERS, HBWD_CONSUMER_REGS),
              "the setmaxnreg split asks for more registers than the block holds at launch (wgmma.cuh)");

/* Tile t of a block's walk over the query tiles that see its keys (per_head tiles of each head
 * from q_start, heads from h_first): its stage of the ring, the parity its "tile landed" barrier
 * completes with this time round (the producer waits for "stage free" with the other one: a fresh
 * barrier's parity 1 counts as done, so the stages start empty), its query head and first query.
 * Producer and consumers both take it from t, so their rings cannot drift apart. */
struct BwdTile {
    int stage;
    u32 parity;
    int head, q0;
};
__device__ __forceinline__ BwdTile bwd_tile(int t, int h_first, int q_start, int per_head) {
    return {t % HBWD_STAGES, (u32)(t / HBWD_STAGES) & 1u, h_first + t / per_head, q_start + (t % per_head) * HBWD_BM};
}

/* P^T in place of S^T: p = exp2(s scale log2(e) - lse log2(e)), zero where the key is not visible
 * (MASKED: the tile crosses the diagonal, a document start or the window). Element e of block n is
 * key (g or g+8), query 8n + 2tq + (e&1); lse_s and doc_s hold the tile's queries. */
template <bool MASKED, int QTILES>
__device__ __forceinline__ void exp_rows(float (&st)[QTILES][4], const float* lse_s, const int* doc_s, int q0, int tq,
                                         int key_a, int key_b, int seq, int window, float scale_log2) {
#pragma unroll
    for (int n = 0; n < QTILES; n++) {
        const int ql0 = 8 * n + 2 * tq;
        const float2 lse2 = *(const float2*)(lse_s + ql0);
        const float lse_log2[2] = {__fmul_rn(lse2.x, LOG2E), __fmul_rn(lse2.y, LOG2E)};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float p = exp2f(st[n][e] * scale_log2 - lse_log2[e & 1]);
            if (MASKED) {
                const int ql = ql0 + (e & 1), qi = q0 + ql, key = e < 2 ? key_a : key_b;
                const bool vis = key >= first_visible(doc_s[ql], qi, window) && key <= qi && qi < seq;
                p = vis ? p : 0.0f;
            }
            st[n][e] = p;
        }
    }
}

template <typename T, int D>
__device__ void attention_backward_wgmma(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                         const float* delta, const int* doc_start, float* dq_acc, T* dk, T* dv,
                                         float* dk_part, float* dv_part, int seq, int heads, int kv_heads, int window,
                                         float scale) {
#if WGMMA_AVAILABLE
    constexpr int KSTEPS = D / 16, DTILES = D / 8, QTILES = HBWD_BM / 8, DQ_COLS = D / 2;
    constexpr int CHUNKS = D / 8; /* 16-byte chunks a row */
    extern __shared__ __align__(128) unsigned char smem_raw[];
    u16* ks = (u16*)align_1024(smem_raw);          /* [BN][D] keys of this block */
    u16* vs = ks + HBWD_BN * D;                    /* [BN][D] values */
    u16* qbuf = vs + HBWD_BN * D;                  /* [STAGES][BM][D] query tiles */
    u16* dobuf = qbuf + HBWD_STAGES * HBWD_BM * D; /* [STAGES][BM][D] their output gradients */
    u16* dsbuf = dobuf + HBWD_STAGES * HBWD_BM * D; /* [2][BN][BM] dS^T (scaled), key rows */
    float* lse_buf = (float*)(dsbuf + 2 * HBWD_BM * HBWD_BN); /* [STAGES][BM] lse of the tiles' queries */
    float* dl_buf = lse_buf + HBWD_STAGES * HBWD_BM;          /* [STAGES][BM] D_i */
    int* doc_buf = (int*)(dl_buf + HBWD_STAGES * HBWD_BM);    /* [STAGES][BM] first key of each query's document */
    /* kv_full; tile_full (producer -> consumers) and tile_free (consumers -> producer) per stage. */
    __shared__ __align__(8) u64 kv_full, tile_full[HBWD_STAGES], tile_free[HBWD_STAGES];

    const GridBlock blk = heavy_first_block(); /* rank 0: the first key block, which every query sees */
    const BackwardHeads bh = backward_heads(dk_part != nullptr, blk.y, heads, kv_heads);
    const int kvh = bh.kvh, h_first = bh.h_first, n_heads = bh.n_heads;
    const int k0 = blk.rank * HBWD_BN, row = blk.row;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u64 tok0 = (u64)row * seq;
    const int key_last = min(k0 + HBWD_BN, seq) - 1;
    const int q_end = window > 0 ? min(seq, key_last + window) : seq;
    const int q_start = (k0 / HBWD_BM) * HBWD_BM;
    const int per_head = q_end > q_start ? (q_end - q_start + HBWD_BM - 1) / HBWD_BM : 0;
    const int tiles = n_heads * per_head;
    if (blockDim.x != HBWD_THREADS) __trap(); /* an older host's 256 threads would leave the loads undone */

    if (threadIdx.x == 0) {
        mbarrier_init(&kv_full, HBWD_PRODUCERS);
        for (int s = 0; s < HBWD_STAGES; s++) {
            mbarrier_init(&tile_full[s], HBWD_PRODUCERS);
            mbarrier_init(&tile_free[s], HBWD_CONSUMER_WARPS);
        }
    }
    __syncthreads();

    if (threadIdx.x >= HBWD_CONSUMERS) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(HBWD_PRODUCER_REGS));
        if (tiles == 0) return;
        const int p = threadIdx.x - HBWD_CONSUMERS;
        /* Rows first..first+rows-1 of one head of a and b ([N, n_heads, D]) into swizzled [rows][D]
         * tiles, zeros past seq. A thread copies chunk j of rows r0, r0 + STEP, ... (STEP a multiple
         * of 8, so that the swizzle stays put). */
        constexpr int STEP = HBWD_PRODUCERS / CHUNKS;
        const int r0 = p / CHUNKS, j = p % CHUNKS;
        auto load_pair = [&](u16* a_tile, u16* b_tile, const T* a, const T* b, int first, int rows, int n,
                             int head) {
            const u64 at = ((tok0 + first + r0) * n + head) * D + 8 * j, stride = (u64)STEP * n * D;
            const u16 *from_a = (const u16*)a + at, *from_b = (const u16*)b + at;
            const int to0 = swz_chunk(r0, j, D);
            for (int r = r0; r < rows; r += STEP) {
                const bool valid = first + r < seq;
                const int to = to0 + (r - r0) / 8 * (D / 64) * 1024;
                cp_async16((unsigned char*)a_tile + to, valid ? from_a : (const u16*)a, valid);
                cp_async16((unsigned char*)b_tile + to, valid ? from_b : (const u16*)b, valid);
                from_a += stride;
                from_b += stride;
            }
        };
        load_pair(ks, vs, k, v, k0, HBWD_BN, kv_heads, kvh);
        mbarrier_cp_async_arrive(&kv_full);
        for (int t = 0; t < tiles; t++) {
            const BwdTile tile = bwd_tile(t, h_first, q_start, per_head);
            const int s = tile.stage, th = tile.head, tq0 = tile.q0;
            mbarrier_wait(&tile_free[s], tile.parity ^ 1u);
            load_pair(qbuf + s * HBWD_BM * D, dobuf + s * HBWD_BM * D, q, dout, tq0, HBWD_BM, heads, th);
            if (p < HBWD_BM) {
                const int qi = tq0 + p;
                const bool valid = qi < seq;
                const u64 at = valid ? (tok0 + qi) * heads + th : 0;
                cp_async4(lse_buf + s * HBWD_BM + p, lse + at, valid);
                cp_async4(dl_buf + s * HBWD_BM + p, delta + at, valid);
                cp_async4(doc_buf + s * HBWD_BM + p, doc_start + (valid ? tok0 + qi : 0), valid);
            }
            mbarrier_cp_async_arrive(&tile_full[s]);
        }
        cp_async_commit();
        cp_async_wait<0>();
        return; /* no block-wide barrier follows */
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(HBWD_CONSUMER_REGS));
    const int g = lane >> 2, tq = lane & 3, group = warp >> 2, gwarp = warp & 3;
    const float scale_log2 = scale * LOG2E;
    float dkacc[DTILES][4], dvacc[DTILES][4];
#pragma unroll
    for (int i = 0; i < DTILES; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) dkacc[i][e] = dvacc[i][e] = 0.0f;
    /* Warp w holds keys 16w + g and 16w + g + 8 of the block (rows of its warpgroup's accumulators). */
    const int key_a = k0 + warp * 16 + g, key_b = key_a + 8;
    /* Descriptors of the fixed operands: this warpgroup's K and V rows (K-major) and the group's half
     * of K for dQ (MN-major). */
    const u64 k_desc = kmajor_desc(ks, D, group * 64, 0), v_desc = kmajor_desc(vs, D, group * 64, 0);
    const u64 k_t_desc = mnmajor_desc(ks, D, 0, group * DQ_COLS);
    auto release = [&](int stage) {
        __syncwarp();
        if (lane == 0) mbarrier_arrive(&tile_free[stage]);
    };
    /* A tile's dQ waits in registers, and its reductions into dq_acc are issued behind the next
     * tile's S^T product; its stage is freed with them (its dK, dV products are done too). */
    float dq[DQ_COLS / 8][4];
    int pending_h = -1, pending_q0 = 0, pending_stage = 0;
    auto retire_pending = [&]() {
        const int qa = pending_q0 + gwarp * 16 + g, qb = qa + 8;
        const u64 col = group * DQ_COLS + 2 * tq;
        float* row_a = dq_acc + ((tok0 + qa) * heads + pending_h) * D + col;
        float* row_b = dq_acc + ((tok0 + qb) * heads + pending_h) * D + col;
#pragma unroll
        for (int i = 0; i < DQ_COLS / 8; i++) {
            add_pair_if(qa < seq, row_a + 8 * i, dq[i][0], dq[i][1]);
            add_pair_if(qb < seq, row_b + 8 * i, dq[i][2], dq[i][3]);
        }
        release(pending_stage);
        pending_h = -1;
    };
    if (tiles > 0) {
        mbarrier_wait(&kv_full, 0);
        fence_proxy_async(); /* the producer's cp.async writes, seen through the tensor cores */
    }
    int done = 0;
    for (int t = 0; t < tiles; t++) {
        const BwdTile tile = bwd_tile(t, h_first, q_start, per_head);
        const int stage = tile.stage, q0 = tile.q0;
        const u16* qs = qbuf + stage * HBWD_BM * D;
        const u16* dos = dobuf + stage * HBWD_BM * D;
        const float* lse_s = lse_buf + stage * HBWD_BM;
        const float* dl_s = dl_buf + stage * HBWD_BM;
        const int* doc_s = doc_buf + stage * HBWD_BM;
        mbarrier_wait(&tile_full[stage], tile.parity);
        fence_proxy_async();
        /* Whether any query of the tile sees this block's keys, and whether every query sees all of
         * them (no mask needed): lane l checks queries l and l + 32, the same answer in every warp. */
        bool any = false, all = true;
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int ql = lane + 32 * half, qi = q0 + ql;
            const int fk = first_visible(doc_s[ql], qi, window);
            any |= qi < seq && fk <= key_last && qi >= k0;
            all &= qi < seq && fk <= k0 && qi >= key_last;
        }
        if (!__any_sync(0xffffffffu, any)) {
            if (pending_h >= 0) {
                wgmma_wait<0>();
                retire_pending();
            }
            release(stage);
        } else {
            const bool full = __all_sync(0xffffffffu, all);
            wgmma_wait<0>(); /* the last tile's products are done (its dQ, its stage, the other dS buffer) */
            /* S^T = K Q^T and dP^T = V dO^T: the warpgroup's 64 keys x the tile's 64 queries. */
            float st[QTILES][4], dpt[QTILES][4];
            const u64 q_desc = kmajor_desc(qs, D, 0, 0), do_desc = kmajor_desc(dos, D, 0, 0);
            wgmma_fence();
#pragma unroll
            for (int s = 0; s < KSTEPS; s++)
                wgmma_ss<0, 0>(st, desc_advance(k_desc, kmajor_step(s)), desc_advance(q_desc, kmajor_step(s)), s > 0,
                               (T*)0);
            wgmma_commit();
            /* The last tile's dQ reductions behind S^T (and before dP^T: its accumulators and dQ's
             * together would not fit the consumers' registers). */
            if (pending_h >= 0) retire_pending();
            wgmma_fence();
#pragma unroll
            for (int s = 0; s < KSTEPS; s++)
                wgmma_ss<0, 0>(dpt, desc_advance(v_desc, kmajor_step(s)), desc_advance(do_desc, kmajor_step(s)),
                               s > 0, (T*)0);
            wgmma_commit();
            /* P^T = exp(S^T - lse) (masked) while the tensor cores still compute dP^T. */
            wgmma_wait<1>();
            if (full)
                exp_rows<false>(st, lse_s, doc_s, q0, tq, key_a, key_b, seq, window, scale_log2);
            else
                exp_rows<true>(st, lse_s, doc_s, q0, tq, key_a, key_b, seq, window, scale_log2);
            wgmma_wait<0>();
            /* dS^T = P^T (dP^T - D) in place: element e of block n is key (g or g+8), query 8n + 2tq +
             * (e&1); the A fragments of dV += P^T dO and dK += dS^T Q packed from them, and dS^T
             * (scaled) to shared memory with key rows, where the two queries of a pair are adjacent
             * (one 4-byte store). */
            u16* dss = dsbuf + (done & 1) * HBWD_BN * HBWD_BM;
            u32 pa[HBWD_BM / 16][4], da[HBWD_BM / 16][4];
#pragma unroll
            for (int n = 0; n < QTILES; n++) {
                const int ql0 = 8 * n + 2 * tq;
                const float2 dl2 = *(const float2*)(dl_s + ql0);
#pragma unroll
                for (int e = 0; e < 4; e++) dpt[n][e] = st[n][e] * (dpt[n][e] - ((e & 1) ? dl2.y : dl2.x));
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    int kl = warp * 16 + g + 8 * half;
                    *(u32*)((unsigned char*)dss + swz_offset(kl, ql0, HBWD_BM)) =
                        pack2<T>(dpt[n][2 * half] * scale, dpt[n][2 * half + 1] * scale);
                }
                pa[n / 2][2 * (n & 1)] = pack2<T>(st[n][0], st[n][1]);
                pa[n / 2][2 * (n & 1) + 1] = pack2<T>(st[n][2], st[n][3]);
                da[n / 2][2 * (n & 1)] = pack2<T>(dpt[n][0], dpt[n][1]);
                da[n / 2][2 * (n & 1) + 1] = pack2<T>(dpt[n][2], dpt[n][3]);
            }
            const u64 do_t_desc = mnmajor_desc(dos, D, 0, 0), q_t_desc = mnmajor_desc(qs, D, 0, 0);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < HBWD_BM / 16; j++) {
                wgmma_rs<1>(dvacc, pa[j], desc_advance(do_t_desc, 2 * (D / 64) * 1024 * j), 1, (T*)0);
                wgmma_rs<1>(dkacc, da[j], desc_advance(q_t_desc, 2 * (D / 64) * 1024 * j), 1, (T*)0);
            }
            wgmma_commit();
            fence_proxy_async();
            /* Both consumer warpgroups' dS are in shared memory. The other buffer's last readers, the
             * dQ products of the tile before the last, were complete before either warpgroup came to
             * the last tile's barrier. */
            named_barrier(1, HBWD_CONSUMERS);
            /* dQ[:, this group's half of D] = dS K over the block's 128 keys, left in flight. */
            const u64 ds_desc = mnmajor_desc(dss, HBWD_BM, 0, 0);
            wgmma_fence();
#pragma unroll
            for (int s = 0; s < HBWD_BN / 16; s++)
                wgmma_ss<1, 1>(dq, desc_advance(ds_desc, 2 * (HBWD_BM / 64) * 1024 * s),
                               desc_advance(k_t_desc, 2 * (D / 64) * 1024 * s), s > 0, (T*)0);
            wgmma_commit();
            pending_h = tile.head;
            pending_q0 = q0;
            pending_stage = stage;
            done++;
        }
    }
    wgmma_wait<0>();
    if (pending_h >= 0) retire_pending();
    if (dk_part == nullptr) {
        store_key_gradients<T, D, false>(dkacc, dvacc, scale, dk, dv, nullptr, nullptr, tok0, key_a, key_b, seq, heads,
                                         kv_heads, kvh, h_first, tq);
        return;
    }
    /* GQA: this query head's dK (times the scale) and dV added into the f32 sums of its kv head,
     * [N, kv_heads, D]: staged in the tiles' shared memory (free once both consumer warpgroups'
     * products are done and every tile has landed: rows of D + 4 floats, 132 KiB of their 160 at
     * D = 128), then one bulk reduction per key row and tensor by thread r < 64 of each warpgroup. */
    named_barrier(1, HBWD_CONSUMERS);
    constexpr int LD = D + 4; /* floats between staged rows: 16-byte aligned, fewer bank conflicts */
    float* stage_k = (float*)ks;
    float* stage_v = stage_k + HBWD_BN * LD;
    const int ra = warp * 16 + g, rb = ra + 8;
#pragma unroll
    for (int i = 0; i < DTILES; i++) {
        const int d = 8 * i + 2 * tq;
        *(float2*)(stage_k + ra * LD + d) = make_float2(dkacc[i][0] * scale, dkacc[i][1] * scale);
        *(float2*)(stage_k + rb * LD + d) = make_float2(dkacc[i][2] * scale, dkacc[i][3] * scale);
        *(float2*)(stage_v + ra * LD + d) = make_float2(dvacc[i][0], dvacc[i][1]);
        *(float2*)(stage_v + rb * LD + d) = make_float2(dvacc[i][2], dvacc[i][3]);
    }
    fence_proxy_async();
    named_barrier(2 + group, 128);
    const int group_thread = threadIdx.x & 127, kr = group * 64 + group_thread, key = k0 + kr;
    if (group_thread < 64 && key < seq) {
        const u64 at = ((tok0 + key) * kv_heads + kvh) * D;
        bulk_reduce_add_f32(dk_part + at, stage_k + kr * LD, D * 4);
        bulk_reduce_add_f32(dv_part + at, stage_v + kr * LD, D * 4);
        bulk_commit();
        bulk_wait_all();
    }
#else
    __trap(); /* wgmma needs sm_90a; the host launches this kernel only on compute capability 9.0 */
#endif
}

#define ATTN_BWD_WGMMA(S, T, D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(HBWD_THREADS, 1) attention_backward_wgmma_##S##_d##D(             \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,                  \
        const int* doc_start, float* dq_acc, T* dk, T* dv, float* dk_part, float* dv_part, int seq, int heads,    \
        int kv_heads, int window, float scale) {                                                                  \
        attention_backward_wgmma<T, D>(q, k, v, dout, lse, delta, doc_start, dq_acc, dk, dv, dk_part, dv_part,    \
                                       seq, heads, kv_heads, window, scale);                                      \
    }
ATTN_BWD_WGMMA(bf16, bf16, 64)
ATTN_BWD_WGMMA(bf16, bf16, 128)
ATTN_BWD_WGMMA(f16, f16, 64)
ATTN_BWD_WGMMA(f16, f16, 128)

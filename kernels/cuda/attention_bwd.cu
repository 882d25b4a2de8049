/* Causal self-attention backward (FlashAttention-2, Dao 2023), recomputing P from the saved lse:
 *   p_ij = exp(s_ij - lse_i),  D_i = dout_i . out_i,  dP_ij = dout_i . v_j,  dS_ij = p_ij (dP_ij - D_i)
 *   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,  dv_j = sum_i p_ij dout_i
 * with the visibility rule of attention_fwd.cu. Nothing of size seq x seq reaches global memory.
 *
 * attention_backward_dot_<t>:     D_i = dout_i . out_i  (f32 [N, heads]), one warp per (token, head);
 *   the same warp zeroes the f32 accumulators the mma kernels add into: dQ's row of its (token, head)
 *   and, with GQA on Hopper, the dK/dV sums' row of (token, kv head = head) for head < kv_heads (null
 *   pointers where there are none), so that no memset launch of its own runs before the backward
 *   (4 bytes written per f32 element: the memset's traffic, one launch fewer or three with GQA).
 * attention_backward_mma_<t>_d<D>_w<NW> (bf16/f16): a block owns 16·NW keys of one (row, kv head);
 *   its NW warps hold 16 keys each, with dK and dV accumulated in registers over every query head of the GQA
 *   group and every query tile of 32 that can see the keys (so dk/dv need no atomics and K/V are
 *   read once; each warp's K A-fragments stay in registers for the whole run: 2.4% faster than
 *   reloading them per tile, while holding V's too spills). Per tile: S^T = K Q^T and
 *   dP^T = V dO^T on the tensor cores, P^T and dS^T in registers, dV += P^T dO and dK += dS^T Q from those registers, then dS goes through shared
 *   memory for dQ += dS K, added into an f32 accumulator by 8-byte vector reductions on sm_90 (pairs of
 *   columns: 1.548 -> 1.391 ms against scalar atomics), scalar atomics below (cast to the dtype afterwards).
 *   Tiles no query of which sees the keys (documents, window) are skipped. The next tile's Q and dO,
 *   with its queries' lse, D and document starts, stream into a second buffer by cp.async while the
 *   current one is used: two barriers a tile (1.632 -> 1.548 ms against four, with the per-query loads
 *   waited on by the whole block). Fragments come from shared
 *   memory through ldmatrix (.trans where the product needs the transposed tile), rows padded by 8.
 *   With GQA (heads > kv_heads) the block owns one query head instead, so that the group's heads run in
 *   parallel, and its dK, dV go in f32 to per-head parts that attention_backward_group_sum_<t> adds up.
 * attention_backward_simple_dq_<t> / _dkdv_<t>: one warp per query (or per key and kv head); the
 *   f32 mode's path and the fallback for other head sizes.
 */
/* Queries per tile. The keys per block, 16 per warp, are a template parameter: at D = 128, 128 keys
 * (8 warps, 113 KiB of shared memory) halve the dQ atomics and the Q/dO tile loads per key against
 * 64 keys (4 warps, 74 KiB), with the same warps per multiprocessor (one block of 8 instead of two
 * of 4); the host takes the 8-warp kernel where the device's shared memory per block allows. */
#define BWD_BM 32 /* = the warp size: lane l of every warp checks query l of a tile */

template <typename T>
__device__ void attention_backward_dot(const T* dout, const T* out, float* delta, u64 pairs, int d, float* dq_zero,
                                       float* dk_zero, float* dv_zero, int heads, int kv_heads) {
    const int lane = threadIdx.x & 31;
    const u64 pair = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (pair >= pairs) return;
    float acc = 0.0f;
    for (int c = lane; c < d; c += 32) acc += load_f32(dout[pair * d + c]) * load_f32(out[pair * d + c]);
    acc = warp_sum(acc);
    if (lane == 0) delta[pair] = acc;
    if (dq_zero != nullptr)
        for (int c = lane; c < d; c += 32) dq_zero[pair * d + c] = 0.0f;
    const int head = (int)(pair % heads);
    if (dk_zero != nullptr && head < kv_heads) {
        const u64 at = ((pair / heads) * kv_heads + head) * d;
        for (int c = lane; c < d; c += 32) dk_zero[at + c] = dv_zero[at + c] = 0.0f;
    }
}

template <typename T, int D, int NW>
__device__ void attention_backward_mma(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                       const float* delta, const int* doc_start, float* dq_acc, T* dk, T* dv, float* dk_part,
                                       float* dv_part, int seq, int heads, int kv_heads, int window, float scale) {
    constexpr int BWD_BN = 16 * NW, LD = D + 8, LDS = BWD_BN + 8, KSTEPS = D / 16, DTILES = D / 8, QTILES = BWD_BM / 8;
    constexpr int CHUNKS = D / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* ks = (u16*)smem_raw;          /* [BN][LD]  keys of this block */
    u16* vs = ks + BWD_BN * LD;        /* [BN][LD]  values */
    u16* qbuf = vs + BWD_BN * LD;      /* [2][BM][LD] query tiles: the current one and the next */
    u16* dobuf = qbuf + 2 * BWD_BM * LD; /* [2][BM][LD] their output gradients */
    u16* dss = dobuf + 2 * BWD_BM * LD; /* [BM][LDS] dS (scaled), query-major */
    float* lse_buf = (float*)(dss + BWD_BM * LDS); /* [2][BM] lse of the two tiles' queries */
    float* dl_buf = lse_buf + 2 * BWD_BM;              /* [2][BM] D_i */
    int* doc_buf = (int*)(dl_buf + 2 * BWD_BM);        /* [2][BM] first key of each query's document */

    const BackwardHeads bh = backward_heads(dk_part != nullptr, blockIdx.y, heads, kv_heads);
    const int kvh = bh.kvh, h_first = bh.h_first, n_heads = bh.n_heads;
    const int k0 = blockIdx.x * BWD_BN, row = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const u64 tok0 = (u64)row * seq;
    const float scale_log2 = scale * LOG2E;
    const int key_last = min(k0 + BWD_BN, seq) - 1;

    for (int c = threadIdx.x; c < BWD_BN * CHUNKS; c += blockDim.x) {
        int r = c / CHUNKS, col = (c % CHUNKS) * 8, key = k0 + r;
        uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
        if (key < seq) {
            u64 at = ((tok0 + key) * kv_heads + kvh) * D + col;
            kv4 = *(const uint4*)((const u16*)k + at);
            vv4 = *(const uint4*)((const u16*)v + at);
        }
        *(uint4*)(ks + r * LD + col) = kv4;
        *(uint4*)(vs + r * LD + col) = vv4;
    }

    __syncthreads();
    /* This warp's 16 keys as A fragments, held for the whole run (loaded once, not per tile). */
    u32 kf[KSTEPS][4];
    for (int s = 0; s < KSTEPS; s++) ldm_a(kf[s], ks, LD, warp * 16, 16 * s);
    float dkacc[DTILES][4], dvacc[DTILES][4];
    for (int i = 0; i < DTILES; i++)
        for (int e = 0; e < 4; e++) dkacc[i][e] = dvacc[i][e] = 0.0f;
    const int key_a = k0 + warp * 16 + g, key_b = key_a + 8;
    const int q_end = window > 0 ? min(seq, key_last + window) : seq;

    /* The (query head, query tile) pairs in order; tile t + 1's Q, dO, lse, D and document starts
     * load by cp.async while tile t is used, so that a tile needs two barriers and no load waits
     * in its path (before: four, the lse/D/document loads waited on by the whole block). */
    const int q_start = (k0 / BWD_BM) * BWD_BM;
    const int per_head = q_end > q_start ? (q_end - q_start + BWD_BM - 1) / BWD_BM : 0;
    const int tiles = n_heads * per_head;
    const u16 *qg = (const u16*)q, *dog = (const u16*)dout;
    auto load_tile = [&](int t, int buf) {
        const int th = h_first + t / per_head, tq0 = q_start + (t % per_head) * BWD_BM;
        for (int c = threadIdx.x; c < BWD_BM * CHUNKS; c += blockDim.x) {
            int r = c / CHUNKS, col = (c % CHUNKS) * 8, qi = tq0 + r;
            bool valid = qi < seq;
            u64 at = valid ? ((tok0 + qi) * heads + th) * D + col : 0;
            cp_async16(qbuf + (buf * BWD_BM + r) * LD + col, qg + at, valid);
            cp_async16(dobuf + (buf * BWD_BM + r) * LD + col, dog + at, valid);
        }
        load_query_vectors<BWD_BM>(lse_buf + buf * BWD_BM, dl_buf + buf * BWD_BM, doc_buf + buf * BWD_BM, lse, delta, doc_start,
                                 tok0, tq0, seq, heads, th);
        cp_async_commit();
    };
    if (tiles > 0) load_tile(0, 0);
    for (int t = 0; t < tiles; t++) {
        const int h = h_first + t / per_head, q0 = q_start + (t % per_head) * BWD_BM;
        const u16* qs = qbuf + (t & 1) * BWD_BM * LD;
        const u16* dos = dobuf + (t & 1) * BWD_BM * LD;
        const float* lse_s = lse_buf + (t & 1) * BWD_BM;
        const float* dl_s = dl_buf + (t & 1) * BWD_BM;
        const int* doc_s = doc_buf + (t & 1) * BWD_BM;
        {
            cp_async_wait<0>();
            __syncthreads(); /* tile t is in shared memory; every warp is done with tile t - 1 */
            if (t + 1 < tiles) load_tile(t + 1, (t + 1) & 1);
            /* Whether any query of the tile sees this block's keys: the same answer in every warp
             * (lane l looks at query l), so the skip keeps the block together. */
            const int qi_l = q0 + lane;
            const int fk_l = first_visible(doc_s[lane], qi_l, window);
            if (!__any_sync(0xffffffffu, qi_l < seq && fk_l <= key_last && qi_l >= k0)) continue;

            /* S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x 32 queries. */
            float st[QTILES][4], dpt[QTILES][4];
            for (int n = 0; n < QTILES; n++)
                for (int e = 0; e < 4; e++) st[n][e] = dpt[n][e] = 0.0f;
            for (int s = 0; s < KSTEPS; s++) {
                const u32* ka = kf[s];
                u32 va[4];
                ldm_a(va, vs, LD, warp * 16, 16 * s);
                for (int n = 0; n < QTILES; n += 2) {
                    u32 b[4];
                    ldm_b2(b, qs, LD, 16 * s, 8 * n);
                    mma_16x8x16(st[n], ka, b, (T*)0);
                    mma_16x8x16(st[n + 1], ka, b + 2, (T*)0);
                    ldm_b2(b, dos, LD, 16 * s, 8 * n);
                    mma_16x8x16(dpt[n], va, b, (T*)0);
                    mma_16x8x16(dpt[n + 1], va, b + 2, (T*)0);
                }
            }
            /* P^T and dS^T in place: element e of tile n is key (g or g+8), query 8n + 2tq + (e&1). */
            for (int n = 0; n < QTILES; n++) {
                for (int e = 0; e < 4; e++) {
                    int ql = 8 * n + 2 * tq + (e & 1), qi = q0 + ql;
                    int key = e < 2 ? key_a : key_b;
                    int fk = first_visible(doc_s[ql], qi, window);
                    bool vis = key >= fk && key <= qi && qi < seq;
                    float p = vis ? exp2f(st[n][e] * scale_log2 - __fmul_rn(lse_s[ql], LOG2E)) : 0.0f;
                    st[n][e] = p;
                    dpt[n][e] = p * (dpt[n][e] - dl_s[ql]);
                }
            }
            /* dV += P^T dO and dK += dS^T Q, the A operands straight from registers. */
            for (int j = 0; j < BWD_BM / 16; j++) {
                u32 pa[4], da[4];
                pa[0] = pack2_int<T>(st[2 * j][0], st[2 * j][1]);
                pa[1] = pack2_int<T>(st[2 * j][2], st[2 * j][3]);
                pa[2] = pack2_int<T>(st[2 * j + 1][0], st[2 * j + 1][1]);
                pa[3] = pack2_int<T>(st[2 * j + 1][2], st[2 * j + 1][3]);
                da[0] = pack2_int<T>(dpt[2 * j][0], dpt[2 * j][1]);
                da[1] = pack2_int<T>(dpt[2 * j][2], dpt[2 * j][3]);
                da[2] = pack2_int<T>(dpt[2 * j + 1][0], dpt[2 * j + 1][1]);
                da[3] = pack2_int<T>(dpt[2 * j + 1][2], dpt[2 * j + 1][3]);
                for (int i = 0; i < DTILES; i += 2) {
                    u32 b[4];
                    ldm_b2_t(b, dos, LD, 16 * j, 8 * i);
                    mma_16x8x16(dvacc[i], pa, b, (T*)0);
                    mma_16x8x16(dvacc[i + 1], pa, b + 2, (T*)0);
                    ldm_b2_t(b, qs, LD, 16 * j, 8 * i);
                    mma_16x8x16(dkacc[i], da, b, (T*)0);
                    mma_16x8x16(dkacc[i + 1], da, b + 2, (T*)0);
                }
            }
            /* dS (times the softmax scale) to shared memory, query-major, for dQ = dS K. */
            for (int n = 0; n < QTILES; n++) {
                for (int e = 0; e < 4; e++) {
                    int ql = 8 * n + 2 * tq + (e & 1);
                    int kl = warp * 16 + g + (e < 2 ? 0 : 8);
                    dss[ql * LDS + kl] = bits_int<T>(dpt[n][e] * scale);
                }
            }
            __syncthreads();
            /* dQ: warp w takes queries 16*(w&1).. and head-dim slice (w>>1) of NW/2, 4 column tiles at a time. */
            constexpr int DSLICE = D / (NW / 2);
            const int qh = (warp & 1) * 16, dbase = (warp >> 1) * DSLICE;
            for (int part = 0; part < DSLICE; part += 32) {
                float acc[4][4];
                for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
                for (int j = 0; j < BWD_BN / 16; j++) {
                    u32 a[4];
                    ldm_a(a, dss, LDS, qh, 16 * j);
                    for (int i = 0; i < 4; i += 2) {
                        u32 b[4];
                        ldm_b2_t(b, ks, LD, 16 * j, dbase + part + 8 * i);
                        mma_16x8x16(acc[i], a, b, (T*)0);
                        mma_16x8x16(acc[i + 1], a, b + 2, (T*)0);
                    }
                }
                const int qa = q0 + qh + g, qb = qa + 8;
                for (int i = 0; i < 4; i++) {
                    int d = dbase + part + 8 * i + 2 * tq;
                    if (qa < seq) {
                        float* p = dq_acc + ((tok0 + qa) * heads + h) * D + d;
                        add_pair(p, acc[i][0], acc[i][1]);
                    }
                    if (qb < seq) {
                        float* p = dq_acc + ((tok0 + qb) * heads + h) * D + d;
                        add_pair(p, acc[i][2], acc[i][3]);
                    }
                }
            }
        }
    }
    store_key_gradients<T, D, true>(dkacc, dvacc, scale, dk, dv, dk_part, dv_part, tok0, key_a, key_b, seq, heads,
                                    kv_heads, kvh, h_first, tq);
}

/* dK, dV of GQA from the per-query-head parts: out[t, kvh, c] = sum_j part[t, kvh * per_kv + j, c].
 * One thread per output element; reads the parts once. */
template <typename T>
__device__ void attention_backward_group_sum(const float* part, T* out, u64 total, int heads, int kv_heads, int d) {
    const int per_kv = heads / kv_heads;
    for (u64 i = THREAD_INDEX; i < total; i += GRID_STRIDE) {
        u64 tok = i / ((u64)kv_heads * d);
        int rest = (int)(i % ((u64)kv_heads * d)), kvh = rest / d, c = rest % d;
        const float* p = part + (tok * heads + (u64)kvh * per_kv) * d + c;
        float acc = 0.0f;
        for (int j = 0; j < per_kv; j++) acc += p[(u64)j * d];
        out[i] = store_f32<T>(acc);
    }
}

/* One warp per (query token, head): dq_i = scale sum_j dS_ij k_j. Lanes split the head dimension. */
template <typename T>
__device__ void attention_backward_simple_dq(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                             const float* delta, const int* doc_start, T* dq, int rows, int seq,
                                             int heads, int kv_heads, int d, int window, float scale) {
    const int lane = threadIdx.x & 31;
    const u64 pair = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (pair >= (u64)rows * seq * heads) return;
    const u64 tok = pair / heads;
    const int h = (int)(pair % heads), kvh = h / (heads / kv_heads), qi = (int)(tok % seq);
    const u64 tok0 = tok - qi;
    const int first = first_key_of(doc_start, tok0, qi, window);
    const float l = lse[pair], big_d = delta[pair];
    float qv[8], dov[8], acc[8];
    for (int c = 0; c < 8; c++) {
        int dim = lane + 32 * c;
        qv[c] = dim < d ? load_f32(q[pair * d + dim]) : 0.0f;
        dov[c] = dim < d ? load_f32(dout[pair * d + dim]) : 0.0f;
        acc[c] = 0.0f;
    }
    for (int j = first; j <= qi; j++) {
        const u64 at = ((tok0 + j) * kv_heads + kvh) * d;
        float s = 0.0f, dp = 0.0f;
        for (int c = 0; c < 8; c++) {
            int dim = lane + 32 * c;
            if (dim < d) {
                s += qv[c] * load_f32(k[at + dim]);
                dp += dov[c] * load_f32(v[at + dim]);
            }
        }
        s = warp_sum(s);
        dp = warp_sum(dp);
        float p = __expf(s * scale - l), ds = p * (dp - big_d);
        for (int c = 0; c < 8; c++) {
            int dim = lane + 32 * c;
            if (dim < d) acc[c] += ds * load_f32(k[at + dim]);
        }
    }
    for (int c = 0; c < 8; c++) {
        int dim = lane + 32 * c;
        if (dim < d) dq[pair * d + dim] = store_f32<T>(acc[c] * scale);
    }
}

/* One warp per (key token, kv head): dk_j and dv_j summed over the group's query heads and the
 * queries that see key j. */
template <typename T>
__device__ void attention_backward_simple_dkdv(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                               const float* delta, const int* doc_start, T* dk, T* dv, int rows,
                                               int seq, int heads, int kv_heads, int d, int window, float scale) {
    const int lane = threadIdx.x & 31;
    const u64 pair = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (pair >= (u64)rows * seq * kv_heads) return;
    const u64 tok = pair / kv_heads;
    const int kvh = (int)(pair % kv_heads), kj = (int)(tok % seq), per_kv = heads / kv_heads;
    const u64 tok0 = tok - kj;
    float kv[8], vv[8], dka[8], dva[8];
    for (int c = 0; c < 8; c++) {
        int dim = lane + 32 * c;
        kv[c] = dim < d ? load_f32(k[pair * d + dim]) : 0.0f;
        vv[c] = dim < d ? load_f32(v[pair * d + dim]) : 0.0f;
        dka[c] = dva[c] = 0.0f;
    }
    const int q_end = window > 0 ? min(seq, kj + window) : seq;
    for (int qi = kj; qi < q_end; qi++) {
        if (first_key_of(doc_start, tok0, qi, window) > kj) continue;
        for (int h = kvh * per_kv; h < (kvh + 1) * per_kv; h++) {
            const u64 qp = (tok0 + qi) * heads + h;
            float s = 0.0f, dp = 0.0f;
            for (int c = 0; c < 8; c++) {
                int dim = lane + 32 * c;
                if (dim < d) {
                    s += kv[c] * load_f32(q[qp * d + dim]);
                    dp += vv[c] * load_f32(dout[qp * d + dim]);
                }
            }
            s = warp_sum(s);
            dp = warp_sum(dp);
            float p = __expf(s * scale - lse[qp]), ds = p * (dp - delta[qp]);
            for (int c = 0; c < 8; c++) {
                int dim = lane + 32 * c;
                if (dim < d) {
                    dka[c] += ds * load_f32(q[qp * d + dim]);
                    dva[c] += p * load_f32(dout[qp * d + dim]);
                }
            }
        }
    }
    for (int c = 0; c < 8; c++) {
        int dim = lane + 32 * c;
        if (dim < d) {
            dk[pair * d + dim] = store_f32<T>(dka[c] * scale);
            dv[pair * d + dim] = store_f32<T>(dva[c]);
        }
    }
}

#define ATTN_BWD_MMA(S, T, D, NW)                                                                                \
    extern "C" __global__ void __launch_bounds__(NW * 32) attention_backward_mma_##S##_d##D##_w##NW(            \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,                 \
        const int* doc_start, float* dq_acc, T* dk, T* dv, float* dk_part, float* dv_part, int seq, int heads,   \
        int kv_heads, int window, float scale) {                                                                 \
        attention_backward_mma<T, D, NW>(q, k, v, dout, lse, delta, doc_start, dq_acc, dk, dv, dk_part, dv_part, seq, \
                                     heads, kv_heads, window, scale);                                            \
    }
/* (D, NW) as BACKWARD_MMA_VARIANTS in kernels/src/cuda/attention.rs. */
ATTN_BWD_MMA(bf16, bf16, 64, 4)
ATTN_BWD_MMA(bf16, bf16, 128, 4)
ATTN_BWD_MMA(bf16, bf16, 128, 8)
ATTN_BWD_MMA(f16, f16, 64, 4)
ATTN_BWD_MMA(f16, f16, 128, 4)
ATTN_BWD_MMA(f16, f16, 128, 8)

#define ATTN_BWD_SIMPLE(S, T)                                                                                     \
    extern "C" __global__ void attention_backward_group_sum_##S(const float* part, T* out, u64 total, int heads, \
                                                                int kv_heads, int d) {                          \
        attention_backward_group_sum<T>(part, out, total, heads, kv_heads, d);                                  \
    }                                                                                                             \
    extern "C" __global__ void attention_backward_dot_##S(const T* dout, const T* out, float* delta, u64 pairs,   \
                                                          int d, float* dq_zero, float* dk_zero, float* dv_zero,  \
                                                          int heads, int kv_heads) {                              \
        attention_backward_dot<T>(dout, out, delta, pairs, d, dq_zero, dk_zero, dv_zero, heads, kv_heads);      \
    }                                                                                                             \
    extern "C" __global__ void attention_backward_simple_dq_##S(                                                 \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,                  \
        const int* doc_start, T* dq, int rows, int seq, int heads, int kv_heads, int d, int window, float scale) { \
        attention_backward_simple_dq<T>(q, k, v, dout, lse, delta, doc_start, dq, rows, seq, heads, kv_heads, d,  \
                                        window, scale);                                                           \
    }                                                                                                             \
    extern "C" __global__ void attention_backward_simple_dkdv_##S(                                               \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,                  \
        const int* doc_start, T* dk, T* dv, int rows, int seq, int heads, int kv_heads, int d, int window,        \
        float scale) {                                                                                            \
        attention_backward_simple_dkdv<T>(q, k, v, dout, lse, delta, doc_start, dk, dv, rows, seq, heads,         \
                                          kv_heads, d, window, scale);                                            \
    }
FOR_EACH_DTYPE(ATTN_BWD_SIMPLE)

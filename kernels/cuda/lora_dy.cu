/* LoRA's two backward products with a projection's output gradient dy, from one read of dy:
 *   dB [out, r] += dy^T t     (t [n, r]: the forward's x A^T, scaled; dB the f32 gradient of B)
 *   u  [n, r]   += dy B       (B [out, r]: the adapter's up-projection; u then gives dx += s u A)
 * dy [n, out] dense; t, B and u rows t_ld, b_ld and u_ld apart (each pointer at its matrix's first
 * element, the host adds the offsets); dy, t and B bf16 or f16; dB [out, r] dense and u f32, both
 * added into (the caller zeroes u first and rounds it to the compute dtype afterwards).
 * Each product alone is memory-bound (2r FLOPs per 2-byte element of dy: 32 at r = 16), so the two
 * cuBLAS products this replaces read dy twice; here each block streams its part of dy once and
 * feeds both products from the same shared-memory tile.
 *
 * lora_dy_products_<t>_r<RP>: ranks r <= RP (RP = 16, 32, 48, 64; r a multiple of 8, the t and B
 * tiles zero-filled from column r to RP). Grid (strips, splits), 4 warps a block: block (x, y) owns
 * the 128 columns 128x.. of dy (its strip) and the rows y * rows_per_split.. (its split, a whole
 * number of chunks). The strip's 128 rows of B are loaded once; dy's rows and t's stream through
 * shared memory in chunks of 64 by a 3-stage cp.async pipeline (16-byte copies, zero-filled past n
 * and out, so tails add zeros). Per chunk, on the tensor cores (mma.sync m16n8k16, f32 accumulators):
 *   u:  warp w takes the chunk's rows 16w..16w+15 over all 128 columns, u_w [16, RP] = dy_w B_strip,
 *       and adds it into u (red.global.add of column pairs, one .v2 instruction on sm_90): this
 *       strip's share of the sum over out, which the strips add up in L2.
 *   dB: warp w takes the strip's columns 32w..32w+31, dB_w [32, RP] += dy_chunk[:, cols]^T t_chunk,
 *       held in registers over all the block's rows; the A fragments of dy^T come from the same dy
 *       tile through ldmatrix.trans (ldm_a_t).
 * At the end each block adds its dB rows into dB the same way. Sums run in another order than a
 * GEMM's: equal to cuBLAS's up to f32 rounding, not bit for bit.
 * Traffic: dy read once (2 n out bytes); t once per strip (2 n r ceil(out/128)) and B once per split
 * (2 out r splits), mostly L2 hits; reductions of 4 n r ceil(out/128) bytes into u and
 * 4 out r splits into dB, in L2 (u is 4 n r bytes: 256 KiB at n = 4096, r = 16). At n = 4096,
 * out = 14336, r = 16 on 132 multiprocessors (3 splits): 117 MB of dy, 29 MB of u reductions.
 * Shared memory (16-bit elements, rows padded by 8 so that ldmatrix's 8 rows fall in distinct banks):
 * B's strip 128 (RP+8), per stage 64 (128+8) of dy and 64 (RP+8) of t: 66 KiB at RP = 16, 96 KiB at
 * RP = 64. sm_80+ (the host runs the two products through cuBLAS on older devices).
 * H200, n = 4096, r = 16 (session 16): out 1024 / 4096 / 11008 / 14336 in 6.6 / 14.1 / 41.4 / 51.5 us,
 * the two cuBLAS products 28.6 / 35.3 / 54.7 / 67.7 us. Writing u rounded by the last block of each
 * split (no zeroing and rounding launches around it) measured 8.8 / 19.0 / 48.1 / 60.7 us and no
 * faster in the step (session 17): the finishing block works alone.
 */
#define LORA_WARPS 4
#define LORA_STRIP (32 * LORA_WARPS) /* columns of dy a block owns: 32 per warp in dB */
#define LORA_CHUNK (16 * LORA_WARPS) /* rows of dy a pipeline stage holds: 16 per warp in u */
#define LORA_STAGES 3

template <typename T, int RP>
__device__ void lora_dy_products(const T* dy, const T* t, const T* b, float* db, float* u, int n, int out, int r,
                                 u64 t_ld, u64 b_ld, u64 u_ld, int rows_per_split) {
    constexpr int LD = LORA_STRIP + 8, LDR = RP + 8, NT = RP / 8;
    constexpr int DY_PIECES = LORA_STRIP / 8, R_PIECES = RP / 8; /* 16-byte copies per row */
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* bs = (u16*)smem_raw;                      /* [STRIP][LDR]         B's rows of the strip */
    u16* dys = bs + LORA_STRIP * LDR;              /* [STAGES][CHUNK][LD]  dy's chunks */
    u16* ts = dys + LORA_STAGES * LORA_CHUNK * LD; /* [STAGES][CHUNK][LDR] t's chunks */

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int col0 = blockIdx.x * LORA_STRIP, row_begin = blockIdx.y * rows_per_split;
    const int row_end = min(n, row_begin + rows_per_split);
    if (row_begin >= row_end) return;
    const int chunks = (row_end - row_begin + LORA_CHUNK - 1) / LORA_CHUNK, r_pieces = r / 8;
    const u16 *dyg = (const u16*)dy, *tg = (const u16*)t, *bg = (const u16*)b;

    for (int c = threadIdx.x; c < LORA_STRIP * R_PIECES; c += blockDim.x) {
        const int i = c / R_PIECES, p = c % R_PIECES, col = col0 + i;
        const bool valid = col < out && p < r_pieces;
        cp_async16(bs + i * LDR + 8 * p, bg + (valid ? (u64)col * b_ld + 8 * p : 0), valid);
    }
    auto load_chunk = [&](int k) {
        const int row0 = row_begin + k * LORA_CHUNK, stage = k % LORA_STAGES;
        u16* dyd = dys + stage * LORA_CHUNK * LD;
        u16* td = ts + stage * LORA_CHUNK * LDR;
        for (int c = threadIdx.x; c < LORA_CHUNK * DY_PIECES; c += blockDim.x) {
            const int i = c / DY_PIECES, col = 8 * (c % DY_PIECES), row = row0 + i;
            const bool valid = row < row_end && col0 + col < out;
            cp_async16(dyd + i * LD + col, dyg + (valid ? (u64)row * out + col0 + col : 0), valid);
        }
        for (int c = threadIdx.x; c < LORA_CHUNK * R_PIECES; c += blockDim.x) {
            const int i = c / R_PIECES, p = c % R_PIECES, row = row0 + i;
            const bool valid = row < row_end && p < r_pieces;
            cp_async16(td + i * LDR + 8 * p, tg + (valid ? (u64)row * t_ld + 8 * p : 0), valid);
        }
    };
    /* One cp.async group per chunk (B's strip in chunk 0's, empty groups past the last chunk), so that
     * waiting until LORA_STAGES - 2 groups are in flight at chunk k means chunks 0..k have landed; the
     * groups still open when the loop ends are empty. */
    for (int k = 0; k < LORA_STAGES - 1; k++) {
        if (k < chunks) load_chunk(k);
        cp_async_commit();
    }

    float dbacc[2][NT][4];
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
        for (int j = 0; j < NT; j++) dbacc[m][j][0] = dbacc[m][j][1] = dbacc[m][j][2] = dbacc[m][j][3] = 0.0f;

    for (int k = 0; k < chunks; k++) {
        cp_async_wait<LORA_STAGES - 2>();
        __syncthreads(); /* chunk k is in shared memory; every warp is done with chunk k - 1, whose stage the load below refills */
        if (k + LORA_STAGES - 1 < chunks) load_chunk(k + LORA_STAGES - 1);
        cp_async_commit();
        const u16* dyk = dys + (k % LORA_STAGES) * LORA_CHUNK * LD;
        const u16* tk = ts + (k % LORA_STAGES) * LORA_CHUNK * LDR;

        /* u's rows of this warp: [16, RP] = dy [16, 128] B_strip [128, RP]. */
        float uacc[NT][4];
#pragma unroll
        for (int j = 0; j < NT; j++) uacc[j][0] = uacc[j][1] = uacc[j][2] = uacc[j][3] = 0.0f;
#pragma unroll
        for (int s = 0; s < LORA_STRIP / 16; s++) {
            u32 a[4];
            ldm_a(a, dyk, LD, 16 * warp, 16 * s);
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                u32 bf[4];
                ldm_b2_t(bf, bs, LDR, 16 * s, 8 * j);
                mma_16x8x16(uacc[j], a, bf, (T*)0);
                mma_16x8x16(uacc[j + 1], a, bf + 2, (T*)0);
            }
        }
        const int row_a = row_begin + k * LORA_CHUNK + 16 * warp + g;
        float* u_a = u + (u64)row_a * u_ld + 2 * tq;
#pragma unroll
        for (int j = 0; j < NT; j++) {
            if (8 * j < r) {
                add_pair_if(row_a < row_end, u_a + 8 * j, uacc[j][0], uacc[j][1]);
                add_pair_if(row_a + 8 < row_end, u_a + 8 * u_ld + 8 * j, uacc[j][2], uacc[j][3]);
            }
        }

        /* dB's rows (dy's columns) of this warp: [32, RP] += dy[:, 32 cols]^T [32, 64] t [64, RP]. */
#pragma unroll
        for (int s = 0; s < LORA_CHUNK / 16; s++) {
            u32 tf[NT / 2][4];
#pragma unroll
            for (int j = 0; j < NT; j += 2) ldm_b2_t(tf[j / 2], tk, LDR, 16 * s, 8 * j);
#pragma unroll
            for (int m = 0; m < 2; m++) {
                u32 a[4];
                ldm_a_t(a, dyk, LD, 32 * warp + 16 * m, 16 * s);
#pragma unroll
                for (int j = 0; j < NT; j++) mma_16x8x16(dbacc[m][j], a, tf[j / 2] + 2 * (j & 1), (T*)0);
            }
        }
    }

#pragma unroll
    for (int m = 0; m < 2; m++) {
        const int col_a = col0 + 32 * warp + 16 * m + g;
        float* db_a = db + (u64)col_a * r + 2 * tq;
#pragma unroll
        for (int j = 0; j < NT; j++) {
            if (8 * j < r) {
                add_pair_if(col_a < out, db_a + 8 * j, dbacc[m][j][0], dbacc[m][j][1]);
                add_pair_if(col_a + 8 < out, db_a + 8 * r + 8 * j, dbacc[m][j][2], dbacc[m][j][3]);
            }
        }
    }
}

#define LORA_DY_KERNEL(S, T, RP)                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * LORA_WARPS)                                            \
        lora_dy_products_##S##_r##RP(const T* dy, const T* t, const T* b, float* db, float* u, int n, int out, \
                                     int r, u64 t_ld, u64 b_ld, u64 u_ld, int rows_per_split) {              \
        lora_dy_products<T, RP>(dy, t, b, db, u, n, out, r, t_ld, b_ld, u_ld, rows_per_split);              \
    }
#define LORA_DY_KERNELS(S, T) \
    LORA_DY_KERNEL(S, T, 16) LORA_DY_KERNEL(S, T, 32) LORA_DY_KERNEL(S, T, 48) LORA_DY_KERNEL(S, T, 64)
LORA_DY_KERNELS(bf16, bf16)
LORA_DY_KERNELS(f16, f16)

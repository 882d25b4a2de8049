/* NF4 dequantization (bitsandbytes quant_type="nf4", blocksize 64), the QLoRA base weight read:
 *   out[(i / cols) * ld + i % cols] = c[code[i]] * A[i / 64]    for i < n = rows * cols
 * with c the 16-value NF4 table and the 4-bit codes packed two per byte, element 2k in the high
 * nibble. The weight's rows of cols elements land ld >= cols apart; cols == ld is the dense weight.
 * The _padded kernels also write a LoRA-padded weight's pad W' = [W | pad] (Nf4Pad, width w =
 * ld - cols), what place_block.cuh's function writes (here, in the same launch):
 *   out[i * ld + cols + j] = B[i, j - b0]   for b0 <= j < b1,   0 for the other j < w
 * with B [rows, b1 - b0] rows b_ld apart (a member's LoRA B in its block, zeros in the others');
 * with w passed as 0 the pad columns are left as they are.
 * A is the block's absmax: stored as f32 (plain), or decoded from 8 bits (double quant):
 *   A[b] = f32(map[code8[b]] * nested_absmax[b / 256]) + offset
 * rounded twice, as bitsandbytes does: __fmul_rn/__fadd_rn keep the compiler from fusing them.
 *
 * Each thread decodes NF4_CHUNKS_PER_THREAD chunks of 8 elements (one 32-bit word of codes each, one
 * 16-byte store in bf16/f16, two in f32); in each round a block's threads take consecutive chunks,
 * so a warp's loads cover 128 contiguous bytes and its stores 512 (bf16), and all of a thread's
 * loads (codes and absmax) are issued before its first store. Session 12 measured the earlier
 * layout (one thread per 16 elements, two 16-byte stores 32 bytes apart per lane) at 2.2 TB/s, 46 %
 * of the H200's bandwidth. The 8 elements of a chunk share their block's absmax (8 divides 64).
 * The code table is read from shared memory: in __constant__ memory the 32 lanes' different
 * indices serialise (one address per cycle), which held this kernel to ~15% of the memory
 * bandwidth. Traffic: n/2 bytes in, n·sizeof(T) out, the absmax tables ~n/64; with a pad also
 * rows·(b1 - b0) elements of B read and rows·w written (w = 48 against cols = 4096 at 7B with three
 * rank-16 adapters: about 1% more).
 * Byte j of a word is bits 8j..8j+7 (little endian): elements 2j (high nibble) and
 * 2j+1 of the chunk. A chunk is one 16-byte store when the output is 16-byte aligned and the chunk
 * stays 8 aligned consecutive elements of out: cols == ld (the dense weight), or cols and ld
 * multiples of 8, the chunk's row found by one division per chunk. Otherwise (and for the last
 * n % 8 elements) elements are stored one by one, the row advancing as the column wraps past cols:
 * about 6x slower (0.19 against 0.033 ms for bf16 11008 x 4096 on an H200), so padded rows are best
 * kept multiples of 8 long. The dense weight has its own kernels (nf4_dequantize_{plain,double}),
 * the padded one the _padded ones: the row arithmetic as a run-time choice inside the dense kernel
 * cost the double-quant one 3-14% (0.0373-0.0415 against 0.0363 ms, same shape). The f32 output
 * holds exactly the host's bits; B's values are copied as stored.
 *
 * The pad is place_block.cuh's grid-stride loop (16-byte words where B, the pad and their strides
 * allow, else elements), run by each thread after its own chunks; the grid's ~n/32 threads
 * outnumber the rows·w pad elements whenever w < cols/32. Writing it here instead of in a
 * place_block launch saves a launch per dequantization (~250 a Mistral-7B QLoRA step: the
 * forward's five folded projections and the recomputation's three, per layer).
 */
__constant__ float NF4_CODE[16] = {
    -1.0f,         -0.6961928f,  -0.52507305f, -0.3949175f,  -0.28444138f, -0.18477343f,
    -0.091050036f, 0.0f,         0.0795803f,   0.1609302f,   0.2461123f,   0.33791524f,
    0.44070983f,   0.562617f,    0.72295684f,  1.0f};

#define NF4_CHUNKS_PER_THREAD 4 /* kernels/src/cuda/nf4.rs sizes the grid by it */

/* Block b's absmax A[b]: stored, or decoded from its 8-bit code (double quant). */
template <bool DOUBLE>
__device__ __forceinline__ float nf4_absmax(u64 b, const float* absmax, const unsigned char* absmax_codes,
                                            const float* nested_absmax, const float* map, float offset) {
    return DOUBLE ? __fadd_rn(__fmul_rn(map[absmax_codes[b]], nested_absmax[b / 256]), offset) : absmax[b];
}

/* Stores v[0..count) as the weight's elements first.. : at first.. in the dense weight, else in
 * rows of cols elements ld apart (the row advancing as the column wraps). */
template <bool PADDED, typename T>
__device__ __forceinline__ void nf4_store_each(T* out, u64 first, const float* v, int count, u64 cols, u64 ld) {
    if (!PADDED) {
        for (int j = 0; j < count; j++) out[first + j] = store_f32<T>(v[j]);
        return;
    }
    u64 row = div_u64(first, cols), col = first - row * cols;
    for (int j = 0; j < count; j++) {
        out[row * ld + col] = store_f32<T>(v[j]);
        if (++col == cols) {
            col = 0;
            row++;
        }
    }
}

/* Where chunk c goes in out, counted in chunks of 8: c in the dense weight, else row c / (cols/8)
 * of rows ld/8 chunks apart (cols and ld multiples of 8, so the chunk stays in its row). */
template <bool PADDED>
__device__ __forceinline__ u64 nf4_out_chunk(u64 c, u64 cols, u64 ld) {
    if (!PADDED) return c;
    const u64 row = div_u64(c, cols / 8);
    return row * (ld / 8) + (c - row * (cols / 8));
}

/* The pad a _padded kernel writes after each row's cols elements: its width w pad columns (0: the
 * pad is left as it is), B [rows, b1 - b0] at b with rows b_ld apart, and the block b0..b1. */
template <typename T>
struct Nf4Pad {
    const T* b;
    u64 b_ld, b0, b1, width;
};

/* PADDED: rows of cols elements ld apart, then the pad (the _padded kernels); else cols == ld and
 * out is the dense weight, whose kernels carry none of the row arithmetic and ignore cols, ld and
 * pad. */
template <typename T, bool DOUBLE, bool PADDED>
__device__ void nf4_dequantize(const unsigned char* packed, const float* absmax,
                               const unsigned char* absmax_codes, const float* nested_absmax,
                               const float* map, float offset, T* out, u64 n, u64 cols, u64 ld,
                               const Nf4Pad<T>& pad) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    const u64 chunks = n / 8;
    const u64 first = (u64)blockIdx.x * blockDim.x * NF4_CHUNKS_PER_THREAD + threadIdx.x;
    const bool vector = aligned16(out) && (!PADDED || (cols % 8 == 0 && ld % 8 == 0));
    unsigned word[NF4_CHUNKS_PER_THREAD];
    float a[NF4_CHUNKS_PER_THREAD];
#pragma unroll
    for (int r = 0; r < NF4_CHUNKS_PER_THREAD; r++) {
        const u64 c = first + (u64)r * blockDim.x;
        if (c < chunks) {
            word[r] = ((const unsigned*)packed)[c];
            a[r] = nf4_absmax<DOUBLE>(c / 8, absmax, absmax_codes, nested_absmax, map, offset);
        }
    }
#pragma unroll
    for (int r = 0; r < NF4_CHUNKS_PER_THREAD; r++) {
        const u64 c = first + (u64)r * blockDim.x;
        if (c >= chunks) break;
        float v[8];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const unsigned byte = (word[r] >> (8 * j)) & 0xffu;
            v[2 * j] = __fmul_rn(code[byte >> 4], a[r]);
            v[2 * j + 1] = __fmul_rn(code[byte & 15], a[r]);
        }
        if (vector) {
            store8(out, nf4_out_chunk<PADDED>(c, cols, ld), v);
        } else {
            nf4_store_each<PADDED>(out, 8 * c, v, 8, cols, ld);
        }
    }
    if (blockIdx.x == 0 && threadIdx.x < n % 8) {
        const u64 i = chunks * 8 + threadIdx.x;
        const unsigned byte = packed[i / 2];
        const float ai = nf4_absmax<DOUBLE>(i / 64, absmax, absmax_codes, nested_absmax, map, offset);
        const float v = __fmul_rn(code[i % 2 == 0 ? byte >> 4 : byte & 15], ai);
        nf4_store_each<PADDED>(out, i, &v, 1, cols, ld);
    }
    /* The pad: place_block.cuh's loop over the pad columns, with this grid. */
    if (PADDED)
        place_block(pad.b, pad.b_ld, out + cols, ld, pad.width, pad.b0, pad.b1, div_u64(n, cols) * pad.width);
}

/* The dense kernels take cols and ld and ignore them; the padded ones take the pad's fields too. */
#define NF4_PAD_PARAMS(T) const T *pad_b, u64 pad_b_ld, u64 pad_b0, u64 pad_b1, u64 pad_width
#define NF4_PAD(T) Nf4Pad<T>{pad_b, pad_b_ld, pad_b0, pad_b1, pad_width}
#define NF4_PLAIN_ARGS (const unsigned char*)packed, absmax, 0, 0, 0, 0.0f, out, n, cols, ld
#define NF4_DOUBLE_ARGS                                                                           \
    (const unsigned char*)packed, 0, (const unsigned char*)absmax_codes, nested_absmax, map, offset, \
        out, n, cols, ld
#define NF4_PLAIN_PARAMS(T) const int *packed, const float *absmax, T *out, u64 n, u64 cols, u64 ld
#define NF4_DOUBLE_PARAMS(T)                                                                      \
    const int *packed, const int *absmax_codes, const float *nested_absmax, const float *map,     \
        float offset, T *out, u64 n, u64 cols, u64 ld
#define NF4_KERNELS(S, T)                                                                         \
    extern "C" __global__ void nf4_dequantize_plain_##S(NF4_PLAIN_PARAMS(T)) {                    \
        nf4_dequantize<T, false, false>(NF4_PLAIN_ARGS, Nf4Pad<T>{});                             \
    }                                                                                             \
    extern "C" __global__ void nf4_dequantize_plain_padded_##S(NF4_PLAIN_PARAMS(T),               \
                                                               NF4_PAD_PARAMS(T)) {               \
        nf4_dequantize<T, false, true>(NF4_PLAIN_ARGS, NF4_PAD(T));                               \
    }                                                                                             \
    extern "C" __global__ void nf4_dequantize_double_##S(NF4_DOUBLE_PARAMS(T)) {                  \
        nf4_dequantize<T, true, false>(NF4_DOUBLE_ARGS, Nf4Pad<T>{});                             \
    }                                                                                             \
    extern "C" __global__ void nf4_dequantize_double_padded_##S(NF4_DOUBLE_PARAMS(T),             \
                                                                NF4_PAD_PARAMS(T)) {              \
        nf4_dequantize<T, true, true>(NF4_DOUBLE_ARGS, NF4_PAD(T));                               \
    }
FOR_EACH_DTYPE(NF4_KERNELS)

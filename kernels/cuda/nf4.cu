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
 * 2j+1 of the chunk. A chunk is one 16-byte store when the output is 16-byte aligned; otherwise (and
 * for the last n % 8 elements) elements are stored one by one. The f32 output holds exactly the
 * host's bits; B's values are copied as stored.
 *
 * The padded kernels (nf4_dequantize_{plain,double}_padded) run a block per row and column range:
 * grid (rows, ceil(cols / (8 · NF4_CHUNKS_PER_THREAD · blockDim.x))), the row its block's index, so
 * no division places a chunk. Where cols and ld are multiples of 8 (the row's codes start on a word
 * and its output on 16 bytes) the chunks are as above, counted from the row's start; otherwise the
 * row's elements go one by one (each reading its nibble and absmax: ~6x slower, so padded rows are
 * best kept multiples of 8 long). The row's block 0 then writes the row's pad, one element a thread.
 * The earlier padded kernel (the dense one's grid, a 64-bit division per chunk to find its row, the
 * pad by a grid-stride loop after) ran 7-31% behind the dense one; on an H200 (session 26, bf16,
 * double quant) 4096 x 4096 into ld 4144 went 17.3 -> 13.7 us (dense 13.2), 11008 x 4096 into
 * ld 4128 42.0 -> 33.7 us (dense 35.2).
 * Writing the pad here instead of in a place_block launch saves a launch per dequantization (~250
 * a Mistral-7B QLoRA step: the forward's five folded projections and the recomputation's three,
 * per layer).
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

/* Decodes chunk c (elements 8c..8c+7) from its word of codes and its block's absmax a. */
__device__ __forceinline__ void nf4_decode_chunk(unsigned word, float a, const float* code, float* v) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const unsigned byte = (word >> (8 * j)) & 0xffu;
        v[2 * j] = __fmul_rn(code[byte >> 4], a);
        v[2 * j + 1] = __fmul_rn(code[byte & 15], a);
    }
}

/* Element i of the weight: its nibble times its block's absmax. */
template <bool DOUBLE>
__device__ __forceinline__ float nf4_element(u64 i, const unsigned char* packed, const float* code,
                                             const float* absmax, const unsigned char* absmax_codes,
                                             const float* nested_absmax, const float* map, float offset) {
    const unsigned byte = packed[i / 2];
    const float a = nf4_absmax<DOUBLE>(i / 64, absmax, absmax_codes, nested_absmax, map, offset);
    return __fmul_rn(code[i % 2 == 0 ? byte >> 4 : byte & 15], a);
}

/* The pad a _padded kernel writes after each row's cols elements: its width w pad columns (0: the
 * pad is left as it is), B [rows, b1 - b0] at b with rows b_ld apart, and the block b0..b1. */
template <typename T>
struct Nf4Pad {
    const T* b;
    u64 b_ld, b0, b1, width;
};

/* A run of chunks whose codes start at word w0 of `packed` and whose output starts at `out`: the
 * thread's chunks first, first + blockDim.x, ... (NF4_CHUNKS_PER_THREAD of them, those below end),
 * all of their loads (codes and absmax) issued before the first store; one 16-byte store a chunk
 * where `vector` (the output 16-byte aligned), else element by element. */
template <typename T, bool DOUBLE>
__device__ __forceinline__ void nf4_decode_chunks(const unsigned char* packed, u64 w0, u64 first, u64 end,
                                                  const float* code, const float* absmax,
                                                  const unsigned char* absmax_codes, const float* nested_absmax,
                                                  const float* map, float offset, T* out, bool vector) {
    unsigned word[NF4_CHUNKS_PER_THREAD];
    float a[NF4_CHUNKS_PER_THREAD];
#pragma unroll
    for (int r = 0; r < NF4_CHUNKS_PER_THREAD; r++) {
        const u64 c = first + (u64)r * blockDim.x;
        if (c < end) {
            word[r] = ((const unsigned*)packed)[w0 + c];
            a[r] = nf4_absmax<DOUBLE>((w0 + c) / 8, absmax, absmax_codes, nested_absmax, map, offset);
        }
    }
#pragma unroll
    for (int r = 0; r < NF4_CHUNKS_PER_THREAD; r++) {
        const u64 c = first + (u64)r * blockDim.x;
        if (c >= end) break;
        float v[8];
        nf4_decode_chunk(word[r], a[r], code, v);
        if (vector) {
            store8(out, c, v);
        } else {
            for (int j = 0; j < 8; j++) out[8 * c + j] = store_f32<T>(v[j]);
        }
    }
}

/* The dense weight: out[i] for i < n, chunks of NF4_CHUNKS_PER_THREAD a thread, a block's threads
 * on consecutive chunks in each round. */
template <typename T, bool DOUBLE>
__device__ void nf4_dequantize(const unsigned char* packed, const float* absmax, const unsigned char* absmax_codes,
                               const float* nested_absmax, const float* map, float offset, T* out, u64 n) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    const u64 chunks = n / 8;
    const u64 first = (u64)blockIdx.x * blockDim.x * NF4_CHUNKS_PER_THREAD + threadIdx.x;
    nf4_decode_chunks<T, DOUBLE>(packed, 0, first, chunks, code, absmax, absmax_codes, nested_absmax, map, offset,
                                 out, aligned16(out));
    if (blockIdx.x == 0 && threadIdx.x < n % 8) {
        const u64 i = chunks * 8 + threadIdx.x;
        out[i] = store_f32<T>(nf4_element<DOUBLE>(i, packed, code, absmax, absmax_codes, nested_absmax, map, offset));
    }
}

/* Padded rows: block (row, part) writes columns part · 8 · NF4_CHUNKS_PER_THREAD · blockDim.x ..
 * of row `row` (rows ld apart), and part 0 the row's pad (width = ld - cols columns when pad.width
 * is not 0). */
template <typename T, bool DOUBLE>
__device__ void nf4_dequantize_padded(const unsigned char* packed, const float* absmax,
                                      const unsigned char* absmax_codes, const float* nested_absmax, const float* map,
                                      float offset, T* out, u64 cols, u64 ld, const Nf4Pad<T>& pad) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    const u64 row = blockIdx.x, span = (u64)8 * NF4_CHUNKS_PER_THREAD * blockDim.x;
    T* out_row = out + row * ld;
    const u64 col_begin = blockIdx.y * span, col_end = min(cols, col_begin + span);
    if (cols % 8 == 0 && ld % 8 == 0 && aligned16(out)) {
        /* The row's chunks: word row · cols/8 + cc of the codes, 16 bytes at out_row + 8 cc. */
        nf4_decode_chunks<T, DOUBLE>(packed, row * (cols / 8), col_begin / 8 + threadIdx.x, col_end / 8, code, absmax,
                                     absmax_codes, nested_absmax, map, offset, out_row, true);
    } else {
        for (u64 col = col_begin + threadIdx.x; col < col_end; col += blockDim.x)
            out_row[col] = store_f32<T>(
                nf4_element<DOUBLE>(row * cols + col, packed, code, absmax, absmax_codes, nested_absmax, map, offset));
    }
    if (blockIdx.y == 0)
        for (u64 j = threadIdx.x; j < pad.width; j += blockDim.x)
            out_row[cols + j] = j >= pad.b0 && j < pad.b1 ? pad.b[row * pad.b_ld + (j - pad.b0)] : store_f32<T>(0.0f);
}

/* The dense kernels take the element count; the padded ones the row length, the row distance and
 * the pad's fields (their grid gives the rows). */
#define NF4_PAD_PARAMS(T) const T *pad_b, u64 pad_b_ld, u64 pad_b0, u64 pad_b1, u64 pad_width
#define NF4_PAD(T) Nf4Pad<T>{pad_b, pad_b_ld, pad_b0, pad_b1, pad_width}
#define NF4_PLAIN_ABSMAX (const unsigned char*)packed, absmax, 0, 0, 0, 0.0f
#define NF4_DOUBLE_ABSMAX \
    (const unsigned char*)packed, 0, (const unsigned char*)absmax_codes, nested_absmax, map, offset
#define NF4_PLAIN_PARAMS const int *packed, const float *absmax
#define NF4_DOUBLE_PARAMS \
    const int *packed, const int *absmax_codes, const float *nested_absmax, const float *map, float offset
#define NF4_KERNELS(S, T)                                                                                    \
    extern "C" __global__ void nf4_dequantize_plain_##S(NF4_PLAIN_PARAMS, T* out, u64 n) {                   \
        nf4_dequantize<T, false>(NF4_PLAIN_ABSMAX, out, n);                                                  \
    }                                                                                                        \
    extern "C" __global__ void nf4_dequantize_plain_padded_##S(NF4_PLAIN_PARAMS, T* out, u64 cols, u64 ld,   \
                                                               NF4_PAD_PARAMS(T)) {                          \
        nf4_dequantize_padded<T, false>(NF4_PLAIN_ABSMAX, out, cols, ld, NF4_PAD(T));                        \
    }                                                                                                        \
    extern "C" __global__ void nf4_dequantize_double_##S(NF4_DOUBLE_PARAMS, T* out, u64 n) {                 \
        nf4_dequantize<T, true>(NF4_DOUBLE_ABSMAX, out, n);                                                  \
    }                                                                                                        \
    extern "C" __global__ void nf4_dequantize_double_padded_##S(NF4_DOUBLE_PARAMS, T* out, u64 cols, u64 ld, \
                                                                NF4_PAD_PARAMS(T)) {                         \
        nf4_dequantize_padded<T, true>(NF4_DOUBLE_ABSMAX, out, cols, ld, NF4_PAD(T));                        \
    }
FOR_EACH_DTYPE(NF4_KERNELS)

/* NF4 dequantization (bitsandbytes quant_type="nf4", blocksize 64), the QLoRA base weight read:
 *   out[i] = c[code[i]] * A[i / 64]
 * with c the 16-value NF4 table and the 4-bit codes packed two per byte, element 2k in the high
 * nibble. A is the block's absmax: stored as f32 (plain), or decoded from 8 bits (double quant):
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
 * bandwidth. Traffic: n/2 bytes in, n·sizeof(T) out, the absmax tables ~n/64. Byte j of a word is
 * bits 8j..8j+7 (little endian): elements 2j (high nibble) and 2j+1 of the chunk. The last n % 8
 * elements, and every element when the output is not 16-byte aligned, are stored one by one. The
 * f32 output holds exactly the host's bits.
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

template <typename T, bool DOUBLE>
__device__ void nf4_dequantize(const unsigned char* packed, const float* absmax,
                               const unsigned char* absmax_codes, const float* nested_absmax,
                               const float* map, float offset, T* out, u64 n) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    const u64 chunks = n / 8;
    const u64 first = (u64)blockIdx.x * blockDim.x * NF4_CHUNKS_PER_THREAD + threadIdx.x;
    const bool vector = aligned16(out);
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
            store8(out, c, v);
        } else {
            for (int j = 0; j < 8; j++) out[8 * c + j] = store_f32<T>(v[j]);
        }
    }
    if (blockIdx.x == 0 && threadIdx.x < n % 8) {
        const u64 i = chunks * 8 + threadIdx.x;
        const unsigned byte = packed[i / 2];
        const float ai = nf4_absmax<DOUBLE>(i / 64, absmax, absmax_codes, nested_absmax, map, offset);
        out[i] = store_f32<T>(__fmul_rn(code[i % 2 == 0 ? byte >> 4 : byte & 15], ai));
    }
}

#define NF4_KERNELS(S, T)                                                                         \
    extern "C" __global__ void nf4_dequantize_plain_##S(const int* packed, const float* absmax,   \
                                                        T* out, u64 n) {                          \
        nf4_dequantize<T, false>((const unsigned char*)packed, absmax, 0, 0, 0, 0.0f, out, n);   \
    }                                                                                             \
    extern "C" __global__ void nf4_dequantize_double_##S(                                         \
        const int* packed, const int* absmax_codes, const float* nested_absmax, const float* map, \
        float offset, T* out, u64 n) {                                                            \
        nf4_dequantize<T, true>((const unsigned char*)packed, 0,                                  \
                                (const unsigned char*)absmax_codes, nested_absmax, map, offset,   \
                                out, n);                                                          \
    }
FOR_EACH_DTYPE(NF4_KERNELS)

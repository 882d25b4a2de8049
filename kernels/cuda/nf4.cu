/* NF4 dequantization (bitsandbytes quant_type="nf4", blocksize 64), the QLoRA base weight read:
 *   out[i] = c[code[i]] * A[i / 64]
 * with c the 16-value NF4 table and the 4-bit codes packed two per byte, element 2k in the high
 * nibble. A is the block's absmax: stored as f32 (plain), or decoded from 8 bits (double quant):
 *   A[b] = f32(map[code8[b]] * nested_absmax[b / 256]) + offset
 * rounded twice, as bitsandbytes does: __fmul_rn/__fadd_rn keep the compiler from fusing them.
 *
 * One thread per 16 elements: it reads 8 packed bytes as one u64 and decodes its block's absmax
 * once (16 divides 64, so all 16 share a block), then writes the 16 outputs with two 16-byte
 * stores (four for f32). The code table is read from shared memory: in __constant__ memory the
 * 32 lanes' different indices serialise (one address per cycle), which held this kernel to ~15%
 * of the memory bandwidth. Traffic: n/2 bytes in, n·sizeof(T) out, the absmax tables ~n/64. The
 * bytes come in i32 words, read here as a byte array (little endian: byte j of the u64 is bits
 * 8j..8j+7). A ragged end (n not a multiple of 16, or an unaligned output) goes element by
 * element. The f32 output holds exactly the host's bits.
 */
__constant__ float NF4_CODE[16] = {
    -1.0f,         -0.6961928f,  -0.52507305f, -0.3949175f,  -0.28444138f, -0.18477343f,
    -0.091050036f, 0.0f,         0.0795803f,   0.1609302f,   0.2461123f,   0.33791524f,
    0.44070983f,   0.562617f,    0.72295684f,  1.0f};

template <typename T, bool DOUBLE>
__device__ void nf4_dequantize(const unsigned char* packed, const float* absmax,
                               const unsigned char* absmax_codes, const float* nested_absmax,
                               const float* map, float offset, T* out, u64 n) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    u64 t = THREAD_INDEX;
    u64 first = 16 * t;
    if (first >= n) return;
    u64 b = first / 64;
    float a = DOUBLE ? __fadd_rn(__fmul_rn(map[absmax_codes[b]], nested_absmax[b / 256]), offset)
                     : absmax[b];
    if (first + 16 <= n && aligned16(out)) {
        u64 word = ((const u64*)packed)[t];
        float v[16];
        for (int k = 0; k < 8; k++) {
            unsigned byte = (unsigned)(word >> (8 * k)) & 0xffu;
            v[2 * k] = __fmul_rn(code[byte >> 4], a);
            v[2 * k + 1] = __fmul_rn(code[byte & 15], a);
        }
        store8(out, 2 * t, v);
        store8(out, 2 * t + 1, v + 8);
        return;
    }
    for (u64 i = first; i < first + 16 && i < n; i++) {
        unsigned byte = packed[i / 2];
        out[i] = store_f32<T>(__fmul_rn(code[i % 2 == 0 ? byte >> 4 : byte & 15], a));
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

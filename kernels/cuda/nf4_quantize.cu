/* NF4 quantization (bitsandbytes quantize_4bit, quant_type="nf4", blocksize 64), bit for bit the
 * host code of kernels/src/nf4 (tests/fixtures/README.md §8.1):
 *   absmax[b] = max |x| over elements 64b..64b+63         (a max: any order gives the same bits)
 *   a = max(absmax[b], 1e-38);  v = clamp(x * f32(1/a), -1, 1)   (x / a in a final partial block)
 *   code = #{j : m[j] < v},  m[j] = f32((c[j] + c[j+1]) / 2)   (ties to the lower code; NaN -> 0)
 *   byte[k] = code[2k] << 4 | code[2k+1]                  (an odd n padded with code 7, the zero)
 * and the double quantization of the absmax (nf4_double_quant), per group g of 256 blocks:
 *   y = absmax - offset;  s[g] = max |y|;  code8(clamp(y * f32(1/s[g]), -1, 1))  (0 when s[g] = 0)
 *   code8(u) = lut[trunc(((u + 1) * 0.5) * 65535 + 0.5)],  lut[i] = #{j : dm[j] < -1 + 2i/65535}
 * with dm[j] = f32(0.5 * (d[j] + d[j+1])) over the dynamic map d. The offset (the f32 mean of the
 * absmax through an f64 sum) is formed on the host, as the host quantizer forms it.
 * Every product, sum and quotient is one IEEE rounding (__fmul_rn, __fadd_rn, __frcp_rn,
 * __fdiv_rn), so the compiler cannot contract them into fused multiply-adds.
 *
 * nf4_quantize: one thread per 16 elements (8 packed bytes, one u64 store), four threads per
 * 64-element block sharing its max through two shuffles. Traffic: n·sizeof(T) in, n/2 + n/16 out.
 * The packed buffer is i32 words: bytes past the last code up to the word end are written 0, as
 * the host's bytes_to_words pads them.
 * nf4_double_quant: one 256-thread block per group, one thread per absmax; each thread finds its
 * grid code by counting the 255 midpoints (held in shared memory) below its grid point.
 */

/* The NF4 table c: nf4.cu holds the same 16 values for dequantization. */
__constant__ float NF4_QUANT_CODE[16] = {
    -1.0f,         -0.6961928f,  -0.52507305f, -0.3949175f,  -0.28444138f, -0.18477343f,
    -0.091050036f, 0.0f,         0.0795803f,   0.1609302f,   0.2461123f,   0.33791524f,
    0.44070983f,   0.562617f,    0.72295684f,  1.0f};

/* clamp(v, -1, 1) keeping NaN, as Rust's f32::clamp does (fminf/fmaxf would drop it). */
__device__ __forceinline__ float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

__device__ __forceinline__ unsigned nf4_code(float v) {
    unsigned code = 0;
    for (int j = 0; j < 15; j++)
        code += __fmul_rn(__fadd_rn(NF4_QUANT_CODE[j], NF4_QUANT_CODE[j + 1]), 0.5f) < v;
    return code;
}

/* x: [n] any dtype; packed: ceil(ceil(n/2)/4) i32 words; absmax: [ceil(n/64)] f32. */
template <typename T>
__device__ void nf4_quantize(const T* x, unsigned char* packed, float* absmax, u64 n, u64 padded_bytes) {
    u64 t = THREAD_INDEX;
    u64 first = 16 * t;
    float v[16];
    bool full = first + 16 <= n;
    if (full && aligned16(x)) {
        load8(x, 2 * t, v);
        load8(x, 2 * t + 1, v + 8);
    } else {
        for (int e = 0; e < 16; e++) v[e] = first + e < n ? load_f32(x[first + e]) : 0.0f;
    }
    float m = 0.0f;
    for (int e = 0; e < 16; e++) m = fmaxf(m, fabsf(v[e]));
    /* The four threads of a 64-element block are lanes 4j..4j+3 of one warp. */
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    /* A thread past the last element has no byte to write either (8t >= the padded byte count). */
    if (first >= n) return;
    u64 b = first / 64;
    if ((t & 3) == 0) absmax[b] = m;
    float a = fmaxf(m, 1e-38f);
    float r = __frcp_rn(a);
    bool divide = n % 64 != 0 && b == n / 64;
    unsigned char bytes[8];
    for (int k = 0; k < 8; k++) {
        unsigned code[2];
        for (int h = 0; h < 2; h++) {
            u64 i = first + 2 * k + h;
            float s = divide ? __fdiv_rn(v[2 * k + h], a) : __fmul_rn(v[2 * k + h], r);
            code[h] = i < n ? nf4_code(clamp_unit(s)) : 7u;
        }
        bytes[k] = first + 2 * k < n ? (unsigned char)(code[0] << 4 | code[1]) : 0;
    }
    if (full) {
        u64 word = 0;
        for (int k = 0; k < 8; k++) word |= (u64)bytes[k] << (8 * k);
        ((u64*)packed)[t] = word;
    } else {
        for (int k = 0; k < 8; k++)
            if (8 * t + k < padded_bytes) packed[8 * t + k] = bytes[k];
    }
}

#define NF4_QUANTIZE(S, T)                                                                        \
    extern "C" __global__ void nf4_quantize_##S(const T* x, int* packed, float* absmax, u64 n,   \
                                                u64 padded_bytes) {                               \
        nf4_quantize<T>(x, (unsigned char*)packed, absmax, n, padded_bytes);                      \
    }
FOR_EACH_DTYPE(NF4_QUANTIZE)

/* absmax: [blocks] f32; codes: ceil(blocks/4) i32 words (bytes past the last code written 0);
 * nested_absmax: [ceil(blocks/256)] f32; map: the dynamic map [256] f32. Grid: one block of 256
 * threads per group. */
extern "C" __global__ void nf4_double_quant(const float* absmax, int* codes, float* nested_absmax,
                                            const float* map, float offset, u64 blocks) {
    __shared__ float mid[255];
    __shared__ float scratch[32];
    for (int j = threadIdx.x; j < 255; j += blockDim.x)
        mid[j] = __fmul_rn(0.5f, __fadd_rn(map[j], map[j + 1]));
    u64 b = (u64)blockIdx.x * 256 + threadIdx.x;
    float y = b < blocks ? __fsub_rn(absmax[b], offset) : 0.0f;
    /* block_max starts from -inf; the host's fold starts from 0 and skips NaN, as fmaxf does. */
    float s = fmaxf(0.0f, block_max(fabsf(y), scratch));
    if (threadIdx.x == 0) nested_absmax[blockIdx.x] = s;
    unsigned char* out = (unsigned char*)codes;
    if (b >= blocks) {
        if (b < (blocks + 3) / 4 * 4) out[b] = 0;
        return;
    }
    unsigned code = 0;
    if (s != 0.0f) {
        float u = clamp_unit(__fmul_rn(y, __frcp_rn(s)));
        float t = __fadd_rn(__fmul_rn(__fmul_rn(__fadd_rn(u, 1.0f), 0.5f), 65535.0f), 0.5f);
        unsigned i = min((unsigned)t, 65535u); /* NaN converts to 0, as Rust's `as usize` does */
        float g = __fadd_rn(-1.0f, __fdiv_rn((float)(2 * i), 65535.0f));
        for (int j = 0; j < 255; j++) code += mid[j] < g;
    }
    out[b] = (unsigned char)code;
}

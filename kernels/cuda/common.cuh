/* Shared by every kernel file (the build prepends it to each source): the three element types
 * without any CUDA header, so NVRTC needs no include path on any CUDA version.
 *
 * - f32  : float
 * - bf16 : 16 bits, the top half of an IEEE f32; f32 -> bf16 rounds to nearest even.
 * - f16  : IEEE half, converted with the PTX cvt instructions (every arch from sm_53).
 *
 * Every kernel reads its elements through load_f32(T) and writes through store_f32<T>(float), so
 * one template body serves all three types and accumulates in f32. The tensor-core helpers at the
 * end wrap mma.sync m16n8k16 (sm_80+) and, for f16 on sm_75, two m16n8k8 instructions.
 */
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define F32_INF __int_as_float(0x7f800000)

/* Instantiates X(suffix, type) for each element type: kernels are named `<op>_<suffix>`. */
#define FOR_EACH_DTYPE(X) X(f32, float) X(bf16, bf16) X(f16, f16)

struct bf16 { u16 bits; };
struct f16 { u16 bits; };

__device__ __forceinline__ float load_f32(float x) { return x; }
__device__ __forceinline__ float load_f32(bf16 x) { return __uint_as_float(((u32)x.bits) << 16); }
__device__ __forceinline__ float load_f32(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

__device__ __forceinline__ u16 f32_to_bf16_bits(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                     /* round to nearest even */
    return (u16)(u >> 16);
}
__device__ __forceinline__ u16 f32_to_f16_bits(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

template <typename T> __device__ __forceinline__ T store_f32(float f);
template <> __device__ __forceinline__ float store_f32<float>(float f) { return f; }
template <> __device__ __forceinline__ bf16 store_f32<bf16>(float f) { bf16 r; r.bits = f32_to_bf16_bits(f); return r; }
template <> __device__ __forceinline__ f16 store_f32<f16>(float f) { f16 r; r.bits = f32_to_f16_bits(f); return r; }

/* Two 16-bit values packed low-first into one 32-bit register, as the mma fragments hold them. */
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)store_f32<T>(lo).bits | ((u32)store_f32<T>(hi).bits << 16);
}
__device__ __forceinline__ u32 pack_bits(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over a block of up to 1024 threads; every thread gets the total. `scratch` holds 32 floats. */
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? scratch[lane] : -F32_INF;
    return warp_max(v);
}

/* D[16x8] += A[16x16] * B[16x8], f32 accumulators. Fragment layout (g = lane/4, t = lane%4):
 * a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..];
 * b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]; d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..]. */
__device__ __forceinline__ void mma_16x8x16(float* d, const u32* a, const u32* b, bf16*) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap(); /* bf16 tensor cores need sm_80; the host never launches this below 8.0 */
#endif
}
__device__ __forceinline__ void mma_16x8x16(float* d, const u32* a, const u32* b, f16*) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b[0]));
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[2]), "r"(a[3]), "r"(b[1]));
#endif
}

/* Fragment loads from shared memory holding 16-bit elements `s` with row stride `ld`.
 * A tile at (r0, c0) of a matrix M[r][c] = s[r*ld + c]                 -> frag_a
 * B tile at (k0, n0) of a matrix B[k][n] = s[n*ld + k] (rows are n)     -> frag_b
 * B tile at (k0, n0) of a matrix B[k][n] = s[k*ld + n] (rows are k)     -> frag_b_t */
__device__ __forceinline__ void frag_a(u32* a, const u16* s, int ld, int r0, int c0) {
    int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const u16* p = s + (r0 + g) * ld + c0 + 2 * t;
    a[0] = *(const u32*)p;
    a[1] = *(const u32*)(p + 8 * ld);
    a[2] = *(const u32*)(p + 8);
    a[3] = *(const u32*)(p + 8 * ld + 8);
}
__device__ __forceinline__ void frag_b(u32* b, const u16* s, int ld, int k0, int n0) {
    int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const u16* p = s + (n0 + g) * ld + k0 + 2 * t;
    b[0] = *(const u32*)p;
    b[1] = *(const u32*)(p + 8);
}
__device__ __forceinline__ void frag_b_t(u32* b, const u16* s, int ld, int k0, int n0) {
    int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const u16* p = s + (k0 + 2 * t) * ld + n0 + g;
    b[0] = pack_bits(p[0], p[ld]);
    b[1] = pack_bits(p[8 * ld], p[9 * ld]);
}

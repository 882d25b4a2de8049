/* Shared by every kernel file (the build prepends it to each source): the three element types
 * without any CUDA header, so NVRTC needs no include path on any CUDA version.
 *
 * - f32  : float
 * - bf16 : 16 bits, the top half of an IEEE f32; f32 -> bf16 rounds to nearest even.
 * - f16  : IEEE half, converted with the PTX cvt instructions (every arch from sm_53).
 *
 * Every kernel reads its elements through load_f32(T) and writes through store_f32<T>(float), so
 * one template body serves all three types and accumulates in f32. The tensor-core helpers at the
 * end wrap mma.sync m16n8k16 (sm_80+) and, for f16 on sm_75, two m16n8k8 instructions, the ldmatrix
 * loads of its fragments, cp.async, and the f32 reductions of results into global sums (add_pair).
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

/* f32 -> bf16, rounding to nearest even, NaN kept NaN (its payload may differ between the two):
 * by integer arithmetic, and from sm_80 on by one cvt, which the issue-bound attention forward
 * and the element-wise kernels use (attention forward 0.432 -> 0.383 ms at b2 x 2048, 32 heads,
 * d 128). Attention backward keeps the integer form: with the cvt its registers spill
 * (1.634 -> 1.854 ms, same shape). */
__device__ __forceinline__ u16 f32_to_bf16_bits_int(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}
__device__ __forceinline__ u16 f32_to_bf16_bits(float f) {
#if __CUDA_ARCH__ >= 800
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    return f32_to_bf16_bits_int(f);
#endif
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
#if __CUDA_ARCH__ >= 800
/* Both conversions in one instruction (cvt's first source goes to the upper half). */
template <> __device__ __forceinline__ u32 pack2<bf16>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <> __device__ __forceinline__ u32 pack2<f16>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
#endif
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


/* Shared-memory address of a generic pointer, for the instructions that take one. */
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

/* Four 8x8 matrices of 16-bit elements from shared memory (sm_75+): lane l gives the address of row
 * l%8 of matrix l/8; register i of each lane receives matrix i's elements [lane/4][2(lane%4)..+1]
 * (with .trans, of the transposed matrix: [2(lane%4)..+1][lane/4]) — the mma.sync fragment layout. */
__device__ __forceinline__ void ldmatrix_x4(u32* r, const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

/* 16 bytes global -> shared without passing through registers (cp.async, sm_80+), zero-filled when
 * `valid` is false; completes at cp_async_wait. Below sm_80 it is an ordinary copy. */
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
#else
    *(uint4*)dst = valid ? *(const uint4*)src : make_uint4(0, 0, 0, 0);
#endif
}
/* The same for 4 bytes (one f32 or int), through L1. */
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
#else
    *(u32*)dst = valid ? *(const u32*)src : 0u;
#endif
}
/* Closes the group of cp.async issued so far. */
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;");
#endif
}
/* Waits until at most N committed groups are still in flight. */
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
#endif
}

/* mma.sync fragments from shared memory holding 16-bit elements with row stride `ld`, one ldmatrix.x4
 * each: ldm_a gives the A fragment of the 16x16 tile at (r0, c0) of M[r][c] = s[r*ld + c]; ldm_b2 and
 * ldm_b2_t give the B fragments of the two 8-column tiles n0 and n0 + 8 (b[0..1] and b[2..3]) at k0
 * of B[k][n] = s[n*ld + k] (rows are n) and of B[k][n] = s[k*ld + n] (rows are k). Row starts must be
 * 16-byte aligned. */
__device__ __forceinline__ void ldm_a(u32* a, const u16* s, int ld, int r0, int c0) {
    int l = threadIdx.x & 31;
    ldmatrix_x4(a, s + (r0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + c0 + (l >> 4) * 8);
}
__device__ __forceinline__ void ldm_b2(u32* b, const u16* s, int ld, int k0, int n0) {
    int l = threadIdx.x & 31;
    ldmatrix_x4(b, s + (n0 + (l & 7) + (l >> 4) * 8) * ld + k0 + ((l >> 3) & 1) * 8);
}
__device__ __forceinline__ void ldm_b2_t(u32* b, const u16* s, int ld, int k0, int n0) {
    int l = threadIdx.x & 31;
    ldmatrix_x4_trans(b, s + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + n0 + (l >> 4) * 8);
}

/* ldm_a for a matrix stored transposed: the A fragment of the 16x16 tile at (m0, k0) of
 * A[m][k] = s[k*ld + m] (rows of s are k, as for ldm_b2_t). Matrix i of the ldmatrix.x4.trans is rows
 * k0 + 8(i/2).., columns m0 + 8(i%2).. of s, so that register i holds A[g + 8(i%2)][2t + 8(i/2) ..+1]
 * (g = lane/4, t = lane%4), the fragment layout of mma_16x8x16. */
__device__ __forceinline__ void ldm_a_t(u32* a, const u16* s, int ld, int m0, int k0) {
    int l = threadIdx.x & 31;
    ldmatrix_x4_trans(a, s + (k0 + (l & 7) + (l >> 4) * 8) * ld + m0 + ((l >> 3) & 1) * 8);
}

/* p[0] += a, p[1] += b (p 8-byte aligned): one 8-byte vector reduction on sm_90, two atomics below it. */
__device__ __forceinline__ void add_pair(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}
/* add_pair where `valid`, as one predicated instruction on sm_90, without add_pair's ordering against
 * other memory accesses (the kernels never read the sums back), so that the addresses are computed once. */
__device__ __forceinline__ void add_pair_if(bool valid, float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %3, 0;\n@p red.global.add.v2.f32 [%0], {%1, %2};\n}" ::"l"(p), "f"(a),
                 "f"(b), "r"((int)valid));
#else
    if (valid) add_pair(p, a, b);
#endif
}

/* Eight consecutive elements per access (16 bytes of a 16-bit type, two float4 of f32): the element-
 * wise kernels stream through memory in chunks of 8, chunk c holding elements 8c..8c+7. Needs the
 * base pointer 16-byte aligned (aligned16); the kernels fall back to single elements otherwise. */
__device__ __forceinline__ bool aligned16(const void* p) { return ((u64)p & 15) == 0; }
__device__ __forceinline__ void load8(const float* p, u64 c, float* v) {
    float4 a = ((const float4*)p)[2 * c], b = ((const float4*)p)[2 * c + 1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, u64 c, float* v) {
    uint4 r = ((const uint4*)p)[c];
    u32 w[4] = {r.x, r.y, r.z, r.w};
    for (int i = 0; i < 4; i++) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void load8(const f16* p, u64 c, float* v) {
    uint4 r = ((const uint4*)p)[c];
    u32 w[4] = {r.x, r.y, r.z, r.w};
    for (int i = 0; i < 4; i++) {
        f16 lo, hi;
        lo.bits = (u16)(w[i] & 0xffffu);
        hi.bits = (u16)(w[i] >> 16);
        v[2 * i] = load_f32(lo);
        v[2 * i + 1] = load_f32(hi);
    }
}
__device__ __forceinline__ void store8(float* p, u64 c, const float* v) {
    ((float4*)p)[2 * c] = make_float4(v[0], v[1], v[2], v[3]);
    ((float4*)p)[2 * c + 1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <typename T> __device__ __forceinline__ void store8(T* p, u64 c, const float* v) {
    ((uint4*)p)[c] = make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
}

/* Chunk c of p as load8 reads it when `vector` (p 16-byte aligned), else element by element:
 * the same values in the same order either way, so a kernel's sums do not depend on alignment. */
template <typename T> __device__ __forceinline__ void load8_or_each(const T* p, u64 c, float* v, bool vector) {
    if (vector) {
        load8(p, c, v);
    } else {
        for (int j = 0; j < 8; j++) v[j] = load_f32(p[8 * c + j]);
    }
}

/* a / b in 32 bits when both fit (a 64-bit division is a long instruction sequence). */
__device__ __forceinline__ u64 div_u64(u64 a, u64 b) {
    return ((a | b) >> 32) == 0 ? (u64)((u32)a / (u32)b) : a / b;
}

/* Grid-stride ranges for the chunked element-wise loops: chunks of 8 when every pointer is aligned,
 * then single elements from `tail_start`. */
#define GRID_STRIDE ((u64)gridDim.x * blockDim.x)
#define THREAD_INDEX ((u64)blockIdx.x * blockDim.x + threadIdx.x)

/* The tensor of a multi-tensor table that flat index `idx` falls in: `starts[t]` is the first flat
 * index of tensor t (starts[count] = total), found by binary search. */
__device__ __forceinline__ int owner_of(const u64* starts, int count, u64 idx) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (starts[mid] <= idx) lo = mid; else hi = mid - 1;
    }
    return lo;
}

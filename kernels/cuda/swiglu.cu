/* SwiGLU, element-wise over [N, inter]:
 *   forward:  out = silu(g) * u,  silu(g) = g * sigmoid(g)
 *   backward: dg = d * u * s * (1 + g (1 - s)),  du = d * g * s,  s = sigmoid(g),  d = dout,
 *             and out again (the forward's expression, so its bits) in dout's place: the down
 *             projection's dA reads it, and the backward need not keep or recompute it.
 * Pure streaming: forward reads 2 and writes 1 element, backward reads 3 and writes 3, 8 elements
 * (16 bytes of bf16) per access in a grid-stride loop (load8/store8), single elements for a tail.
 *
 * swiglu_backward_lora_<t>_r<R>: the backward with the down projection's LoRA input term in d,
 *   d[i, j] = dout[i, j] + scale * sum_k u[i, k] A[k, j]     (f32, never rounded to T)
 * with u [N, R] rows u_ld apart (u = dy B_down) and A [R, inter] rows a_ld apart (A_down): dL/d act
 * is dy W_down + s u A_down, and without this kernel a K = R product writes s u A over all of dout
 * and the frozen product adds dy W_down onto it (beta = 1: one more read of dout). bf16/f16,
 * R = 8 or 16, inter a multiple of 8, every matrix's rows on 16-byte boundaries (the host checks,
 * and elsewhere runs that product and the plain kernel).
 * Grid (column blocks, row groups) of SWIGLU_LORA_THREADS threads: thread c of the grid's x
 * dimension owns the 8 columns 8c..8c+7, and block row y the rows y * rows_per_group.. . A thread
 * loads A[:, 8c..8c+7] once into registers, R 16-byte words of packed 16-bit pairs (4R registers:
 * 64 at R = 16; widened to f32 they would take 128), then walks its rows: per row u[i, :] (R / 8
 * 16-byte loads at one address for the whole warp: a broadcast) and the three chunks of 8, loaded
 * a row ahead of their use so that two rows' loads are in flight while it computes, and the term
 * by 8R f32 FMAs, A's elements widened as they are used (a shift or a mask per bf16 element, a cvt
 * per f16 one). A is not read again per row: that would be 2R bytes of L2 traffic per element (32
 * at R = 16) against the 12 the element itself moves.
 * Traffic per element: the plain backward's 3 reads and 3 writes, plus u's 2R bytes per row (L1
 * hits after the first warp; 2R / inter bytes per element) and A's 2R per column per row group
 * (L2 hits: 32 bytes against the 12 * rows_per_group the column's elements move, 6 % at 43 rows).
 * The K = R product and the beta read it replaces moved 4 bytes per element (and a launch).
 * Registers (ptxas, sm_90): 120 at R = 16 for bf16, 127 for f16 (96 / 111 at R = 8), none spilled:
 * 4 blocks of 128 threads per multiprocessor, which __launch_bounds__ holds them to.
 */
#define SWIGLU_LORA_THREADS 128 /* kernels/src/cuda/swiglu.rs sizes the grid by it */
#define SWIGLU_LORA_BLOCKS_PER_SM 4 /* at most 128 registers a thread; swiglu.rs's BLOCKS_PER_SM */

__device__ __forceinline__ float sigmoidf(float g) { return 1.0f / (1.0f + __expf(-g)); }

/* One element's backward: the gradients of g and u from the output gradient d, and the forward's
 * output (its expression, so its bits). */
__device__ __forceinline__ void swiglu_backward_element(float g, float u, float d, float& dg, float& du, float& o) {
    float s = sigmoidf(g);
    du = d * g * s;
    dg = d * u * s * (1.0f + g * (1.0f - s));
    o = g * s * u;
}

template <typename T>
__device__ void swiglu_forward(const T* gate, const T* up, T* out, u64 n) {
    u64 chunks = aligned16(gate) && aligned16(up) && aligned16(out) ? n / 8 : 0;
    for (u64 c = THREAD_INDEX; c < chunks; c += GRID_STRIDE) {
        float g[8], u[8], o[8];
        load8(gate, c, g);
        load8(up, c, u);
        for (int j = 0; j < 8; j++) o[j] = g[j] * sigmoidf(g[j]) * u[j];
        store8(out, c, o);
    }
    for (u64 i = chunks * 8 + THREAD_INDEX; i < n; i += GRID_STRIDE) {
        float g = load_f32(gate[i]);
        out[i] = store_f32<T>(g * sigmoidf(g) * load_f32(up[i]));
    }
}

template <typename T>
__device__ void swiglu_backward(T* dout, T* gate, T* up, u64 n) {
    bool vec = aligned16(dout) && aligned16(gate) && aligned16(up);
    u64 chunks = vec ? n / 8 : 0;
    for (u64 c = THREAD_INDEX; c < chunks; c += GRID_STRIDE) {
        float g[8], u[8], d[8], dg[8], du[8], o[8];
        load8(gate, c, g);
        load8(up, c, u);
        load8(dout, c, d);
        for (int j = 0; j < 8; j++) swiglu_backward_element(g[j], u[j], d[j], dg[j], du[j], o[j]);
        store8(up, c, du);
        store8(gate, c, dg);
        store8(dout, c, o);
    }
    for (u64 i = chunks * 8 + THREAD_INDEX; i < n; i += GRID_STRIDE) {
        float dg, du, o;
        swiglu_backward_element(load_f32(gate[i]), load_f32(up[i]), load_f32(dout[i]), dg, du, o);
        up[i] = store_f32<T>(du);
        gate[i] = store_f32<T>(dg);
        dout[i] = store_f32<T>(o);
    }
}

/* One row's 16-byte words for a thread of swiglu_backward_lora: its chunks of gate, up and dout and
 * the row of u, loaded a row ahead of their use. */
template <int R>
struct SwigluLoraRow {
    uint4 g, v, d, u[R / 8];
};

template <typename T, int R>
__device__ __forceinline__ SwigluLoraRow<R> swiglu_lora_row(const T* dout, const T* gate, const T* up, const T* u_row,
                                                            u64 chunk) {
    SwigluLoraRow<R> row;
    row.g = ((const uint4*)gate)[chunk];
    row.v = ((const uint4*)up)[chunk];
    row.d = ((const uint4*)dout)[chunk];
#pragma unroll
    for (int p = 0; p < R / 8; p++) row.u[p] = ((const uint4*)u_row)[p];
    return row;
}

template <typename T, int R>
__device__ void swiglu_backward_lora(T* __restrict__ dout, T* __restrict__ gate, T* __restrict__ up,
                                     const T* __restrict__ u, const T* __restrict__ a, u64 n, u64 inter,
                                     u64 u_ld, u64 a_ld, float scale, u64 rows_per_group) {
    const u64 chunks_per_row = inter / 8, c = THREAD_INDEX;
    const u64 row_begin = (u64)blockIdx.y * rows_per_group;
    if (c >= chunks_per_row || row_begin >= n) return;
    const u64 rows = n - row_begin < rows_per_group ? n - row_begin : rows_per_group;
    uint4 a_cols[R]; /* A[k, 8c..8c+7], packed */
#pragma unroll
    for (int k = 0; k < R; k++) a_cols[k] = ((const uint4*)(a + k * a_ld))[c];
    const T* u_row = u + row_begin * u_ld;
    u64 chunk = row_begin * chunks_per_row + c; /* the row's chunk of 8 in the [N, inter] tensors */
    SwigluLoraRow<R> next = swiglu_lora_row<T, R>(dout, gate, up, u_row, chunk);
    for (u64 i = 0; i < rows; i++, u_row += u_ld, chunk += chunks_per_row) {
        const SwigluLoraRow<R> row = next;
        if (i + 1 < rows) next = swiglu_lora_row<T, R>(dout, gate, up, u_row + u_ld, chunk + chunks_per_row);
        /* An empty asm that "changes" A's registers every row: the compiler would otherwise hoist
         * their widening out of the loop and hold A as 8R f32 registers. */
#pragma unroll
        for (int k = 0; k < R; k++)
            asm volatile("" : "+r"(a_cols[k].x), "+r"(a_cols[k].y), "+r"(a_cols[k].z), "+r"(a_cols[k].w));
        float uk[R], term[8] = {};
#pragma unroll
        for (int p = 0; p < R / 8; p++) widen8<T>(row.u[p], uk + 8 * p);
#pragma unroll
        for (int k = 0; k < R; k++) {
            float ak[8];
            widen8<T>(a_cols[k], ak);
#pragma unroll
            for (int j = 0; j < 8; j++) term[j] = fmaf(uk[k], ak[j], term[j]);
        }
        float g[8], v[8], d[8], dg[8], du[8], o[8];
        widen8<T>(row.g, g);
        widen8<T>(row.v, v);
        widen8<T>(row.d, d);
#pragma unroll
        for (int j = 0; j < 8; j++) swiglu_backward_element(g[j], v[j], fmaf(scale, term[j], d[j]), dg[j], du[j], o[j]);
        store8(up, chunk, du);
        store8(gate, chunk, dg);
        store8(dout, chunk, o);
    }
}

#define SWIGLU_KERNELS(S, T)                                                                               \
    extern "C" __global__ void swiglu_forward_##S(const T* gate, const T* up, T* out, u64 n) {            \
        swiglu_forward<T>(gate, up, out, n);                                                              \
    }                                                                                                     \
    extern "C" __global__ void swiglu_backward_##S(T* dout, T* gate, T* up, u64 n) {                     \
        swiglu_backward<T>(dout, gate, up, n);                                                            \
    }
FOR_EACH_DTYPE(SWIGLU_KERNELS)

#define SWIGLU_LORA_KERNEL(S, T, R)                                                                        \
    extern "C" __global__ void __launch_bounds__(SWIGLU_LORA_THREADS, SWIGLU_LORA_BLOCKS_PER_SM)           \
        swiglu_backward_lora_##S##_r##R(T* dout, T* gate, T* up, const T* u, const T* a, u64 n, u64 inter, \
                                        u64 u_ld, u64 a_ld, float scale, u64 rows_per_group) {             \
        swiglu_backward_lora<T, R>(dout, gate, up, u, a, n, inter, u_ld, a_ld, scale, rows_per_group);     \
    }
SWIGLU_LORA_KERNEL(bf16, bf16, 8)
SWIGLU_LORA_KERNEL(bf16, bf16, 16)
SWIGLU_LORA_KERNEL(f16, f16, 8)
SWIGLU_LORA_KERNEL(f16, f16, 16)

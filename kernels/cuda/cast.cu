/* Element-wise copies and updates between any two of the element types, with f32 arithmetic:
 *   cast_<src>_<dst>:  dst = src                 (f32 master weights -> bf16 copies, and back)
 *   axpy_<src>_<dst>:  dst = dst + alpha * src   (residual adds, gradient accumulation)
 *   scale_<t>:         t = alpha * t
 *   cast_multi_f32_<dst>: dst_t = src_t for every tensor t of a table (the compute-dtype copies of
 *                      all LoRA weights after an optimizer step, in one launch instead of one each);
 *                      src/dst are tables of addresses, starts[t] the first flat index of tensor t.
 *   zero_multi_f32:    t = 0 for every f32 tensor t of a table (all LoRA gradients at a step's start:
 *                      one launch instead of a memset each); the same tables.
 *   axpy_blocks_f32:   dst_b = dst_b + alpha * src_b for each block b, blockIdx.y the block and its
 *                      row of the table (src, dst addresses, n): a stacked LoRA dA [members * r, in]
 *                      added into the members' gradients in one launch instead of one each.
 * Streaming grid-stride loops, each element read and written once, 8 elements per access
 * (load8/store8: 16 bytes of a 16-bit type) and single elements for a tail.
 */
template <typename S, typename D>
__device__ void cast(const S* src, D* dst, u64 n) {
    u64 chunks = aligned16(src) && aligned16(dst) ? n / 8 : 0;
    for (u64 c = THREAD_INDEX; c < chunks; c += GRID_STRIDE) {
        float v[8];
        load8(src, c, v);
        store8(dst, c, v);
    }
    for (u64 i = chunks * 8 + THREAD_INDEX; i < n; i += GRID_STRIDE) dst[i] = store_f32<D>(load_f32(src[i]));
}
template <typename S, typename D>
__device__ void axpy(float alpha, const S* src, D* dst, u64 n) {
    u64 chunks = aligned16(src) && aligned16(dst) ? n / 8 : 0;
    for (u64 c = THREAD_INDEX; c < chunks; c += GRID_STRIDE) {
        float x[8], y[8];
        load8(src, c, x);
        load8(dst, c, y);
        for (int j = 0; j < 8; j++) y[j] += alpha * x[j];
        store8(dst, c, y);
    }
    for (u64 i = chunks * 8 + THREAD_INDEX; i < n; i += GRID_STRIDE)
        dst[i] = store_f32<D>(load_f32(dst[i]) + alpha * load_f32(src[i]));
}
template <typename T>
__device__ void scale(float alpha, T* t, u64 n) {
    u64 chunks = aligned16(t) ? n / 8 : 0;
    for (u64 c = THREAD_INDEX; c < chunks; c += GRID_STRIDE) {
        float x[8];
        load8(t, c, x);
        for (int j = 0; j < 8; j++) x[j] *= alpha;
        store8(t, c, x);
    }
    for (u64 i = chunks * 8 + THREAD_INDEX; i < n; i += GRID_STRIDE) t[i] = store_f32<T>(alpha * load_f32(t[i]));
}

#define CAST_PAIR(SS, ST, DS, DT)                                                                        \
    extern "C" __global__ void cast_##SS##_##DS(const ST* src, DT* dst, u64 n) { cast<ST, DT>(src, dst, n); } \
    extern "C" __global__ void axpy_##SS##_##DS(float alpha, const ST* src, DT* dst, u64 n) {            \
        axpy<ST, DT>(alpha, src, dst, n);                                                                 \
    }
#define CAST_FROM(SS, ST) CAST_PAIR(SS, ST, f32, float) CAST_PAIR(SS, ST, bf16, bf16) CAST_PAIR(SS, ST, f16, f16)
FOR_EACH_DTYPE(CAST_FROM)

#define SCALE_KERNEL(S, T) \
    extern "C" __global__ void scale_##S(float alpha, T* t, u64 n) { scale<T>(alpha, t, n); }
FOR_EACH_DTYPE(SCALE_KERNEL)

template <typename D>
__device__ void cast_multi(const u64* src, const u64* dst, const u64* starts, int count) {
    const u64 total = starts[count];
    for (u64 idx = THREAD_INDEX; idx < total; idx += GRID_STRIDE) {
        int t = owner_of(starts, count, idx);
        u64 i = idx - starts[t];
        ((D*)dst[t])[i] = store_f32<D>(((const float*)src[t])[i]);
    }
}
#define CAST_MULTI(S, T)                                                                                  \
    extern "C" __global__ void cast_multi_f32_##S(const u64* src, const u64* dst, const u64* starts,     \
                                                  int count) {                                          \
        cast_multi<T>(src, dst, starts, count);                                                          \
    }
FOR_EACH_DTYPE(CAST_MULTI)

extern "C" __global__ void zero_multi_f32(const u64* dst, const u64* starts, int count) {
    const u64 total = starts[count];
    for (u64 idx = THREAD_INDEX; idx < total; idx += GRID_STRIDE) {
        int t = owner_of(starts, count, idx);
        ((float*)dst[t])[idx - starts[t]] = 0.0f;
    }
}

extern "C" __global__ void axpy_blocks_f32(float alpha, const u64* table) {
    const u64* b = table + 3 * (u64)blockIdx.y;
    axpy<float, float>(alpha, (const float*)b[0], (float*)b[1], b[2]);
}

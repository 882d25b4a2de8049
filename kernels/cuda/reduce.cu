/* Reductions over many tensors in one launch, for global-norm clipping and loss scaling:
 *   sum_squares_multi: total += sum_i x_i^2   (f32 partial sums per block, one f64 atomic per block)
 *   all_finite_multi:  flag = 0 if any x_i is NaN or +-inf (flag starts at 1 on the host side)
 * Tensors come as tables: ptrs[i], dtypes[i] (0 = f32, 1 = bf16, 2 = f16) and starts[i], the first
 * flat index of tensor i (starts[count] = total); the result is a word uploaded with them, its
 * initial value set by the host. One read of every element, nothing else.
 */
__device__ __forceinline__ float element_as_f32(const u64* ptrs, const u64* dtypes, int t, u64 i) {
    switch (dtypes[t]) {
        case 0: return ((const float*)ptrs[t])[i];
        case 1: return load_f32(((const bf16*)ptrs[t])[i]);
        default: return load_f32(((const f16*)ptrs[t])[i]);
    }
}

extern "C" __global__ void sum_squares_multi(const u64* ptrs, const u64* dtypes, const u64* starts, int count,
                                             double* total) {
    __shared__ float scratch[32];
    u64 n = starts[count];
    float acc = 0.0f;
    for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (u64)gridDim.x * blockDim.x) {
        int t = owner_of(starts, count, idx);
        float x = element_as_f32(ptrs, dtypes, t, idx - starts[t]);
        acc += x * x;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) atomicAdd(total, (double)acc);
}

extern "C" __global__ void all_finite_multi(const u64* ptrs, const u64* dtypes, const u64* starts, int count,
                                            int* flag) {
    u64 n = starts[count];
    for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (u64)gridDim.x * blockDim.x) {
        int t = owner_of(starts, count, idx);
        float x = element_as_f32(ptrs, dtypes, t, idx - starts[t]);
        if (!(fabsf(x) <= 3.402823466e38f)) *flag = 0;
    }
}

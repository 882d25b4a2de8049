/* Row broadcast, out[r, :] = row for every row of out [rows, cols]:
 * the bias of a linear layer laid down before the GEMM that accumulates x W^T onto it with
 * beta = 1 (y = b + x W^T, the order of torch's addmm, so y is rounded once).
 * Pure streaming: writes every element of out once and reads the row (cols elements, L1/L2 resident);
 * a grid-stride loop over the flat index keeps every thread busy whatever rows and cols are.
 */
template <typename T>
__device__ void broadcast_rows(const T* row, T* out, u64 cols, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = row[i % cols];
    }
}

#define BROADCAST_KERNELS(S, T)                                                                    \
    extern "C" __global__ void broadcast_rows_##S(const T* row, T* out, u64 cols, u64 n) {        \
        broadcast_rows<T>(row, out, cols, n);                                                     \
    }
FOR_EACH_DTYPE(BROADCAST_KERNELS)

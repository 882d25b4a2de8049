/* Embedding gather: out[i, :] = table[ids[i], :], table [vocab, hidden], out [N, hidden].
 * One block per token, threads striding over the row: each output element is written once and
 * each table row read once per occurrence. Ids are checked on the host before the launch.
 */
template <typename T>
__device__ void embedding(const T* table, const int* ids, T* out, int hidden) {
    const T* src = table + (u64)ids[blockIdx.x] * hidden;
    T* dst = out + (u64)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
}

#define EMBEDDING_KERNELS(S, T)                                                                   \
    extern "C" __global__ void embedding_##S(const T* table, const int* ids, T* out, int hidden) { \
        embedding<T>(table, ids, out, hidden);                                                     \
    }
FOR_EACH_DTYPE(EMBEDDING_KERNELS)

/* Embedding gather: out[i, :] = table[ids[i], :], table [vocab, hidden], out [N, hidden].
 * One block per token, threads striding over the row in 16-byte words (element by element when a
 * row is not a whole number of aligned words): each output element is written once and each table
 * row read once per occurrence. The table may be pinned host memory (`model.embedding = "host"`),
 * read across the host link at its host address (unified addressing); wide reads keep more bytes
 * in flight per request there. Ids are checked on the host before the launch.
 */
template <typename T>
__device__ void embedding(const T* table, const int* ids, T* out, int hidden) {
    const T* src = table + (u64)ids[blockIdx.x] * hidden;
    T* dst = out + (u64)blockIdx.x * hidden;
    const int row_bytes = hidden * (int)sizeof(T);
    if (row_bytes % 16 == 0 && aligned16(src) && aligned16(dst)) {
        for (int i = threadIdx.x; i < row_bytes / 16; i += blockDim.x) ((uint4*)dst)[i] = ((const uint4*)src)[i];
        return;
    }
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
}

#define EMBEDDING_KERNELS(S, T)                                                                   \
    extern "C" __global__ void embedding_##S(const T* table, const int* ids, T* out, int hidden) { \
        embedding<T>(table, ids, out, hidden);                                                     \
    }
FOR_EACH_DTYPE(EMBEDDING_KERNELS)

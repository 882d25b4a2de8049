/* place_block_<t>: place_block.cuh's copy as a kernel of its own (the dequantization in nf4.cu
 * calls the same function for a padded weight's pad). */
#define PLACE_BLOCK_KERNELS(S, T)                                                                  \
    extern "C" __global__ void place_block_##S(const T* src, u64 src_ld, T* dst, u64 dst_ld,        \
                                               u64 width, u64 b0, u64 b1, u64 n) {                 \
        place_block<T>(src, src_ld, dst, dst_ld, width, b0, b1, n);                                \
    }
FOR_EACH_DTYPE(PLACE_BLOCK_KERNELS)

/* place_block_<t>: place_block.cuh's copy as a kernel of its own (the dequantization in nf4.cu
 * calls the same function for a padded weight's pad). */
#define PLACE_BLOCK_KERNELS(S, T)                                                                  \
    extern "C" __global__ void place_block_##S(const T* src, u64 src_ld, T* dst, u64 dst_ld,        \
                                               u64 width, u64 b0, u64 b1, u64 n) {                 \
        place_block<T>(src, src_ld, dst, dst_ld, width, b0, b1, n);                                \
    }
FOR_EACH_DTYPE(PLACE_BLOCK_KERNELS)

/* place_blocks_<t>: a batch of place_block copies in one launch, blockIdx.y the copy; its arguments
 * are row y of a table of PLACE_BLOCKS_FIELDS u64s (src, src_ld, dst, dst_ld, width, b0, b1, n as
 * place_block takes them, the pointers as addresses). The grid's x extent is sized for the largest
 * copy; each copy's grid-stride loop runs over the blocks of its row of the grid, so a smaller one
 * leaves some of them idle. A layer's LoRA pads (5 copies of 0.1-0.9 MB at 7B) are one launch,
 * where one each was launch-bound (~8 us a copy on an H100). Traffic: the sum of the copies'. */
#define PLACE_BLOCKS_FIELDS 8 /* kernels/src/cuda/mod.rs writes the table */
#define PLACE_BLOCKS_KERNELS(S, T)                                                                 \
    extern "C" __global__ void place_blocks_##S(const u64* table) {                                \
        const u64* c = table + (u64)blockIdx.y * PLACE_BLOCKS_FIELDS;                              \
        place_block<T>((const T*)c[0], c[1], (T*)c[2], c[3], c[4], c[5], c[6], c[7]);              \
    }
FOR_EACH_DTYPE(PLACE_BLOCKS_KERNELS)

/* place_block.cuh: a column block placed into a wider matrix, for every row i < rows:
 *   dst[i, j] = src[i, j - b0]   for b0 <= j < b1
 *   dst[i, j] = 0                for the other j < width
 * src [rows, b1 - b0] rows src_ld apart and dst [rows, width] rows dst_ld apart, each pointer at its
 * matrix's first element (the host adds the offsets); columns past width are not touched. Uses: a
 * LoRA B [out, r] written into its block of a padded weight's pad columns W' = [W | B-block] (the
 * other adapters' blocks zeroed), and pad columns copied out to a dense tensor and back
 * (b0 = 0, b1 = width). Values are copied as stored, no rounding.
 * Traffic: reads rows * (b1 - b0) elements, writes rows * width. A grid-stride loop over the flat
 * index i * width + j (64-bit), so a warp touches consecutive columns of a row; the row is one
 * division per element, 32-bit where the index fits (div_u64). Where both pointers are 16-byte
 * aligned and the strides, width and block edges are whole 16-byte words (LoRA's pads at ranks
 * that are multiples of 8), the loop moves one 16-byte word per step instead of one element: the
 * pads are a few hundred KiB, rows of 32 to 96 bytes, so the element loop's time was mostly its
 * 2-byte accesses.
 */
template <typename T>
__device__ void place_block(const T* src, u64 src_ld, T* dst, u64 dst_ld, u64 width, u64 b0, u64 b1, u64 n) {
    constexpr u64 E = 16 / sizeof(T); /* elements a 16-byte word holds */
    if (aligned16(src) && aligned16(dst) && (src_ld | dst_ld | width | b0 | b1) % E == 0) {
        const u64 words_per_row = width / E;
        for (u64 k = THREAD_INDEX; k < n / E; k += GRID_STRIDE) {
            const u64 i = div_u64(k, words_per_row), j = (k - i * words_per_row) * E;
            uint4 v = make_uint4(0u, 0u, 0u, 0u); /* every element 0, as store_f32<T>(0.0f) */
            if (j >= b0 && j < b1) v = *(const uint4*)(src + i * src_ld + (j - b0));
            *(uint4*)(dst + i * dst_ld + j) = v;
        }
        return;
    }
    for (u64 k = THREAD_INDEX; k < n; k += GRID_STRIDE) {
        const u64 i = div_u64(k, width), j = k - i * width;
        dst[i * dst_ld + j] = j >= b0 && j < b1 ? src[i * src_ld + (j - b0)] : store_f32<T>(0.0f);
    }
}

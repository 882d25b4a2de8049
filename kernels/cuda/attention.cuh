/* The visibility rule shared by the attention kernels (attention_fwd.cu, attention_bwd.cu and their
 * Hopper versions): key j is visible to query i of the same row iff first_i <= j <= i, with first_i
 * the first token of i's document, or later inside a sliding window (window = 0: none). */
#define LOG2E 1.4426950408889634f

/* The first key query qi sees, given its document's first token. */
__device__ __forceinline__ int first_visible(int doc_first, int qi, int window) {
    return window > 0 ? max(doc_first, qi + 1 - window) : doc_first;
}
/* The same from the row's document starts (doc_start[t] = first token of t's document). */
__device__ __forceinline__ int first_key_of(const int* doc_start, u64 tok0, int qi, int window) {
    return first_visible(doc_start[tok0 + qi], qi, window);
}

/* dq[0] += a, dq[1] += b: one 8-byte vector reduction on sm_90, two atomics below it. */
__device__ __forceinline__ void add_pair(float* dq, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(dq), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(dq, a);
    atomicAdd(dq + 1, b);
#endif
}
/* add_pair where `valid`, as one predicated instruction on sm_90, without add_pair's ordering against
 * other memory accesses (the kernels never read dq back), so that the addresses are computed once. */
__device__ __forceinline__ void add_pair_if(bool valid, float* dq, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %3, 0;\n@p red.global.add.v2.f32 [%0], {%1, %2};\n}" ::"l"(dq), "f"(a),
                 "f"(b), "r"((int)valid));
#else
    if (valid) add_pair(dq, a, b);
#endif
}

/* Deterministic uniform random fill (random weights for benchmarks, made on the device):
 *   t[i] = scale · (2u − 1),  u = (splitmix64(seed + splitmix64(i)) >> 40) · 2⁻²⁴ ∈ [0, 1),
 * so values are uniform on [−scale, scale) (standard deviation scale/√3). The generator is a pure
 * function of (seed, i), the same one the CPU backend uses, so both backends fill the same values
 * (up to rounding to the tensor's dtype) whatever the launch shape.
 */
__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

template <typename T>
__device__ void fill_random(T* t, u64 n, u64 seed, float scale) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float u = (float)(splitmix64(seed + splitmix64(i)) >> 40) * (1.0f / 16777216.0f);
        t[i] = store_f32<T>(scale * (2.0f * u - 1.0f));
    }
}

#define RANDOM_KERNELS(S, T)                                                                   \
    extern "C" __global__ void fill_random_##S(T* t, u64 n, u64 seed, float scale) {         \
        fill_random<T>(t, n, seed, scale);                                                     \
    }
FOR_EACH_DTYPE(RANDOM_KERNELS)

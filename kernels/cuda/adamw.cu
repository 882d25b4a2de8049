/* torch.optim.AdamW over every LoRA tensor in one launch (all f32: master weights, grads, moments):
 *   g = grad * grad_scale;  p = p * (1 - lr*wd);  m = m + (1-b1)(g - m);  v = b2 v + (1-b2) g^2
 *   p = p - step_size * m / (sqrt(v)/sqrt(1-b2^t) + eps),  step_size = lr / (1-b1^t)
 * The scalars are formed on the host in f64 and rounded once, as in kernels/src/cpu/adamw.rs.
 * Tensors are reached through device tables of pointers; `starts[i]` is the first flat index of
 * tensor i (starts[count] = total), so a thread finds its tensor by binary search (owner_of). Each element's
 * four values are read and its three outputs written once: one pass over 16 bytes in, 12 out.
 * Where `compute` is non-null (a table of addresses, one per tensor) the updated weight is also
 * rounded into it, as cast_multi_f32_<t> would (compute_dtype: 1 bf16, 2 f16, 2 bytes out; 0 f32, the
 * f32 backend's copies, 4 bytes), and
 * with `zero_grads` the gradient is zeroed once read (4 bytes out): the compute copies and the
 * zeroing that two launches after the update wrote, in the same pass.
 */
extern "C" __global__ void adamw_multi_f32(float* const* params, float* const* grads, float* const* exp_avg,
                                           float* const* exp_avg_sq, const u64* starts, int count, float step_size,
                                           float decay, float one_minus_b1, float b2, float one_minus_b2,
                                           float bias2_sqrt, float eps, float grad_scale, const u64* compute,
                                           int compute_dtype, int zero_grads) {
    u64 total = starts[count];
    for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (u64)gridDim.x * blockDim.x) {
        int t = owner_of(starts, count, idx);
        u64 i = idx - starts[t];
        float g = grads[t][i] * grad_scale;
        float p = params[t][i] * decay;
        float m = exp_avg[t][i];
        m = m + one_minus_b1 * (g - m);
        float v = b2 * exp_avg_sq[t][i] + one_minus_b2 * g * g;
        float denom = sqrtf(v) / bias2_sqrt + eps;
        const float updated = p - step_size * m / denom;
        params[t][i] = updated;
        exp_avg[t][i] = m;
        exp_avg_sq[t][i] = v;
        if (compute != nullptr) {
            if (compute_dtype == 1) ((bf16*)compute[t])[i] = store_f32<bf16>(updated);
            else if (compute_dtype == 2) ((f16*)compute[t])[i] = store_f32<f16>(updated);
            else ((float*)compute[t])[i] = updated;
        }
        if (zero_grads) grads[t][i] = 0.0f;
    }
}

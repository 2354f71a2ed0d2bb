// CUDA kernels of the device path; loaded with cupy.RawModule (hpc_train.kernels.device)
// and compiled to PTX for sm_80 and sm_90 by the tests. All per-element logic lives in
// elementwise.cuh, which the host build (host.cpp) shares.
#include "elementwise.cuh"

#define FOR_EACH(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

extern "C" {

__global__ void sgd_f32(float* w, const float* grad, float* buf, long long n, float lr, float momentum,
                        float weight_decay, int nesterov, int first) {
    FOR_EACH(i, n) sgd_element(w + i, grad[i], buf + i, lr, momentum, weight_decay, nesterov, first);
}

__global__ void adam_f32(float* w, const float* grad, float* m, float* v, long long n, float beta1, float beta2,
                         float one_minus_beta1, float one_minus_beta2, float eps, float weight_decay, float shrink,
                         float step_size, float correction2) {
    FOR_EACH(i, n) adam_element(w + i, grad[i], m + i, v + i, beta1, beta2, one_minus_beta1,
                                one_minus_beta2, eps, weight_decay, shrink, step_size, correction2);
}

__global__ void pack_f16(const float* src, uint16_t* dst, long long n, float scale) {
    FOR_EACH(i, n) dst[i] = f32_to_f16_bits(src[i] * scale);
}

__global__ void unpack_f16(const uint16_t* src, float* dst, long long n, float scale) {
    FOR_EACH(i, n) dst[i] = f16_bits_to_f32(src[i]) * scale;
}

__global__ void pack_bf16(const float* src, uint16_t* dst, long long n, float scale) {
    FOR_EACH(i, n) dst[i] = f32_to_bf16_bits(src[i] * scale);
}

__global__ void unpack_bf16(const uint16_t* src, float* dst, long long n, float scale) {
    FOR_EACH(i, n) dst[i] = bf16_bits_to_f32(src[i]) * scale;
}

// Many arrays into one buffer (and back) with one launch: offsets has count + 1 entries.
__global__ void bucket_pack_f32(const float* const* arrays, const long long* offsets, int count, float* dst) {
    FOR_EACH(i, offsets[count]) {
        int k = segment_of((const int64_t*)offsets, count, i);
        dst[i] = arrays[k][i - offsets[k]];
    }
}

__global__ void bucket_unpack_f32(const float* src, float* const* arrays, const long long* offsets, int count) {
    FOR_EACH(i, offsets[count]) {
        int k = segment_of((const int64_t*)offsets, count, i);
        arrays[k][i - offsets[k]] = src[i];
    }
}

__global__ void sum_f32(const float* a, const float* b, float* out, long long n) {
    FOR_EACH(i, n) out[i] = add_element(a[i], b[i]);
}

}  // extern "C"

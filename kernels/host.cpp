// Host build of the per-element functions (elementwise.cuh), loaded with ctypes by the
// tests and checked against the NumPy references: the logic the GPU runs, run here.
#include "elementwise.cuh"

extern "C" {

void sgd_f32(float* w, const float* grad, float* buf, long long n, float lr, float momentum, float weight_decay,
             int nesterov, int first) {
    for (long long i = 0; i < n; ++i)
        sgd_element(w + i, grad[i], buf ? buf + i : nullptr, lr, momentum, weight_decay, nesterov, first);
}

void adam_f32(float* w, const float* grad, float* m, float* v, long long n, float beta1, float beta2,
              float one_minus_beta1, float one_minus_beta2, float eps, float weight_decay, float shrink,
              float step_size, float correction2) {
    for (long long i = 0; i < n; ++i)
        adam_element(w + i, grad[i], m + i, v + i, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                     weight_decay, shrink, step_size, correction2);
}

void pack_f16(const float* src, uint16_t* dst, long long n, float scale) {
    for (long long i = 0; i < n; ++i) dst[i] = f32_to_f16_bits(src[i] * scale);
}

void unpack_f16(const uint16_t* src, float* dst, long long n, float scale) {
    for (long long i = 0; i < n; ++i) dst[i] = f16_bits_to_f32(src[i]) * scale;
}

void pack_bf16(const float* src, uint16_t* dst, long long n, float scale) {
    for (long long i = 0; i < n; ++i) dst[i] = f32_to_bf16_bits(src[i] * scale);
}

void unpack_bf16(const uint16_t* src, float* dst, long long n, float scale) {
    for (long long i = 0; i < n; ++i) dst[i] = bf16_bits_to_f32(src[i]) * scale;
}

void bucket_pack_f32(const float* const* arrays, const long long* offsets, int count, float* dst) {
    for (long long i = 0; i < offsets[count]; ++i) {
        int k = segment_of((const int64_t*)offsets, count, i);
        dst[i] = arrays[k][i - offsets[k]];
    }
}

void bucket_unpack_f32(const float* src, float* const* arrays, const long long* offsets, int count) {
    for (long long i = 0; i < offsets[count]; ++i) {
        int k = segment_of((const int64_t*)offsets, count, i);
        arrays[k][i - offsets[k]] = src[i];
    }
}

void sum_f32(const float* a, const float* b, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = add_element(a[i], b[i]);
}

}  // extern "C"

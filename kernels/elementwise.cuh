// Per-element logic of every kernel, shared by the CUDA kernels (kernels.cu) and the
// host build (host.cpp) that the tests check against the NumPy references: the same
// source runs on the GPU and, compiled by g++, on a CPU-only machine.
#pragma once
#include <stdint.h>
#ifndef __CUDACC__
#include <math.h>
#include <string.h>
#define __host__
#define __device__
#endif
#define HD __host__ __device__ inline

HD uint32_t f32_bits(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
#endif
}

HD float bits_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
#endif
}

// float32 -> IEEE half bits, round to nearest even; overflow -> inf, NaN stays NaN (quiet).
HD uint16_t f32_to_f16_bits(float f) {
    uint32_t x = f32_bits(f), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a >= 0x7f800000u)  // inf or NaN
        return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u | ((a >> 13) & 0x3ffu) : 0u));
    if (a >= 0x477ff000u)  // >= 65520: rounds past the largest half (65504)
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) {  // below 2^-14: a half subnormal (m * 2^-24) or zero
        int shift = 126 - (int)(a >> 23);
        if (shift > 24) return (uint16_t)sign;
        uint32_t mant = (a & 0x7fffffu) | 0x800000u, m = mant >> shift;
        uint32_t rest = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (m & 1u))) m += 1u;
        return (uint16_t)(sign | m);
    }
    uint32_t r = a - 0x38000000u;  // exponent rebiased from 127 to 15
    r += 0x0fffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

HD float f16_bits_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) return bits_f32(sign | 0x7f800000u | (m << 13));
    if (e == 0u) {
        float v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24, exact
        return sign ? -v : v;
    }
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

// float32 -> bfloat16 bits, round to nearest even; NaN stays NaN (quiet).
HD uint16_t f32_to_bf16_bits(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

HD float bf16_bits_to_f32(uint16_t b) { return bits_f32((uint32_t)b << 16); }

// PyTorch's SGD: g = grad + wd*w; buf = momentum*buf + g (buf = g on the first step);
// w -= lr * (nesterov ? g + momentum*buf : buf). momentum == 0: w -= lr*g.
HD void sgd_element(float* w, float grad, float* buf, float lr, float momentum, float weight_decay,
                    int nesterov, int first) {
    float g = weight_decay != 0.0f ? grad + weight_decay * *w : grad;
    if (momentum != 0.0f) {
        float b = first ? g : momentum * *buf + g;
        *buf = b;
        g = nesterov ? g + momentum * b : b;
    }
    *w -= lr * g;
}

// Adam with bias correction. The host computes the per-step constants once, in double
// precision as the NumPy reference does: one_minus_beta1/2 = 1 - beta1/2, shrink = 1 - lr*wd
// for AdamW (1 for Adam), step_size = lr / (1 - beta1^t), correction2 = 1 - beta2^t;
// weight_decay is the coupled (Adam) decay, 0 for AdamW.
HD void adam_element(float* w, float grad, float* m, float* v, float beta1, float beta2, float one_minus_beta1,
                     float one_minus_beta2, float eps, float weight_decay, float shrink, float step_size,
                     float correction2) {
    float g = weight_decay != 0.0f ? grad + weight_decay * *w : grad;
    *w *= shrink;
    *m = beta1 * *m + one_minus_beta1 * g;
    *v = beta2 * *v + one_minus_beta2 * g * g;
    float denom = sqrtf(*v / correction2) + eps;
    *w -= step_size * *m / denom;
}

HD float add_element(float a, float b) { return a + b; }

// Which of n segments (offsets[k] <= i < offsets[k+1], offsets[n] = total) holds element i.
HD int segment_of(const int64_t* offsets, int n, int64_t i) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (offsets[mid] <= i) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Scalar arithmetic of the quantisation formats (emloc_kernels/ops/quant.py), shared by
// the CUDA kernels (quant.cu) and the C++ CPU implementation (ext.cpp) so that both agree
// bit for bit with the torch reference. Each translation unit provides, for its storage
// types T (float and its fp16/bf16 types): to_float(T), from_float<T>(float) rounding to
// nearest even, and next_up(T) (the next representable value above a finite T >= 0), declared before this
// header is included.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define EMLOC_HD __host__ __device__ __forceinline__
#else
#define EMLOC_HD inline
#endif

namespace emloc {

// Largest quantised level: int8 is symmetric in [-127, 127], int4 nibbles are in [0, 15].
constexpr float kInt8Max = 127.f;
constexpr float kInt4Max = 15.f;

// fp32 scale s >= 0 rounded *up* to the storage type, so the grid covers every element.
template <typename T>
EMLOC_HD T scale_rounded_up(float s) {
  T d = from_float<T>(s);
  return to_float(d) < s ? next_up(d) : d;
}

// round(a / s) to nearest even, clamped to [lo, hi]; 0 when s == 0 (all-zero row or constant
// group). fmaxf/fminf also map a NaN quotient to lo, so no undefined int conversion follows.
EMLOC_HD float level(float a, float s, float lo, float hi) {
  if (!(s > 0.f)) return 0.f;
#ifdef __CUDA_ARCH__
  float quotient = __fdiv_rn(a, s);
#else
  float quotient = a / s;
#endif
  return fminf(fmaxf(rintf(quotient), lo), hi);
}

// q * s + offset as two separately rounded fp32 operations (never a fused multiply-add:
// the host code is compiled with -ffp-contract=off, the device code uses _rn intrinsics).
EMLOC_HD float dequant_value(float q, float s, float offset) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(__fmul_rn(q, s), offset);
#else
  return q * s + offset;
#endif
}

// int8 dequantisation: a single fp32 multiply.
EMLOC_HD float dequant_value(float q, float s) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(q, s);
#else
  return q * s;
#endif
}

}  // namespace emloc

// CUDA kernels of the quantisation formats (layout and rounding: emloc_kernels/ops/quant.py).
// Includes only CUDA headers; the torch glue in ext.cpp calls the launchers of quant.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace emloc {

// Conversions used by quant_math.h (declared before it is included).
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float next_up(float x) { return nextafterf(x, INFINITY); }
__device__ __forceinline__ __half next_up(__half x) { return __ushort_as_half(__half_as_ushort(x) + 1); }
__device__ __forceinline__ __nv_bfloat16 next_up(__nv_bfloat16 x) {
  return __ushort_as_bfloat16(__bfloat16_as_ushort(x) + 1);
}

}  // namespace emloc

#include "quant.h"
#include "quant_math.h"

namespace emloc {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest

int blocks_for(int64_t items) {
  int64_t b = (items + kThreads - 1) / kThreads;
  return static_cast<int>(b < kMaxBlocks ? b : kMaxBlocks);
}

__device__ __forceinline__ float warp_max(float x) {
  for (int d = 16; d > 0; d >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}

__device__ __forceinline__ float warp_min(float x) {
  for (int d = 16; d > 0; d >>= 1) x = fminf(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}

// One block per row: block-wide max |w|, then the row's levels.
template <typename T>
__global__ void quantize_int8_kernel(const T* __restrict__ w, int64_t k, int8_t* __restrict__ q,
                                     T* __restrict__ scale) {
  __shared__ float partial[kWarps];
  const int64_t row = blockIdx.x;
  const T* wr = w + row * k;
  float amax = 0.f;
  for (int64_t i = threadIdx.x; i < k; i += kThreads) amax = fmaxf(amax, fabsf(to_float(wr[i])));
  amax = warp_max(amax);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = 0.f;
  for (int i = 0; i < kWarps; ++i) amax = fmaxf(amax, partial[i]);
  const T s = scale_rounded_up<T>(__fdiv_rn(amax, kInt8Max));
  if (threadIdx.x == 0) scale[row] = s;
  const float sf = to_float(s);
  for (int64_t i = threadIdx.x; i < k; i += kThreads)
    q[row * k + i] = static_cast<int8_t>(level(to_float(wr[i]), sf, -kInt8Max, kInt8Max));
}

// One warp per group; lane l handles the byte pairs l, l + 32, ... (group_size / 2 pairs).
template <typename T>
__global__ void quantize_int4_kernel(const T* __restrict__ w, int64_t n, int64_t k, int64_t group_size,
                                     uint8_t* __restrict__ q, T* __restrict__ scale, T* __restrict__ offset) {
  constexpr int kMaxPairsPerLane = 128 / 2 / 32;
  const int64_t groups_per_row = (k + group_size - 1) / group_size;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (group >= n * groups_per_row) return;  // the whole warp leaves together
  const int lane = threadIdx.x % 32;
  const int64_t row = group / groups_per_row, k0 = (group % groups_per_row) * group_size;
  const int pairs = static_cast<int>(group_size / 2);
  float v[kMaxPairsPerLane][2];
  float lo = INFINITY, hi = -INFINITY;
  for (int p = 0; p < kMaxPairsPerLane; ++p) {
    const int pair = lane + 32 * p;
    if (pair >= pairs) break;
    for (int e = 0; e < 2; ++e) {
      const int64_t col = k0 + 2 * pair + e;
      v[p][e] = col < k ? to_float(w[row * k + col]) : 0.f;  // zero padding takes part in min/max
      lo = fminf(lo, v[p][e]);
      hi = fmaxf(hi, v[p][e]);
    }
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  const T s = scale_rounded_up<T>(__fdiv_rn(__fsub_rn(hi, lo), kInt4Max));
  if (lane == 0) {
    scale[group] = s;
    offset[group] = from_float<T>(lo);
  }
  const float sf = to_float(s);
  uint8_t* qg = q + row * (groups_per_row * group_size / 2) + k0 / 2;
  for (int p = 0; p < kMaxPairsPerLane; ++p) {
    const int pair = lane + 32 * p;
    if (pair >= pairs) break;
    const auto low = static_cast<uint8_t>(level(__fsub_rn(v[p][0], lo), sf, 0.f, kInt4Max));
    const auto high = static_cast<uint8_t>(level(__fsub_rn(v[p][1], lo), sf, 0.f, kInt4Max));
    qg[pair] = static_cast<uint8_t>(low | (high << 4));
  }
}

template <typename T>
__global__ void dequantize_int8_kernel(const int8_t* __restrict__ q, const T* __restrict__ scale, int64_t n,
                                       int64_t k, T* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n * k;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    out[i] = from_float<T>(dequant_value(static_cast<float>(q[i]), to_float(scale[i / k])));
}

// One thread per packed byte (two elements); elements of the zero padding are not written.
template <typename T>
__global__ void dequantize_int4_kernel(const uint8_t* __restrict__ q, const T* __restrict__ scale,
                                       const T* __restrict__ offset, int64_t n, int64_t k, int64_t group_size,
                                       T* __restrict__ out) {
  const int64_t groups_per_row = (k + group_size - 1) / group_size;
  const int64_t bytes_per_row = groups_per_row * group_size / 2;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n * bytes_per_row;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = i / bytes_per_row, col = 2 * (i % bytes_per_row);
    const int64_t g = row * groups_per_row + col / group_size;
    const float s = to_float(scale[g]), o = to_float(offset[g]);
    const uint8_t byte = q[i];
    if (col < k) out[row * k + col] = from_float<T>(dequant_value(static_cast<float>(byte & 0xF), s, o));
    if (col + 1 < k) out[row * k + col + 1] = from_float<T>(dequant_value(static_cast<float>(byte >> 4), s, o));
  }
}

// Calls f with a null pointer of the storage type named by `type`.
template <typename F>
int with_type(FloatType type, F&& f) {
  switch (type) {
    case FloatType::f32:
      return f(static_cast<float*>(nullptr));
    case FloatType::f16:
      return f(static_cast<__half*>(nullptr));
    case FloatType::bf16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int quantize_int8_cuda(const void* w, int64_t n, int64_t k, FloatType type, int8_t* qweight, void* scale,
                       void* stream) {
  return with_type(type, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    quantize_int8_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(w), k, qweight, static_cast<T*>(scale));
    return static_cast<int>(cudaGetLastError());
  });
}

int quantize_int4_cuda(const void* w, int64_t n, int64_t k, int64_t group_size, FloatType type, uint8_t* qweight,
                       void* scale, void* offset, void* stream) {
  if (group_size != 64 && group_size != 128) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t groups = n * ((k + group_size - 1) / group_size);
  const auto blocks = static_cast<unsigned>((groups + kWarps - 1) / kWarps);
  return with_type(type, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    quantize_int4_kernel<T><<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(w), n, k, group_size, qweight, static_cast<T*>(scale), static_cast<T*>(offset));
    return static_cast<int>(cudaGetLastError());
  });
}

int dequantize_int8_cuda(const int8_t* qweight, const void* scale, int64_t n, int64_t k, FloatType type, void* out,
                         void* stream) {
  return with_type(type, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dequantize_int8_kernel<T><<<blocks_for(n * k), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        qweight, static_cast<const T*>(scale), n, k, static_cast<T*>(out));
    return static_cast<int>(cudaGetLastError());
  });
}

int dequantize_int4_cuda(const uint8_t* qweight, const void* scale, const void* offset, int64_t n, int64_t k,
                         int64_t group_size, FloatType type, void* out, void* stream) {
  const int64_t bytes = n * ((k + group_size - 1) / group_size) * group_size / 2;
  return with_type(type, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dequantize_int4_kernel<T><<<blocks_for(bytes), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        qweight, static_cast<const T*>(scale), static_cast<const T*>(offset), n, k, group_size, static_cast<T*>(out));
    return static_cast<int>(cudaGetLastError());
  });
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace emloc

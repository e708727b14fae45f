// Launchers of the CUDA quantisation kernels (quant.cu). Plain C++ types only, so the torch
// glue (ext.cpp) needs no CUDA headers and quant.cu needs no torch headers. Pointers are
// device pointers to contiguous row-major data; `stream` is a cudaStream_t. Each returns a
// cudaError_t value (0 on success); cuda_error_string() names it.
#pragma once

#include <cstdint>

namespace emloc {

enum class FloatType : int { f32 = 0, f16 = 1, bf16 = 2 };

int quantize_int8_cuda(const void* w, int64_t n, int64_t k, FloatType type, int8_t* qweight, void* scale,
                       void* stream);
int quantize_int4_cuda(const void* w, int64_t n, int64_t k, int64_t group_size, FloatType type, uint8_t* qweight,
                       void* scale, void* offset, void* stream);
int dequantize_int8_cuda(const int8_t* qweight, const void* scale, int64_t n, int64_t k, FloatType type, void* out,
                         void* stream);
int dequantize_int4_cuda(const uint8_t* qweight, const void* scale, const void* offset, int64_t n, int64_t k,
                         int64_t group_size, FloatType type, void* out, void* stream);
const char* cuda_error_string(int code);

}  // namespace emloc

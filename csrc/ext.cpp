// Torch glue of the emloc_ext operators and their C++ CPU implementation; the CUDA kernels
// live in quant.cu (compiled by nvcc, linked in when EMLOC_WITH_CUDA is defined). Formats:
// emloc_kernels/ops/quant.py. Light torch headers only, so this builds against CPU and CUDA
// builds of torch alike.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace emloc {

// Conversions used by quant_math.h (declared before it is included).
inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
template <typename T>
inline T from_float(float x) {
  return T(x);  // c10::Half and c10::BFloat16 round to nearest even
}
inline float next_up(float x) { return std::nextafter(x, INFINITY); }
inline c10::Half next_up(c10::Half x) { return {static_cast<uint16_t>(x.x + 1), c10::Half::from_bits()}; }
inline c10::BFloat16 next_up(c10::BFloat16 x) {
  return {static_cast<uint16_t>(x.x + 1), c10::BFloat16::from_bits()};
}

}  // namespace emloc

#include "quant.h"
#include "quant_math.h"

namespace emloc {
namespace {

// ---- CPU implementation (same arithmetic as the CUDA kernels) ----

template <typename T>
void quantize_int8_cpu(const T* w, int64_t n, int64_t k, int8_t* q, T* scale) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* wr = w + row * k;
      float amax = 0.f;
      for (int64_t i = 0; i < k; ++i) amax = fmaxf(amax, fabsf(to_float(wr[i])));
      const T s = scale_rounded_up<T>(amax / kInt8Max);
      scale[row] = s;
      for (int64_t i = 0; i < k; ++i)
        q[row * k + i] = static_cast<int8_t>(level(to_float(wr[i]), to_float(s), -kInt8Max, kInt8Max));
    }
  });
}

template <typename T>
void quantize_int4_cpu(const T* w, int64_t n, int64_t k, int64_t group_size, uint8_t* q, T* scale, T* offset) {
  const int64_t groups_per_row = (k + group_size - 1) / group_size;
  at::parallel_for(0, n * groups_per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t row = group / groups_per_row, k0 = (group % groups_per_row) * group_size;
      // the zero padding past k takes part in the last group's min/max
      auto value = [&](int64_t col) { return col < k ? to_float(w[row * k + col]) : 0.f; };
      float lo = INFINITY, hi = -INFINITY;
      for (int64_t col = k0; col < k0 + group_size; ++col) {
        lo = fminf(lo, value(col));
        hi = fmaxf(hi, value(col));
      }
      const T s = scale_rounded_up<T>((hi - lo) / kInt4Max);
      scale[group] = s;
      offset[group] = from_float<T>(lo);
      uint8_t* qg = q + row * (groups_per_row * group_size / 2) + k0 / 2;
      for (int64_t col = k0; col < k0 + group_size; col += 2) {
        const auto low = static_cast<uint8_t>(level(value(col) - lo, to_float(s), 0.f, kInt4Max));
        const auto high = static_cast<uint8_t>(level(value(col + 1) - lo, to_float(s), 0.f, kInt4Max));
        qg[(col - k0) / 2] = static_cast<uint8_t>(low | (high << 4));
      }
    }
  });
}

template <typename T>
void dequantize_int8_cpu(const int8_t* q, const T* scale, int64_t n, int64_t k, T* out) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      for (int64_t i = 0; i < k; ++i)
        out[row * k + i] = from_float<T>(dequant_value(static_cast<float>(q[row * k + i]), to_float(scale[row])));
  });
}

template <typename T>
void dequantize_int4_cpu(const uint8_t* q, const T* scale, const T* offset, int64_t n, int64_t k, int64_t group_size,
                         T* out) {
  const int64_t groups_per_row = (k + group_size - 1) / group_size, bytes_per_row = groups_per_row * group_size / 2;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      for (int64_t col = 0; col < k; ++col) {
        const int64_t g = row * groups_per_row + col / group_size;
        const uint8_t byte = q[row * bytes_per_row + col / 2];
        const auto nibble = static_cast<float>(col % 2 ? byte >> 4 : byte & 0xF);
        out[row * k + col] = from_float<T>(dequant_value(nibble, to_float(scale[g]), to_float(offset[g])));
      }
  });
}

// ---- glue ----

FloatType float_type(const at::Tensor& t, const char* name) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "emloc_ext: ", name,
              " dtype must be float32, float16 or bfloat16, got ", s);
  return s == at::kFloat ? FloatType::f32 : s == at::kHalf ? FloatType::f16 : FloatType::bf16;
}

// Calls f with a null pointer of the CPU storage type named by `type`.
template <typename F>
void with_cpu_type(FloatType type, F&& f) {
  switch (type) {
    case FloatType::f32:
      return f(static_cast<float*>(nullptr));
    case FloatType::f16:
      return f(static_cast<c10::Half*>(nullptr));
    case FloatType::bf16:
      return f(static_cast<c10::BFloat16*>(nullptr));
  }
}

// Runs `cpu()` for CPU tensors, or `cuda(stream)` on the device's current stream; nothing
// for meta tensors (shape propagation, e.g. under torch.compile, only needs the outputs).
template <typename Cpu, typename Cuda>
void run(const at::Tensor& t, Cpu&& cpu, Cuda&& cuda) {
  if (t.is_meta()) return;
  if (!t.is_cuda()) {
    TORCH_CHECK(t.is_cpu(), "emloc_ext: tensors must be on CPU, CUDA or meta, got ", t.device());
    cpu();
    return;
  }
#ifdef EMLOC_WITH_CUDA
  const c10::DeviceGuard guard(t.device());
  void* stream = c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(t.device()).native_handle();
  const int err = cuda(stream);
  TORCH_CHECK(err == 0, "emloc_ext: CUDA kernel failed: ", cuda_error_string(err));
#else
  (void)cuda;
  TORCH_CHECK(false, "emloc_ext was built without CUDA (no nvcc at build time); use the torch reference");
#endif
}

at::Tensor checked_factor(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.numel() > 0, "emloc_ext: w must be a non-empty 2-D tensor, got sizes ", w.sizes());
  float_type(w, "w");
  return w.contiguous();
}

void check_group_size(int64_t group_size) {
  TORCH_CHECK(group_size == 64 || group_size == 128, "emloc_ext: group_size must be 64 or 128, got ", group_size);
}

void check_packed(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                  const at::Tensor& qweight) {
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == shape && t.device() == qweight.device(), "emloc_ext: ", name,
              " must be ", dtype, " of sizes ", shape, " on ", qweight.device(), "; got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& w_in) {
  const at::Tensor w = checked_factor(w_in);
  const int64_t n = w.size(0), k = w.size(1);
  const FloatType type = float_type(w, "w");
  at::Tensor q = at::empty({n, k}, w.options().dtype(at::kChar));
  at::Tensor scale = at::empty({n, 1}, w.options());
  run(
      w,
      [&] {
        with_cpu_type(type, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          quantize_int8_cpu<T>(static_cast<const T*>(w.const_data_ptr()), n, k, q.data_ptr<int8_t>(),
                               static_cast<T*>(scale.data_ptr()));
        });
      },
      [&](void* stream) {
        return quantize_int8_cuda(w.const_data_ptr(), n, k, type, q.data_ptr<int8_t>(), scale.data_ptr(), stream);
      });
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4(const at::Tensor& w_in, int64_t group_size) {
  const at::Tensor w = checked_factor(w_in);
  check_group_size(group_size);
  const int64_t n = w.size(0), k = w.size(1), groups = (k + group_size - 1) / group_size;
  const FloatType type = float_type(w, "w");
  at::Tensor q = at::empty({n, groups * group_size / 2}, w.options().dtype(at::kByte));
  at::Tensor scale = at::empty({n, groups}, w.options());
  at::Tensor offset = at::empty({n, groups}, w.options());
  run(
      w,
      [&] {
        with_cpu_type(type, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          quantize_int4_cpu<T>(static_cast<const T*>(w.const_data_ptr()), n, k, group_size, q.data_ptr<uint8_t>(),
                               static_cast<T*>(scale.data_ptr()), static_cast<T*>(offset.data_ptr()));
        });
      },
      [&](void* stream) {
        return quantize_int4_cuda(w.const_data_ptr(), n, k, group_size, type, q.data_ptr<uint8_t>(),
                                  scale.data_ptr(), offset.data_ptr(), stream);
      });
  return {q, scale, offset};
}

at::Tensor dequantize_int8(const at::Tensor& qweight_in, const at::Tensor& scale_in) {
  TORCH_CHECK(qweight_in.dim() == 2, "emloc_ext: qweight must be 2-D, got sizes ", qweight_in.sizes());
  const at::Tensor qweight = qweight_in.contiguous(), scale = scale_in.contiguous();
  const int64_t n = qweight.size(0), k = qweight.size(1);
  const FloatType type = float_type(scale, "scale");
  check_packed(qweight, "qweight", at::kChar, {n, k}, qweight);
  check_packed(scale, "scale", scale.scalar_type(), {n, 1}, qweight);
  at::Tensor out = at::empty({n, k}, scale.options());
  run(
      qweight,
      [&] {
        with_cpu_type(type, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          dequantize_int8_cpu<T>(qweight.const_data_ptr<int8_t>(), static_cast<const T*>(scale.const_data_ptr()), n,
                                 k, static_cast<T*>(out.data_ptr()));
        });
      },
      [&](void* stream) {
        return dequantize_int8_cuda(qweight.const_data_ptr<int8_t>(), scale.const_data_ptr(), n, k, type,
                                    out.data_ptr(), stream);
      });
  return out;
}

at::Tensor dequantize_int4(const at::Tensor& qweight_in, const at::Tensor& scale_in, const at::Tensor& offset_in,
                           int64_t group_size, int64_t k) {
  check_group_size(group_size);
  TORCH_CHECK(k > 0, "emloc_ext: k must be positive, got ", k);
  TORCH_CHECK(qweight_in.dim() == 2, "emloc_ext: qweight must be 2-D, got sizes ", qweight_in.sizes());
  const at::Tensor qweight = qweight_in.contiguous(), scale = scale_in.contiguous(), offset = offset_in.contiguous();
  const int64_t n = qweight.size(0), groups = (k + group_size - 1) / group_size;
  const FloatType type = float_type(scale, "scale");
  check_packed(qweight, "qweight", at::kByte, {n, groups * group_size / 2}, qweight);
  check_packed(scale, "scale", scale.scalar_type(), {n, groups}, qweight);
  check_packed(offset, "offset", scale.scalar_type(), {n, groups}, qweight);
  at::Tensor out = at::empty({n, k}, scale.options());
  run(
      qweight,
      [&] {
        with_cpu_type(type, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          dequantize_int4_cpu<T>(qweight.const_data_ptr<uint8_t>(), static_cast<const T*>(scale.const_data_ptr()),
                                 static_cast<const T*>(offset.const_data_ptr()), n, k, group_size,
                                 static_cast<T*>(out.data_ptr()));
        });
      },
      [&](void* stream) {
        return dequantize_int4_cuda(qweight.const_data_ptr<uint8_t>(), scale.const_data_ptr(), offset.const_data_ptr(),
                                    n, k, group_size, type, out.data_ptr(), stream);
      });
  return out;
}

bool cuda_built() {
#ifdef EMLOC_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace emloc

TORCH_LIBRARY(emloc_ext, m) {
  m.def("quantize_int8(Tensor w) -> (Tensor qweight, Tensor scale)");
  m.def("quantize_int4(Tensor w, int group_size) -> (Tensor qweight, Tensor scale, Tensor offset)");
  m.def("dequantize_int8(Tensor qweight, Tensor scale) -> Tensor");
  m.def("dequantize_int4(Tensor qweight, Tensor scale, Tensor offset, int group_size, int k) -> Tensor");
  m.def("cuda_built() -> bool", &emloc::cuda_built);
}

// One registration for CPU, CUDA and Meta: each function dispatches on its tensors' device.
TORCH_LIBRARY_IMPL(emloc_ext, CompositeExplicitAutograd, m) {
  m.impl("quantize_int8", &emloc::quantize_int8);
  m.impl("quantize_int4", &emloc::quantize_int4);
  m.impl("dequantize_int8", &emloc::dequantize_int8);
  m.impl("dequantize_int4", &emloc::dequantize_int4);
}

#pragma once
// Glue-side helpers: tensor -> DType and input checks whose messages name the argument, what was
// expected and what came.
#include <ATen/ATen.h>

#include <optional>

#include "common/dtype.h"

namespace markovkit {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, ": expected a floating dtype (float32, float64, float16, bfloat16), got ",
                  t.scalar_type());
  }
}

inline void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> ok) {
  for (auto s : ok) {
    if (t.scalar_type() == s) return;
  }
  std::string expected;
  for (auto s : ok) expected += (expected.empty() ? "" : " or ") + std::string(c10::toString(s));
  TORCH_CHECK(false, name, ": expected dtype ", expected, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (the device of ",
              ref_name, "), got one on ", t.device());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (the dtype of ",
              ref_name, "), got ", t.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides(), " for shape ",
              t.sizes());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, ": expected shape ", expected, ", got ", t.sizes());
}

// The data of an optional tensor argument, or null.
inline const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

}  // namespace markovkit

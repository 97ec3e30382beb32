#pragma once
// Element types as the kernels see them: a plain enum, so params structs stay free of torch headers.
namespace markovkit {

enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

}  // namespace markovkit

#pragma once
// Filling a tensor from the Philox stream: the params struct and the per-block values, shared by the CPU
// kernel and the CUDA kernel.
//
// Element i of the output is element g = offset + i of the stream (seed). fp32 takes 4 elements from each
// Philox block (one 32-bit word each, normals as two Box-Muller pairs); fp64 takes 2 (two words each, one
// Box-Muller pair). Block b is philox_block(seed, b, 0). So a value depends only on (seed, offset + i), and
// `offset = n` continues a stream of which n values were drawn.
#include <cstdint>

#include "common/dtype.h"
#include "common/philox.h"
#ifdef MARKOVKIT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace markovkit {

struct PhiloxFillParams {
  void* out;        // (numel,) contiguous, dtype
  int64_t numel;
  uint64_t seed;
  uint64_t offset;  // stream position of out[0]
  DType dtype;      // kFloat32 or kFloat64
  bool normal;      // standard normal instead of uniform (0, 1)
};

template <typename T>
struct PhiloxPerBlock {
  static constexpr int value = 4;
};
template <>
struct PhiloxPerBlock<double> {
  static constexpr int value = 2;
};

// The PhiloxPerBlock<T> values of block `block`.
template <typename T, bool kNormal>
MK_HOST_DEVICE void philox_block_values(uint64_t seed, uint64_t block, T* vals);

template <>
MK_HOST_DEVICE void philox_block_values<float, false>(uint64_t seed, uint64_t block, float* vals) {
  const Philox4 r = philox_block(seed, block, 0);
  for (int j = 0; j < 4; ++j) vals[j] = uniform_float(r.v[j]);
}

template <>
MK_HOST_DEVICE void philox_block_values<float, true>(uint64_t seed, uint64_t block, float* vals) {
  const Philox4 r = philox_block(seed, block, 0);
  box_muller(uniform_float(r.v[0]), uniform_float(r.v[1]), &vals[0], &vals[1]);
  box_muller(uniform_float(r.v[2]), uniform_float(r.v[3]), &vals[2], &vals[3]);
}

template <>
MK_HOST_DEVICE void philox_block_values<double, false>(uint64_t seed, uint64_t block, double* vals) {
  const Philox4 r = philox_block(seed, block, 0);
  vals[0] = uniform_double(r.v[0], r.v[1]);
  vals[1] = uniform_double(r.v[2], r.v[3]);
}

template <>
MK_HOST_DEVICE void philox_block_values<double, true>(uint64_t seed, uint64_t block, double* vals) {
  const Philox4 r = philox_block(seed, block, 0);
  box_muller(uniform_double(r.v[0], r.v[1]), uniform_double(r.v[2], r.v[3]), &vals[0], &vals[1]);
}

// Writes the values of stream block `block` that fall inside out[0, numel).
template <typename T, bool kNormal>
MK_HOST_DEVICE void philox_fill_block(const PhiloxFillParams& p, uint64_t block) {
  constexpr int kPer = PhiloxPerBlock<T>::value;
  T vals[kPer];
  philox_block_values<T, kNormal>(p.seed, block, vals);
  T* out = static_cast<T*>(p.out);
  for (int j = 0; j < kPer; ++j) {
    const int64_t i = static_cast<int64_t>(block * kPer + j - p.offset);
    if (i >= 0 && i < p.numel) out[i] = vals[j];
  }
}

void philox_fill_cpu(const PhiloxFillParams& p);
#ifdef MARKOVKIT_WITH_CUDA
void philox_fill_cuda(const PhiloxFillParams& p, cudaStream_t stream);
#endif

}  // namespace markovkit

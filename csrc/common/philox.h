#pragma once
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), one header for host
// and device. A draw is a pure function of (key, counter): streams need no state, so any split of the work
// over threads, batches or devices yields the same numbers.
//
// markovkit's convention: key = the 64-bit seed; counter = (lo, hi) two 64-bit words whose meaning each op
// documents (the philox ops use lo = block index, hi = 0; the simulators use (step, path) and the like).
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace markovkit {

struct Philox4 {
  uint32_t v[4];
};

MK_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// The raw generator: 10 rounds on a 128-bit counter under a 64-bit key.
MK_HOST_DEVICE Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
MK_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, ctr.v[0], &hi0);
    const uint32_t lo1 = mulhilo32(kM1, ctr.v[2], &hi1);
    ctr = {{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// Four 32-bit words for counter (lo, hi) under `seed`.
MK_HOST_DEVICE Philox4 philox_block(uint64_t seed, uint64_t lo, uint64_t hi) {
  const Philox4 ctr = {{static_cast<uint32_t>(lo), static_cast<uint32_t>(lo >> 32),
                        static_cast<uint32_t>(hi), static_cast<uint32_t>(hi >> 32)}};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Uniform in the open interval (0, 1): the top 23 bits, centred in their cell. (k + 1/2) 2^-23 is exact in
// float32 for k < 2^23, so the result is never 0 and never rounds up to 1.
MK_HOST_DEVICE float uniform_float(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
}

// Uniform in (0, 1) from the top 52 bits of two words, centred likewise (exact, never 0 or 1).
MK_HOST_DEVICE double uniform_double(uint32_t a, uint32_t b) {
  const uint64_t x = ((static_cast<uint64_t>(a) << 32) | b) >> 12;
  return (static_cast<double>(x) + 0.5) * 2.220446049250313e-16;  // 2^-52
}

// Box-Muller: two independent standard normals from two uniforms in (0, 1). The float version clamps at 0:
// under nvcc --use_fast_math logf is __logf, whose absolute error near 1 (2^-21.41) exceeds |log u0| for the
// largest uniforms (1 − 2^-24 gives −6e-8), so its sign is not guaranteed and sqrtf would give NaN.
MK_HOST_DEVICE void box_muller(float u0, float u1, float* z0, float* z1) {
  const float r = sqrtf(fmaxf(-2.0f * logf(u0), 0.0f));
  const float theta = 6.2831853071795865f * u1;
  *z0 = r * cosf(theta);
  *z1 = r * sinf(theta);
}

MK_HOST_DEVICE void box_muller(double u0, double u1, double* z0, double* z1) {
  const double r = sqrt(-2.0 * log(u0));
  const double theta = 6.2831853071795865 * u1;
  *z0 = r * cos(theta);
  *z1 = r * sin(theta);
}

}  // namespace markovkit

#pragma once
// Torch-free 16-bit activation types of the CPU scan kernels, with the bit layout of torch's float16 and
// bfloat16 storage. Conversion to float is exact; from float it rounds to nearest even, overflows to ±inf
// and keeps NaN a NaN, as torch's casts do.
#include <bit>
#include <cmath>
#include <cstdint>

namespace markovkit {

struct ScanBFloat16 {
  uint16_t bits;

  ScanBFloat16() = default;
  explicit ScanBFloat16(float f) : bits(round(std::bit_cast<uint32_t>(f))) {}
  explicit operator float() const { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

 private:
  static uint16_t round(uint32_t x) {
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  }
};

// IEEE binary16: sign, 5 exponent bits (bias 15), 10 mantissa bits.
struct ScanHalf {
  uint16_t bits;

  ScanHalf() = default;
  explicit ScanHalf(float f) : bits(round(f)) {}
  explicit operator float() const {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16, e = (bits >> 10) & 0x1fu, m = bits & 0x3ffu;
    if (e == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (m << 13));  // inf, NaN
    if (e == 0) return std::copysign(static_cast<float>(m) * 0x1p-24f, sign ? -1.0f : 1.0f);  // zero, subnormal
    return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));  // exponent bias 127 - 15 = 112
  }

 private:
  static uint16_t round(float f) {
    const uint32_t x = std::bit_cast<uint32_t>(f), ax = x & 0x7fffffffu;
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    if (ax > 0x7f800000u) return sign | 0x7e00u;   // NaN
    if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (incl. inf): rounds to inf
    if (ax >= 0x38800000u) {                       // >= 2^-14: normal; rebias, round the 13 dropped bits
      const uint32_t r = ax - (112u << 23);
      return sign | static_cast<uint16_t>((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
    }
    // subnormal: a multiple of 2^-24; |f|·2^24 < 1024 is exact, nearbyint rounds it to nearest even
    return sign | static_cast<uint16_t>(std::nearbyint(std::bit_cast<float>(ax) * 0x1p24f));
  }
};

}  // namespace markovkit

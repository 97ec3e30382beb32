// The Philox fill over lanes of kFillLanes consecutive stream blocks, CPU only. Compiled three times by
// philox_cpu.cpp through common/lane_copies.h (baseline, AVX2, AVX-512, after common/philox_lanes.h): no include
// guard, no includes.

// uniform_double (common/philox.h) bit for bit: the 52-bit integer x becomes a double exactly through the bits
// of 2^52 + x (an int64 -> double conversion does not vectorise before AVX-512DQ).
inline double lane_uniform_double(uint32_t a, uint32_t b) {
  const uint64_t bits = (((static_cast<uint64_t>(a) << 32) | b) >> 12) | 0x4330000000000000ull;  // 2^52 + x
  double two52_plus_x;
  std::memcpy(&two52_plus_x, &bits, 8);
  return ((two52_plus_x - 4503599627370496.0) + 0.5) * 2.220446049250313e-16;  // (x + 0.5) 2^-52
}

// The values of each lane's block words (the layout of philox_fill.h), v[j][l]: float32 uniforms bit for bit as
// uniform_float or normals by the lane Box-Muller (common/philox_lanes.h); float64 uniforms, or normals by the
// scalar box_muller (libm) of the same uniforms, bit for bit as philox_block_values.
template <bool kNormal>
inline void lane_block_values(uint32_t (*w)[kFillLanes], float (*v)[kFillLanes]) {
  if constexpr (kNormal) {
    lane_box_muller_normals<kFillLanes>(w, v);
  } else {
    for (int j = 0; j < 4; ++j) {
      for (int l = 0; l < kFillLanes; ++l) v[j][l] = lane_uniform(w[j][l]);
    }
  }
}

template <bool kNormal>
inline void lane_block_values(uint32_t (*w)[kFillLanes], double (*v)[kFillLanes]) {
  for (int l = 0; l < kFillLanes; ++l) {
    v[0][l] = lane_uniform_double(w[0][l], w[1][l]);
    v[1][l] = lane_uniform_double(w[2][l], w[3][l]);
  }
  if constexpr (kNormal) {
    for (int l = 0; l < kFillLanes; ++l) box_muller(v[0][l], v[1][l], &v[0][l], &v[1][l]);
  }
}

// Stream blocks [block, block + kFillLanes) (lane l: philox_block(seed, block + l, 0)), PhiloxPerBlock<T> values
// each. Value j of block b goes to out[kPer b + j − offset] where that lies in [0, numel).
template <typename T, bool kNormal>
void fill_blocks(const PhiloxFillParams& p, uint64_t block) {
  constexpr int kPer = PhiloxPerBlock<T>::value;
  uint32_t w[4][kFillLanes];
  for (int l = 0; l < kFillLanes; ++l) {
    w[0][l] = static_cast<uint32_t>(block + l);
    w[1][l] = static_cast<uint32_t>((block + l) >> 32);
    w[2][l] = 0;
    w[3][l] = 0;
  }
  lane_philox4x32_10<kFillLanes>(p.seed, w);
  T v[kPer][kFillLanes];
  lane_block_values<kNormal>(w, v);
  T* out = static_cast<T*>(p.out);
  const int64_t first = static_cast<int64_t>(block * kPer - p.offset);  // where v[0][0] goes
  if (first >= 0 && first + kPer * kFillLanes <= p.numel) {
    T* __restrict dst = out + first;
    for (int l = 0; l < kFillLanes; ++l) {
      for (int j = 0; j < kPer; ++j) dst[kPer * l + j] = v[j][l];
    }
    return;
  }
  for (int l = 0; l < kFillLanes; ++l) {
    for (int j = 0; j < kPer; ++j) {
      const int64_t i = first + kPer * l + j;
      if (i >= 0 && i < p.numel) out[i] = v[j][l];
    }
  }
}

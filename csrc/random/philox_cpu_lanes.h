// The float32 Philox fill over lanes of kFillLanes consecutive stream blocks, CPU only. Compiled three times by
// philox_cpu.cpp through common/lane_copies.h (baseline, AVX2, AVX-512, after common/philox_lanes.h): no include
// guard, no includes.

// Stream blocks [block, block + kFillLanes) (lane l: philox_block(seed, block + l, 0)), 4 float32 values each:
// uniforms bit for bit as uniform_float, or normals by the lane Box-Muller (common/philox_lanes.h). Value j of
// block b goes to out[4 b + j − offset] where that lies in [0, numel) (the layout of philox_fill.h).
template <bool kNormal>
void fill_f32_blocks(const PhiloxFillParams& p, uint64_t block) {
  uint32_t w[4][kFillLanes];
  for (int l = 0; l < kFillLanes; ++l) {
    w[0][l] = static_cast<uint32_t>(block + l);
    w[1][l] = static_cast<uint32_t>((block + l) >> 32);
    w[2][l] = 0;
    w[3][l] = 0;
  }
  lane_philox4x32_10<kFillLanes>(p.seed, w);
  float v[4][kFillLanes];
  if constexpr (kNormal) {
    lane_box_muller_normals<kFillLanes>(w, v);
  } else {
    for (int j = 0; j < 4; ++j) {
      for (int l = 0; l < kFillLanes; ++l) v[j][l] = lane_uniform(w[j][l]);
    }
  }
  float* out = static_cast<float*>(p.out);
  const int64_t first = static_cast<int64_t>(block * 4 - p.offset);  // where v[0][0] goes
  if (first >= 0 && first + 4 * kFillLanes <= p.numel) {
    float* __restrict dst = out + first;
    for (int l = 0; l < kFillLanes; ++l) {
      for (int j = 0; j < 4; ++j) dst[4 * l + j] = v[j][l];
    }
    return;
  }
  for (int l = 0; l < kFillLanes; ++l) {
    for (int j = 0; j < 4; ++j) {
      const int64_t i = first + 4 * l + j;
      if (i >= 0 && i < p.numel) out[i] = v[j][l];
    }
  }
}

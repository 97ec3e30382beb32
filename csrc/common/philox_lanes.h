// Philox4x32-10, float32 uniforms and Box-Muller normals over L lanes of counters at once, CPU only: plain
// loops over lanes (arrays w[word][lane]) that the compiler vectorises, with branch-free log, sqrt and sincos;
// the Philox rounds of the AVX2 and AVX-512 copies are written with intrinsics (MK_LANES_BITS).
//
// How to include: no include guard and no includes on purpose; a lane kernel gets its baseline, AVX2 and
// AVX-512 copies of this file through common/lane_copies.h (after <cstdint>, <cstring> and, on x86-64,
// <immintrin.h>). Only code that is itself inside the ISA's namespace (also included there) gets that
// ISA's loops.
//
// What is exact: lane_philox4x32_10 equals philox4x32_10 (common/philox.h) word for word, lane_uniform equals
// uniform_float bit for bit. What is not: lane_log, lane_sqrt and lane_sincos_turns are polynomials / Newton
// steps; over all 2^23 float32 uniforms (checked exhaustively against float64) their relative errors are
// < 2.1e-7 (log), < 1.9e-7 (sqrt of −2 ln u), < 1.7e-7 (cos, sin; < 1e-7 absolute, the reduction being
// exact), so lane_box_muller_normals is within 4e-7 relative of box_muller(double) of the same uniforms, and
// differs from the float box_muller (libm) by float rounding, not bitwise. No FMA contraction (common/
// lane_copies.h turns it off): the three copies give bitwise-equal normals.

// Philox4x32-10 rounds of 8 (AVX2) or 16 (AVX-512) lanes from lane g: the two 32 x 32 -> 64-bit products of a
// round are vpmuludq of the even and of the odd lanes (shifted down), their high and low words blended back.
#if MK_LANES_BITS == 256
inline void philox_rounds_x8(uint64_t seed, uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0));
  __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1));
  __m256i c2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w2));
  __m256i c3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w3));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i even2 = _mm256_mul_epu32(m1, c2), odd2 = _mm256_mul_epu32(m1, _mm256_srli_epi64(c2, 32));
    const __m256i even0 = _mm256_mul_epu32(m0, c0), odd0 = _mm256_mul_epu32(m0, _mm256_srli_epi64(c0, 32));
    const __m256i hi2 = _mm256_blend_epi32(_mm256_srli_epi64(even2, 32), odd2, 0xAA);
    const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(even0, 32), odd0, 0xAA);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi2, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = _mm256_blend_epi32(even2, _mm256_slli_epi64(odd2, 32), 0xAA);  // low words: M1 · c2
    c3 = _mm256_blend_epi32(even0, _mm256_slli_epi64(odd0, 32), 0xAA);  // M0 · c0
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3), c3);
}
#elif MK_LANES_BITS == 512
inline void philox_rounds_x16(uint64_t seed, uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  __m512i c0 = _mm512_loadu_si512(w0), c1 = _mm512_loadu_si512(w1);
  __m512i c2 = _mm512_loadu_si512(w2), c3 = _mm512_loadu_si512(w3);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m512i even2 = _mm512_mul_epu32(m1, c2), odd2 = _mm512_mul_epu32(m1, _mm512_srli_epi64(c2, 32));
    const __m512i even0 = _mm512_mul_epu32(m0, c0), odd0 = _mm512_mul_epu32(m0, _mm512_srli_epi64(c0, 32));
    const __m512i hi2 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even2, 32), odd2);
    const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even0, 32), odd0);
    c0 = _mm512_ternarylogic_epi32(hi2, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // 3-way xor
    c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c1 = _mm512_mask_blend_epi32(0xAAAA, even2, _mm512_slli_epi64(odd2, 32));  // low words: M1 · c2
    c3 = _mm512_mask_blend_epi32(0xAAAA, even0, _mm512_slli_epi64(odd0, 32));  // M0 · c0
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  _mm512_storeu_si512(w0, c0);
  _mm512_storeu_si512(w1, c1);
  _mm512_storeu_si512(w2, c2);
  _mm512_storeu_si512(w3, c3);
}
#endif

// philox4x32_10 for each lane, in place: w[j][l] holds word j of lane l's 128-bit counter on entry and word j
// of its block on return; the key is the 64-bit seed (as philox_block). w: (4, L). The baseline copy is a plain
// loop on 64-bit products (pmuludq from SSE2 on).
template <int L>
inline void lane_philox4x32_10(uint64_t seed, uint32_t (*w)[L]) {
#if MK_LANES_BITS == 256
  static_assert(L % 8 == 0, "AVX2 lanes come in groups of 8");
  for (int g = 0; g < L; g += 8) philox_rounds_x8(seed, w[0] + g, w[1] + g, w[2] + g, w[3] + g);
#elif MK_LANES_BITS == 512
  static_assert(L % 16 == 0, "AVX-512 lanes come in groups of 16");
  for (int g = 0; g < L; g += 16) philox_rounds_x16(seed, w[0] + g, w[1] + g, w[2] + g, w[3] + g);
#else
  uint32_t c0[L], c1[L], c2[L], c3[L];
  for (int l = 0; l < L; ++l) {
    c0[l] = w[0][l];
    c1[l] = w[1][l];
    c2[l] = w[2][l];
    c3[l] = w[3][l];
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < L; ++l) {
      const uint64_t p2 = uint64_t{0xCD9E8D57u} * c2[l], p0 = uint64_t{0xD2511F53u} * c0[l];
      const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c1[l] = static_cast<uint32_t>(p2);
      c3[l] = static_cast<uint32_t>(p0);
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int l = 0; l < L; ++l) {
    w[0][l] = c0[l];
    w[1][l] = c1[l];
    w[2][l] = c2[l];
    w[3][l] = c3[l];
  }
#endif
}

// uniform_float (common/philox.h), bit for bit, with a signed conversion (x >> 9 < 2^23 is exact either way),
// which vectorises without AVX-512.
inline float lane_uniform(uint32_t x) {
  return (static_cast<float>(static_cast<int32_t>(x >> 9)) + 0.5f) * 1.1920928955078125e-07f;
}

// ln(u) for u in (0, 1]: u = m·2^e with m in [√½, √2), ln m = 2 atanh(t), t = (m − 1)/(m + 1), |t| < 0.172,
// by its series to t^9 (truncation < 1e-9); relative error < 2.1e-7 on the float32 uniforms.
inline float lane_log(float u) {
  uint32_t bits;
  std::memcpy(&bits, &u, 4);
  int e = static_cast<int>(bits >> 23) - 127;
  bits = (bits & 0x007FFFFFu) | 0x3F800000u;  // m in [1, 2)
  float m;
  std::memcpy(&m, &bits, 4);
  const int big = m > 1.41421356f;
  m *= 1.0f - 0.5f * static_cast<float>(big);
  e += big;
  const float t = (m - 1.0f) / (m + 1.0f), t2 = t * t;
  const float atanh_t = t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9)))));
  return static_cast<float>(e) * 0.693147180559945f + 2.0f * atanh_t;
}

// cos and sin of 2π·u, u in [0, 1): quarter turns q = round(4u), remainder a in [−π/4, π/4] (4u − q is exact),
// Taylor to a^9 / a^8 (truncation < 1e-9); relative error < 1.7e-7, absolute < 1e-7 on the float32 uniforms.
inline void lane_sincos_turns(float u, float* c, float* s) {
  const float v = 4.0f * u;
  const float q = static_cast<float>(static_cast<int>(v + 0.5f));
  const float a = (v - q) * 1.5707963267948966f, a2 = a * a;
  const float sa = a * (1.0f - a2 * (1.0f / 6 - a2 * (1.0f / 120 - a2 * (1.0f / 5040 - a2 * (1.0f / 362880)))));
  const float ca = 1.0f - a2 * (0.5f - a2 * (1.0f / 24 - a2 * (1.0f / 720 - a2 * (1.0f / 40320))));
  const int quarter = static_cast<int>(q) & 3;
  const float odd = static_cast<float>(quarter & 1);  // odd quarters swap cos and sin (exact blend)
  const float sign_c = static_cast<float>(1 - 2 * (((quarter + 1) >> 1) & 1));  // − in quarters 1, 2
  const float sign_s = static_cast<float>(1 - 2 * ((quarter >> 1) & 1));        // − in quarters 2, 3
  *c = sign_c * ((1.0f - odd) * ca + odd * sa);
  *s = sign_s * ((1.0f - odd) * sa + odd * ca);
}

// √v for v > 0 by three Newton steps on 1/√v from the bit-level guess (libm's sqrtf sets errno, which keeps
// the loop scalar); relative error < 1.9e-7 on −2 ln u.
inline float lane_sqrt(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = 0x5F3759DFu - (bits >> 1);
  float r;
  std::memcpy(&r, &bits, 4);
  r = r * (1.5f - 0.5f * v * r * r);
  r = r * (1.5f - 0.5f * v * r * r);
  r = r * (1.5f - 0.5f * v * r * r);
  return v * r;
}

// One Box-Muller pair of each lane, as box_muller on uniform_float of (a, b): c = r cos θ, s = r sin θ with
// r = √(−2 ln u(a)), θ = 2π u(b). a, b, c, s: (L,).
template <int L>
inline void lane_box_muller_pair(const uint32_t* a, const uint32_t* b, float* c, float* s) {
  for (int l = 0; l < L; ++l) {
    const float r = lane_sqrt(-2.0f * lane_log(lane_uniform(a[l])));
    float cos_t, sin_t;
    lane_sincos_turns(lane_uniform(b[l]), &cos_t, &sin_t);
    c[l] = r * cos_t;
    s[l] = r * sin_t;
  }
}

// The 4 normals of each lane's block words: the pairs (w0, w1) -> (z0, z1) and (w2, w3) -> (z2, z3). w, z: (4, L).
template <int L>
inline void lane_box_muller_normals(const uint32_t (*w)[L], float (*z)[L]) {
  lane_box_muller_pair<L>(w[0], w[1], z[0], z[1]);
  lane_box_muller_pair<L>(w[2], w[3], z[2], z[3]);
}

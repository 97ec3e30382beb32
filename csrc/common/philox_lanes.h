// Philox4x32-10, float32 uniforms and Box-Muller normals over L lanes of counters at once, CPU only: plain
// loops over lanes (arrays w[word][lane]) that the compiler vectorises, with branch-free log, sqrt and sincos.
//
// How to include: no include guard and no includes on purpose; a lane kernel gets its baseline and AVX2 copies
// of this file through common/lane_copies.h (after <cstdint> and <cstring>).
// Only code that is itself inside the ISA's namespace (also included there) gets that ISA's loops.
//
// What is exact: lane_philox4x32_10 equals philox4x32_10 (common/philox.h) word for word, lane_uniform equals
// uniform_float bit for bit. What is not: lane_log, lane_sqrt and lane_sincos_turns are polynomials / Newton
// steps; over all 2^23 float32 uniforms (checked exhaustively against float64) their relative errors are
// < 2.1e-7 (log), < 1.9e-7 (sqrt of −2 ln u), < 1.7e-7 (cos, sin; < 1e-7 absolute, the reduction being
// exact), so lane_box_muller_normals is within 4e-7 relative of box_muller(double) of the same uniforms, and
// differs from the float box_muller (libm) by float rounding, not bitwise. No FMA contraction (the default and
// the avx2 targets have no FMA): both builds give bitwise-equal normals.

// High word of a·b from 16-bit halves with only 32-bit multiplies, which vectorise everywhere (vpmulld under
// AVX2). The 64-bit product was no faster there (vpmuludq needs even/odd shuffles), and g++ does not define
// __AVX2__ under #pragma GCC target, so an #ifdef could not pick it anyway.
inline uint32_t lane_mulhi(uint32_t a, uint32_t b) {
  const uint32_t a0 = a & 0xFFFFu, a1 = a >> 16, b0 = b & 0xFFFFu, b1 = b >> 16;
  const uint32_t mid0 = a1 * b0, mid1 = a0 * b1;
  const uint32_t carry = ((a0 * b0) >> 16) + (mid0 & 0xFFFFu) + (mid1 & 0xFFFFu);
  return a1 * b1 + (mid0 >> 16) + (mid1 >> 16) + (carry >> 16);
}

// philox4x32_10 for each lane, in place: w[j][l] holds word j of lane l's 128-bit counter on entry and word j
// of its block on return; the key is the 64-bit seed (as philox_block). w: (4, L).
template <int L>
inline void lane_philox4x32_10(uint64_t seed, uint32_t (*w)[L]) {
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
      const uint32_t n0 = lane_mulhi(0xCD9E8D57u, c2[l]) ^ c1[l] ^ k0;
      const uint32_t n2 = lane_mulhi(0xD2511F53u, c0[l]) ^ c3[l] ^ k1;
      c1[l] = 0xCD9E8D57u * c2[l];
      c3[l] = 0xD2511F53u * c0[l];
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

// The 4 normals of each lane's block words, as box_muller on uniform_float of the pairs (w0, w1) and (w2, w3):
// z[0] = r0 cos θ0, z[1] = r0 sin θ0, z[2] = r1 cos θ1, z[3] = r1 sin θ1. w, z: (4, L).
template <int L>
inline void lane_box_muller_normals(const uint32_t (*w)[L], float (*z)[L]) {
  for (int l = 0; l < L; ++l) {
    const float r0 = lane_sqrt(-2.0f * lane_log(lane_uniform(w[0][l])));
    const float r1 = lane_sqrt(-2.0f * lane_log(lane_uniform(w[2][l])));
    float cos0, sin0, cos1, sin1;
    lane_sincos_turns(lane_uniform(w[1][l]), &cos0, &sin0);
    lane_sincos_turns(lane_uniform(w[3][l]), &cos1, &sin1);
    z[0][l] = r0 * cos0;
    z[1][l] = r0 * sin0;
    z[2][l] = r1 * cos1;
    z[3][l] = r1 * sin1;
  }
}

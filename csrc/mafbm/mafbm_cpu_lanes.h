// The float32 step (over lanes of elements) and simulator (over lanes of paths), CPU only. Compiled three times by
// mafbm_cpu.cpp through common/lane_copies.h (baseline, AVX2, AVX-512, after common/philox_lanes.h): no include
// guard, no includes.
//
// The same Philox blocks and Box-Muller pairs as mafbm_step.h's scalar code, computed for kLanes streams at once
// with the lane generator of common/philox_lanes.h, so the draws match the scalar path to float rounding (its
// normals are within 4e-7 relative of float64 Box-Muller); the arithmetic after the draw is the scalar code's,
// in its order. The three copies give bitwise-equal results for the same coefficients (mafbm.py computes the exact
// scheme's with torch's exp, whose CPU copies can differ in the last bit).

// The words of philox_block(seed, block, stream_l) for each lane l: w[word][l].
inline void lane_blocks(uint64_t seed, uint64_t block, const uint64_t* stream, uint32_t (*w)[kLanes]) {
  for (int l = 0; l < kLanes; ++l) {
    w[0][l] = static_cast<uint32_t>(block);
    w[1][l] = static_cast<uint32_t>(block >> 32);
    w[2][l] = static_cast<uint32_t>(stream[l]);
    w[3][l] = static_cast<uint32_t>(stream[l] >> 32);
  }
  lane_philox4x32_10<kLanes>(seed, w);
}

// The 4 normals of philox_block(seed, block, stream_l) for each lane l: z[slot][l].
inline void lane_block_normals(uint64_t seed, uint64_t block, const uint64_t* stream, float (*z)[kLanes]) {
  uint32_t w[4][kLanes];
  lane_blocks(seed, block, stream, w);
  lane_box_muller_normals<kLanes>(w, z);
}

// The step works on kLanes consecutive elements e = first + l (path·dims + d), l < live: x, drift, diffusion,
// control and the outputs of the same shape are contiguous runs, y and its gradients strided columns of K.
// Lanes past `live` compute on zeros (or on the normals of streams past the last element) and store nothing.

// The float values src[first + l], l < live, zeros after (all zeros when src is nullptr): v (kLanes,).
inline void load_lanes(const float* src, int64_t first, int live, float* v) {
  if (src == nullptr) live = 0;
  for (int l = 0; l < live; ++l) v[l] = src[first + l];
  for (int l = live; l < kLanes; ++l) v[l] = 0.0f;
}

// Column k of a (elements, K) array: v[l] = src[(first + l)·K + k], l < live, zeros after.
inline void load_column(const float* src, int K, int k, int64_t first, int live, float* v) {
  const float* col = src + first * K + k;
  for (int l = 0; l < live; ++l) v[l] = col[l * K];
  for (int l = live; l < kLanes; ++l) v[l] = 0.0f;
}

inline void store_column(const float* v, int K, int k, int64_t first, int live, float* dst) {
  float* col = dst + first * K + k;
  for (int l = 0; l < live; ++l) col[l * K] = v[l];
}

// The step's normals [step·R, step·R + R) of streams first + l: z[r][l] (the layout of mafbm_step.h),
// computing only the Box-Muller pairs that meet the range (Euler, R = 1: one pair of a block's two).
void philox_step_normals(uint64_t seed, uint64_t step, int R, uint64_t first, float (*z)[kLanes]) {
  const uint64_t lo = step * static_cast<uint64_t>(R), hi = lo + static_cast<uint64_t>(R);
  uint64_t stream[kLanes];
  for (int l = 0; l < kLanes; ++l) stream[l] = first + static_cast<uint64_t>(l);
  for (uint64_t b = lo / 4; b * 4 < hi; ++b) {
    uint32_t w[4][kLanes];
    lane_blocks(seed, b, stream, w);
    for (int pair = 0; pair < 2; ++pair) {
      const uint64_t i = b * 4 + 2 * static_cast<uint64_t>(pair);  // the pair's normals i, i + 1
      if (i + 1 < lo || i >= hi) continue;
      float c[kLanes], s[kLanes];
      lane_box_muller_pair<kLanes>(w[2 * pair], w[2 * pair + 1], c, s);
      if (i >= lo) std::memcpy(z[i - lo], c, sizeof(c));
      if (i + 1 < hi) std::memcpy(z[i + 1 - lo], s, sizeof(s));
    }
  }
}

// The R normals of each lane of elements [first, first + live): the given noise (elements, R) or the Philox draw
// of streams first_stream + first + l. z: (R, kLanes).
inline void step_normals(const float* noise, uint64_t seed, uint64_t step, int R, uint64_t first_stream,
                         int64_t first, int live, float (*z)[kLanes]) {
  if (noise == nullptr) return philox_step_normals(seed, step, R, first_stream + static_cast<uint64_t>(first), z);
  for (int j = 0; j < R; ++j) load_column(noise, R, j, first, live, z[j]);
}

// dy_k = −drop_k y_k + phi_k u + Σ_j factor_kj z_j for each lane, in mafbm_increment's order. dy: (kLanes,).
inline void lane_increment(float drop, float phi, const float* factor_k, int R, const float* yk, const float* u,
                           const float (*z)[kLanes], float* dy) {
  for (int l = 0; l < kLanes; ++l) dy[l] = -drop * yk[l] + phi * u[l];
  for (int j = 0; j < R; ++j) {
    const float f = factor_k[j];
    for (int l = 0; l < kLanes; ++l) dy[l] += f * z[j][l];
  }
}

// The step's forward (mafbm_step_element) of elements [first, first + live); the kl is left to the caller.
void step_forward(const MafbmStepParams& p, int64_t first, int live) {
  const int K = p.K, R = p.R;
  const float h = static_cast<float>(p.dt);
  const float* factor = static_cast<const float*>(p.factor);
  float z[kMafbmMaxK][kLanes], u[kLanes], s[kLanes], yk[kLanes], dy[kLanes];
  step_normals(static_cast<const float*>(p.noise), p.seed, p.step, R, p.first_stream, first, live, z);
  load_lanes(static_cast<const float*>(p.control), first, live, u);
  for (int l = 0; l < kLanes; ++l) s[l] = 0.0f;
  for (int k = 0; k < K; ++k) {
    const float omega = static_cast<const float*>(p.omega)[k];
    load_column(static_cast<const float*>(p.y), K, k, first, live, yk);
    lane_increment(static_cast<const float*>(p.drop)[k], static_cast<const float*>(p.phi)[k], factor + k * R, R,
                   yk, u, z, dy);
    for (int l = 0; l < kLanes; ++l) {
      yk[l] += dy[l];
      s[l] += omega * dy[l];
    }
    store_column(yk, K, k, first, live, static_cast<float*>(p.y_next));
  }
  const float* __restrict x = static_cast<const float*>(p.x) + first;
  const float* __restrict drift = static_cast<const float*>(p.drift) + first;
  const float* __restrict sigma = static_cast<const float*>(p.diffusion) + first;
  float* __restrict x_next = static_cast<float*>(p.x_next) + first;
  for (int l = 0; l < live; ++l) x_next[l] = x[l] + drift[l] * h + sigma[l] * s[l];
}

// The step's backward (mafbm_step_backward_element) of elements [first, first + live), all of one gω row: their
// terms of gω are summed in float and added to g_omega (K,).
void step_backward(const MafbmStepBackwardParams& p, int64_t first, int live, double* g_omega) {
  const int K = p.K, R = p.R;
  const float h = static_cast<float>(p.dt);
  const float* factor = static_cast<const float*>(p.factor);
  float z[kMafbmMaxK][kLanes], u[kLanes], gx[kLanes], gs[kLanes], gu[kLanes], s[kLanes];
  float yk[kLanes], gyk[kLanes], dy[kLanes];
  step_normals(static_cast<const float*>(p.noise), p.seed, p.step, R, p.first_stream, first, live, z);
  load_lanes(static_cast<const float*>(p.control), first, live, u);
  load_lanes(static_cast<const float*>(p.grad_x_next), first, live, gx);
  load_lanes(static_cast<const float*>(p.diffusion), first, live, gs);
  const float* gkl = static_cast<const float*>(p.grad_kl);
  int64_t path = first / p.dims, d = first % p.dims;
  for (int l = 0; l < kLanes; ++l) gu[l] = 0.0f;
  for (int l = 0; l < live; ++l) {  // the path's grad_kl, walking (path, d) along the lanes
    gu[l] = gkl[path * p.grad_kl_stride];
    if (++d == p.dims) d = 0, ++path;
  }
  for (int l = 0; l < kLanes; ++l) {
    gs[l] *= gx[l];
    gu[l] = gu[l] * u[l] * h;
    s[l] = 0.0f;
  }
  for (int k = 0; k < K; ++k) {
    const float drop = static_cast<const float*>(p.drop)[k], phi = static_cast<const float*>(p.phi)[k];
    const float omega = static_cast<const float*>(p.omega)[k];
    load_column(static_cast<const float*>(p.y), K, k, first, live, yk);
    load_column(static_cast<const float*>(p.grad_y_next), K, k, first, live, gyk);
    lane_increment(drop, phi, factor + k * R, R, yk, u, z, dy);
    float terms[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const float g_dy = gyk[l] + gs[l] * omega;
      s[l] += omega * dy[l];
      gyk[l] -= drop * g_dy;
      terms[l] = gs[l] * dy[l];
      gu[l] += phi * g_dy;
    }
    store_column(gyk, K, k, first, live, static_cast<float*>(p.grad_y));
    float sum = 0.0f;
    for (int l = 0; l < live; ++l) sum += terms[l];
    g_omega[k] += sum;
  }
  float* __restrict grad_drift = static_cast<float*>(p.grad_drift) + first;
  float* __restrict grad_diffusion = static_cast<float*>(p.grad_diffusion) + first;
  float* __restrict grad_control = static_cast<float*>(p.grad_control) + first;
  for (int l = 0; l < live; ++l) {
    grad_drift[l] = gx[l] * h;
    grad_diffusion[l] = gx[l] * s[l];
    grad_control[l] = gu[l];
  }
}

// Paths [first, first + kLanes) (clamped to the last path; only real paths are stored). K and R are run-time
// bounds here: every loop body works on kLanes values. c: omega, drop (K,), factor (K, R), in float.
// kGrad: the backward (tangents as in mafbm_simulate_path) instead of the forward.
template <bool kGrad>
void simulate_lanes(const MafbmSimulateParams& p, const float* c_omega, const float* c_drop, const float* c_factor,
                    int64_t first) {
  const int K = p.K, R = p.R;
  const int64_t n_saved = p.n_steps / p.save_every + 1;
  const float h = static_cast<float>(p.dt), theta = static_cast<float>(p.theta), mu = static_cast<float>(p.mu);
  const float sigma = static_cast<float>(p.sigma);
  const int live = static_cast<int>(std::min<int64_t>(kLanes, p.paths - first));
  uint64_t stream[kLanes];
  float x[kLanes], s[kLanes], y[kMafbmMaxK][kLanes], z[kMafbmMaxK * 4][kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const int64_t path = first + std::min(l, live - 1);
    stream[l] = p.first_stream + static_cast<uint64_t>(path);
    x[l] = static_cast<const float*>(p.x0)[path];
    for (int k = 0; k < K; ++k) y[k][l] = 0.0f;
  }
  if (p.R0 > 0) {  // the type-I start, per lane as in the scalar path (float64)
    for (int l = 0; l < kLanes; ++l) {
      double z0[kMafbmMaxK];
      mafbm_stream_normals<double>(p.seed, stream[l] | kMafbmInitStream, 0, p.R0, z0);
      for (int k = 0; k < p.K; ++k) {
        double acc = 0.0;
        for (int j = 0; j < p.R0; ++j) acc += p.factor0[k * p.R0 + j] * z0[j];
        y[k][l] = static_cast<float>(acc);
      }
    }
  }
  float* out = static_cast<float*>(p.out);
  const float* grad = static_cast<const float*>(p.grad_out);
  const float rho = 1.0f - theta * h;
  float t_x0[kLanes], t_theta[kLanes], t_mu[kLanes], t_sigma[kLanes];  // tangents of x
  float g_x0[kLanes], g_theta[kLanes], g_mu[kLanes], g_sigma[kLanes];  // contracted with grad_out
  for (int l = 0; l < kLanes; ++l) {
    t_x0[l] = 1.0f;
    t_theta[l] = t_mu[l] = t_sigma[l] = 0.0f;
    g_x0[l] = g_theta[l] = g_mu[l] = g_sigma[l] = 0.0f;
  }
  for (int l = 0; l < live; ++l) {
    if constexpr (kGrad) {
      g_x0[l] = grad[(first + l) * n_saved];
    } else {
      out[(first + l) * n_saved] = x[l];
    }
  }
  int64_t next_save = p.save_every;
  for (int64_t n0 = 0; n0 < p.n_steps; n0 += 4) {
    const uint64_t first_block = static_cast<uint64_t>(n0 / 4) * static_cast<uint64_t>(R);
    for (int b = 0; b < R; ++b) lane_block_normals(p.seed, first_block + b, stream, z + 4 * b);
    for (int g = 0; g < 4 && n0 + g < p.n_steps; ++g) {
      for (int l = 0; l < kLanes; ++l) s[l] = 0.0f;
      for (int k = 0; k < K; ++k) {
        float dy[kLanes];
        for (int l = 0; l < kLanes; ++l) dy[l] = -c_drop[k] * y[k][l];
        for (int j = 0; j < R; ++j) {
          const float f = c_factor[k * R + j];
          const float* zj = z[g * R + j];
          for (int l = 0; l < kLanes; ++l) dy[l] += f * zj[l];
        }
        for (int l = 0; l < kLanes; ++l) {
          y[k][l] += dy[l];
          s[l] += c_omega[k] * dy[l];
        }
      }
      if constexpr (kGrad) {
        for (int l = 0; l < kLanes; ++l) {
          t_x0[l] = rho * t_x0[l];
          t_theta[l] = rho * t_theta[l] + (mu - x[l]) * h;
          t_mu[l] = rho * t_mu[l] + theta * h;
          t_sigma[l] = rho * t_sigma[l] + s[l];
        }
      }
      for (int l = 0; l < kLanes; ++l) x[l] += theta * (mu - x[l]) * h + sigma * s[l];
      const int64_t n = n0 + g + 1;
      if (n == next_save) {
        const int64_t j = next_save / p.save_every;
        next_save += p.save_every;
        for (int l = 0; l < live; ++l) {
          if constexpr (kGrad) {
            const float gl = grad[(first + l) * n_saved + j];
            g_x0[l] += gl * t_x0[l];
            g_theta[l] += gl * t_theta[l];
            g_mu[l] += gl * t_mu[l];
            g_sigma[l] += gl * t_sigma[l];
          } else {
            out[(first + l) * n_saved + j] = x[l];
          }
        }
      }
    }
  }
  if constexpr (kGrad) {
    float* partials = static_cast<float*>(p.partials);
    for (int l = 0; l < live; ++l) {
      partials[first + l] = g_x0[l];
      partials[p.paths + first + l] = g_theta[l];
      partials[2 * p.paths + first + l] = g_mu[l];
      partials[3 * p.paths + first + l] = g_sigma[l];
    }
  }
}

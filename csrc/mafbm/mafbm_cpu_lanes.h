// The float32 step and simulator over lanes of paths, CPU only. Compiled twice by mafbm_cpu.cpp through
// common/lane_copies.h (baseline and AVX2, after common/philox_lanes.h): no include guard, no includes.
//
// The same Philox blocks and Box-Muller pairs as mafbm_simulate_path, computed for kLanes paths at once with
// the lane generator of common/philox_lanes.h, so the draws match the scalar path to float rounding (its
// normals are within 4e-7 relative of float64 Box-Muller). Both builds give bitwise-equal paths.

// The 4 normals of philox_block(seed, block, stream_l) for each lane l: z[slot][l].
inline void lane_block_normals(uint64_t seed, uint64_t block, const uint64_t* stream, float (*z)[kLanes]) {
  uint32_t w[4][kLanes];
  for (int l = 0; l < kLanes; ++l) {
    w[0][l] = static_cast<uint32_t>(block);
    w[1][l] = static_cast<uint32_t>(block >> 32);
    w[2][l] = static_cast<uint32_t>(stream[l]);
    w[3][l] = static_cast<uint32_t>(stream[l] >> 32);
  }
  lane_philox4x32_10<kLanes>(seed, w);
  lane_box_muller_normals<kLanes>(w, z);
}

// The step op's normals [step·R, step·R + R) of each lane's stream: z[r][l] (the layout of mafbm_step.h).
void step_normals(uint64_t seed, uint64_t step, int R, const uint64_t* stream, float (*z)[kLanes]) {
  float block[4][kLanes];
  const uint64_t first = step * static_cast<uint64_t>(R), last = first + static_cast<uint64_t>(R);
  for (uint64_t b = first / 4; b * 4 < last; ++b) {
    lane_block_normals(seed, b, stream, block);
    for (int j = 0; j < 4; ++j) {
      const uint64_t i = b * 4 + j;
      if (i < first || i >= last) continue;
      for (int l = 0; l < kLanes; ++l) z[i - first][l] = block[j][l];
    }
  }
}

// Σ_j factor_kj z_j for each lane: nz[l].
inline void lane_noise_term(const float* factor_k, int R, const float (*z)[kLanes], float* nz) {
  for (int l = 0; l < kLanes; ++l) nz[l] = 0.0f;
  for (int j = 0; j < R; ++j) {
    const float f = factor_k[j];
    for (int l = 0; l < kLanes; ++l) nz[l] += f * z[j][l];
  }
}

// The elements path·dims + d of the kLanes paths from `first`, lanes past `live` clamped to the last path
// (they rewrite its values). An element's index is also its Philox stream (mafbm_step.h).
inline void lane_elements(int64_t first, int live, int64_t dims, int64_t d, uint64_t* elem) {
  for (int l = 0; l < kLanes; ++l) elem[l] = static_cast<uint64_t>((first + std::min(l, live - 1)) * dims + d);
}

// The step's forward (mafbm_step_element) for the elements of lane_elements; u2[l] += u_l².
void step_forward(const MafbmStepParams& p, const uint64_t* elem, const float (*z)[kLanes], float* u2) {
  const int K = p.K, R = p.R;
  const float h = static_cast<float>(p.dt);
  const float* __restrict y = static_cast<const float*>(p.y);
  const float* __restrict ctl = static_cast<const float*>(p.control);
  float* __restrict y_next = static_cast<float*>(p.y_next);
  int64_t e[kLanes];
  float u[kLanes], s[kLanes], nz[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    e[l] = static_cast<int64_t>(elem[l]);
    u[l] = ctl != nullptr ? ctl[e[l]] : 0.0f;
    s[l] = 0.0f;
  }
  for (int k = 0; k < K; ++k) {
    const float drop = static_cast<const float*>(p.drop)[k], phi = static_cast<const float*>(p.phi)[k];
    const float omega = static_cast<const float*>(p.omega)[k];
    lane_noise_term(static_cast<const float*>(p.factor) + k * R, R, z, nz);
    for (int l = 0; l < kLanes; ++l) {
      const float yk = y[e[l] * K + k];
      const float dy = -drop * yk + phi * u[l] + nz[l];
      y_next[e[l] * K + k] = yk + dy;
      s[l] += omega * dy;
    }
  }
  const float* __restrict x = static_cast<const float*>(p.x);
  const float* __restrict drift = static_cast<const float*>(p.drift);
  const float* __restrict sigma = static_cast<const float*>(p.diffusion);
  float* __restrict x_next = static_cast<float*>(p.x_next);
  for (int l = 0; l < kLanes; ++l) {
    x_next[e[l]] = x[e[l]] + drift[e[l]] * h + sigma[e[l]] * s[l];
    u2[l] += u[l] * u[l];
  }
}

// The step's backward (mafbm_step_backward_element) for the same elements. The gω terms of the
// first `live` lanes (the others repeat the last real element) are added to g_omega (K,).
void step_backward(const MafbmStepBackwardParams& p, const uint64_t* elem, const float (*z)[kLanes], int live,
                   double* g_omega) {
  const int K = p.K, R = p.R;
  const float h = static_cast<float>(p.dt);
  const float* __restrict y = static_cast<const float*>(p.y);
  const float* __restrict ctl = static_cast<const float*>(p.control);
  const float* __restrict gy = static_cast<const float*>(p.grad_y_next);
  const float* __restrict gkl = static_cast<const float*>(p.grad_kl);
  float* __restrict grad_y = static_cast<float*>(p.grad_y);
  int64_t e[kLanes];
  float u[kLanes], s[kLanes], nz[kLanes], gx[kLanes], gs[kLanes], gu[kLanes], terms[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    e[l] = static_cast<int64_t>(elem[l]);
    const int64_t path = e[l] / p.dims;
    u[l] = ctl != nullptr ? ctl[e[l]] : 0.0f;
    gx[l] = static_cast<const float*>(p.grad_x_next)[e[l]];
    gs[l] = gx[l] * static_cast<const float*>(p.diffusion)[e[l]];
    gu[l] = gkl[path * p.grad_kl_stride] * u[l] * h;
    s[l] = 0.0f;
  }
  for (int k = 0; k < K; ++k) {
    const float drop = static_cast<const float*>(p.drop)[k], phi = static_cast<const float*>(p.phi)[k];
    const float omega = static_cast<const float*>(p.omega)[k];
    lane_noise_term(static_cast<const float*>(p.factor) + k * R, R, z, nz);
    for (int l = 0; l < kLanes; ++l) {
      const int64_t i = e[l] * K + k;
      const float dy = -drop * y[i] + phi * u[l] + nz[l];
      const float g_dy = gy[i] + gs[l] * omega;
      s[l] += omega * dy;
      grad_y[i] = gy[i] - drop * g_dy;
      terms[l] = gs[l] * dy;
      gu[l] += phi * g_dy;
    }
    float sum = 0.0f;
    for (int l = 0; l < live; ++l) sum += terms[l];
    g_omega[k] += sum;
  }
  for (int l = 0; l < kLanes; ++l) {
    static_cast<float*>(p.grad_drift)[e[l]] = gx[l] * h;
    static_cast<float*>(p.grad_diffusion)[e[l]] = gx[l] * s[l];
    static_cast<float*>(p.grad_control)[e[l]] = gu[l];
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
    stream[l] = static_cast<uint64_t>(first + std::min(l, live - 1));
    x[l] = static_cast<const float*>(p.x0)[stream[l]];
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

#pragma once
// MA-fBM SDE steps: params structs and the per-element math shared by the CPU kernels and the CUDA kernels.
//
// One step of the augmented system, per path p and latent dimension d (K modes, noise rank R):
//   dy_k = −drop_k y_k + phi_k u + Σ_j factor_kj z_j          (z ~ N(0, I_R))
//   y'_k = y_k + dy_k
//   x'   = x + b h + σ Σ_k ω_k dy_k                            (Itô: b, σ, u taken at the start of the step)
//   kl_p = ½ h Σ_d u_d²
// The host chooses the coefficients: Euler-Maruyama drop = γh, phi = h, factor = √h·1 (R = 1); the exact OU
// transition drop = 1 − e^{−γh}, phi = (1 − e^{−γh})/γ, factor = a low-rank root of Σ(h).
//
// Philox counter layout (key = seed). Each (path p, latent dim d) owns the stream s = (path_offset + p)·dims + d
// of normals (path_offset: the global index of the call's first path, so that a batch split in calls gives the
// streams of one call); normal i of stream s is slot i % per of philox_block(seed, lo = i / per, hi = s), per = 4
// for fp32 (two Box-Muller pairs of 23-bit uniforms) and 2 for fp64 (one pair of 52-bit uniforms). Step n consumes
// normals [n·R, n·R + R) of its stream. The simulator is the step with dims = 1; its type-I start
// Y(0) = factor0 · z0 takes z0 = normals [0, R0) (always fp64) of the separate stream hi = s | 2^63.
#include <cstdint>

#include "common/dtype.h"
#include "common/philox.h"
#ifdef MARKOVKIT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace markovkit {

constexpr int kMafbmMaxK = 16;  // modes (and noise rank) held in registers
constexpr uint64_t kMafbmInitStream = uint64_t{1} << 63;

struct MafbmStepParams {
  const void* x;          // (paths, dims)
  const void* y;          // (paths, dims, K)
  const void* drift;      // (paths, dims)
  const void* diffusion;  // (paths, dims)
  const void* control;    // (paths, dims) or nullptr (u = 0)
  const void* noise;      // (paths, dims, R) or nullptr (Philox)
  const void* omega;      // (K,)
  const void* drop;       // (K,)
  const void* phi;        // (K,)
  const void* factor;     // (K, R)
  void* x_next;           // (paths, dims)
  void* y_next;           // (paths, dims, K)
  void* kl;               // (paths,)
  int64_t paths, dims;
  int K, R;
  double dt;
  uint64_t seed, step;
  DType dtype;            // kFloat32 or kFloat64, every tensor
  uint64_t first_stream;  // the stream of element 0: path_offset·dims
};

// Paths per row of the backward's gω partial sums: a CUDA block, and a CPU task's unit. Fixed rows, summed in
// a fixed order by the backward launcher, make gω independent of the device's scheduling (no atomics).
constexpr int64_t kMafbmOmegaRowPaths = 128;

MK_HOST_DEVICE int64_t mafbm_omega_rows(int64_t paths) {
  return (paths + kMafbmOmegaRowPaths - 1) / kMafbmOmegaRowPaths;
}

struct MafbmStepBackwardParams {
  const void* grad_x_next;  // (paths, dims)
  const void* grad_y_next;  // (paths, dims, K)
  const void* grad_kl;      // (paths,): path p's value at grad_kl[p * grad_kl_stride] (stride 0: an expanded one)
  const void* y;            // (paths, dims, K)
  const void* diffusion;    // (paths, dims)
  const void* control;      // (paths, dims) or nullptr
  const void* noise;        // (paths, dims, R) or nullptr
  const void* omega;        // (K,)
  const void* drop;         // (K,)
  const void* phi;          // (K,)
  const void* factor;       // (K, R)
  void* grad_y;             // (paths, dims, K)
  void* grad_drift;         // (paths, dims)
  void* grad_diffusion;     // (paths, dims)
  void* grad_control;       // (paths, dims): the gradient for u (u = 0 when control is absent)
  void* grad_omega_rows;    // scratch (mafbm_omega_rows(paths), K): row r = the sum over paths and dims of the
                            // paths [r kMafbmOmegaRowPaths, (r + 1) kMafbmOmegaRowPaths)
  void* grad_omega;         // (K,): the sum of the rows, in a fixed order
  int64_t paths, dims, grad_kl_stride;
  int K, R;
  double dt;
  uint64_t seed, step;
  DType dtype;
  uint64_t first_stream;  // as in MafbmStepParams
};

// Whole fractional OU paths dX = θ(μ − X)dt + σ dB̂ with the Y block stepped as above (u = 0).
// Backward (grad_out given): X is linear in (x0, μ, σ) given the noise, and θ enters through ρ = 1 − θh, so the
// tangents ∂x_n/∂(x0, θ, μ, σ) are carried forward along a re-run of the same path (same Philox draws):
//   t_x0' = ρ t_x0, t_θ' = ρ t_θ + (μ − x_n) h, t_μ' = ρ t_μ + θ h, t_σ' = ρ t_σ + s_n,
// and partials[:, p] = Σ_j grad_out[p, j] · t(step j·save_every): O(paths) memory, no stored trajectory.
struct MafbmSimulateParams {
  const void* x0;        // (paths,)
  void* out;             // forward: (paths, n_steps / save_every + 1), X at steps 0, save_every, ...
  const void* grad_out;  // backward: (paths, n_saved) gradient of `out`; nullptr in the forward
  void* partials;        // backward: (4, paths) per-path dL/dx0, and dL/dθ, dL/dμ, dL/dσ terms
  int64_t paths, n_steps, save_every;
  int K, R, R0;    // modes, noise rank per step, rank of the start factor (0: Y(0) = 0)
  double omega[kMafbmMaxK], drop[kMafbmMaxK];
  double factor[kMafbmMaxK * kMafbmMaxK];   // (K, R) row-major
  double factor0[kMafbmMaxK * kMafbmMaxK];  // (K, R0) row-major; Y(0) drawn in float64
  double dt, theta, mu, sigma;
  uint64_t seed;
  uint64_t first_stream;  // the stream of path 0: path_offset
  DType dtype;
};

template <typename T>
struct MafbmNormalsPerBlock {
  static constexpr int value = 4;
};
template <>
struct MafbmNormalsPerBlock<double> {
  static constexpr int value = 2;
};

MK_HOST_DEVICE void mafbm_block_normals(const Philox4& r, float* z) {
  box_muller(uniform_float(r.v[0]), uniform_float(r.v[1]), &z[0], &z[1]);
  box_muller(uniform_float(r.v[2]), uniform_float(r.v[3]), &z[2], &z[3]);
}

MK_HOST_DEVICE void mafbm_block_normals(const Philox4& r, double* z) {
  box_muller(uniform_double(r.v[0], r.v[1]), uniform_double(r.v[2], r.v[3]), &z[0], &z[1]);
}

// Box-Muller pair `pair` of a Philox block: fp32 pairs 0 and 1 (words 0-1, 2-3), fp64 pair 0 (all four).
MK_HOST_DEVICE void mafbm_pair_normals(const Philox4& r, int pair, float* z0, float* z1) {
  box_muller(uniform_float(r.v[2 * pair]), uniform_float(r.v[2 * pair + 1]), z0, z1);
}

MK_HOST_DEVICE void mafbm_pair_normals(const Philox4& r, int, double* z0, double* z1) {
  box_muller(uniform_double(r.v[0], r.v[1]), uniform_double(r.v[2], r.v[3]), z0, z1);
}

// z[0, count) = normals [first, first + count) of `stream` (the same values as mafbm_block_normals), computing
// only the Box-Muller pairs that meet the range.
template <typename T>
MK_HOST_DEVICE void mafbm_stream_normals(uint64_t seed, uint64_t stream, uint64_t first, int count, T* z) {
  constexpr int kPer = MafbmNormalsPerBlock<T>::value;
  const uint64_t last = first + static_cast<uint64_t>(count);
  for (uint64_t b = first / kPer; b * kPer < last; ++b) {
    const Philox4 r = philox_block(seed, b, stream);
    for (int pair = 0; pair < kPer / 2; ++pair) {
      const uint64_t i0 = b * kPer + 2 * pair;
      if (i0 + 1 < first || i0 >= last) continue;
      T z0, z1;
      mafbm_pair_normals(r, pair, &z0, &z1);
      if (i0 >= first) z[i0 - first] = z0;
      if (i0 + 1 < last) z[i0 + 1 - first] = z1;
    }
  }
}

// The R normals of element e = p·dims + d at `step`: given ones or the Philox draw of its stream.
template <typename T>
MK_HOST_DEVICE void mafbm_step_normals(const void* noise, uint64_t seed, uint64_t step, int64_t e, uint64_t stream,
                                       int R, T* z) {
  if (noise != nullptr) {
    const T* n = static_cast<const T*>(noise) + e * R;
    for (int j = 0; j < R; ++j) z[j] = n[j];
  } else {
    mafbm_stream_normals<T>(seed, stream, step * static_cast<uint64_t>(R), R, z);
  }
}

// dy (K,) of element e with control value u; returns s = Σ ω_k dy_k.
template <typename T>
MK_HOST_DEVICE T mafbm_increment(const T* y, T u, const T* z, const T* omega, const T* drop, const T* phi,
                                 const T* factor, int K, int R, T* dy) {
  T s = T(0);
  for (int k = 0; k < K; ++k) {
    T acc = -drop[k] * y[k] + phi[k] * u;
    for (int j = 0; j < R; ++j) acc += factor[k * R + j] * z[j];
    dy[k] = acc;
    s += omega[k] * acc;
  }
  return s;
}

// Forward of element e = p·dims + d with its normals z (R,); returns its control value u.
template <typename T>
MK_HOST_DEVICE T mafbm_step_element(const MafbmStepParams& p, int64_t e, const T* z) {
  const int K = p.K, R = p.R;  // locals: the output stores cannot alias them
  const T* ctl = static_cast<const T*>(p.control);
  const T u = ctl != nullptr ? ctl[e] : T(0);
  const T* ye = static_cast<const T*>(p.y) + e * K;
  T dy[kMafbmMaxK];
  const T s = mafbm_increment<T>(ye, u, z, static_cast<const T*>(p.omega), static_cast<const T*>(p.drop),
                                 static_cast<const T*>(p.phi), static_cast<const T*>(p.factor), K, R, dy);
  T* y_next = static_cast<T*>(p.y_next) + e * K;
  for (int k = 0; k < K; ++k) y_next[k] = ye[k] + dy[k];
  const T drift = static_cast<const T*>(p.drift)[e], sigma = static_cast<const T*>(p.diffusion)[e];
  static_cast<T*>(p.x_next)[e] = static_cast<const T*>(p.x)[e] + drift * static_cast<T>(p.dt) + sigma * s;
  return u;
}

// Forward of path p: every latent dimension, and the path's kl.
template <typename T>
MK_HOST_DEVICE void mafbm_step_path(const MafbmStepParams& p, int64_t path) {
  T z[kMafbmMaxK];
  T kl = T(0);
  for (int64_t d = 0; d < p.dims; ++d) {
    const int64_t e = path * p.dims + d;
    mafbm_step_normals<T>(p.noise, p.seed, p.step, e, p.first_stream + static_cast<uint64_t>(e), p.R, z);
    const T u = mafbm_step_element<T>(p, e, z);
    kl += u * u;
  }
  static_cast<T*>(p.kl)[path] = T(0.5) * static_cast<T>(p.dt) * kl;
}

// Backward of element e with its normals z and its path's grad_kl. With G_k = ∂L/∂dy_k = gy'_k + gs ω_k,
// gs = gx' σ: gy_k = gy'_k − drop_k G_k, gb = gx' h, gσ = gx' s, gu = Σ_k phi_k G_k + gkl u h; the element's
// terms gs dy_k of gω_k are added to g_omega (K,).
template <typename T>
MK_HOST_DEVICE void mafbm_step_backward_element(const MafbmStepBackwardParams& p, int64_t e, const T* z, T gkl,
                                                T* g_omega) {
  const int K = p.K, R = p.R;  // locals: the output stores cannot alias them
  const T* gy = static_cast<const T*>(p.grad_y_next) + e * K;
  const T* omega = static_cast<const T*>(p.omega);
  const T* drop = static_cast<const T*>(p.drop);
  const T* phi = static_cast<const T*>(p.phi);
  const T* ctl = static_cast<const T*>(p.control);
  const T u = ctl != nullptr ? ctl[e] : T(0);
  T dy[kMafbmMaxK];
  const T s = mafbm_increment<T>(static_cast<const T*>(p.y) + e * K, u, z, omega, drop, phi,
                                 static_cast<const T*>(p.factor), K, R, dy);
  const T gx = static_cast<const T*>(p.grad_x_next)[e];
  const T gs = gx * static_cast<const T*>(p.diffusion)[e];
  T* grad_y = static_cast<T*>(p.grad_y) + e * K;
  T gu = gkl * u * static_cast<T>(p.dt);
  for (int k = 0; k < K; ++k) {
    const T g_dy = gy[k] + gs * omega[k];
    grad_y[k] = gy[k] - drop[k] * g_dy;
    g_omega[k] += gs * dy[k];
    gu += phi[k] * g_dy;
  }
  static_cast<T*>(p.grad_drift)[e] = gx * static_cast<T>(p.dt);
  static_cast<T*>(p.grad_diffusion)[e] = gx * s;
  static_cast<T*>(p.grad_control)[e] = gu;
}

// Backward of path p: every latent dimension; adds the path's terms of gω to g_omega (K,).
template <typename T>
MK_HOST_DEVICE void mafbm_step_backward_path(const MafbmStepBackwardParams& p, int64_t path, T* g_omega) {
  const T gkl = static_cast<const T*>(p.grad_kl)[path * p.grad_kl_stride];
  T z[kMafbmMaxK];
  for (int64_t d = 0; d < p.dims; ++d) {
    const int64_t e = path * p.dims + d;
    mafbm_step_normals<T>(p.noise, p.seed, p.step, e, p.first_stream + static_cast<uint64_t>(e), p.R, z);
    mafbm_step_backward_element<T>(p, e, z, gkl, g_omega);
  }
}

// The simulator's compile-time shapes: kK ≥ K modes (padded with zero coefficients), kR = R normals per
// step when R ≤ 4, else kR = 0: R read at run time (≤ kK).
template <int kK, int kR>
struct MafbmSimShape {
  static constexpr int kMaxR = kR > 0 ? kR : kK;
  MK_HOST_DEVICE static int rank(int runtime_r) { return kR > 0 ? kR : runtime_r; }
};

// The simulator's coefficients in the kernel's precision, padded with zeros to kK modes and kMaxR (factor) or
// kK (factor0) columns, so that every loop over them has compile-time bounds and indices (registers and, as
// a CUDA kernel argument, constant-bank operands; no local memory).
template <typename T, int kK, int kR>
struct MafbmSimCoeffs {
  T omega[kK], drop[kK], factor[kK * MafbmSimShape<kK, kR>::kMaxR];
  double factor0[kK * kK];  // (kK, kK): Y(0) = factor0 · z0 in float64
};

template <typename T, int kK, int kR>
MafbmSimCoeffs<T, kK, kR> mafbm_sim_coeffs(const MafbmSimulateParams& p) {
  constexpr int kMaxR = MafbmSimShape<kK, kR>::kMaxR;
  MafbmSimCoeffs<T, kK, kR> c{};  // zeros
  for (int k = 0; k < p.K; ++k) {
    c.omega[k] = static_cast<T>(p.omega[k]);
    c.drop[k] = static_cast<T>(p.drop[k]);
    for (int j = 0; j < p.R; ++j) c.factor[k * kMaxR + j] = static_cast<T>(p.factor[k * p.R + j]);
    for (int j = 0; j < p.R0; ++j) c.factor0[k * kK + j] = p.factor0[k * p.R0 + j];
  }
  return c;
}

// The type-I start Y(0) = factor0 · z0 (zero when R0 = 0), z0 = normals [0, R0) of the path's start stream
// (float64 whatever T): Philox blocks b < ⌈R0/2⌉ of that stream, unrolled over ⌈kK/2⌉ blocks.
template <typename T, int kK, int kR>
MK_HOST_DEVICE void mafbm_sim_start(const MafbmSimulateParams& p, const MafbmSimCoeffs<T, kK, kR>& c,
                                    uint64_t stream, T* y) {
  constexpr int kBlocks = (kK + 1) / 2;  // two float64 normals per block
  double z0[2 * kBlocks];
MK_UNROLL
  for (int b = 0; b < kBlocks; ++b) {
    if (2 * b < p.R0) {
      mafbm_block_normals(philox_block(p.seed, static_cast<uint64_t>(b), stream | kMafbmInitStream), z0 + 2 * b);
    } else {
      z0[2 * b] = z0[2 * b + 1] = 0.0;
    }
  }
MK_UNROLL
  for (int k = 0; k < kK; ++k) {
    double acc = 0.0;
MK_UNROLL
    for (int j = 0; j < kK; ++j) acc += c.factor0[k * kK + j] * z0[j];
    y[k] = static_cast<T>(acc);
  }
}

// One whole path, in groups of G = per steps: a group consumes exactly R Philox blocks (normals [nR, nR + GR)
// of the path's stream, n = the group's first step), so z holds R·per values (registers when kR > 0).
template <typename T, int kK, int kR, bool kGrad>
MK_HOST_DEVICE void mafbm_simulate_path(const MafbmSimulateParams& p, const MafbmSimCoeffs<T, kK, kR>& c,
                                        int64_t path) {
  constexpr int kPer = MafbmNormalsPerBlock<T>::value;
  constexpr int kMaxR = MafbmSimShape<kK, kR>::kMaxR;
  const int R = MafbmSimShape<kK, kR>::rank(p.R);
  const int64_t n_saved = p.n_steps / p.save_every + 1;
  T* out = static_cast<T*>(p.out) + path * n_saved;
  const T h = static_cast<T>(p.dt), theta = static_cast<T>(p.theta), mu = static_cast<T>(p.mu);
  const T sigma = static_cast<T>(p.sigma);
  const uint64_t stream = p.first_stream + static_cast<uint64_t>(path);
  T y[kK], z[kMaxR * kPer];
  T x = static_cast<const T*>(p.x0)[path];
  mafbm_sim_start<T, kK, kR>(p, c, stream, y);
  const T* grad = kGrad ? static_cast<const T*>(p.grad_out) + path * n_saved : nullptr;
  const T rho = T(1) - theta * h;
  T t_x0 = T(1), t_theta = T(0), t_mu = T(0), t_sigma = T(0);  // tangents of x
  T g_x0 = T(0), g_theta = T(0), g_mu = T(0), g_sigma = T(0);  // their contractions with grad_out
  if (kGrad) {
    g_x0 = grad[0];
  } else {
    out[0] = x;
  }
  int64_t saved = 1, to_save = p.save_every;  // counters, not a 64-bit division per save
  for (int64_t n0 = 0; n0 < p.n_steps; n0 += kPer) {
    const uint64_t first_block = static_cast<uint64_t>(n0 / kPer) * static_cast<uint64_t>(R);
MK_UNROLL
    for (int b = 0; b < kMaxR; ++b) {
      if (b < R) mafbm_block_normals(philox_block(p.seed, first_block + b, stream), z + b * kPer);
    }
MK_UNROLL
    for (int g = 0; g < kPer; ++g) {
      if (n0 + g >= p.n_steps) break;
      T s = T(0);
MK_UNROLL
      for (int k = 0; k < kK; ++k) {
        T dy = -c.drop[k] * y[k];
MK_UNROLL
        for (int j = 0; j < kMaxR; ++j) {
          if (j < R) dy += c.factor[k * kMaxR + j] * z[g * R + j];
        }
        y[k] += dy;
        s += c.omega[k] * dy;
      }
      if (kGrad) {
        t_x0 = rho * t_x0;
        t_theta = rho * t_theta + (mu - x) * h;
        t_mu = rho * t_mu + theta * h;
        t_sigma = rho * t_sigma + s;
      }
      x += theta * (mu - x) * h + sigma * s;
      if (--to_save == 0) {
        to_save = p.save_every;
        if (kGrad) {
          const T gj = grad[saved];
          g_x0 += gj * t_x0;
          g_theta += gj * t_theta;
          g_mu += gj * t_mu;
          g_sigma += gj * t_sigma;
        } else {
          out[saved] = x;
        }
        ++saved;
      }
    }
  }
  if (kGrad) {
    T* partials = static_cast<T*>(p.partials);
    partials[path] = g_x0;
    partials[p.paths + path] = g_theta;
    partials[2 * p.paths + path] = g_mu;
    partials[3 * p.paths + path] = g_sigma;
  }
}

// Calls f.template operator()<kK, kR>() with the smallest compiled kK ≥ K and kR as in MafbmSimShape.
template <typename F>
void mafbm_sim_dispatch(int K, int R, F&& f) {
  auto with_k = [&]<int kK>() {
    switch (R) {
      case 1: f.template operator()<kK, 1>(); break;
      case 2: f.template operator()<kK, 2>(); break;
      case 3: f.template operator()<kK, 3>(); break;
      case 4: f.template operator()<kK, 4>(); break;
      default: f.template operator()<kK, 0>(); break;
    }
  };
  if (K <= 5) {  // the paper's K = 5 without padding
    with_k.template operator()<5>();
  } else if (K <= 8) {
    with_k.template operator()<8>();
  } else {
    with_k.template operator()<16>();
  }
}

void mafbm_step_cpu(const MafbmStepParams& p);
void mafbm_step_backward_cpu(const MafbmStepBackwardParams& p);
void mafbm_simulate_cpu(const MafbmSimulateParams& p);  // backward when p.grad_out != nullptr
#ifdef MARKOVKIT_WITH_CUDA
void mafbm_step_cuda(const MafbmStepParams& p, cudaStream_t stream);
void mafbm_step_backward_cuda(const MafbmStepBackwardParams& p, cudaStream_t stream);
void mafbm_simulate_cuda(const MafbmSimulateParams& p, cudaStream_t stream);  // likewise
#endif

}  // namespace markovkit

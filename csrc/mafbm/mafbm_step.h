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
// Philox counter layout (key = seed): the R normals of (path p, dim d, step n) come from the blocks
// philox_block(seed, lo = n, hi = (p·dims + d)·8 + j), j = 0, 1, ... (fp32: 4 normals per block as two
// Box-Muller pairs, fp64: 2 per block), normal r from block r / per, slot r % per. The simulator is the
// step with dims = 1; its type-I start Y(0) = factor0 · z0 draws z0 at lo = 2^64 − 1 (step "−1").
#include <cstdint>

#include "common/dtype.h"
#include "common/philox.h"
#ifdef MARKOVKIT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace markovkit {

constexpr int kMafbmMaxK = 16;  // modes (and noise rank) held in registers
constexpr uint64_t kMafbmInitStep = ~uint64_t{0};

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
  DType dtype;  // kFloat32 or kFloat64, every tensor
};

struct MafbmStepBackwardParams {
  const void* grad_x_next;  // (paths, dims)
  const void* grad_y_next;  // (paths, dims, K)
  const void* grad_kl;      // (paths,)
  const void* y;            // (paths, dims, K)
  const void* diffusion;    // (paths, dims)
  const void* control;      // (paths, dims) or nullptr
  const void* noise;        // (paths, dims, R) or nullptr
  const void* omega;        // (K,)
  const void* drop;         // (K,)
  const void* phi;          // (K,)
  const void* factor;       // (K, R)
  void* grad_y;             // (paths, dims, K)
  void* grad_diffusion;     // (paths, dims)
  void* grad_control;       // (paths, dims) or nullptr
  void* grad_omega_terms;   // (paths, dims, K): summed over paths and dims by the host
  int64_t paths, dims;
  int K, R;
  double dt;
  uint64_t seed, step;
  DType dtype;
};

// Whole fractional OU paths dX = θ(μ − X)dt + σ dB̂ with the Y block stepped as above (u = 0).
struct MafbmSimulateParams {
  const void* x0;  // (paths,)
  void* out;       // (paths, n_steps / save_every + 1): X at steps 0, save_every, 2·save_every, ...
  int64_t paths, n_steps, save_every;
  int K, R, R0;    // modes, noise rank per step, rank of the start factor (0: Y(0) = 0)
  double omega[kMafbmMaxK], drop[kMafbmMaxK];
  double factor[kMafbmMaxK * kMafbmMaxK];   // (K, R) row-major
  double factor0[kMafbmMaxK * kMafbmMaxK];  // (K, R0) row-major; Y(0) drawn in float64
  double dt, theta, mu, sigma;
  uint64_t seed;
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

// z[0, R) for (stream = p·dims + d, step), R ≤ kMax; whole blocks are written, so z holds kMax values
// (kMax a multiple of 4).
template <typename T, int kMax = kMafbmMaxK>
MK_HOST_DEVICE void mafbm_philox_normals(uint64_t seed, uint64_t step, uint64_t stream, int R, T* z) {
  constexpr int kPer = MafbmNormalsPerBlock<T>::value;
MK_UNROLL
  for (int b = 0; b < kMax / kPer; ++b) {
    if (b * kPer < R) mafbm_block_normals(philox_block(seed, step, stream * 8 + b), z + b * kPer);
  }
}

// The normals of element e = p·dims + d: given ones or the Philox draw.
template <typename T>
MK_HOST_DEVICE void mafbm_step_normals(const void* noise, uint64_t seed, uint64_t step, int64_t e, int R, T* z) {
  if (noise != nullptr) {
    const T* n = static_cast<const T*>(noise) + e * R;
    for (int j = 0; j < R; ++j) z[j] = n[j];
  } else {
    mafbm_philox_normals<T>(seed, step, static_cast<uint64_t>(e), R, z);
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

// Forward of path p: every latent dimension, and the path's kl.
template <typename T>
MK_HOST_DEVICE void mafbm_step_path(const MafbmStepParams& p, int64_t path) {
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);
  const T* b = static_cast<const T*>(p.drift);
  const T* sig = static_cast<const T*>(p.diffusion);
  const T* ctl = static_cast<const T*>(p.control);
  T* x_next = static_cast<T*>(p.x_next);
  T* y_next = static_cast<T*>(p.y_next);
  const T h = static_cast<T>(p.dt);
  T z[kMafbmMaxK], dy[kMafbmMaxK];
  T kl = T(0);
  for (int64_t d = 0; d < p.dims; ++d) {
    const int64_t e = path * p.dims + d;
    const T u = ctl != nullptr ? ctl[e] : T(0);
    mafbm_step_normals<T>(p.noise, p.seed, p.step, e, p.R, z);
    const T* ye = y + e * p.K;
    const T s = mafbm_increment<T>(ye, u, z, static_cast<const T*>(p.omega), static_cast<const T*>(p.drop),
                                   static_cast<const T*>(p.phi), static_cast<const T*>(p.factor), p.K, p.R, dy);
    for (int k = 0; k < p.K; ++k) y_next[e * p.K + k] = ye[k] + dy[k];
    x_next[e] = x[e] + b[e] * h + sig[e] * s;
    kl += u * u;
  }
  static_cast<T*>(p.kl)[path] = T(0.5) * h * kl;
}

// Backward of path p. With G_k = ∂L/∂dy_k = gy'_k + gs ω_k, gs = gx' σ:
//   gy_k = gy'_k − drop_k G_k, gσ = gx' s, gu = Σ_k phi_k G_k + gkl u h, gω_k (term) = gs dy_k.
template <typename T>
MK_HOST_DEVICE void mafbm_step_backward_path(const MafbmStepBackwardParams& p, int64_t path) {
  const T* gx = static_cast<const T*>(p.grad_x_next);
  const T* gy = static_cast<const T*>(p.grad_y_next);
  const T* y = static_cast<const T*>(p.y);
  const T* sig = static_cast<const T*>(p.diffusion);
  const T* ctl = static_cast<const T*>(p.control);
  const T* omega = static_cast<const T*>(p.omega);
  const T* drop = static_cast<const T*>(p.drop);
  const T* phi = static_cast<const T*>(p.phi);
  const T h = static_cast<T>(p.dt);
  const T gkl = static_cast<const T*>(p.grad_kl)[path];
  T z[kMafbmMaxK], dy[kMafbmMaxK];
  for (int64_t d = 0; d < p.dims; ++d) {
    const int64_t e = path * p.dims + d;
    const T u = ctl != nullptr ? ctl[e] : T(0);
    mafbm_step_normals<T>(p.noise, p.seed, p.step, e, p.R, z);
    const T s = mafbm_increment<T>(y + e * p.K, u, z, omega, drop, phi, static_cast<const T*>(p.factor), p.K,
                                   p.R, dy);
    const T gs = gx[e] * sig[e];
    T gu = gkl * u * h;
    for (int k = 0; k < p.K; ++k) {
      const T g_dy = gy[e * p.K + k] + gs * omega[k];
      static_cast<T*>(p.grad_y)[e * p.K + k] = gy[e * p.K + k] - drop[k] * g_dy;
      static_cast<T*>(p.grad_omega_terms)[e * p.K + k] = gs * dy[k];
      gu += phi[k] * g_dy;
    }
    static_cast<T*>(p.grad_diffusion)[e] = gx[e] * s;
    if (p.grad_control != nullptr) static_cast<T*>(p.grad_control)[e] = gu;
  }
}

// The simulator's coefficients in the kernel's precision, padded with zeros to kK modes and kR normals
// (kK, kR multiples of 4 or kR = 1), so the loops have compile-time bounds.
template <typename T, int kK, int kR>
struct MafbmSimCoeffs {
  T omega[kK], drop[kK], factor[kK * kR];
};

template <typename T, int kK, int kR>
MK_HOST_DEVICE void mafbm_sim_coeffs(const MafbmSimulateParams& p, MafbmSimCoeffs<T, kK, kR>* c) {
  for (int k = 0; k < kK; ++k) {
    c->omega[k] = k < p.K ? static_cast<T>(p.omega[k]) : T(0);
    c->drop[k] = k < p.K ? static_cast<T>(p.drop[k]) : T(0);
    for (int j = 0; j < kR; ++j) {
      c->factor[k * kR + j] = (k < p.K && j < p.R) ? static_cast<T>(p.factor[k * p.R + j]) : T(0);
    }
  }
}

// One whole path. z holds whole Philox blocks (≥ 4 values); entries past R are finite and meet zero factors.
template <typename T, int kK, int kR>
MK_HOST_DEVICE void mafbm_simulate_path(const MafbmSimulateParams& p, const MafbmSimCoeffs<T, kK, kR>& c,
                                        int64_t path) {
  constexpr int kZ = kR < 4 ? 4 : kR;
  const int64_t n_saved = p.n_steps / p.save_every + 1;
  T* out = static_cast<T*>(p.out) + path * n_saved;
  const T h = static_cast<T>(p.dt), theta = static_cast<T>(p.theta), mu = static_cast<T>(p.mu);
  const T sigma = static_cast<T>(p.sigma);
  T y[kK], z[kZ];
  T x = static_cast<const T*>(p.x0)[path];
MK_UNROLL
  for (int k = 0; k < kK; ++k) y[k] = T(0);
  if (p.R0 > 0) {  // type-I start: Y(0) = factor0 · z0, in float64 whatever T
    double z0[kMafbmMaxK];
    mafbm_philox_normals<double>(p.seed, kMafbmInitStep, static_cast<uint64_t>(path), p.R0, z0);
    for (int k = 0; k < p.K; ++k) {
      double acc = 0.0;
      for (int j = 0; j < p.R0; ++j) acc += p.factor0[k * p.R0 + j] * z0[j];
      y[k] = static_cast<T>(acc);
    }
  }
  out[0] = x;
  for (int64_t n = 0; n < p.n_steps; ++n) {
    mafbm_philox_normals<T, kZ>(p.seed, static_cast<uint64_t>(n), static_cast<uint64_t>(path), p.R, z);
    T s = T(0);
MK_UNROLL
    for (int k = 0; k < kK; ++k) {
      T dy = -c.drop[k] * y[k];
MK_UNROLL
      for (int j = 0; j < kR; ++j) dy += c.factor[k * kR + j] * z[j];
      y[k] += dy;
      s += c.omega[k] * dy;
    }
    x += theta * (mu - x) * h + sigma * s;
    if ((n + 1) % p.save_every == 0) out[(n + 1) / p.save_every] = x;
  }
}

// Calls f.template operator()<kK, kR>() with the smallest compiled (kK, kR) that holds (K, R).
template <typename F>
void mafbm_sim_dispatch(int K, int R, F&& f) {
  auto with_k = [&]<int kK>() {
    if (R == 1) {
      f.template operator()<kK, 1>();
    } else if (R <= 4) {
      f.template operator()<kK, 4>();
    } else {
      f.template operator()<kK, kK>();
    }
  };
  if (K <= 4) {
    with_k.template operator()<4>();
  } else if (K <= 8) {
    with_k.template operator()<8>();
  } else {
    with_k.template operator()<16>();
  }
}

void mafbm_step_cpu(const MafbmStepParams& p);
void mafbm_step_backward_cpu(const MafbmStepBackwardParams& p);
void mafbm_simulate_cpu(const MafbmSimulateParams& p);
#ifdef MARKOVKIT_WITH_CUDA
void mafbm_step_cuda(const MafbmStepParams& p, cudaStream_t stream);
void mafbm_step_backward_cuda(const MafbmStepBackwardParams& p, cudaStream_t stream);
void mafbm_simulate_cuda(const MafbmSimulateParams& p, cudaStream_t stream);
#endif

}  // namespace markovkit

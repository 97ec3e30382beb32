// CPU kernels of the MA-fBM step (forward, backward) and the simulator: threads split the paths; float32
// draws its Philox normals 16 paths at a time with the vectorised generator of mafbm_cpu_lanes.h.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "mafbm/mafbm_step.h"

namespace markovkit {
namespace {

// --- float32 simulator over lanes of paths (mafbm_cpu_lanes.h), built for the baseline ISA and for AVX2 ---

constexpr int kLanes = 64;

namespace lanes_default {
#include "mafbm/mafbm_cpu_lanes.h"
}  // namespace lanes_default

#pragma GCC push_options
#pragma GCC target("avx2")
namespace lanes_avx2 {
#include "mafbm/mafbm_cpu_lanes.h"
}  // namespace lanes_avx2
#pragma GCC pop_options

template <typename T>
void step(const MafbmStepParams& p) {
  at::parallel_for(0, p.paths, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) mafbm_step_path<T>(p, i);
  });
}

template <typename T>
void step_backward(const MafbmStepBackwardParams& p) {
  at::parallel_for(0, p.paths, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) mafbm_step_backward_path<T>(p, i);
  });
}

// float32 with Philox noise: the normals of kLanes paths at a time by the vectorised generator, then the
// per-element math. P: MafbmStepParams or MafbmStepBackwardParams.
template <typename P, typename Element>
void step_lanes_f32(const P& p, Element&& element) {
  const auto normals = __builtin_cpu_supports("avx2") ? &lanes_avx2::step_normals : &lanes_default::step_normals;
  const int64_t groups = (p.paths + kLanes - 1) / kLanes;
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * kLanes;
      const int live = static_cast<int>(std::min<int64_t>(kLanes, p.paths - first));
      for (int64_t d = 0; d < p.dims; ++d) {
        uint64_t stream[kLanes];
        float z[kMafbmMaxK][kLanes];
        for (int l = 0; l < kLanes; ++l) {
          stream[l] = static_cast<uint64_t>((first + std::min(l, live - 1)) * p.dims + d);
        }
        normals(p.seed, p.step, p.R, stream, z);
        for (int l = 0; l < live; ++l) {
          float zl[kMafbmMaxK];
          for (int r = 0; r < p.R; ++r) zl[r] = z[r][l];
          element(first + l, d, zl);
        }
      }
    }
  });
}

void step_f32(const MafbmStepParams& p) {
  if (p.noise != nullptr) return step<float>(p);
  float* kl = static_cast<float*>(p.kl);
  std::fill_n(kl, p.paths, 0.0f);
  step_lanes_f32(p, [&](int64_t path, int64_t d, const float* z) {
    const float u = mafbm_step_element<float>(p, path * p.dims + d, z);
    kl[path] += u * u;
  });
  const float half_h = 0.5f * static_cast<float>(p.dt);
  for (int64_t i = 0; i < p.paths; ++i) kl[i] *= half_h;
}

void step_backward_f32(const MafbmStepBackwardParams& p) {
  if (p.noise != nullptr) return step_backward<float>(p);
  const float* gkl = static_cast<const float*>(p.grad_kl);
  step_lanes_f32(p, [&](int64_t path, int64_t d, const float* z) {
    mafbm_step_backward_element<float>(p, path * p.dims + d, z, gkl[path]);
  });
}

void simulate_f32(const MafbmSimulateParams& p) {
  float omega[kMafbmMaxK], drop[kMafbmMaxK], factor[kMafbmMaxK * kMafbmMaxK];
  for (int k = 0; k < p.K; ++k) {
    omega[k] = static_cast<float>(p.omega[k]);
    drop[k] = static_cast<float>(p.drop[k]);
    for (int j = 0; j < p.R; ++j) factor[k * p.R + j] = static_cast<float>(p.factor[k * p.R + j]);
  }
  const bool avx2 = __builtin_cpu_supports("avx2"), grad = p.grad_out != nullptr;
  const auto lanes = avx2 ? (grad ? &lanes_avx2::simulate_lanes<true> : &lanes_avx2::simulate_lanes<false>)
                          : (grad ? &lanes_default::simulate_lanes<true> : &lanes_default::simulate_lanes<false>);
  const int64_t groups = (p.paths + kLanes - 1) / kLanes;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) lanes(p, omega, drop, factor, i * kLanes);
  });
}

void simulate_f64(const MafbmSimulateParams& p) {
  mafbm_sim_dispatch(p.K, p.R, [&]<int kK, int kR>() {
    MafbmSimCoeffs<double, kK, kR> c;
    mafbm_sim_coeffs<double, kK, kR>(p, &c);
    at::parallel_for(0, p.paths, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        p.grad_out != nullptr ? mafbm_simulate_path<double, kK, kR, true>(p, c, i)
                              : mafbm_simulate_path<double, kK, kR, false>(p, c, i);
      }
    });
  });
}

}  // namespace

void mafbm_step_cpu(const MafbmStepParams& p) {
  p.dtype == DType::kFloat64 ? step<double>(p) : step_f32(p);
}

void mafbm_step_backward_cpu(const MafbmStepBackwardParams& p) {
  p.dtype == DType::kFloat64 ? step_backward<double>(p) : step_backward_f32(p);
}

void mafbm_simulate_cpu(const MafbmSimulateParams& p) {
  p.dtype == DType::kFloat64 ? simulate_f64(p) : simulate_f32(p);
}

}  // namespace markovkit

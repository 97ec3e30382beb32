// CPU kernels of the MA-fBM step (forward, backward) and the simulator: threads split the paths.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "mafbm/mafbm_step.h"

namespace markovkit {
namespace {

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

// --- float32 simulator over lanes of paths (mafbm_cpu_lanes.h), built for the baseline ISA and for AVX2 ---

constexpr int kLanes = 16;

namespace lanes_default {
#include "mafbm/mafbm_cpu_lanes.h"
}  // namespace lanes_default

#pragma GCC push_options
#pragma GCC target("avx2")
namespace lanes_avx2 {
#include "mafbm/mafbm_cpu_lanes.h"
}  // namespace lanes_avx2
#pragma GCC pop_options

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
  p.dtype == DType::kFloat64 ? step<double>(p) : step<float>(p);
}

void mafbm_step_backward_cpu(const MafbmStepBackwardParams& p) {
  p.dtype == DType::kFloat64 ? step_backward<double>(p) : step_backward<float>(p);
}

void mafbm_simulate_cpu(const MafbmSimulateParams& p) {
  p.dtype == DType::kFloat64 ? simulate_f64(p) : simulate_f32(p);
}

}  // namespace markovkit

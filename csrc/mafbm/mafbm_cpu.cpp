// CPU kernels of the MA-fBM step (forward, backward) and the simulator: threads split the paths; float32
// draws its Philox normals kLanes paths at a time with the vectorised generator of common/philox_lanes.h.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/cpu_isa.h"
#include "mafbm/mafbm_step.h"

namespace markovkit {
namespace {

// --- float32 step and simulator over lanes of paths (mafbm_cpu_lanes.h), baseline and AVX2 builds ---

constexpr int kLanes = 64;

#define MK_LANES_HEADER "mafbm/mafbm_cpu_lanes.h"
#include "common/lane_copies.h"

template <typename T>
void step(const MafbmStepParams& p) {
  at::parallel_for(0, p.paths, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) mafbm_step_path<T>(p, i);
  });
}

// Every row of kMafbmOmegaRowPaths paths sums its terms of gω into its own row of p.grad_omega_rows (as a CUDA
// block does), so the result does not depend on the thread count.
template <typename T>
void step_backward(const MafbmStepBackwardParams& p) {
  const int64_t rows = mafbm_omega_rows(p.paths);
  T* grad_omega_rows = static_cast<T*>(p.grad_omega_rows);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = grad_omega_rows + r * p.K;
      std::fill_n(row, p.K, T(0));
      const int64_t last = std::min(p.paths, (r + 1) * kMafbmOmegaRowPaths);
      for (int64_t i = r * kMafbmOmegaRowPaths; i < last; ++i) mafbm_step_backward_path<T>(p, i, row);
    }
  });
}

// float32 with Philox noise, kLanes paths at a time: their normals by the vectorised generator, then the
// step's math over the lanes (both from mafbm_cpu_lanes.h, baseline or AVX2 build).
void step_f32(const MafbmStepParams& p) {
  if (p.noise != nullptr) return step<float>(p);
  const bool avx2 = cpu_isa() != CpuIsa::kBaseline;
  const auto normals = avx2 ? &lanes_avx2::step_normals : &lanes_default::step_normals;
  const auto forward = avx2 ? &lanes_avx2::step_forward : &lanes_default::step_forward;
  const float half_h = 0.5f * static_cast<float>(p.dt);
  at::parallel_for(0, (p.paths + kLanes - 1) / kLanes, 1, [&](int64_t begin, int64_t end) {
    uint64_t elem[kLanes];  // element index = Philox stream of each lane
    float z[kMafbmMaxK][kLanes], u2[kLanes];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * kLanes;
      const int live = static_cast<int>(std::min<int64_t>(kLanes, p.paths - first));
      std::fill_n(u2, kLanes, 0.0f);
      for (int64_t d = 0; d < p.dims; ++d) {
        lanes_default::lane_elements(first, live, p.dims, d, elem);
        normals(p.seed, p.step, p.R, elem, z);
        forward(p, elem, z, u2);
      }
      for (int l = 0; l < live; ++l) static_cast<float*>(p.kl)[first + l] = half_h * u2[l];
    }
  });
}

void step_backward_f32(const MafbmStepBackwardParams& p) {
  if (p.noise != nullptr) return step_backward<float>(p);
  const bool avx2 = cpu_isa() != CpuIsa::kBaseline;
  const auto normals = avx2 ? &lanes_avx2::step_normals : &lanes_default::step_normals;
  const auto backward = avx2 ? &lanes_avx2::step_backward : &lanes_default::step_backward;
  static_assert(kMafbmOmegaRowPaths % kLanes == 0, "a gω row holds whole lane groups");
  const int64_t rows = mafbm_omega_rows(p.paths);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    uint64_t elem[kLanes];  // element index = Philox stream of each lane
    float z[kMafbmMaxK][kLanes];
    for (int64_t r = begin; r < end; ++r) {
      double row[kMafbmMaxK] = {};
      const int64_t last = std::min(p.paths, (r + 1) * kMafbmOmegaRowPaths);
      for (int64_t first = r * kMafbmOmegaRowPaths; first < last; first += kLanes) {
        const int live = static_cast<int>(std::min<int64_t>(kLanes, last - first));
        for (int64_t d = 0; d < p.dims; ++d) {
          lanes_default::lane_elements(first, live, p.dims, d, elem);
          normals(p.seed, p.step, p.R, elem, z);
          backward(p, elem, z, live, row);
        }
      }
      for (int k = 0; k < p.K; ++k) static_cast<float*>(p.grad_omega_rows)[r * p.K + k] = static_cast<float>(row[k]);
    }
  });
}

// gω = the sum of the rows, added in row order.
template <typename T>
void sum_omega_rows(const MafbmStepBackwardParams& p) {
  const T* rows = static_cast<const T*>(p.grad_omega_rows);
  T* grad_omega = static_cast<T*>(p.grad_omega);
  std::fill_n(grad_omega, p.K, T(0));
  for (int64_t r = 0; r < mafbm_omega_rows(p.paths); ++r) {
    for (int k = 0; k < p.K; ++k) grad_omega[k] += rows[r * p.K + k];
  }
}

void simulate_f32(const MafbmSimulateParams& p) {
  float omega[kMafbmMaxK], drop[kMafbmMaxK], factor[kMafbmMaxK * kMafbmMaxK];
  for (int k = 0; k < p.K; ++k) {
    omega[k] = static_cast<float>(p.omega[k]);
    drop[k] = static_cast<float>(p.drop[k]);
    for (int j = 0; j < p.R; ++j) factor[k * p.R + j] = static_cast<float>(p.factor[k * p.R + j]);
  }
  const bool avx2 = cpu_isa() != CpuIsa::kBaseline, grad = p.grad_out != nullptr;
  const auto lanes = avx2 ? (grad ? &lanes_avx2::simulate_lanes<true> : &lanes_avx2::simulate_lanes<false>)
                          : (grad ? &lanes_default::simulate_lanes<true> : &lanes_default::simulate_lanes<false>);
  const int64_t groups = (p.paths + kLanes - 1) / kLanes;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) lanes(p, omega, drop, factor, i * kLanes);
  });
}

void simulate_f64(const MafbmSimulateParams& p) {
  mafbm_sim_dispatch(p.K, p.R, [&]<int kK, int kR>() {
    const MafbmSimCoeffs<double, kK, kR> c = mafbm_sim_coeffs<double, kK, kR>(p);
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
  if (p.dtype == DType::kFloat64) {
    step_backward<double>(p);
    sum_omega_rows<double>(p);
  } else {
    step_backward_f32(p);
    sum_omega_rows<float>(p);
  }
}

void mafbm_simulate_cpu(const MafbmSimulateParams& p) {
  p.dtype == DType::kFloat64 ? simulate_f64(p) : simulate_f32(p);
}

}  // namespace markovkit

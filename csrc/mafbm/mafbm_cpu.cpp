// CPU kernels of the MA-fBM step (forward, backward) and the simulator: threads split the paths (the float32
// step: its elements); float32 works on kLanes lanes with the vectorised generator of common/philox_lanes.h.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>  // the lane copies' intrinsics (common/lane_copies.h)
#endif

#include "common/cpu_isa.h"
#include "mafbm/mafbm_step.h"

namespace markovkit {
namespace {

// --- float32 step and simulator over lanes (mafbm_cpu_lanes.h), baseline, AVX2, AVX-512 ---

constexpr int kLanes = 64;

#define MK_LANES_HEADER "mafbm/mafbm_cpu_lanes.h"
#include "common/lane_copies.h"

void step_f64(const MafbmStepParams& p) {
  at::parallel_for(0, p.paths, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) mafbm_step_path<double>(p, i);
  });
}

// Every row of kMafbmOmegaRowPaths paths sums its terms of gω into its own row of p.grad_omega_rows (as a CUDA
// block does), so the result does not depend on the thread count.
void step_backward_f64(const MafbmStepBackwardParams& p) {
  double* grad_omega_rows = static_cast<double*>(p.grad_omega_rows);
  at::parallel_for(0, mafbm_omega_rows(p.paths), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      double* row = grad_omega_rows + r * p.K;
      std::fill_n(row, p.K, 0.0);
      const int64_t last = std::min(p.paths, (r + 1) * kMafbmOmegaRowPaths);
      for (int64_t i = r * kMafbmOmegaRowPaths; i < last; ++i) mafbm_step_backward_path<double>(p, i, row);
    }
  });
}

// float32, kLanes consecutive elements at a time (mafbm_cpu_lanes.h, the copy for this CPU), then each path's
// kl = ½h Σ_d u_d² (in d order, as mafbm_step_path).
void step_f32(const MafbmStepParams& p) {
  const auto forward = MK_LANES_PICK(step_forward);
  const int64_t elements = p.paths * p.dims;
  at::parallel_for(0, (elements + kLanes - 1) / kLanes, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      forward(p, g * kLanes, static_cast<int>(std::min<int64_t>(kLanes, elements - g * kLanes)));
    }
  });
  const float half_h = 0.5f * static_cast<float>(p.dt);
  const float* u = static_cast<const float*>(p.control);
  float* kl = static_cast<float*>(p.kl);
  if (u == nullptr) {
    std::fill_n(kl, p.paths, 0.0f);
    return;
  }
  at::parallel_for(0, p.paths, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float u2 = 0.0f;
      for (int64_t d = 0; d < p.dims; ++d) u2 += u[i * p.dims + d] * u[i * p.dims + d];
      kl[i] = half_h * u2;
    }
  });
}

// Row r of gω sums the elements of paths [r·128, (r + 1)·128), kLanes at a time, into a float64 row.
void step_backward_f32(const MafbmStepBackwardParams& p) {
  const auto backward = MK_LANES_PICK(step_backward);
  at::parallel_for(0, mafbm_omega_rows(p.paths), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      double row[kMafbmMaxK] = {};
      const int64_t last = std::min(p.paths, (r + 1) * kMafbmOmegaRowPaths) * p.dims;
      for (int64_t first = r * kMafbmOmegaRowPaths * p.dims; first < last; first += kLanes) {
        backward(p, first, static_cast<int>(std::min<int64_t>(kLanes, last - first)), row);
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
  const auto lanes = p.grad_out != nullptr ? MK_LANES_PICK(simulate_lanes<true>) : MK_LANES_PICK(simulate_lanes<false>);
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
  p.dtype == DType::kFloat64 ? step_f64(p) : step_f32(p);
}

void mafbm_step_backward_cpu(const MafbmStepBackwardParams& p) {
  if (p.dtype == DType::kFloat64) {
    step_backward_f64(p);
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

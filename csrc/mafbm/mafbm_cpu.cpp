// CPU kernels of the MA-fBM step (forward, backward) and the simulator: threads split the paths.
#include <ATen/Parallel.h>

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

template <typename T>
void simulate(const MafbmSimulateParams& p) {
  mafbm_sim_dispatch(p.K, p.R, [&]<int kK, int kR>() {
    MafbmSimCoeffs<T, kK, kR> c;
    mafbm_sim_coeffs<T, kK, kR>(p, &c);
    at::parallel_for(0, p.paths, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) mafbm_simulate_path<T, kK, kR>(p, c, i);
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
  p.dtype == DType::kFloat64 ? simulate<double>(p) : simulate<float>(p);
}

}  // namespace markovkit

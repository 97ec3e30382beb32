// CUDA kernels of the MA-fBM step (forward, backward) and the simulator: one thread per path, the same
// per-path code and Philox counters as the CPU kernels.
#include "mafbm/mafbm_step.h"

namespace markovkit {
namespace {

constexpr int kThreads = static_cast<int>(kMafbmOmegaRowPaths);  // a block's paths fill one gω row

unsigned grid_for(int64_t paths) {
  return static_cast<unsigned>((paths + kThreads - 1) / kThreads);
}

template <typename T>
__global__ void step_kernel(MafbmStepParams p) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < p.paths) mafbm_step_path<T>(p, i);
}

// Each thread adds its path's terms of gω; the block sums them (warps by shuffles, then the warps' sums in warp
// order) into its row of p.grad_omega_rows.
template <typename T>
__global__ void step_backward_kernel(MafbmStepBackwardParams p) {
  constexpr int kWarps = kThreads / 32;
  __shared__ T warp_sums[kWarps][kMafbmMaxK];
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  T g_omega[kMafbmMaxK];
  for (int k = 0; k < p.K; ++k) g_omega[k] = T(0);
  if (i < p.paths) mafbm_step_backward_path<T>(p, i, g_omega);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int k = 0; k < p.K; ++k) {
    T v = g_omega[k];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x < p.K) {
    T v = T(0);
    for (int w = 0; w < kWarps; ++w) v += warp_sums[w][threadIdx.x];
    static_cast<T*>(p.grad_omega_rows)[blockIdx.x * static_cast<int64_t>(p.K) + threadIdx.x] = v;
  }
}

// gω = the sum of the rows of p.grad_omega_rows: warp k adds column k (lane l the rows l, l + 32, ..., then the
// lanes by shuffles), a fixed order. Launched with 32 K threads.
template <typename T>
__global__ void omega_rows_sum_kernel(MafbmStepBackwardParams p) {
  const int k = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* column = static_cast<const T*>(p.grad_omega_rows) + k;
  T v = T(0);
  for (int64_t r = lane; r < mafbm_omega_rows(p.paths); r += 32) v += column[r * p.K];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (lane == 0) static_cast<T*>(p.grad_omega)[k] = v;
}

// The coefficients come as a kernel argument (constant bank, computed once on the host); every thread steps
// its own path. Arguments over 4 KB need CUDA 12.1 on Volta or newer (limit 32764 bytes).
static_assert(sizeof(MafbmSimulateParams) + sizeof(MafbmSimCoeffs<double, kMafbmMaxK, 0>) <= 32764,
              "simulate_kernel's arguments exceed the kernel parameter limit");
template <typename T, int kK, int kR, bool kGrad>
__global__ void simulate_kernel(const MafbmSimulateParams p, const MafbmSimCoeffs<T, kK, kR> c) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < p.paths) mafbm_simulate_path<T, kK, kR, kGrad>(p, c, i);
}

template <typename T>
void simulate(const MafbmSimulateParams& p, cudaStream_t stream) {
  mafbm_sim_dispatch(p.K, p.R, [&]<int kK, int kR>() {
    const MafbmSimCoeffs<T, kK, kR> c = mafbm_sim_coeffs<T, kK, kR>(p);
    if (p.grad_out != nullptr) {
      simulate_kernel<T, kK, kR, true><<<grid_for(p.paths), kThreads, 0, stream>>>(p, c);
    } else {
      simulate_kernel<T, kK, kR, false><<<grid_for(p.paths), kThreads, 0, stream>>>(p, c);
    }
  });
}

}  // namespace

void mafbm_step_cuda(const MafbmStepParams& p, cudaStream_t stream) {
  if (p.paths == 0) return;
  if (p.dtype == DType::kFloat64) {
    step_kernel<double><<<grid_for(p.paths), kThreads, 0, stream>>>(p);
  } else {
    step_kernel<float><<<grid_for(p.paths), kThreads, 0, stream>>>(p);
  }
}

// The backward kernel (its gω rows), then their sum (zeros without paths).
template <typename T>
void step_backward(const MafbmStepBackwardParams& p, cudaStream_t stream) {
  if (p.paths > 0) step_backward_kernel<T><<<grid_for(p.paths), kThreads, 0, stream>>>(p);
  omega_rows_sum_kernel<T><<<1, 32 * p.K, 0, stream>>>(p);
}

void mafbm_step_backward_cuda(const MafbmStepBackwardParams& p, cudaStream_t stream) {
  p.dtype == DType::kFloat64 ? step_backward<double>(p, stream) : step_backward<float>(p, stream);
}

void mafbm_simulate_cuda(const MafbmSimulateParams& p, cudaStream_t stream) {
  if (p.paths == 0) return;
  p.dtype == DType::kFloat64 ? simulate<double>(p, stream) : simulate<float>(p, stream);
}

}  // namespace markovkit

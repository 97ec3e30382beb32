// CUDA kernels of the selective scan besides the forward (scan_fwd_kernel.cu) and the backward
// (scan_bwd_kernel.cu): the decode step (one thread per channel, scan_step.h) and the fixed-order reduction of the
// backward's partial sums.
#include "scan/scan_device.cuh"
#include "scan/scan_step.h"

namespace markovkit {
namespace {
using namespace scan_cuda;

// Conversions and exp of the decode step (scan_step.h) on the device.
template <typename in_t, typename acc_t>
struct CudaStepOps {
  __device__ __forceinline__ static acc_t load(in_t v) { return to_acc(v); }
  __device__ __forceinline__ static in_t store(acc_t v) { return store_cast<in_t>(v); }
  __device__ __forceinline__ static acc_t exp(acc_t v) { return mk_exp(v); }
};

template <typename in_t, typename acc_t>
__global__ void scan_step_kernel(ScanStepParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.dim) return;
  scan_step_channel<in_t, acc_t, CudaStepOps<in_t, acc_t>>(p, i);
}

template <typename acc_t, typename out_t>
__global__ void scan_reduce_kernel(ScanReduceParams p) {
  const int64_t total = p.outer * p.inner;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const acc_t* part = static_cast<const acc_t*>(p.part);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t o = i / p.inner, j = i % p.inner;
    acc_t s = 0;
    for (int64_t k = 0; k < p.K; ++k) s += part[(o * p.K + k) * p.inner + j];
    static_cast<out_t*>(p.out)[i] = store_cast<out_t>(s);
  }
}

unsigned grid_of(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

}  // namespace

void scan_step_cuda(const ScanStepParams& p, cudaStream_t stream) {
  if (p.batch * p.dim == 0) return;
  dispatch_itype(p.itype, [&]<typename in_t, typename acc_t>() {
    scan_step_kernel<in_t, acc_t><<<grid_of(p.batch * p.dim, 128), 128, 0, stream>>>(p);
  });
}

void scan_reduce_cuda(const ScanReduceParams& p, cudaStream_t stream) {
  const int64_t total = p.outer * p.inner;
  if (total == 0) return;
  const int64_t blocks = (total + 255) / 256;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 * 16 ? blocks : 65536 * 16);
  if (p.acc_type == DType::kFloat64) {
    scan_reduce_kernel<double, double><<<grid, 256, 0, stream>>>(p);
    return;
  }
  dispatch_itype(p.out_type, [&]<typename out_t, typename acc_t>() {
    scan_reduce_kernel<float, out_t><<<grid, 256, 0, stream>>>(p);
  });
}

}  // namespace markovkit

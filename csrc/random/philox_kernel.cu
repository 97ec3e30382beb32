// CUDA kernel of the Philox fill: one thread per stream block, grid-stride.
#include "random/philox_fill.h"

namespace markovkit {
namespace {

template <typename T, bool kNormal>
__global__ void philox_fill_kernel(PhiloxFillParams p, uint64_t first, uint64_t n_blocks) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t b = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; b < n_blocks; b += stride) {
    philox_fill_block<T, kNormal>(p, first + b);
  }
}

template <typename T, bool kNormal>
void launch(const PhiloxFillParams& p, cudaStream_t stream) {
  constexpr uint64_t kPer = PhiloxPerBlock<T>::value;
  constexpr int kThreads = 256;
  const uint64_t first = p.offset / kPer;
  const uint64_t n_blocks = (p.offset + p.numel + kPer - 1) / kPer - first;
  const uint64_t grid = (n_blocks + kThreads - 1) / kThreads;
  const unsigned grid_x = static_cast<unsigned>(grid < 65536u * 16u ? grid : 65536u * 16u);
  philox_fill_kernel<T, kNormal><<<grid_x, kThreads, 0, stream>>>(p, first, n_blocks);
}

}  // namespace

void philox_fill_cuda(const PhiloxFillParams& p, cudaStream_t stream) {
  if (p.numel == 0) return;
  if (p.dtype == DType::kFloat64) {
    p.normal ? launch<double, true>(p, stream) : launch<double, false>(p, stream);
  } else {
    p.normal ? launch<float, true>(p, stream) : launch<float, false>(p, stream);
  }
}

}  // namespace markovkit

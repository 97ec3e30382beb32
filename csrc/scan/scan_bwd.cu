// The selective scan's backward on CUDA: the kernels of the input type (scan_bwd_kernel.cuh, compiled per type in
// scan_bwd_<type>.cu).
#include "scan/scan_device.cuh"

namespace markovkit {

int64_t scan_bwd_cuda_blk(int64_t dstate, bool float64) {
  int64_t width = 4;
  while (width < dstate) width *= 2;
  return scan_cuda::bwd_blk(width, float64);
}

void scan_bwd_cuda(const ScanBwdParams& q, cudaStream_t stream) {
  if (q.f.batch * q.f.dim == 0) return;
  scan_cuda::dispatch_itype(q.f.itype,
                           [&]<typename in_t, typename acc_t>() { scan_bwd_cuda_as<in_t, acc_t>(q, stream); });
}

}  // namespace markovkit

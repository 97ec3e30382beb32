// The selective scan's backward on CUDA: the staged plan where it takes q (scan_bwd_staged_kernel.cu), else the
// team plans of the input type (scan_bwd_kernel.cuh, compiled per type in scan_bwd_<type>.cu).
#include "scan/scan_device.cuh"

namespace markovkit {

int64_t scan_bwd_cuda_blk(const ScanBwdParams& q) {
  const int64_t staged = scan_bwd_staged_blk(q);
  if (staged > 0) return staged;
  int64_t width = 4;
  while (width < q.f.dstate) width *= 2;
  return scan_cuda::bwd_blk(width, q.f.itype == DType::kFloat64);
}

void scan_bwd_cuda(const ScanBwdParams& q, cudaStream_t stream) {
  if (q.f.batch * q.f.dim == 0 || scan_bwd_staged_cuda(q, stream)) return;
  scan_cuda::dispatch_itype(q.f.itype,
                           [&]<typename in_t, typename acc_t>() { scan_bwd_cuda_as<in_t, acc_t>(q, stream); });
}

}  // namespace markovkit

// The selective scan's backward on CUDA: the staged plan where it takes q (scan_bwd_staged_kernel.cu), else the
// team plans of the input type (scan_bwd_kernel.cuh, compiled per type in scan_bwd_<type>.cu).
#include "scan/scan_device.cuh"

namespace markovkit {

ScanBwdLaunch scan_bwd_cuda_launch(const ScanBwdParams& q) {
  const ScanBwdLaunch staged = scan_bwd_staged_launch(q);
  if (staged.blk > 0) return staged;
  int64_t width = 4;
  while (width < q.f.dstate) width *= 2;
  ScanBwdParams team = q;
  team.blk = scan_cuda::bwd_blk(width, q.f.itype == DType::kFloat64);
  team.nblk = (q.f.dim / q.f.groups + team.blk - 1) / team.blk;
  ScanBwdLaunch launch{0, 0};
  scan_cuda::dispatch_itype(q.f.itype, [&]<typename in_t, typename acc_t>() {
    launch = scan_bwd_cuda_team_as<in_t, acc_t>(team);
  });
  return launch;
}

void scan_bwd_cuda(const ScanBwdParams& q, cudaStream_t stream) {
  if (q.f.cu_seqlens) scan_check_cu_seqlens_cuda(q.f, stream);
  if (q.f.batch * q.f.dim == 0 || scan_bwd_staged_cuda(q, stream)) return;
  scan_cuda::dispatch_itype(q.f.itype,
                           [&]<typename in_t, typename acc_t>() { scan_bwd_cuda_as<in_t, acc_t>(q, stream); });
}

}  // namespace markovkit

// The selective scan's backward kernels for float32 inputs (scan_bwd_kernel.cuh).
#include "scan/scan_bwd_kernel.cuh"

namespace markovkit {
template void scan_bwd_cuda_as<float, float>(const ScanBwdParams& q, cudaStream_t stream);
template ScanBwdLaunch scan_bwd_cuda_team_as<float, float>(const ScanBwdParams& q);
}  // namespace markovkit

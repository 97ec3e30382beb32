// The device-side check of cu_seqlens: the forward and backward on CUDA run it first on their stream (the host
// cannot read the offsets without a sync), so offsets the scan kernels would index out of bounds with fail as a
// device-side assert that names the bad entry, before those kernels run.
#include "common/device_check.cuh"
#include "scan/scan_device.cuh"

namespace markovkit {
namespace {

// cu: (nseq + 1,) offsets, expected 0 = cu[0] <= cu[1] <= ... <= cu[nseq] = seqlen (the CPU glue's messages).
__global__ void scan_check_cu_seqlens_kernel(const int32_t* cu, int64_t nseq, int64_t seqlen) {
  for (int64_t i = threadIdx.x; i <= nseq; i += blockDim.x) {
    if (i == 0) {
      MK_DEVICE_CHECK(cu[0] == 0 && cu[nseq] == seqlen,
                      "cu_seqlens: expected to start at 0 and end at seqlen = %lld, got %d and %d",
                      static_cast<long long>(seqlen), cu[0], cu[nseq]);
    } else {
      MK_DEVICE_CHECK(cu[i] >= cu[i - 1], "cu_seqlens: expected non-decreasing offsets, got %d then %d at index %lld",
                      cu[i - 1], cu[i], static_cast<long long>(i));
    }
  }
}

}  // namespace

void scan_check_cu_seqlens_cuda(const ScanParams& p, cudaStream_t stream) {
  scan_check_cu_seqlens_kernel<<<1, 256, 0, stream>>>(p.cu_seqlens, p.nseq, p.seqlen);
}

}  // namespace markovkit

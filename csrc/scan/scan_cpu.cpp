// CPU kernels of the selective scan: threads over (batch x dim) channels, sequential over time, inner loop
// over dstate in vectors (scan_cpu_isa.h, compiled for the baseline here and for AVX2 + FMA in
// scan_cpu_avx2.cpp). The backward recomputes one chunk of states from its checkpoint, then runs the
// reverse recurrence over the chunk (see scan_params.h). The decode step and the partial-sum reduction are
// here.
#include <ATen/Parallel.h>
#include <bit>
#include <cmath>
#include <cstdint>
#include <memory>

#include "common/cpu_isa.h"
#include "scan/scan_cpu_entry.h"
#include "scan/scan_half.h"
#include "scan/scan_params.h"
#include "scan/scan_step.h"

#define SCAN_CPU_ISA base
#define SCAN_CPU_VEC_BYTES 16
#define SCAN_CPU_KERNELS scan_cpu_kernels_base
#include "scan/scan_cpu_isa.h"

namespace markovkit {
namespace {

// exp without library calls and with integer-only selects, so that the decode step's dstate loop vectorizes
// (floating compares would not be if-converted under the default -ftrapping-math): |x| saturated at 100 on its bit
// pattern, x = k ln2 + r (Cody-Waite), e^r by the Cephes expf polynomial, 2^k from exponent bits with k
// clamped to [-127, 128] (2^-127 -> 0, 2^128 -> inf). Relative error a few ulp; results below 2^-126 flush
// to 0 and above 2^127 overflow to inf; NaN gives NaN (as the scan's exp does).
inline float cpu_exp(float x) {
  const int32_t bits = std::bit_cast<int32_t>(x);
  int32_t mag = bits & 0x7fffffff;
  const int32_t nan = mag > 0x7f800000 ? 0x7fc00000 : 0;
  mag = mag < 0x42c80000 ? mag : 0x42c80000;  // 100.0f
  x = std::bit_cast<float>((bits & static_cast<int32_t>(0x80000000u)) | mag);
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int32_t ki = static_cast<int32_t>(k);  // |k| <= 145
  ki = ki < -127 ? -127 : (ki > 128 ? 128 : ki);
  return std::bit_cast<float>(std::bit_cast<int32_t>(p * std::bit_cast<float>((ki + 127) << 23)) | nan);
}
inline double cpu_exp(double x) { return std::exp(x); }

// The AVX2 + FMA copy of the scan loops where cpu_isa() allows it (AVX-512 CPUs too), else the baseline copy.
ScanCpuKernels pick(DType itype) {
  return cpu_isa() == CpuIsa::kBaseline ? scan_cpu_kernels_base(itype) : scan_cpu_kernels_avx2(itype);
}

int64_t weight_size(DType itype) { return itype == DType::kFloat64 ? 8 : 4; }

// A thread's scratch, not zeroed: the loops write everything they read, and the parts they do not use (the per-step
// B / C rows where B and C are constant: 2-4 x seqlen x dstate weights) then cost no memory (zeroing made them
// resident: 2.5 GB at seqlen 2^24).
std::unique_ptr<double[]> scratch(int64_t bytes) { return std::unique_ptr<double[]>(new double[(bytes + 7) / 8]); }

void fwd(const ScanParams& p) {
  const ScanFwdRange run = pick(p.itype).fwd;
  const int64_t bytes = scan_cpu_fwd_work_bytes(p.seqlen, p.dstate, weight_size(p.itype));
  at::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
    const auto work = scratch(bytes);
    run(p, begin, end, work.get());
  });
}

void bwd(const ScanBwdParams& q) {
  const ScanParams& p = q.f;
  const ScanBwdRange run = pick(p.itype).bwd;
  const int64_t bytes = scan_cpu_bwd_work_bytes(p.seqlen, p.dstate, weight_size(p.itype));
  at::parallel_for(0, p.batch * p.groups * q.nblk, 1, [&](int64_t begin, int64_t end) {
    const auto work = scratch(bytes);
    run(q, begin, end, work.get());
  });
}

// Conversions and exp of the decode step (scan_step.h) on the CPU.
template <typename in_t, typename acc_t>
struct CpuStepOps {
  static acc_t load(in_t v) { return static_cast<acc_t>(v); }
  static in_t store(acc_t v) { return static_cast<in_t>(v); }
  static acc_t exp(acc_t v) { return cpu_exp(v); }
};

template <typename in_t, typename acc_t>
void step_op(const ScanStepParams& p) {
  at::parallel_for(0, p.batch * p.dim, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scan_step_channel<in_t, acc_t, CpuStepOps<in_t, acc_t>>(p, i, scan_step_row(p, i / p.dim));
    }
  });
}

template <typename acc_t, typename out_t>
void reduce(const ScanReduceParams& p) {
  const acc_t* part = static_cast<const acc_t*>(p.part);
  out_t* out = static_cast<out_t*>(p.out);
  at::parallel_for(0, p.outer * p.inner, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t o = i / p.inner, j = i % p.inner;
      acc_t s = 0;
      for (int64_t k = 0; k < p.K; ++k) s += part[(o * p.K + k) * p.inner + j];
      out[i] = static_cast<out_t>(s);
    }
  });
}

// Calls f.template operator()<in_t, acc_t>() for the activation type.
template <typename F>
void dispatch_itype(DType itype, F&& f) {
  switch (itype) {
    case DType::kFloat64: f.template operator()<double, double>(); break;
    case DType::kFloat32: f.template operator()<float, float>(); break;
    case DType::kFloat16: f.template operator()<ScanHalf, float>(); break;
    case DType::kBFloat16: f.template operator()<ScanBFloat16, float>(); break;
  }
}

}  // namespace

void scan_fwd_cpu(const ScanParams& p) {
  fwd(p);
}

void scan_bwd_cpu(const ScanBwdParams& p) {
  bwd(p);
}

void scan_step_cpu(const ScanStepParams& p) {
  dispatch_itype(p.itype, [&]<typename in_t, typename acc_t>() { step_op<in_t, acc_t>(p); });
}

void scan_reduce_cpu(const ScanReduceParams& p) {
  if (p.acc_type == DType::kFloat64) {
    reduce<double, double>(p);
    return;
  }
  dispatch_itype(p.out_type, [&]<typename out_t, typename acc_t>() { reduce<float, out_t>(p); });
}

}  // namespace markovkit

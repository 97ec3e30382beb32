#pragma once
// Device helpers shared by the selective scan's CUDA kernels (scan_kernel.cu: forward, decode step, reductions;
// scan_bwd_kernel.cuh: backward): conversions, team sums, one channel's weights as seen by one lane, the backward's
// block staging, and the dtype / lane-plan dispatch of the launchers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "scan/scan_params.h"

namespace markovkit {
namespace scan_cuda {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

__device__ __forceinline__ float exp2_of(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_of(double x) { return exp2(x); }

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename out_t, typename acc_t>
__device__ __forceinline__ out_t store_cast(acc_t x) {
  if constexpr (std::is_same_v<out_t, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<out_t, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<out_t>(x);
  }
}

// Sum over the kLanes lanes of a team (every lane gets the sum).
template <int kLanes, typename T>
__device__ __forceinline__ T team_sum(T v) {
MK_UNROLL
  for (int off = kLanes / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off, kLanes);
  return v;
}

// The weights of one channel as seen by one lane of its team (states n = lane + k·kLanes, zeros past dstate).
template <typename acc_t, int kLanes, int kS>
struct Team {
  int64_t N;
  int lane;
  acc_t A2[kS];  // A·log2(e): ā = exp2(Δ·A2)
  acc_t Bc[kS], Cc[kS];  // constant B / C (zeros where per step)
  acc_t Dd;

  __device__ Team(const ScanParams& p, int64_t d, int lane_) : N(p.dstate), lane(lane_) {
MK_UNROLL
    for (int k = 0; k < kS; ++k) {
      const int64_t n = lane + k * kLanes;
      const bool ok = n < N;
      A2[k] = ok ? static_cast<const acc_t*>(p.A)[d * N + n] * acc_t(kLog2e) : acc_t(-1);  // padding: as the CPU's
      Bc[k] = ok && !p.var_B ? static_cast<const acc_t*>(p.B)[d * N + n] : acc_t(0);
      Cc[k] = ok && !p.var_C ? static_cast<const acc_t*>(p.C)[d * N + n] : acc_t(0);
    }
    Dd = p.D ? static_cast<const acc_t*>(p.D)[d] : acc_t(0);
  }
  __device__ bool has(int k) const { return lane + k * kLanes < N; }
  // state row src (N,) or zeros
  __device__ void load(const acc_t* src, acc_t* h) const {
MK_UNROLL
    for (int k = 0; k < kS; ++k) h[k] = src != nullptr && has(k) ? src[lane + k * kLanes] : acc_t(0);
  }
  __device__ void store(const acc_t* h, acc_t* dst) const {
MK_UNROLL
    for (int k = 0; k < kS; ++k) {
      if (has(k)) dst[lane + k * kLanes] = h[k];
    }
  }
};

template <typename acc_t>
__device__ __forceinline__ const acc_t* state_row(const void* base, int64_t s, int64_t d, int64_t dim, int64_t N) {
  return base ? static_cast<const acc_t*>(base) + (s * dim + d) * N : nullptr;
}

// Team sums of the per-step partials v[i] of kG consecutive steps (i < kG, both powers of two): lane l ends with
// the sum of step i = l + m·kLanes in v[m·kLanes] (m < kG / kLanes) when kG > kLanes, else of step i = l % kG in
// v[0]. Reduce-scatter: at each offset o < min(kG, kLanes) a lane keeps the steps whose bit o matches its own,
// adds the partner's (lane ^ o) partials of them and hands over the others (kG / 2o shuffles); offsets kG and up
// sum the one remaining value. kG - 1 + log2(kLanes / kG) shuffles per kG steps (kG <= kLanes), not
// kG·log2(kLanes).
template <int kLanes, int kG, typename T>
__device__ __forceinline__ void team_sum_steps(T (&v)[kG], int lane) {
MK_UNROLL
  for (int o = 1; o < kG && o < kLanes; o *= 2) {
    const bool upper = (lane & o) != 0;
MK_UNROLL
    for (int i = 0; i < kG; i += 2 * o) {
      const T keep = upper ? v[i + o] : v[i], give = upper ? v[i] : v[i + o];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, give, o, kLanes);
    }
  }
MK_UNROLL
  for (int o = kG; o < kLanes; o *= 2) v[0] += __shfl_xor_sync(0xffffffffu, v[0], o, kLanes);
}

// Block staging of the backward (every thread of a block of kThreads calls it): the per-step B / C
// rows of steps [t0, t0 + len) of group g of batch row b into sB / sC where per step, kW rows of kRow weights and
// kSpan steps; zeros past len and in the rows past dstate.
template <typename in_t, typename acc_t, int kW, int kSpan, int kRow, int kThreads>
__device__ void stage_bc_rows(const ScanParams& p, int64_t b, int64_t g, int64_t t0, int len, acc_t* sB, acc_t* sC) {
  const int64_t N = p.dstate, L = p.seqlen, off = (b * p.groups + g) * N * L + t0;
  for (int e = threadIdx.x; e < kW * kSpan; e += kThreads) {
    const int n = e / kSpan, i = e % kSpan;
    const bool in = n < N && i < len;
    if (p.var_B) sB[n * kRow + i] = in ? to_acc(static_cast<const in_t*>(p.B)[off + n * L + i]) : acc_t(0);
    if (p.var_C) sC[n * kRow + i] = in ? to_acc(static_cast<const in_t*>(p.C)[off + n * L + i]) : acc_t(0);
  }
}

// Channel r of a block whose channels start at d0 inside a group: past the group's end, the group's last channel
// stands in (its team runs along and writes nothing).
__device__ __forceinline__ int64_t block_channel(const ScanParams& p, int64_t d0, int r) {
  const int64_t dpg = p.dim / p.groups;
  return d0 % dpg + r < dpg ? d0 + r : d0 + (dpg - 1 - d0 % dpg);
}

// delta + delta_bias of channel d at element `at` of the (batch, dim, seqlen) activations (before softplus).
template <typename in_t, typename acc_t>
__device__ __forceinline__ acc_t pre_delta_at(const ScanParams& p, int64_t d, int64_t at) {
  const acc_t bias = p.delta_bias ? static_cast<const acc_t*>(p.delta_bias)[d] : acc_t(0);
  return to_acc(static_cast<const in_t*>(p.delta)[at]) + bias;
}

// Δ there: softplus'd if asked.
template <typename in_t, typename acc_t>
__device__ __forceinline__ acc_t delta_at(const ScanParams& p, int64_t d, int64_t at) {
  const acc_t x = pre_delta_at<in_t, acc_t>(p, d, at);
  return p.softplus ? softplus_thr(x) : x;
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Whether the rows of per-step B and C start 16-byte aligned (base pointers and row length), as the forward's
// loads of several steps need.
inline bool rows_aligned(const ScanParams& p, int64_t elem_bytes) {
  return p.seqlen * elem_bytes % 16 == 0 && aligned16(p.B) && aligned16(p.C);
}

template <typename F>
void dispatch_itype(DType itype, F&& f) {
  switch (itype) {
    case DType::kFloat64: f.template operator()<double, double>(); break;
    case DType::kFloat32: f.template operator()<float, float>(); break;
    case DType::kFloat16: f.template operator()<__half, float>(); break;
    case DType::kBFloat16: f.template operator()<__nv_bfloat16, float>(); break;
  }
}

// Lane plan of both passes: calls f.template operator()<kLanes, kS>() with 4 states per lane (8 above 128 states),
// kLanes·kS = the power of two >= dstate (at least 4), so the per-step work shared by a channel's lanes (the
// team sum, the broadcasts, the loop) is spread over few lanes.
template <typename F>
void dispatch_lanes(int64_t dstate, F&& f) {
  if (dstate <= 4) {
    f.template operator()<1, 4>();
  } else if (dstate <= 8) {
    f.template operator()<2, 4>();
  } else if (dstate <= 16) {
    f.template operator()<4, 4>();
  } else if (dstate <= 32) {
    f.template operator()<8, 4>();
  } else if (dstate <= 64) {
    f.template operator()<16, 4>();
  } else if (dstate <= 128) {
    f.template operator()<32, 4>();
  } else {
    f.template operator()<32, 8>();
  }
}

// float64 runs at most 128 states on CUDA (the glue refuses more): no float64 instances with 8 states per lane.
template <typename acc_t, int kS>
constexpr bool kFitsCuda = !(std::is_same_v<acc_t, double> && kS == 8);

// Backward: channels per block for width = kLanes·kS states per team: 32 up to 16 states, 16 up to 64, 512 / width
// above; halved in float64. Shared memory (BwdPlan, scan_bwd_kernel.cuh) then allows 3 blocks of 128 threads per SM
// at 16 and 32 states in float32 (71 and 67 KB), one of 256 at 64 (122 KB). More channels per block keep the
// per-step dB / dC partials (batch, groups, dim / groups / blk, dstate, seqlen) small.
constexpr int64_t bwd_blk(int64_t width, bool float64) {
  const int64_t r = width <= 16 ? 32 : width <= 64 ? 16 : 512 / width;
  return float64 ? r / 2 : r;
}

}  // namespace scan_cuda

// Checks p.cu_seqlens on the device (scan_check_kernel.cu): bad offsets fail as a device-side assert.
void scan_check_cu_seqlens_cuda(const ScanParams& p, cudaStream_t stream);

// The forward's staged plan (scan_fwd_staged_kernel.cu) where it takes p; false (nothing launched) where not.
bool scan_fwd_staged_cuda(const ScanParams& p, cudaStream_t stream);

// The backward's staged plan (scan_bwd_staged_kernel.cu) where it takes q; false (nothing launched) where not. Its
// launch (channels per block: the partials' blk; shared memory) where it takes q, else {0, 0}.
bool scan_bwd_staged_cuda(const ScanBwdParams& q, cudaStream_t stream);
ScanBwdLaunch scan_bwd_staged_launch(const ScanBwdParams& q);

// The backward's team plans for one input type (scan_bwd_kernel.cuh, instantiated by scan_bwd_<type>.cu): the
// launch, and its channels per block and dynamic shared memory per block in bytes (q.nblk for bwd_blk's channels).
template <typename in_t, typename acc_t>
void scan_bwd_cuda_as(const ScanBwdParams& q, cudaStream_t stream);
template <typename in_t, typename acc_t>
ScanBwdLaunch scan_bwd_cuda_team_as(const ScanBwdParams& q);

}  // namespace markovkit

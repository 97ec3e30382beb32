// CUDA kernels of the selective scan, mirroring scan_cpu.cpp. A "team" of kLanes threads (a power-of-two
// slice of one warp, or one thread) owns one (b, d) channel: lane l keeps the states n = l + k·kLanes, k < kS, in
// registers, the team walks time sequentially like the CPU kernel and sums over n with warp shuffles.
// Parallelism is batch·dim·kLanes threads. 1-D grids (dim may exceed 65535), 64-bit offsets throughout.
//
// Forward: teams of N/4 lanes with 4 states each (dispatch_lanes), walking time in tiles of max(kLanes, kV)
// steps: lane l prepares steps t0 + l + m·kLanes of the tile (loads Δ and u, softplus, later the gate and the
// store of out), the team broadcasts Δ_t, u_t of each step from that lane, so the per-step scalar work runs once
// per step, not once per lane. Where B and C are per step with 16-byte aligned rows each lane loads kV steps of
// its B/C rows at once (8 or 16 bytes), runs them unrolled and sums the team's kV partials of y in one
// reduce-scatter (team_sum_steps); elsewhere kV = 1. The backward is in scan_bwd_kernel.cu.
#include <cstring>

#include "scan/scan_device.cuh"
#include "scan/scan_step.h"

namespace markovkit {
namespace {
using namespace scan_cuda;

constexpr int kFwdThreads = 128;

// A channel as the forward's team reads it: its weights (Team) and its rows of the activations and of the per-step
// B / C.
template <typename in_t, typename acc_t, int kLanes, int kS>
struct FwdChannel : Team<acc_t, kLanes, kS> {
  int64_t L;
  bool var_B, var_C;
  const in_t *u, *delta, *z, *Bv, *Cv;
  acc_t bias;

  __device__ FwdChannel(const ScanParams& p, int64_t b, int64_t d, int lane_)
      : Team<acc_t, kLanes, kS>(p, d, lane_), L(p.seqlen), var_B(p.var_B), var_C(p.var_C) {
    const int64_t row = (b * p.dim + d) * L;
    const int64_t g = d / (p.dim / p.groups);
    u = static_cast<const in_t*>(p.u) + row;
    delta = static_cast<const in_t*>(p.delta) + row;
    z = p.z ? static_cast<const in_t*>(p.z) + row : nullptr;
    Bv = static_cast<const in_t*>(p.B) + (var_B ? (b * p.groups + g) * this->N * L : 0);
    Cv = static_cast<const in_t*>(p.C) + (var_C ? (b * p.groups + g) * this->N * L : 0);
    bias = p.delta_bias ? static_cast<const acc_t*>(p.delta_bias)[d] : acc_t(0);
  }
  __device__ acc_t pre_delta(int64_t t) const { return to_acc(delta[t]) + bias; }
};
// Forward: steps per load of a lane's per-step B/C rows where they are 16-byte aligned (8 or 16 bytes: 32
// registers of B and C per lane in all).
template <typename in_t, int kS>
constexpr int kFwdVec = 64 / (kS * static_cast<int>(sizeof(in_t)));

// Forward blocks per SM that the registers must allow (ptxas places these without spills): 7 (72 registers)
// loading one step, 5 (96) loading several with float accumulators and 4 states per lane, else 4 (128).
template <typename acc_t, int kS, int kV>
constexpr int kFwdBlocks = sizeof(acc_t) == 8 || kS == 8 ? 4 : kV == 1 ? 7 : 5;

// kV consecutive steps of one row of per-step B or C (kV·sizeof(in_t) bytes, aligned to that), or zeros.
template <typename in_t, int kV>
struct RowSteps {
  static constexpr int kBytes = kV * sizeof(in_t);
  using Raw = std::conditional_t<kBytes == 16, uint4,
                                 std::conditional_t<kBytes == 8, uint2,
                                                    std::conditional_t<kBytes == 4, uint32_t, uint16_t>>>;
  static_assert(sizeof(Raw) == kBytes, "one element, or 4, 8 or 16 bytes");
  in_t v[kV];
  __device__ void load(const in_t* src, bool on) {
    Raw raw{};
    if (on) raw = *reinterpret_cast<const Raw*>(src);
    memcpy(v, &raw, kBytes);  // copied, not cast: reading a Raw through an in_t* breaks strict aliasing
  }
};

// Forward, kV steps per load of a lane's B/C rows: 1, or kFwdVec where B and C are both per step and their rows
// aligned (scan_fwd_cuda). Tiles of kT = max(kLanes, kV) steps start at multiples of kT (a sequence's first and
// last tiles are partial; chunk starts are tile starts); lane l prepares the steps t0 + l + m·kLanes
// (m < kT / kLanes) of a tile. A tile runs in groups of kV steps: per state one load of B and of C, kV unrolled
// steps, one team reduction of the kV per-step partials of y (team_sum_steps).
template <typename in_t, typename acc_t, int kLanes, int kS, int kV>
__global__ void __launch_bounds__(kFwdThreads, kFwdBlocks<acc_t, kS, kV>) scan_fwd_kernel(ScanParams p) {
  constexpr int kTeams = kFwdThreads / kLanes;
  constexpr int kT = kLanes > kV ? kLanes : kV, kM = kT / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int64_t team = static_cast<int64_t>(blockIdx.x) * kTeams + threadIdx.x / kLanes;
  const bool active = team < p.batch * p.dim;  // the tail teams run along (for the shuffles), write nothing
  const int64_t bd = active ? team : p.batch * p.dim - 1;
  const int64_t b = bd / p.dim, d = bd % p.dim, N = p.dstate;
  const FwdChannel<in_t, acc_t, kLanes, kS> ch(p, b, d, lane);
  const SeqBounds sb = seq_bounds(p);
  acc_t* ckpt = static_cast<acc_t*>(p.chunk_states) + bd * p.n_chunks * N;
  in_t* out = static_cast<in_t*>(p.out) + bd * p.seqlen;
  // this lane's per-step B / C rows (state lane + k·kLanes at k·kLanes·L), where per step and the state exists
  const int64_t k_stride = kLanes * ch.L;
  const in_t* Brow = ch.Bv + lane * ch.L;
  const in_t* Crow = ch.Cv + lane * ch.L;
  constexpr bool kVarBC = kV > 1;  // B and C per step (else see ch.var_B, ch.var_C)
  acc_t h[kS];
  for (int64_t s = 0; s < sb.count(); ++s) {
    const int64_t sg = sb.global(s, b), begin = sb.begin(s), end = sb.end(s);
    ch.load(state_row<acc_t>(p.h0, sg, d, p.dim, N), h);
    for (int64_t t0 = begin / kT * kT; t0 < end; t0 += kT) {
      if (active && t0 >= begin && t0 % kScanChunk == 0) ch.store(h, ckpt + t0 / kScanChunk * N);
      acc_t dt_l[kM], u_l[kM], y_l[kM];
MK_UNROLL
      for (int m = 0; m < kM; ++m) {
        const int64_t tl = t0 + lane + m * kLanes;
        dt_l[m] = u_l[m] = y_l[m] = 0;
        if (tl >= begin && tl < end) {
          const acc_t x = ch.pre_delta(tl);
          dt_l[m] = p.softplus ? softplus_thr(x) : x;
          u_l[m] = to_acc(ch.u[tl]);
        }
      }
      for (int g = 0; g < kT; g += kV) {
        const int64_t tg = t0 + g;
        if (tg + kV <= begin || tg >= end) continue;  // no step of the sequence
        RowSteps<in_t, kV> Bs[kS], Cs[kS];
MK_UNROLL
        for (int k = 0; k < kS; ++k) {  // zeros past N
          Bs[k].load(Brow + k * k_stride + tg, (kVarBC || ch.var_B) && ch.has(k));
          Cs[k].load(Crow + k * k_stride + tg, (kVarBC || ch.var_C) && ch.has(k));
        }
        // the kV steps (j = g + i of the tile, prepared by lane j % kLanes in slot j / kLanes); kWhole: all in
        // the sequence, else (a sequence's first or last group) the steps outside it leave h alone and add 0 to y
        acc_t y[kV];
        auto steps = [&]<bool kWhole>() {
MK_UNROLL
          for (int i = 0; i < kV; ++i) {
            const int j = g + i, m = kM == 1 ? 0 : i / kLanes;  // kM > 1: one group per tile, g = 0
            const acc_t dt = __shfl_sync(0xffffffffu, dt_l[m], j % kLanes, kLanes),
                        ut = __shfl_sync(0xffffffffu, u_l[m], j % kLanes, kLanes);
            y[i] = 0;
            if (kWhole || (tg + i >= begin && tg + i < end)) {
MK_UNROLL
              for (int k = 0; k < kS; ++k) {
                const acc_t Bt = kVarBC || ch.var_B ? to_acc(Bs[k].v[i]) : ch.Bc[k];
                const acc_t Ct = kVarBC || ch.var_C ? to_acc(Cs[k].v[i]) : ch.Cc[k];
                h[k] = exp2_of(dt * ch.A2[k]) * h[k] + dt * ut * Bt;
                y[i] += Ct * h[k];
              }
            }
          }
        };
        if (tg >= begin && tg + kV <= end) {
          steps.template operator()<true>();
        } else {
          steps.template operator()<false>();
        }
        team_sum_steps<kLanes, kV>(y, lane);
        if constexpr (kM == 1) {
          if (lane / kV == g % kLanes / kV) y_l[0] = y[0];  // this lane's step is in the group
        } else {
MK_UNROLL
          for (int m = 0; m < kM; ++m) y_l[m] = y[m * kLanes];
        }
      }
      if (active) {
MK_UNROLL
        for (int m = 0; m < kM; ++m) {
          const int64_t tl = t0 + lane + m * kLanes;
          if (tl < begin || tl >= end) continue;
          acc_t yo = y_l[m] + ch.Dd * u_l[m];
          if (ch.z) {
            const acc_t zt = to_acc(ch.z[tl]);
            yo *= zt * sigmoid(zt);
          }
          out[tl] = store_cast<in_t>(yo);
        }
      }
    }
    if (active) ch.store(h, static_cast<acc_t*>(p.last_state) + (sg * p.dim + d) * N);
  }
}

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

// Whether the rows of per-step B and C start 16-byte aligned (base pointers and row length), as the forward's
// loads of several steps need.
bool rows_aligned(const ScanParams& p, int64_t elem_bytes) {
  auto ok = [](const void* base) { return reinterpret_cast<uintptr_t>(base) % 16 == 0; };
  return p.seqlen * elem_bytes % 16 == 0 && ok(p.B) && ok(p.C);
}

}  // namespace

void scan_fwd_cuda(const ScanParams& p, cudaStream_t stream) {
  if (p.batch * p.dim == 0) return;
  dispatch_itype(p.itype, [&]<typename in_t, typename acc_t>() {
    dispatch_lanes(p.dstate, [&]<int kLanes, int kS>() {
      if constexpr (kFitsCuda<acc_t, kS>) {
        const unsigned grid = grid_of(p.batch * p.dim, kFwdThreads / kLanes);
        if (p.var_B && p.var_C && rows_aligned(p, sizeof(in_t))) {
          scan_fwd_kernel<in_t, acc_t, kLanes, kS, kFwdVec<in_t, kS>><<<grid, kFwdThreads, 0, stream>>>(p);
        } else {
          scan_fwd_kernel<in_t, acc_t, kLanes, kS, 1><<<grid, kFwdThreads, 0, stream>>>(p);
        }
      }
    });
  });
}

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

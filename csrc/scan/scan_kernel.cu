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
// reduce-scatter (team_sum_steps); elsewhere kV = 1. Where the channels are many (more than one round of resident
// blocks) a team runs two neighbouring channels of one group: each B/C load and conversion then serves both, and
// the grid is half as long; where they are few (under half a round) a team has twice the lanes with 2 states each:
// twice the warps. Where a block of channels shares its per-step B / C and the channels fill the device, the staged
// plan of scan_fwd_staged_kernel.cu runs instead (threads of 16 or 4 states, no shuffles). The backward is in
// scan_bwd_kernel.cuh (team plans) and scan_bwd_staged_kernel.cu (where the forward's staged plan would run).
#include <cstring>
#include <utility>

#include "common/device_check.cuh"
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
};

// The kC channels d0 + c (c < kC) of a team, all of one group of one batch row: one per-step B / C.
template <typename in_t, typename acc_t, int kLanes, int kS, int kC>
struct FwdChannels {
  using Channel = FwdChannel<in_t, acc_t, kLanes, kS>;
  Channel c[kC];
};

template <typename in_t, typename acc_t, int kLanes, int kS, int kC, size_t... I>
__device__ FwdChannels<in_t, acc_t, kLanes, kS, kC> fwd_channels(const ScanParams& p, int64_t b, int64_t d0,
                                                                 int lane, std::index_sequence<I...>) {
  return {{FwdChannel<in_t, acc_t, kLanes, kS>(p, b, d0 + static_cast<int64_t>(I), lane)...}};
}

// The activations a lane prepares in a tile (Δ before its bias, u, z at its steps t0 + lane + m·kLanes of each
// channel; zeros outside the sequence), loaded a tile ahead of their use.
template <typename in_t, int kLanes, int kC, int kM>
struct TileActs {
  in_t delta[kC][kM], u[kC][kM], z[kC][kM];
  template <typename Channels>
  __device__ void load(const Channels& chs, int64_t t0, int lane, int64_t begin, int64_t end) {
MK_UNROLL
    for (int c = 0; c < kC; ++c) {
MK_UNROLL
      for (int m = 0; m < kM; ++m) {
        const int64_t tl = t0 + lane + m * kLanes;
        const bool in = tl >= begin && tl < end;
        delta[c][m] = in ? chs.c[c].delta[tl] : in_t(0.0f);
        u[c][m] = in ? chs.c[c].u[tl] : in_t(0.0f);
        z[c][m] = in && chs.c[c].z ? chs.c[c].z[tl] : in_t(0.0f);
      }
    }
  }
};

// Forward: steps per load of a lane's per-step B/C rows where they are 16-byte aligned: 16 bytes (8 with 8 states
// per lane): at most 32 registers of B and C per lane in all. The same for 2 and 4 states per lane.
template <typename in_t, int kS>
constexpr int kFwdVec = (kS <= 4 ? 16 : 8) / static_cast<int>(sizeof(in_t));

// Forward blocks per SM that the registers must allow (ptxas places these without spills): 7 (72 registers)
// loading one step, 5 (96) loading several with float accumulators, up to 4 states and under 4 steps of a tile per
// lane, else 4 (128); 4 with two channels per team.
template <typename acc_t, int kLanes, int kS, int kV, int kC>
constexpr int kFwdBlocks =
    kC == 2 || sizeof(acc_t) == 8 || kS == 8 || kV >= 4 * kLanes ? 4 : kV == 1 ? 7 : 5;

// kV consecutive steps of one row of per-step B or C (kV·sizeof(in_t) bytes, aligned to that), zeros until loaded.
template <typename in_t, int kV>
struct RowSteps {
  static constexpr int kBytes = kV * sizeof(in_t);
  using Raw = std::conditional_t<kBytes == 16, uint4,
                                 std::conditional_t<kBytes == 8, uint2,
                                                    std::conditional_t<kBytes == 4, uint32_t, uint16_t>>>;
  static_assert(sizeof(Raw) == kBytes, "one element, or 4, 8 or 16 bytes");
  Raw raw{};
  __device__ void load(const in_t* src) { raw = *reinterpret_cast<const Raw*>(src); }
  // step i in the accumulator type; a bfloat16 is the high half of a float: one shift or mask, not an extract
  // and a shift. Copies, not casts: reading a Raw through another type breaks strict aliasing.
  __device__ auto at(int i) const {
    if constexpr (std::is_same_v<in_t, __nv_bfloat16>) {
      if constexpr (kV == 1) {
        return __uint_as_float(uint32_t{raw} << 16);
      } else {
        uint32_t w[kBytes / 4];
        memcpy(w, &raw, kBytes);
        return __uint_as_float(i % 2 == 1 ? w[i / 2] & 0xffff0000u : w[i / 2] << 16);
      }
    } else {
      in_t v[kV];
      memcpy(v, &raw, kBytes);
      return to_acc(v[i]);
    }
  }
};

// Forward, kC channels per team (1, or 2 where the channels are many: scan_fwd_cuda) and kV steps per load of a
// lane's B/C rows: 1, or kFwdVec where B and C are both per step and their rows aligned (scan_fwd_cuda). The
// team's channels share the per-step B / C: each load of them serves kC channels. Tiles of kT = max(kLanes, kV)
// steps start at multiples of kT (a sequence's first and last tiles are partial; chunk starts are tile starts);
// lane l prepares the steps t0 + l + m·kLanes (m < kT / kLanes) of a tile for every channel. A tile runs in groups
// of kV steps: per state one load of B and of C, kV unrolled steps, one team reduction of the kV per-step partials
// of y per channel (team_sum_steps).
template <typename in_t, typename acc_t, int kLanes, int kS, int kV, int kC>
__global__ void __launch_bounds__(kFwdThreads, kFwdBlocks<acc_t, kLanes, kS, kV, kC>) scan_fwd_kernel(ScanParams p) {
  constexpr int kTeams = kFwdThreads / kLanes;
  constexpr int kT = kLanes > kV ? kLanes : kV, kM = kT / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int64_t team = static_cast<int64_t>(blockIdx.x) * kTeams + threadIdx.x / kLanes;
  const int64_t channels = p.batch * p.dim;  // a multiple of kC (scan_fwd_cuda)
  const bool active = team * kC < channels;  // the tail teams run along (for the shuffles), write nothing
  const int64_t bd0 = active ? team * kC : channels - kC;
  const int64_t b = bd0 / p.dim, d0 = bd0 % p.dim, N = p.dstate, L = p.seqlen;
  const auto chs = fwd_channels<in_t, acc_t, kLanes, kS, kC>(p, b, d0, lane, std::make_index_sequence<kC>{});
  const auto& ch0 = chs.c[0];
  const SeqBounds sb = seq_bounds(p);
  // channel c's checkpoints and outputs at c·n_chunks·N and c·L from these
  acc_t* ckpt = static_cast<acc_t*>(p.chunk_states) + bd0 * p.n_chunks * N;
  in_t* out = static_cast<in_t*>(p.out) + bd0 * L;
  // this lane's per-step B / C rows (state lane + k·kLanes at k·kLanes·L), where per step and the state exists
  const int64_t k_stride = kLanes * L;
  const in_t* Brow = ch0.Bv + lane * L;
  const in_t* Crow = ch0.Cv + lane * L;
  constexpr bool kVarBC = kV > 1;  // B and C per step (else see var_B, var_C)
  // a lane's activations of the next tile load while this one runs, where it has few steps of them (more would
  // spill at the launch bounds' registers)
  constexpr bool kAhead = kM <= 2;
  const bool var_B = kVarBC || ch0.var_B, var_C = kVarBC || ch0.var_C;
  acc_t h[kC][kS];
  for (int64_t s = 0; s < sb.count(); ++s) {
    const int64_t sg = sb.global(s, b), begin = sb.begin(s), end = sb.end(s);
MK_UNROLL
    for (int c = 0; c < kC; ++c) chs.c[c].load(state_row<acc_t>(p.h0, sg, d0 + c, p.dim, N), h[c]);
    TileActs<in_t, kLanes, kC, kM> acts;
    if constexpr (kAhead) acts.load(chs, begin / kT * kT, lane, begin, end);
    for (int64_t t0 = begin / kT * kT; t0 < end; t0 += kT) {
      if (active && t0 >= begin && t0 % kScanChunk == 0) {
MK_UNROLL
        for (int c = 0; c < kC; ++c) chs.c[c].store(h[c], ckpt + (c * p.n_chunks + t0 / kScanChunk) * N);
      }
      if constexpr (!kAhead) acts.load(chs, t0, lane, begin, end);
      const TileActs<in_t, kLanes, kC, kM> cur = acts;
      if (kAhead && t0 + kT < end) acts.load(chs, t0 + kT, lane, begin, end);  // the next tile's, behind this one
      acc_t dt_l[kC][kM], u_l[kC][kM], y_l[kC][kM];
MK_UNROLL
      for (int c = 0; c < kC; ++c) {
MK_UNROLL
        for (int m = 0; m < kM; ++m) {
          const acc_t x = to_acc(cur.delta[c][m]) + chs.c[c].bias;
          dt_l[c][m] = p.softplus ? softplus_thr(x) : x;  // 0 (or softplus(bias)) outside: unused there
          u_l[c][m] = to_acc(cur.u[c][m]);
          y_l[c][m] = 0;
        }
      }
      for (int g = 0; g < kT; g += kV) {
        const int64_t tg = t0 + g;
        if (tg + kV <= begin || tg >= end) continue;  // no step of the sequence
        const in_t* Bg = Brow + tg;
        const in_t* Cg = Crow + tg;
        RowSteps<in_t, kV> Bs[kS], Cs[kS];  // zeros past N
MK_UNROLL
        for (int k = 0; k < kS; ++k, Bg += k_stride, Cg += k_stride) {
          if (var_B && ch0.has(k)) Bs[k].load(Bg);
          if (var_C && ch0.has(k)) Cs[k].load(Cg);
        }
        // the kV steps (j = g + i of the tile, prepared by lane j % kLanes in slot j / kLanes); kWhole: all in
        // the sequence, else (a sequence's first or last group) the steps outside it leave h alone and add 0 to y
        acc_t y[kC][kV];
        auto steps = [&]<bool kWhole>() {
MK_UNROLL
          for (int i = 0; i < kV; ++i) {
            const int j = g + i, m = kM == 1 ? 0 : i / kLanes;  // kM > 1: one group per tile, g = 0
            acc_t dt[kC], ut[kC];
MK_UNROLL
            for (int c = 0; c < kC; ++c) {
              dt[c] = __shfl_sync(0xffffffffu, dt_l[c][m], j % kLanes, kLanes);
              ut[c] = __shfl_sync(0xffffffffu, u_l[c][m], j % kLanes, kLanes);
              y[c][i] = 0;
            }
            if (kWhole || (tg + i >= begin && tg + i < end)) {
MK_UNROLL
              for (int k = 0; k < kS; ++k) {
MK_UNROLL
                for (int c = 0; c < kC; ++c) {  // the channels' per-step B / C: one conversion
                  const auto& ch = chs.c[c];
                  const acc_t Bt = var_B ? Bs[k].at(i) : ch.Bc[k];
                  const acc_t Ct = var_C ? Cs[k].at(i) : ch.Cc[k];
                  h[c][k] = exp2_of(dt[c] * ch.A2[k]) * h[c][k] + dt[c] * ut[c] * Bt;
                  y[c][i] += Ct * h[c][k];
                }
              }
            }
          }
        };
        if (tg >= begin && tg + kV <= end) {
          steps.template operator()<true>();
        } else {
          steps.template operator()<false>();
        }
MK_UNROLL
        for (int c = 0; c < kC; ++c) {
          team_sum_steps<kLanes, kV>(y[c], lane);
          if constexpr (kM == 1) {
            if (lane / kV == g % kLanes / kV) y_l[c][0] = y[c][0];  // this lane's step is in the group
          } else {
MK_UNROLL
            for (int m = 0; m < kM; ++m) y_l[c][m] = y[c][m * kLanes];
          }
        }
      }
      if (active) {
MK_UNROLL
        for (int c = 0; c < kC; ++c) {
MK_UNROLL
          for (int m = 0; m < kM; ++m) {
            const int64_t tl = t0 + lane + m * kLanes;
            if (tl < begin || tl >= end) continue;
            acc_t yo = y_l[c][m] + chs.c[c].Dd * u_l[c][m];
            if (chs.c[c].z) {
              const acc_t zt = to_acc(cur.z[c][m]);
              yo *= zt * sigmoid(zt);
            }
            out[c * L + tl] = store_cast<in_t>(yo);
          }
        }
      }
    }
    if (active) {
MK_UNROLL
      for (int c = 0; c < kC; ++c) chs.c[c].store(h[c], static_cast<acc_t*>(p.last_state) + (sg * p.dim + d0 + c) * N);
    }
  }
}

// Conversions and exp of the decode step (scan_step.h) on the device.
template <typename in_t, typename acc_t>
struct CudaStepOps {
  __device__ __forceinline__ static acc_t load(in_t v) { return to_acc(v); }
  __device__ __forceinline__ static in_t store(acc_t v) { return store_cast<in_t>(v); }
  __device__ __forceinline__ static acc_t exp(acc_t v) { return mk_exp(v); }
};

// One thread per (b, d) channel. With state_batch_indices its row is checked on the device (the host could read it
// only after a sync); distinct rows are checked once per step by scan_step_check_rows_kernel.
template <typename in_t, typename acc_t>
__global__ void scan_step_kernel(ScanStepParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.dim) return;
  const int64_t row = scan_step_row(p, i / p.dim);
  MK_DEVICE_CHECK(row < p.state_rows, "state_batch_indices: expected rows < %lld (state.size(0)), got %lld",
                  static_cast<long long>(p.state_rows), static_cast<long long>(row));
  scan_step_channel<in_t, acc_t, CudaStepOps<in_t, acc_t>>(p, i, row);
}

// No two batch elements share a non-negative state row (their updates would race): each thread compares its
// elements with the later ones (batch^2 / 2 compares in one block: decode batches are small).
__global__ void scan_step_check_rows_kernel(ScanStepParams p) {
  for (int64_t b = threadIdx.x; b < p.batch; b += blockDim.x) {
    const int64_t row = scan_step_row(p, b);
    for (int64_t c = b + 1; c < p.batch && row >= 0; ++c) {
      MK_DEVICE_CHECK(scan_step_row(p, c) != row,
                      "state_batch_indices: expected distinct rows, got %lld at indices %lld and %lld",
                      static_cast<long long>(row), static_cast<long long>(b), static_cast<long long>(c));
    }
  }
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

void scan_fwd_cuda(const ScanParams& p, cudaStream_t stream) {
  if (p.cu_seqlens) scan_check_cu_seqlens_cuda(p, stream);
  const int64_t channels = p.batch * p.dim;
  if (channels == 0) return;
  if (scan_fwd_staged_cuda(p, stream)) return;
  dispatch_itype(p.itype, [&]<typename in_t, typename acc_t>() {
    dispatch_lanes(p.dstate, [&]<int kLanes, int kS>() {
      if constexpr (kFitsCuda<acc_t, kS>) {
        // The team plan by how the plain one (a channel per team, dispatch_lanes' lanes) fills one round of
        // resident blocks (float accumulators and 4 states per lane only: elsewhere the plain one):
        // - more than a round: two channels per team (2 lanes or more: one lane's steps of two channels'
        //   activations would spill; the two are neighbours in one group: dim / groups even). A load of B / C then
        //   serves two channels and the grid takes fewer rounds.
        // - at most half a round: twice the lanes with 2 states each (at most 32 lanes), twice the warps per SM
        //   for the same blocks' worth of registers (the per-step work shared by a team's lanes is then spread
        //   over 2 states, not 4).
        const auto launch = [&]<int kV>() {
          constexpr bool kPlans = std::is_same_v<acc_t, float> && kS == 4;
          const unsigned grid = grid_of(channels, kFwdThreads / kLanes);
          const int64_t round = int64_t{p.sm_count} * kFwdBlocks<acc_t, kLanes, kS, kV, 1>;
          if constexpr (kPlans && kLanes >= 2) {
            if ((p.dim / p.groups) % 2 == 0 && int64_t{grid} > round) {
              const unsigned pairs = grid_of(channels / 2, kFwdThreads / kLanes);
              scan_fwd_kernel<in_t, acc_t, kLanes, kS, kV, 2><<<pairs, kFwdThreads, 0, stream>>>(p);
              return;
            }
          }
          if constexpr (kPlans && kLanes <= 16) {
            if (2 * int64_t{grid} <= round) {
              const unsigned wide = grid_of(channels, kFwdThreads / (2 * kLanes));
              scan_fwd_kernel<in_t, acc_t, 2 * kLanes, 2, kV, 1><<<wide, kFwdThreads, 0, stream>>>(p);
              return;
            }
          }
          scan_fwd_kernel<in_t, acc_t, kLanes, kS, kV, 1><<<grid, kFwdThreads, 0, stream>>>(p);
        };
        if (p.var_B && p.var_C && rows_aligned(p, sizeof(in_t))) {
          launch.template operator()<kFwdVec<in_t, kS>>();
        } else {
          launch.template operator()<1>();
        }
      }
    });
  });
}

void scan_step_cuda(const ScanStepParams& p, cudaStream_t stream) {
  if (p.batch * p.dim == 0) return;
  if (p.rows) scan_step_check_rows_kernel<<<1, 256, 0, stream>>>(p);
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

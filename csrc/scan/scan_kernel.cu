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
// reduce-scatter (team_sum_steps); elsewhere kV = 1.
//
// Backward: the same lane plan; a block holds R = blk teams, R consecutive channels of one group of one batch
// row (the task of scan_params.h). Per chunk of kScanChunk steps (last first) it recomputes the state at the
// start of each segment of kSeg steps from the chunk's checkpoint (shared memory), then per segment (last
// first) recomputes h_prev of its steps into shared memory and runs the reverse recurrence over it, as the CPU
// kernel. Per-step dB/dC contributions of the R channels meet in shared memory, kSub steps at a time, and are
// summed in channel order into the task's partial; per-channel sums stay in registers. No atomics:
// deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "scan/scan_params.h"
#include "scan/scan_step.h"

namespace markovkit {
namespace {

constexpr int kFwdThreads = 128;
// Backward: steps of per-step dB/dC contributions staged in shared memory between two block reductions
// (a divisor of kScanChunk); their rows are padded to kSub + 1 so that both the lanes' writes (stride
// kSub + 1) and the reduction's reads (consecutive steps) are free of bank conflicts.
constexpr int kSub = 4;
static_assert(kScanChunk % kSub == 0, "sub-blocks tile a chunk");
// Backward: steps per segment of a chunk whose h_prev is held in shared memory at a time (a multiple of the
// tile of kLanes steps and of kSub, a divisor of kScanChunk).
template <int kLanes>
constexpr int kSeg = kLanes > 8 ? kLanes : 8;

// Backward shared memory, in weights: per team (channel) of kLanes lanes, h_prev of a segment (kSeg, N), the
// states at the segment starts of a chunk (kScanChunk / kSeg, N) and per-step dB or dC of a sub-block
// (N, kSub + 1). Each team's part is padded so that the teams of a warp start kLanes banks apart (lane l of
// team r then hits bank r·kLanes + l, times kSub + 1 for dB / dC): conflict-free.
template <int kLanes>
struct BwdSmem {
  static constexpr int64_t pad(int64_t words, int64_t bank) { return words + ((bank - words) % 32 + 32) % 32; }
  static constexpr int64_t hp(int64_t N) { return pad(kSeg<kLanes> * N, kLanes); }
  static constexpr int64_t segs(int64_t N) { return pad(kScanChunk / kSeg<kLanes> * N, kLanes); }
  static constexpr int64_t sd(int64_t N) { return pad(N * (kSub + 1), kLanes * (kSub + 1)); }
};

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

// One channel as seen by one lane of its team.
template <typename in_t, typename acc_t, int kLanes, int kS>
struct Team {
  int64_t L, N;
  int lane;
  bool var_B, var_C;
  const in_t *u, *delta, *z, *Bv, *Cv;
  acc_t A[kS], Bc[kS], Cc[kS];
  acc_t Dd, bias;

  __device__ Team(const ScanParams& p, int64_t b, int64_t d, int lane_)
      : L(p.seqlen), N(p.dstate), lane(lane_), var_B(p.var_B), var_C(p.var_C) {
    const int64_t row = (b * p.dim + d) * L;
    const int64_t g = d / (p.dim / p.groups);
    u = static_cast<const in_t*>(p.u) + row;
    delta = static_cast<const in_t*>(p.delta) + row;
    z = p.z ? static_cast<const in_t*>(p.z) + row : nullptr;
    Bv = static_cast<const in_t*>(p.B) + (var_B ? (b * p.groups + g) * N * L : 0);
    Cv = static_cast<const in_t*>(p.C) + (var_C ? (b * p.groups + g) * N * L : 0);
MK_UNROLL
    for (int k = 0; k < kS; ++k) {
      const int64_t n = lane + k * kLanes;
      const bool ok = n < N;
      A[k] = ok ? static_cast<const acc_t*>(p.A)[d * N + n] : acc_t(0);
      Bc[k] = ok && !var_B ? static_cast<const acc_t*>(p.B)[d * N + n] : acc_t(0);
      Cc[k] = ok && !var_C ? static_cast<const acc_t*>(p.C)[d * N + n] : acc_t(0);
    }
    Dd = p.D ? static_cast<const acc_t*>(p.D)[d] : acc_t(0);
    bias = p.delta_bias ? static_cast<const acc_t*>(p.delta_bias)[d] : acc_t(0);
  }
  __device__ bool has(int k) const { return lane + k * kLanes < N; }
  __device__ acc_t pre_delta(int64_t t) const { return to_acc(delta[t]) + bias; }
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
  const Team<in_t, acc_t, kLanes, kS> ch(p, b, d, lane);
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
                h[k] = mk_exp(dt * ch.A[k]) * h[k] + dt * ut * Bt;
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

// Backward: sums the per-step dB / dC contributions of the block's R channels, staged in shared memory
// sdB / sdC (R, N, kSub + 1) (`team` weights apart) for the steps [t, t + len), in channel order into the task's
// partials at var_off (N, L). A thread sums one (n, step) element of dB or dC (the dB ones first). Every thread
// of the block calls it (it holds the barriers).
template <typename acc_t>
__device__ void reduce_sub_block(const ScanBwdParams& q, const acc_t* sdB, const acc_t* sdC, int team,
                                 int64_t var_off, int64_t t, int len) {
  const ScanParams& p = q.f;
  const int N = static_cast<int>(p.dstate), R = static_cast<int>(q.blk), per = len * N;
  const int total = per * ((p.var_B ? 1 : 0) + (p.var_C ? 1 : 0));
  __syncthreads();
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const bool c = !p.var_B || idx >= per;  // a dC element
    const int e = idx >= per ? idx - per : idx, i = e % len, n = e / len;
    const acc_t* src = (c ? sdC : sdB) + n * (kSub + 1) + i;
    acc_t sum = 0;
    for (int rr = 0; rr < R; ++rr) sum += src[rr * team];
    static_cast<acc_t*>(c ? q.dC_part : q.dB_part)[var_off + n * p.seqlen + t + i] = sum;
  }
  __syncthreads();
}

// One lane's per-step inputs of the chunk [t0, t0 + kScanChunk), indexed by the step i within it: int steps
// from two 64-bit offsets into the kernel parameters' tensors (few registers, no row pointers held).
template <typename in_t, typename acc_t, int kLanes, int kS>
struct ChunkIn {
  const Team<in_t, acc_t, kLanes, kS>& ch;
  const ScanParams& p;
  int64_t at;        // step t0 of the channel's (batch, dim, seqlen) activation rows: u, delta, z, dout, ...
  int64_t bc;        // step t0 of this lane's per-step B / C row (state lane), where per step
  int64_t k_stride;  // from the row of state lane + k·kLanes to the next (kLanes rows)
  __device__ ChunkIn(const Team<in_t, acc_t, kLanes, kS>& ch_, const ScanParams& p_, int64_t bd, int64_t g,
                     int64_t t0)
      : ch(ch_), p(p_), at(bd * p_.seqlen + t0),
        bc(((bd / p_.dim * p_.groups + g) * p_.dstate + ch_.lane) * p_.seqlen + t0), k_stride(kLanes * p_.seqlen) {}
  __device__ acc_t act(const void* base, int i) const { return to_acc(static_cast<const in_t*>(base)[at + i]); }
  __device__ acc_t Bt(int k, int i) const {
    return p.var_B ? (ch.has(k) ? to_acc(static_cast<const in_t*>(p.B)[bc + k * k_stride + i]) : acc_t(0))
                   : ch.Bc[k];
  }
  __device__ acc_t Ct(int k, int i) const {
    return p.var_C ? (ch.has(k) ? to_acc(static_cast<const in_t*>(p.C)[bc + k * k_stride + i]) : acc_t(0))
                   : ch.Cc[k];
  }
  __device__ acc_t pre_delta(int i) const { return act(p.delta, i) + ch.bias; }
};

// Backward: threads per block at most (blk·kLanes, scan_bwd_cuda_blk: 128 up to 64 states in float32, else fewer),
// and the blocks per SM that the registers must allow (ptxas places these without spills) in float32 with 4 states
// per lane: 4 (128 registers) up to 32 states (the shared memory allows 4 from 5 states on, 3 at 4 and below), 3
// (168) at 64; else no bound (1).
constexpr int kBwdThreads = 128;
template <typename acc_t, int kLanes, int kS>
constexpr int kBwdBlocks = std::is_same_v<acc_t, float> && kS == 4 ? (kLanes <= 8 ? 4 : kLanes == 16 ? 3 : 1) : 1;

template <typename in_t, typename acc_t, int kLanes, int kS>
__global__ void __launch_bounds__(kBwdThreads, kBwdBlocks<acc_t, kLanes, kS>) scan_bwd_kernel(ScanBwdParams q) {
  extern __shared__ __align__(16) unsigned char scan_smem[];
  const ScanParams& p = q.f;
  const int R = static_cast<int>(q.blk);
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t task = blockIdx.x;
  const int64_t blk = task % q.nblk, g = (task / q.nblk) % p.groups, b = task / (q.nblk * p.groups);
  const int64_t dpg = p.dim / p.groups, kch = blk * q.blk + r;
  const bool active = kch < dpg;  // channels past the group's end run along and contribute zeros
  const int64_t d = g * dpg + (active ? kch : dpg - 1);
  const int64_t N = p.dstate, L = p.seqlen, dim = p.dim, bd = b * dim + d;
  const int Ni = static_cast<int>(N);
  const Team<in_t, acc_t, kLanes, kS> ch(p, b, d, lane);
  const SeqBounds sb = seq_bounds(p);
  const acc_t* ckpt = static_cast<const acc_t*>(p.chunk_states) + bd * p.n_chunks * N;
  acc_t* dh0 = static_cast<acc_t*>(q.dh0);
  // shared memory: h_prev of the current segment per team (R, kSeg, N); the states at the segment starts of the
  // chunk per team (R, kScanChunk / kSeg, N); per-step dB, dC contributions of the current sub-block
  // (R, N, kSub + 1) each when per step; each team's part padded (BwdSmem). hps, segs and sd point at this
  // lane's first state.
  using Smem = BwdSmem<kLanes>;
  const int hp_team = static_cast<int>(Smem::hp(N)), segs_team = static_cast<int>(Smem::segs(N));
  const int sd_team = static_cast<int>(Smem::sd(N));
  acc_t* hps = reinterpret_cast<acc_t*>(scan_smem) + r * hp_team + lane;
  acc_t* segs = reinterpret_cast<acc_t*>(scan_smem) + R * hp_team + r * segs_team + lane;
  acc_t* sdB = reinterpret_cast<acc_t*>(scan_smem) + R * (hp_team + segs_team);
  acc_t* sdC = sdB + (p.var_B ? R * sd_team : 0);
  const int sd = r * sd_team + lane * (kSub + 1);
  const int64_t var_off = ((b * p.groups + g) * q.nblk + blk) * N * L;

  acc_t carry[kS], dA[kS], dBc[kS], dCc[kS], h[kS];
MK_UNROLL
  for (int k = 0; k < kS; ++k) dA[k] = dBc[k] = dCc[k] = carry[k] = acc_t(0);
  acc_t dD_l = 0, dbias_l = 0;  // this lane's steps' parts of dD, d delta_bias
  // the sequence s of the step the reverse walk is at, its first and last steps (-1 past the first sequence)
  int64_t s = sb.count() - 1, s_first = -1, s_last = -1;
  auto enter_seq = [&]() {  // skips empty sequences (d initial_state = d last_state), then caches the bounds
    while (s >= 0 && sb.begin(s) == sb.end(s)) {
      const int64_t sg = sb.global(s, b);
      acc_t tmp[kS];
      ch.load(state_row<acc_t>(q.dlast, sg, d, dim, N), tmp);
      if (active) ch.store(tmp, dh0 + (sg * dim + d) * N);
      --s;
    }
    s_first = s >= 0 ? sb.begin(s) : -1;
    s_last = s >= 0 ? sb.end(s) - 1 : -1;
  };
  enter_seq();
  // Every pass over a chunk walks it in tiles of kLanes steps (segments start at multiples of kLanes); lane l
  // prepares step ib + l of the tile and the team broadcasts each step's scalars from that lane.
  for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kScanChunk;
    const int clen = static_cast<int>(L - t0 < kScanChunk ? L - t0 : kScanChunk);
    const ChunkIn<in_t, acc_t, kLanes, kS> in(ch, p, bd, g, t0);
    // Recomputes the steps [i0, i1) of the chunk from h (the state before step i0), calling at_step(i) with h
    // = h_prev of each step i. Sequence sf holds the step, `next` is the next step that starts a sequence (then
    // h_prev is its initial state); s holds step i1 - 1 or a later one.
    auto walk = [&](int i0, int i1, auto&& at_step) {
      int64_t sf = s;
      while (sb.begin(sf) > t0 + i0 || sb.end(sf) <= t0 + i0) --sf;
      int64_t next = sb.begin(sf) == t0 + i0 ? t0 + i0 : sb.end(sf);
      for (int ib = i0; ib < i1; ib += kLanes) {
        const int len = i1 - ib < kLanes ? i1 - ib : kLanes;
        acc_t dt_l = 0, u_l = 0;
        if (lane < len) {
          const acc_t x = in.pre_delta(ib + lane);
          dt_l = p.softplus ? softplus_thr(x) : x;
          u_l = in.act(p.u, ib + lane);
        }
        for (int j = 0; j < len; ++j) {
          const int i = ib + j;
          if (t0 + i == next) {
            while (sb.end(sf) <= t0 + i) ++sf;
            ch.load(state_row<acc_t>(p.h0, sb.global(sf, b), d, dim, N), h);
            next = sb.end(sf);
          }
          at_step(i);
          const acc_t dt = __shfl_sync(0xffffffffu, dt_l, j, kLanes), ut = __shfl_sync(0xffffffffu, u_l, j, kLanes);
MK_UNROLL
          for (int k = 0; k < kS; ++k) h[k] = mk_exp(dt * ch.A[k]) * h[k] + dt * ut * in.Bt(k, i);
        }
      }
    };
    // the states at the segment starts (each lane its own states)
    const int nseg = (clen + kSeg<kLanes> - 1) / kSeg<kLanes>;
    ch.load(ckpt + c * N, h);
    walk(0, (nseg - 1) * kSeg<kLanes>, [&](int i) {
      if (i % kSeg<kLanes> == 0) {
MK_UNROLL
        for (int k = 0; k < kS; ++k) {
          if (ch.has(k)) segs[i / kSeg<kLanes> * Ni + k * kLanes] = h[k];
        }
      }
    });
    for (int e = nseg - 1; e >= 0; --e) {
      const int i0 = e * kSeg<kLanes>, i1 = clen - i0 < kSeg<kLanes> ? clen : i0 + kSeg<kLanes>;
      // h_prev over the segment into shared memory
      if (e < nseg - 1) {
MK_UNROLL
        for (int k = 0; k < kS; ++k) h[k] = ch.has(k) ? segs[e * Ni + k * kLanes] : acc_t(0);
      }
      walk(i0, i1, [&](int i) {
MK_UNROLL
        for (int k = 0; k < kS; ++k) {
          if (ch.has(k)) hps[(i - i0) * Ni + k * kLanes] = h[k];
        }
      });
      // reverse recurrence over the segment, last tile first
      for (int ib = i0 + (i1 - 1 - i0) / kLanes * kLanes; ib >= i0; ib -= kLanes) {
        const int len = i1 - ib < kLanes ? i1 - ib : kLanes;
        // this lane's step: pre-softplus x, Δ, u, upstream g, z and σ(z), dy = g·silu(z) (or g)
        acc_t x_l = 0, dt_l = 0, u_l = 0, g_l = 0, z_l = 0, sz_l = 0, dy_l = 0;
        if (lane < len) {
          x_l = in.pre_delta(ib + lane);
          dt_l = p.softplus ? softplus_thr(x_l) : x_l;
          u_l = in.act(p.u, ib + lane);
          g_l = in.act(q.dout, ib + lane);
          dy_l = g_l;
          if (p.z) {
            z_l = in.act(p.z, ib + lane);
            sz_l = sigmoid(z_l);
            dy_l *= z_l * sz_l;
          }
        }
        acc_t y_l = 0, ddt_l = 0, du_l = 0;  // the team sums of this lane's step
        for (int j = len - 1; j >= 0; --j) {
          const int i = ib + j;
          const int64_t t = t0 + i;
          if (t == s_last) ch.load(state_row<acc_t>(q.dlast, sb.global(s, b), d, dim, N), carry);
          const acc_t dt = __shfl_sync(0xffffffffu, dt_l, j, kLanes), ut = __shfl_sync(0xffffffffu, u_l, j, kLanes),
                      dy = __shfl_sync(0xffffffffu, dy_l, j, kLanes);
          acc_t a[kS], hp[kS], ht[kS], Bt[kS], Ct[kS];
          acc_t yp = 0;
MK_UNROLL
          for (int k = 0; k < kS; ++k) {
            hp[k] = ch.has(k) ? hps[(i - i0) * Ni + k * kLanes] : acc_t(0);
            Bt[k] = in.Bt(k, i);
            Ct[k] = in.Ct(k, i);
            a[k] = mk_exp(dt * ch.A[k]);
            ht[k] = a[k] * hp[k] + dt * Bt[k] * ut;
            yp += Ct[k] * ht[k];
          }
          if (p.z) {
            const acc_t y = team_sum<kLanes>(yp) + ch.Dd * ut;
            if (lane == j) y_l = y;
          }
          acc_t ddt = 0, du = 0;
MK_UNROLL
          for (int k = 0; k < kS; ++k) {
            const acc_t dh = Ct[k] * dy + carry[k];
            const acc_t cC = dy * ht[k], cB = dh * dt * ut;
            if (ch.has(k)) {
              const int slot = sd + k * kLanes * (kSub + 1) + i % kSub;
              if (p.var_B) sdB[slot] = active ? cB : acc_t(0);
              if (p.var_C) sdC[slot] = active ? cC : acc_t(0);
            }
            if (!p.var_B) dBc[k] += cB;
            if (!p.var_C) dCc[k] += cC;
            dA[k] += dh * hp[k] * a[k] * dt;
            ddt += dh * (hp[k] * a[k] * ch.A[k] + Bt[k] * ut);
            du += dh * dt * Bt[k];
            carry[k] = a[k] * dh;
          }
          ddt = team_sum<kLanes>(ddt);
          du = team_sum<kLanes>(du);
          if (lane == j) {
            ddt_l = ddt;
            du_l = du;
          }
          if (t == s_first) {
            if (active) ch.store(carry, dh0 + (sb.global(s, b) * dim + d) * N);
            --s;
            enter_seq();
          }
          // per-step dB / dC of the sub-block [t, t + sub_len): t is block-uniform, so is the branch
          if ((p.var_B || p.var_C) && i % kSub == 0) {
            reduce_sub_block(q, sdB, sdC, sd_team, var_off, t, clen - i < kSub ? clen - i : kSub);
          }
        }
        if (active && lane < len) {
          if (p.z) {
            static_cast<in_t*>(q.dz)[in.at + ib + lane] =
                store_cast<in_t>(g_l * y_l * sz_l * (acc_t(1) + z_l * (acc_t(1) - sz_l)));
          }
          static_cast<in_t*>(q.du)[in.at + ib + lane] = store_cast<in_t>(du_l + ch.Dd * dy_l);
          const acc_t dx = p.softplus ? ddt_l * softplus_thr_grad(x_l) : ddt_l;
          static_cast<in_t*>(q.ddelta)[in.at + ib + lane] = store_cast<in_t>(dx);
          dbias_l += dx;
          dD_l += dy_l * u_l;
        }
      }
    }
  }
  const acc_t dD = team_sum<kLanes>(dD_l), dbias = team_sum<kLanes>(dbias_l);
  if (!active) return;
  ch.store(dA, static_cast<acc_t*>(q.dA_part) + bd * N);
  if (!p.var_B) ch.store(dBc, static_cast<acc_t*>(q.dB_part) + bd * N);
  if (!p.var_C) ch.store(dCc, static_cast<acc_t*>(q.dC_part) + bd * N);
  if (lane == 0) {
    static_cast<acc_t*>(q.dD_part)[bd] = dD;
    static_cast<acc_t*>(q.dbias_part)[bd] = dbias;
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

unsigned grid_of(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

// Whether the rows of per-step B and C start 16-byte aligned (base pointers and row length), as the forward's
// loads of several steps need.
bool rows_aligned(const ScanParams& p, int64_t elem_bytes) {
  auto ok = [](const void* base) { return reinterpret_cast<uintptr_t>(base) % 16 == 0; };
  return p.seqlen * elem_bytes % 16 == 0 && ok(p.B) && ok(p.C);
}

}  // namespace

// Channels per backward block for width = kLanes·kS of dispatch_lanes: 512 / width up to 64 states, 256 / width
// above, halved in float64: blocks of 128 threads (64 at 128 states, 32 at 256; half in float64) whose shared
// memory, about blk·dstate·(kSeg + kScanChunk / kSeg + 2·(kSub + 1)) weights (BwdSmem), is at most 70 KB, so that
// 3 or 4 blocks share an SM (with kBwdBlocks) and one block's barriers leave the others running. The per-step dB/dC
// partials (batch, groups, dim / groups / blk, dstate, seqlen) grow as blk shrinks.
constexpr int64_t scan_bwd_blk(int64_t width, bool float64) {
  return (width <= 64 ? 512 : 256) / width / (float64 ? 2 : 1);
}

int64_t scan_bwd_cuda_blk(int64_t dstate, bool float64) {
  int64_t width = 4;
  while (width < dstate) width *= 2;
  return scan_bwd_blk(width, float64);
}

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

void scan_bwd_cuda(const ScanBwdParams& q, cudaStream_t stream) {
  const ScanParams& p = q.f;
  if (p.batch * p.dim == 0) return;
  dispatch_itype(p.itype, [&]<typename in_t, typename acc_t>() {
    dispatch_lanes(p.dstate, [&]<int kLanes, int kS>() {
      if constexpr (kFitsCuda<acc_t, kS>) {
        static_assert(scan_bwd_blk(kLanes * kS, std::is_same_v<acc_t, double>) * kLanes <= kBwdThreads,
                      "blocks of blk teams stay within the backward's launch bounds");
        using Smem = BwdSmem<kLanes>;
        const int64_t N = p.dstate, nsd = (p.var_B ? 1 : 0) + (p.var_C ? 1 : 0);
        const int64_t team = Smem::hp(N) + Smem::segs(N) + nsd * Smem::sd(N);
        const int smem = static_cast<int>(q.blk * team * static_cast<int64_t>(sizeof(acc_t)));
        auto kernel = scan_bwd_kernel<in_t, acc_t, kLanes, kS>;
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        const unsigned grid = static_cast<unsigned>(p.batch * p.groups * q.nblk);
        kernel<<<grid, static_cast<unsigned>(q.blk * kLanes), smem, stream>>>(q);
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

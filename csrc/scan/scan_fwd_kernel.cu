// Forward of the selective scan on CUDA, mirroring scan_fwd_cpu. A block holds R teams of kLanes lanes (the lane
// plan of scan_device.cuh): R consecutive channels of one group of one batch row, tasks (batch, groups, nblk) as in
// the backward. It walks time in spans of kSpan steps (a divisor of kScanChunk); per span the block stages, once,
// the group's per-step B / C rows (which its R channels share) and each channel's Δ (softplus applied), u and gate
// silu(z) into shared memory, as weights. Each team then runs the span in groups of kGrp steps: per state one
// 16-byte read of each of its B and C rows, kGrp unrolled steps, one reduce-scatter of the team's partials of y
// (team_sum_steps), and the lane left with a step's y writes its output. No global load inside a step.
// A group inside one sequence, neither its first nor its last step, runs without per-step checks (kPlain).
#include "scan/scan_device.cuh"

namespace markovkit {
namespace {
using namespace scan_cuda;

constexpr int kGrp = 4;  // steps per group: one 16-byte read of a float row (two of a double row)

// Block plan for kLanes lanes of kS states: R channels (128 threads; 32 channels of one or two lanes), spans of up
// to 64 steps whose B / C rows take at most 2·16 KB (64 steps up to 64 float states, 16 at 256). Rows are padded
// to kRow = kSpan + 4 weights and each team's Δ, u, gate (kAct) likewise, so that the 16-byte reads of a team's
// lanes (rows n = l + k·kLanes) and of the teams of a warp (their own Δ, u) start 4 banks apart: conflict-free.
template <typename acc_t, int kLanes, int kS>
struct FwdPlan {
  static constexpr int kW = kLanes * kS;
  static constexpr int kR = kLanes >= 4 ? 128 / kLanes : 32;
  static constexpr int kThreads = kR * kLanes;
  static constexpr int kSpan = 16384 / (kW * static_cast<int>(sizeof(acc_t))) < kScanChunk
                                   ? 16384 / (kW * static_cast<int>(sizeof(acc_t)))
                                   : static_cast<int>(kScanChunk);
  static_assert(kScanChunk % kSpan == 0 && kSpan % kGrp == 0, "spans tile a chunk, groups a span");
  static constexpr int kRow = kSpan + 4;
  static constexpr int kAct = 3 * kSpan + 4;
  // blocks per SM that the registers must allow where B and C are both per step: 5 (102 registers) with 4 float
  // states per lane, else 2; one less with constant B or C (their registers)
  static constexpr int kMinBlocks = sizeof(acc_t) == 4 && kS == 4 ? 5 : 2;
  static constexpr int64_t words(int nvar) { return int64_t{nvar} * kW * kRow + int64_t{kR} * kAct; }
  static_assert(words(2) * sizeof(acc_t) <= 227 * 1024, "the shared memory of one block fits an SM");
};

// The 4 weights at src (16-byte aligned shared memory).
__device__ __forceinline__ void read4(const float* src, float (&v)[4]) {
  const float4 x = *reinterpret_cast<const float4*>(src);
  v[0] = x.x;
  v[1] = x.y;
  v[2] = x.z;
  v[3] = x.w;
}
__device__ __forceinline__ void read4(const double* src, double (&v)[4]) {
  const double2 x = reinterpret_cast<const double2*>(src)[0], y = reinterpret_cast<const double2*>(src)[1];
  v[0] = x.x;
  v[1] = x.y;
  v[2] = y.x;
  v[3] = y.y;
}

// Stages the span [t0, t0 + slen) (every thread of the block calls it): the group's per-step B / C rows into sB / sC
// where per step, each team's Δ, u and gate silu(z) (or 1) into act (R, kAct); zeros past slen and past dstate.
template <typename in_t, typename acc_t, int kLanes, int kS>
__device__ void stage_span(const ScanParams& p, int64_t b, int64_t g, int64_t d0, int64_t t0, int slen, acc_t* sB,
                           acc_t* sC, acc_t* act) {
  using Plan = FwdPlan<acc_t, kLanes, kS>;
  constexpr int kSpan = Plan::kSpan;
  __syncthreads();  // every thread is done with the previous span
  stage_bc_rows<in_t, acc_t, Plan::kW, kSpan, Plan::kRow, Plan::kThreads>(p, b, g, t0, slen, sB, sC);
  for (int e = threadIdx.x; e < Plan::kR * kSpan; e += Plan::kThreads) {
    const int r = e / kSpan, i = e % kSpan;
    const int64_t d = block_channel(p, d0, r);
    acc_t dt = 0, u = 0, gate = 1;
    if (i < slen) {
      const int64_t at = (b * p.dim + d) * p.seqlen + t0 + i;
      dt = delta_at<in_t, acc_t>(p, d, at);
      u = to_acc(static_cast<const in_t*>(p.u)[at]);
      if (p.z) {
        const acc_t z = to_acc(static_cast<const in_t*>(p.z)[at]);
        gate = z * sigmoid(z);
      }
    }
    acc_t* row = act + r * Plan::kAct;
    row[i] = dt;
    row[kSpan + i] = u;
    row[2 * kSpan + i] = gate;
  }
  __syncthreads();
}

// Writes the span's outputs, left by the teams in their gate slots of act (R, kAct), to out: coalesced, for the
// block's first nactive channels (the others are past the group's end). Every thread of the block calls it; the
// next stage_span's barrier keeps act until all are written.
template <typename in_t, typename acc_t, int kLanes, int kS>
__device__ void write_span(const ScanParams& p, int64_t b, int64_t d0, int nactive, int64_t t0, int slen,
                           const acc_t* act) {
  using Plan = FwdPlan<acc_t, kLanes, kS>;
  constexpr int kSpan = Plan::kSpan;
  __syncthreads();  // every team's outputs are in
  for (int e = threadIdx.x; e < Plan::kR * kSpan; e += Plan::kThreads) {
    const int r = e / kSpan, i = e % kSpan;
    if (i < slen && r < nactive) {
      static_cast<in_t*>(p.out)[(b * p.dim + d0 + r) * p.seqlen + t0 + i] =
          store_cast<in_t>(act[r * Plan::kAct + 2 * kSpan + i]);
    }
  }
}

// kVarBC: B and C both per step (else each as p.var_B, p.var_C say).
template <typename in_t, typename acc_t, int kLanes, int kS, bool kVarBC>
__global__ void __launch_bounds__(FwdPlan<acc_t, kLanes, kS>::kThreads,
                                  FwdPlan<acc_t, kLanes, kS>::kMinBlocks - (kVarBC ? 0 : 1))
    scan_fwd_kernel(ScanParams p) {
  using Plan = FwdPlan<acc_t, kLanes, kS>;
  constexpr int kW = Plan::kW, kSpan = Plan::kSpan, R = Plan::kR;
  extern __shared__ __align__(16) unsigned char scan_smem[];
  const bool var_B = kVarBC || p.var_B, var_C = kVarBC || p.var_C;
  const int nvar = (var_B ? 1 : 0) + (var_C ? 1 : 0);
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t dpg = p.dim / p.groups, nblk = (dpg + R - 1) / R;
  const int64_t task = blockIdx.x;
  const int64_t blk = task % nblk, g = (task / nblk) % p.groups, b = task / (nblk * p.groups);
  const int64_t kch = blk * R + r, d0 = g * dpg + blk * R;
  const bool active = kch < dpg;  // channels past the group's end run along and write nothing
  const int nactive = static_cast<int>(dpg - blk * R < R ? dpg - blk * R : R);  // the block's channels in the group
  const int64_t d = g * dpg + (active ? kch : dpg - 1);
  const int64_t N = p.dstate, L = p.seqlen, bd = b * p.dim + d;
  const Team<acc_t, kLanes, kS> ch(p, d, lane);
  const SeqBounds sb = seq_bounds(p);
  acc_t* ckpt = static_cast<acc_t*>(p.chunk_states) + bd * p.n_chunks * N;
  // shared memory (FwdPlan): sB, sC where per step, then per team act: Δ [0, kSpan), u, gate (then out)
  acc_t* sB = reinterpret_cast<acc_t*>(scan_smem);
  acc_t* sC = sB + (var_B ? kW * Plan::kRow : 0);
  acc_t* act_all = sB + nvar * kW * Plan::kRow;
  acc_t* act = act_all + r * Plan::kAct;
  const acc_t* sBl = sB + lane * Plan::kRow;  // this lane's first B row: state lane + k·kLanes at k·kLanes·kRow
  const acc_t* sCl = sC + lane * Plan::kRow;

  acc_t h[kS];
MK_UNROLL
  for (int k = 0; k < kS; ++k) h[k] = acc_t(0);
  // the sequence s holding the next step (sequences past the last step: s = count); empty ones have
  // last_state = initial_state (or 0)
  int64_t s = 0;
  auto skip_empty = [&]() {
    while (s < sb.count() && sb.begin(s) == sb.end(s)) {
      const int64_t sg = sb.global(s, b);
      acc_t tmp[kS];
      ch.load(state_row<acc_t>(p.h0, sg, d, p.dim, N), tmp);
      if (active) ch.store(tmp, static_cast<acc_t*>(p.last_state) + (sg * p.dim + d) * N);
      ++s;
    }
  };
  skip_empty();
  for (int64_t t0 = 0; t0 < L; t0 += kSpan) {
    const int slen = static_cast<int>(L - t0 < kSpan ? L - t0 : kSpan);
    stage_span<in_t, acc_t, kLanes, kS>(p, b, g, d0, t0, slen, sB, sC, act_all);
    // The n steps of the group at i1 of the span; a chunk start saves h (after a sequence start's reset).
    auto group = [&]<bool kPlain>(int i1, int n) {
      acc_t dt4[kGrp], u4[kGrp], B4[kS][kGrp], C4[kS][kGrp], y[kGrp];
      read4(act + i1, dt4);
      read4(act + kSpan + i1, u4);
MK_UNROLL
      for (int k = 0; k < kS; ++k) {
        if (var_B) read4(sBl + k * kLanes * Plan::kRow + i1, B4[k]);
        if (var_C) read4(sCl + k * kLanes * Plan::kRow + i1, C4[k]);
      }
MK_UNROLL
      for (int j = 0; j < kGrp; ++j) {
        y[j] = 0;
        if (!kPlain && j >= n) continue;
        const int64_t t = t0 + i1 + j;
        if (!kPlain && t == sb.begin(s)) ch.load(state_row<acc_t>(p.h0, sb.global(s, b), d, p.dim, N), h);
        if (j == 0 && t % kScanChunk == 0 && active) ch.store(h, ckpt + t / kScanChunk * N);
        const acc_t dtu = dt4[j] * u4[j];
MK_UNROLL
        for (int k = 0; k < kS; ++k) {
          const acc_t Bt = var_B ? B4[k][j] : ch.Bc[k], Ct = var_C ? C4[k][j] : ch.Cc[k];
          h[k] = exp2_of(dt4[j] * ch.A2[k]) * h[k] + dtu * Bt;
          y[j] += Ct * h[k];
        }
        if (!kPlain && t == sb.end(s) - 1) {
          if (active) ch.store(h, static_cast<acc_t*>(p.last_state) + (sb.global(s, b) * p.dim + d) * N);
          ++s;
          skip_empty();
        }
      }
      team_sum_steps<kLanes, kGrp>(y, lane);
      // the steps whose sums this lane holds (team_sum_steps): lane + m·kLanes in slot m·kLanes, or lane % kGrp
      constexpr int kM = kGrp > kLanes ? kGrp / kLanes : 1;
MK_UNROLL
      for (int m = 0; m < kM; ++m) {
        const int jj = kGrp > kLanes ? lane + m * kLanes : lane % kGrp, v = kGrp > kLanes ? m * kLanes : 0;
        if ((kGrp > kLanes || lane < kGrp) && jj < n) {  // the step's output in place of its gate
          const int i = i1 + jj;
          act[2 * kSpan + i] = (y[v] + ch.Dd * act[kSpan + i]) * act[2 * kSpan + i];
        }
      }
    };
    for (int i1 = 0; i1 < slen; i1 += kGrp) {
      const int n = slen - i1 < kGrp ? slen - i1 : kGrp;
      const int64_t t1 = t0 + i1;
      if (n == kGrp && sb.begin(s) < t1 && sb.end(s) > t1 + kGrp) {
        group.template operator()<true>(i1, n);
      } else {
        group.template operator()<false>(i1, n);
      }
    }
    write_span<in_t, acc_t, kLanes, kS>(p, b, d0, nactive, t0, slen, act_all);
  }
}

}  // namespace

void scan_fwd_cuda(const ScanParams& p, cudaStream_t stream) {
  if (p.batch * p.dim == 0) return;
  dispatch_itype(p.itype, [&]<typename in_t, typename acc_t>() {
    dispatch_lanes(p.dstate, [&]<int kLanes, int kS>() {
      if constexpr (kFitsCuda<acc_t, kS>) {
        using Plan = FwdPlan<acc_t, kLanes, kS>;
        const int nvar = (p.var_B ? 1 : 0) + (p.var_C ? 1 : 0);
        const int smem = static_cast<int>(Plan::words(nvar) * static_cast<int64_t>(sizeof(acc_t)));
        const int64_t dpg = p.dim / p.groups;
        const unsigned grid = static_cast<unsigned>(p.batch * p.groups * ((dpg + Plan::kR - 1) / Plan::kR));
        auto launch = [&](auto kernel) {
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
          kernel<<<grid, Plan::kThreads, smem, stream>>>(p);
        };
        if (p.var_B && p.var_C) {
          launch(scan_fwd_kernel<in_t, acc_t, kLanes, kS, true>);
        } else {
          launch(scan_fwd_kernel<in_t, acc_t, kLanes, kS, false>);
        }
      }
    });
  });
}

}  // namespace markovkit

// Backward of the selective scan on CUDA, mirroring scan_bwd_cpu. A block holds R = blk teams of kLanes lanes
// (dispatch_lanes' plan, scan_device.cuh; with few channels, teams of twice the lanes with 2 states each:
// scan_bwd_cuda): R consecutive channels of one group of one batch row, the task of scan_params.h. It walks the
// chunks of kScanChunk steps last first. Per chunk:
//  1. stage: the block loads the chunk's per-step inputs into shared memory once, as weights: Δ (softplus
//     applied), u and dy = dout·silu(z) of each channel, and the per-step B / C rows of the group, which the R
//     channels share. The recurrences read shared memory and registers only; the outputs' other inputs (dout, z,
//     Δ before softplus) load at the start of their group of steps (load_step).
//  2. segment starts: from the chunk's checkpoint each lane recomputes its states at the start of every segment
//     of kSeg steps (shared memory, the lane's own).
//  3. per segment, last first: h_prev of its kSeg steps is recomputed into registers, then the reverse recurrence
//     runs over them in groups of kGrp steps. Per group the team sums of the steps' dΔ, du (and y, for dz) are
//     one reduce-scatter (team_sum_steps) and the lane left with a step's sums writes its outputs; the R
//     channels' per-step dB / dC contributions meet in shared memory and are summed in channel order into the
//     task's partial. Per-channel sums (dA, dD, d delta_bias, constant dB / dC) stay in registers.
// A segment without sequence boundaries (all but the first and last of a sequence) runs without per-step checks
// (kPlain). No atomics: deterministic.
// Compiled once per input type (scan_bwd_<type>.cu: the types build in parallel); scan_bwd.cu picks the type.
#pragma once
#include <algorithm>

#include "scan/scan_device.cuh"

namespace markovkit {
namespace {
using namespace scan_cuda;

constexpr int kGrp = 4;  // steps per group (team sums, outputs, the block's dB / dC reduction)

constexpr int64_t pad_to_bank(int64_t words, int64_t bank) { return words + ((bank - words) % 32 + 32) % 32; }

// Shared memory of a block, in weights. Where B (C) is per step: its rows of the chunk (kW, kRow), rows n >= dstate
// zero. Per team: Δ, u, dy of the chunk's steps (kAct); the lane's states at each segment start (kSegs); the
// group's per-step dB and dC contributions (kSd each, where per step), state n at n·(kGrp + 1).
// Bank-conflict free: a team's lanes read one step of different B rows (kRow odd) and the teams of a warp one
// step of their own Δ, u, dy (kAct odd); the teams' segment starts begin kLanes banks apart and their dB / dC
// kLanes·(kGrp + 1) apart, so lane l of team r hits bank r·kLanes + l (times kGrp + 1).
// kDiv: bwd_blk's channels per block divided by it, for GPUs with less shared memory per block (with_bwd_plan).
template <typename acc_t, int kLanes_, int kS_, int kDiv = 1>
struct BwdPlan {
  using Acc = acc_t;
  static constexpr int kLanes = kLanes_, kS = kS_, kDivide = kDiv;
  static constexpr int kW = kLanes * kS;
  static constexpr int kR = static_cast<int>(bwd_blk(kW, sizeof(acc_t) == 8)) / kDiv;
  static constexpr int kThreads = kR * kLanes;
  static constexpr int kRow = kScanChunk + 1;
  static constexpr int kAct = 3 * kScanChunk + 1;
  // steps per segment: their h_prev are held in registers, kSeg·kS weights per lane (32 words: 8 steps with 4
  // float states per lane, else 4)
  static constexpr int kSeg = sizeof(acc_t) * kS > 16 ? 4 : 8;
  static_assert(kScanChunk % kSeg == 0 && kSeg % kGrp == 0, "segments tile a chunk, groups a segment");
  static constexpr int kSegs = static_cast<int>(pad_to_bank(kScanChunk / kSeg * kW, kLanes));
  static constexpr int kSd = static_cast<int>(pad_to_bank(kW * (kGrp + 1), kLanes * (kGrp + 1)));
  // blocks per SM that the launch bounds ask registers for: 3 where the shared memory allows 3 (float32, 16 and
  // 32 states, 4 per lane: 128 threads); 2 with 2 states per lane (the few-channel plan of scan_bwd_cuda: 256
  // threads); else 1
  static constexpr int kMinBlocks = sizeof(acc_t) == 4 && (kW == 16 || kW == 32) ? (kS == 2 ? 2 : 3) : 1;
  static constexpr int64_t words(int nvar) {
    return int64_t{nvar} * kW * kRow + int64_t{kR} * (kAct + kSegs + nvar * kSd);
  }
  static_assert(words(2) * sizeof(acc_t) <= 227 * 1024, "the shared memory of one block fits an SM");
};

// Stages the chunk [t0, t0 + clen) (every thread of the block calls it): the group's per-step B / C rows into sB /
// sC where per step, each team's Δ, u, dy into act (R, kAct); zeros past clen, past dstate and for the dy of the
// channels past the group's end.
template <typename in_t, typename acc_t, int kLanes, int kS, int kDiv>
__device__ void stage_chunk(const ScanBwdParams& q, int64_t b, int64_t g, int64_t d0, int64_t t0, int clen,
                            acc_t* sB, acc_t* sC, acc_t* act) {
  using Plan = BwdPlan<acc_t, kLanes, kS, kDiv>;
  const ScanParams& p = q.f;
  const int64_t L = p.seqlen, dpg = p.dim / p.groups;
  __syncthreads();  // every thread is done with the previous chunk
  stage_bc_rows<in_t, acc_t, Plan::kW, kScanChunk, Plan::kRow, Plan::kThreads>(p, b, g, t0, clen, sB, sC);
MK_UNROLL
  for (int e = threadIdx.x; e < Plan::kR * kScanChunk; e += Plan::kThreads) {
    const int r = e / kScanChunk, i = e % kScanChunk;
    const int64_t d = block_channel(p, d0, r);
    acc_t dt = 0, u = 0, dy = 0;
    if (i < clen) {
      const int64_t at = (b * p.dim + d) * L + t0 + i;
      dt = delta_at<in_t, acc_t>(p, d, at);
      u = to_acc(static_cast<const in_t*>(p.u)[at]);
      if (d0 % dpg + r < dpg) {
        dy = to_acc(static_cast<const in_t*>(q.dout)[at]);
        if (p.z) {
          const acc_t z = to_acc(static_cast<const in_t*>(p.z)[at]);
          dy *= z * sigmoid(z);
        }
      }
    }
    acc_t* row = act + r * Plan::kAct;
    row[i] = dt;
    row[kScanChunk + i] = u;
    row[2 * kScanChunk + i] = dy;
  }
  __syncthreads();
}

// Sums the R channels' per-step dB / dC contributions of the steps [t, t + len) (staged in sd: dB (R, kSd), then
// dC where per step) in channel order into the task's partials at var_off (dstate, seqlen). A thread sums one
// (n, step) element. Every thread of the block calls it.
template <typename acc_t, int kLanes, int kS, int kDiv>
__device__ void reduce_group(const ScanBwdParams& q, const acc_t* sd, int64_t var_off, int64_t t, int len) {
  using Plan = BwdPlan<acc_t, kLanes, kS, kDiv>;
  const ScanParams& p = q.f;
  const int N = static_cast<int>(p.dstate), per = len * N;
  const int total = per * ((p.var_B ? 1 : 0) + (p.var_C ? 1 : 0));
  __syncthreads();
  for (int idx = threadIdx.x; idx < total; idx += Plan::kThreads) {
    const bool c = !p.var_B || idx >= per;  // a dC element
    const int e = idx >= per ? idx - per : idx, j = e % len, n = e / len;
    const acc_t* src = sd + (c && p.var_B ? Plan::kR * Plan::kSd : 0) + n * (kGrp + 1) + j;
    acc_t sum = 0;
MK_UNROLL
    for (int r = 0; r < Plan::kR; ++r) sum += src[r * Plan::kSd];
    static_cast<acc_t*>(c ? q.dC_part : q.dB_part)[var_off + n * p.seqlen + t + j] = sum;
  }
  __syncthreads();
}

// kVarBC: B and C both per step (else each as p.var_B, p.var_C say).
template <typename in_t, typename acc_t, int kLanes, int kS, int kDiv, bool kVarBC>
__global__ void __launch_bounds__(BwdPlan<acc_t, kLanes, kS, kDiv>::kThreads,
                                  BwdPlan<acc_t, kLanes, kS, kDiv>::kMinBlocks) scan_bwd_kernel(ScanBwdParams q) {
  using Plan = BwdPlan<acc_t, kLanes, kS, kDiv>;
  constexpr int kW = Plan::kW, kSeg = Plan::kSeg;
  extern __shared__ __align__(16) unsigned char scan_smem[];
  const ScanParams& p = q.f;
  const bool var_B = kVarBC || p.var_B, var_C = kVarBC || p.var_C;
  constexpr int R = Plan::kR;  // = q.blk (scan_bwd_cuda_blk)
  const int nvar = (var_B ? 1 : 0) + (var_C ? 1 : 0);
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t task = blockIdx.x;
  const int64_t blk = task % q.nblk, g = (task / q.nblk) % p.groups, b = task / (q.nblk * p.groups);
  const int64_t dpg = p.dim / p.groups, kch = blk * q.blk + r, d0 = g * dpg + blk * q.blk;
  const bool active = kch < dpg;  // channels past the group's end run along with dy = 0 and write nothing
  const int64_t d = block_channel(p, d0, r);
  const int64_t N = p.dstate, L = p.seqlen, dim = p.dim, bd = b * dim + d;
  const Team<acc_t, kLanes, kS> ch(p, d, lane);
  const SeqBounds sb = seq_bounds(p);
  const acc_t* ckpt = static_cast<const acc_t*>(p.chunk_states) + bd * p.n_chunks * N;
  acc_t* dh0 = static_cast<acc_t*>(q.dh0);
  // shared memory (BwdPlan): sB, sC, then per team act, segs, then sd
  acc_t* sB = reinterpret_cast<acc_t*>(scan_smem);
  acc_t* sC = sB + (var_B ? kW * Plan::kRow : 0);
  acc_t* act_all = sB + nvar * kW * Plan::kRow;
  const acc_t* act = act_all + r * Plan::kAct;  // this team's Δ [0, 64), u [64, 128), dy [128, 192)
  // this lane's segment starts: segment e, state lane + k·kLanes at e·kW + k·kLanes
  acc_t* segs = act_all + R * Plan::kAct + r * Plan::kSegs + lane;
  acc_t* sd = act_all + R * (Plan::kAct + Plan::kSegs);
  acc_t* sdB = sd + r * Plan::kSd + lane * (kGrp + 1);  // state lane + k·kLanes at k·kLanes·(kGrp + 1)
  acc_t* sdC = sdB + (var_B ? R * Plan::kSd : 0);
  const acc_t* sBl = sB + lane * Plan::kRow;  // this lane's first B row: state lane + k·kLanes at k·kLanes·kRow
  const acc_t* sCl = sC + lane * Plan::kRow;
  const int64_t var_off = ((b * p.groups + g) * q.nblk + blk) * N * L;
  auto Bk = [&](int k, int i) { return var_B ? sBl[k * kLanes * Plan::kRow + i] : ch.Bc[k]; };
  auto Ck = [&](int k, int i) { return var_C ? sCl[k * kLanes * Plan::kRow + i] : ch.Cc[k]; };

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
  for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kScanChunk;
    const int clen = static_cast<int>(L - t0 < kScanChunk ? L - t0 : kScanChunk);
    stage_chunk<in_t, acc_t, kLanes, kS, kDiv>(q, b, g, d0, t0, clen, sB, sC, act_all);
    // the sequence holding step t0 + i (s holds it or a later step)
    auto seq_of = [&](int i) {
      int64_t sf = s;
      while (sb.begin(sf) > t0 + i || sb.end(sf) <= t0 + i) --sf;
      return sf;
    };
    // whether the n steps of the segment at i0 are all of it and inside one sequence, neither its first nor last
    auto plain = [&](int i0, int n) {
      if (n < kSeg) return false;
      const int64_t sf = seq_of(i0);
      return sb.begin(sf) < t0 + i0 && sb.end(sf) > t0 + i0 + kSeg;
    };
    // Recomputes the steps [i0, i0 + n) of the segment at i0 from h (the state before step i0), with hp[j] = h_prev
    // of step i0 + j when kKeep. Where a sequence starts, h_prev is its initial state.
    auto walk = [&]<bool kPlain, bool kKeep>(int i0, int n, acc_t(&hp)[Plan::kSeg][kS]) {
      int64_t sf = 0, next = -1;  // the sequence of the step, the next step that starts one
      if constexpr (!kPlain) {
        sf = seq_of(i0);
        next = sb.begin(sf) == t0 + i0 ? t0 + i0 : sb.end(sf);
      }
MK_UNROLL
      for (int j = 0; j < kSeg; ++j) {
        if (!kPlain && j >= n) continue;
        const int i = i0 + j;
        if (!kPlain && t0 + i == next) {
          while (sb.end(sf) <= t0 + i) ++sf;
          ch.load(state_row<acc_t>(p.h0, sb.global(sf, b), d, dim, N), h);
          next = sb.end(sf);
        }
        const acc_t dt = act[i], dtu = dt * act[kScanChunk + i];
MK_UNROLL
        for (int k = 0; k < kS; ++k) {
          if constexpr (kKeep) hp[j][k] = h[k];
          h[k] = exp2_of(dt * ch.A2[k]) * h[k] + dtu * Bk(k, i);
        }
      }
    };
    // The global inputs of step i's outputs that are not staged: dout and z (for dz), Δ before softplus (for its
    // gradient). Loaded at the start of the step's group, so their latency hides behind the group's steps rather
    // than stalling the lane (and, at the group's reduction barrier, the block) right before the outputs.
    struct StepIn {
      acc_t gz, z, pre;
    };
    auto load_step = [&](int i) {
      const int64_t at = bd * L + t0 + i;
      StepIn v{0, 0, 0};
      if (p.z) {
        v.gz = to_acc(static_cast<const in_t*>(q.dout)[at]);
        v.z = to_acc(static_cast<const in_t*>(p.z)[at]);
      }
      if (p.softplus) v.pre = pre_delta_at<in_t, acc_t>(p, d, at);
      return v;
    };
    // The lane's outputs of step i given the team sums of its dΔ, du and y parts and its inputs (load_step).
    auto write_step = [&](int i, acc_t ddt, acc_t du, acc_t y, const StepIn& in) {
      const int64_t at = bd * L + t0 + i;
      const acc_t u = act[kScanChunk + i], dy = act[2 * kScanChunk + i];
      if (p.z) {
        const acc_t sz = sigmoid(in.z);
        static_cast<in_t*>(q.dz)[at] =
            store_cast<in_t>(in.gz * (y + ch.Dd * u) * sz * (acc_t(1) + in.z * (acc_t(1) - sz)));
      }
      static_cast<in_t*>(q.du)[at] = store_cast<in_t>(du + ch.Dd * dy);
      const acc_t dx = p.softplus ? ddt * softplus_thr_grad(in.pre) : ddt;
      static_cast<in_t*>(q.ddelta)[at] = store_cast<in_t>(dx);
      dbias_l += dx;
      dD_l += dy * u;
    };
    // Reverse recurrence over the n steps of the segment at i0 (hp from walk), last group first.
    auto reverse = [&]<bool kPlain>(int i0, int n, const acc_t(&hp)[Plan::kSeg][kS]) {
MK_UNROLL
      for (int gr = kSeg / kGrp - 1; gr >= 0; --gr) {
        const int len = kPlain ? kGrp : (n - gr * kGrp < kGrp ? n - gr * kGrp : kGrp);
        if (len <= 0) continue;
        // the steps whose sums this lane will hold (team_sum_steps): jj = lane + m·kLanes, in slot m·kLanes, or
        // lane % kGrp
        constexpr int kM = kGrp > kLanes ? kGrp / kLanes : 1;
        auto writes = [&](int m, int& jj) {
          jj = kGrp > kLanes ? lane + m * kLanes : lane % kGrp;
          return active && (kGrp > kLanes || lane < kGrp) && jj < len;
        };
        StepIn in[kM];
MK_UNROLL
        for (int m = 0; m < kM; ++m) {
          int jj;
          if (writes(m, jj)) in[m] = load_step(i0 + gr * kGrp + jj);
        }
        acc_t pdt[kGrp], pdu[kGrp], py[kGrp];  // this lane's parts of each step's dΔ, du and y
MK_UNROLL
        for (int jj = kGrp - 1; jj >= 0; --jj) {
          pdt[jj] = pdu[jj] = py[jj] = 0;
          if (!kPlain && jj >= len) continue;
          const int j = gr * kGrp + jj, i = i0 + j;
          const int64_t t = t0 + i;
          if (!kPlain && t == s_last && active) ch.load(state_row<acc_t>(q.dlast, sb.global(s, b), d, dim, N), carry);
          const acc_t dt = act[i], u = act[kScanChunk + i], dy = act[2 * kScanChunk + i], dtu = dt * u;
          acc_t gA = 0, gB = 0, yp = 0;  // Σ_k dh·ā·h_prev·A·log2(e), Σ_k dh·B, Σ_k C·h
MK_UNROLL
          for (int k = 0; k < kS; ++k) {
            const acc_t Bt = Bk(k, i), Ct = Ck(k, i);
            const acc_t a = exp2_of(dt * ch.A2[k]);
            const acc_t ht = a * hp[j][k] + dtu * Bt;
            yp += Ct * ht;
            const acc_t dh = Ct * dy + carry[k];
            const acc_t cB = dh * dtu, cC = dy * ht;
            if (var_B) {
              sdB[k * kLanes * (kGrp + 1) + jj] = cB;
            } else {
              dBc[k] += cB;
            }
            if (var_C) {
              sdC[k * kLanes * (kGrp + 1) + jj] = cC;
            } else {
              dCc[k] += cC;
            }
            carry[k] = a * dh;
            const acc_t ah = carry[k] * hp[j][k];
            dA[k] += ah * dt;
            gA += ah * ch.A2[k];
            gB += dh * Bt;
          }
          pdt[jj] = gA * acc_t(kLn2) + u * gB;
          pdu[jj] = dt * gB;
          py[jj] = yp;
          if (!kPlain && t == s_first) {
            if (active) ch.store(carry, dh0 + (sb.global(s, b) * dim + d) * N);
            --s;
            enter_seq();
          }
        }
        team_sum_steps<kLanes, kGrp>(pdt, lane);
        team_sum_steps<kLanes, kGrp>(pdu, lane);
        if (p.z) team_sum_steps<kLanes, kGrp>(py, lane);
MK_UNROLL
        for (int m = 0; m < kM; ++m) {
          const int v = kGrp > kLanes ? m * kLanes : 0;
          int jj;
          if (writes(m, jj)) write_step(i0 + gr * kGrp + jj, pdt[v], pdu[v], py[v], in[m]);
        }
        if (var_B || var_C) reduce_group<acc_t, kLanes, kS, kDiv>(q, sd, var_off, t0 + i0 + gr * kGrp, len);
      }
    };
    // the lane's states at the segment starts, from the checkpoint
    const int nseg = (clen + kSeg - 1) / kSeg;
    acc_t hp[kSeg][kS];
    ch.load(ckpt + c * N, h);
    for (int e = 0; e < nseg; ++e) {
MK_UNROLL
      for (int k = 0; k < kS; ++k) segs[e * kW + k * kLanes] = h[k];
      if (e == nseg - 1) break;
      if (plain(e * kSeg, kSeg)) {
        walk.template operator()<true, false>(e * kSeg, kSeg, hp);
      } else {
        walk.template operator()<false, false>(e * kSeg, kSeg, hp);
      }
    }
    for (int e = nseg - 1; e >= 0; --e) {
      const int i0 = e * kSeg, n = clen - i0 < kSeg ? clen - i0 : kSeg;
MK_UNROLL
      for (int k = 0; k < kS; ++k) h[k] = segs[e * kW + k * kLanes];
      if (plain(i0, n)) {
        walk.template operator()<true, true>(i0, n, hp);
        reverse.template operator()<true>(i0, n, hp);
      } else {
        walk.template operator()<false, true>(i0, n, hp);
        reverse.template operator()<false>(i0, n, hp);
      }
    }
  }
  const acc_t dD = team_sum<kLanes>(dD_l), dbias = team_sum<kLanes>(dbias_l);
  if (!active) return;
  ch.store(dA, static_cast<acc_t*>(q.dA_part) + bd * N);
  if (!var_B) ch.store(dBc, static_cast<acc_t*>(q.dB_part) + bd * N);
  if (!var_C) ch.store(dCc, static_cast<acc_t*>(q.dC_part) + bd * N);
  if (lane == 0) {
    static_cast<acc_t*>(q.dD_part)[bd] = dD;
    static_cast<acc_t*>(q.dbias_part)[bd] = dbias;
  }
}

// Whether dispatch_lanes' plan (kLanes, kS) has the backward's few-channel plan (scan_bwd_cuda).
template <typename acc_t, int kLanes, int kS>
constexpr bool kWideBwd = std::is_same_v<acc_t, float> && kLanes == 4 && kS == 4;

// Dynamic shared memory of a block of Plan for p, in bytes.
template <typename Plan>
int64_t bwd_smem(const ScanParams& p) {
  const int nvar = (p.var_B ? 1 : 0) + (p.var_C ? 1 : 0);
  return Plan::words(nvar) * static_cast<int64_t>(sizeof(typename Plan::Acc));
}

// The backward of Plan (the block's channels, so the grid and the partials, depend on Plan::kR only:
// scan_bwd_cuda_launch).
template <typename in_t, typename Plan>
void launch_bwd(const ScanBwdParams& q, unsigned grid, cudaStream_t stream) {
  const ScanParams& p = q.f;
  using acc_t = typename Plan::Acc;
  const int smem = static_cast<int>(bwd_smem<Plan>(p));
  // The limit is the kernel's, shared by the host threads: set the instance's largest need (without kVarBC, one
  // per-step B or C), not this call's, or a call needing less could lower it between another's set and launch.
  auto run = [&](auto kernel, int nvar_max) {
    const int64_t most = std::min<int64_t>(Plan::words(nvar_max) * int64_t{sizeof(acc_t)}, p.smem_optin);
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(most));
    kernel<<<grid, Plan::kThreads, smem, stream>>>(q);
  };
  if (p.var_B && p.var_C) {
    run(scan_bwd_kernel<in_t, acc_t, Plan::kLanes, Plan::kS, Plan::kDivide, true>, 2);
  } else {
    run(scan_bwd_kernel<in_t, acc_t, Plan::kLanes, Plan::kS, Plan::kDivide, false>, 1);
  }
}

// The plan with fewer channels per block (kDiv 2 or 4) for devices whose shared memory per block the plan (kLanes,
// kS) exceeds: the least kDiv whose blocks fit 99 KB, the least of any GPU (sm_86, sm_89); where none does, the
// largest that leaves a channel per block (the least shared memory; it fits the 163 KB of sm_80 at 256 states,
// float64 128); 0 where the full plan fits 99 KB.
template <typename acc_t, int kLanes, int kS>
constexpr int small_div() {
  constexpr int64_t kSmall = 99 * 1024;
  constexpr int kR = BwdPlan<acc_t, kLanes, kS>::kR;
  if (BwdPlan<acc_t, kLanes, kS>::words(2) * int64_t{sizeof(acc_t)} <= kSmall) return 0;
  if (kR % 2 == 0 && BwdPlan<acc_t, kLanes, kS, 2>::words(2) * int64_t{sizeof(acc_t)} <= kSmall) return 2;
  if (kR % 4 == 0) return 4;
  return kR % 2 == 0 ? 2 : 0;
}

// Calls f.template operator()<Plan>() with the team plan of q: dispatch_lanes' lanes, the few-channel plan below,
// or, where the device's shared memory per block is less than the plan needs, fewer channels per block
// (small_div; where none fits, the plan that does not: the glue refuses q).
template <typename acc_t, typename F>
void with_bwd_plan(const ScanBwdParams& q, F&& f) {
  const ScanParams& p = q.f;
  dispatch_lanes(p.dstate, [&]<int kLanes, int kS>() {
    if constexpr (kFitsCuda<acc_t, kS>) {
      using Full = BwdPlan<acc_t, kLanes, kS>;
      // Few channels (9 to 16 states, float accumulators): where the blocks of teams of 8 lanes with 2 states
      // each all fit at once (2 per SM), those, twice the warps of dispatch_lanes' plan (at (2, 4096, L, 16):
      // 256 blocks, 2 per SM of 8 warps, not of 4). Not elsewhere: wider teams of more states would need blocks
      // of 512 threads; fewer states are rare in Mamba models.
      if constexpr (kWideBwd<acc_t, kLanes, kS>) {
        if (p.batch * p.groups * q.nblk <= int64_t{p.sm_count} * BwdPlan<acc_t, 8, 2>::kMinBlocks) {
          f.template operator()<BwdPlan<acc_t, 8, 2>>();
          return;
        }
      }
      constexpr int kDiv = small_div<acc_t, kLanes, kS>();
      if constexpr (kDiv > 0) {
        if (bwd_smem<Full>(p) > p.smem_optin) {
          f.template operator()<BwdPlan<acc_t, kLanes, kS, kDiv>>();
          return;
        }
      }
      f.template operator()<Full>();
    }
  });
}

}  // namespace

template <typename in_t, typename acc_t>
ScanBwdLaunch scan_bwd_cuda_team_as(const ScanBwdParams& q) {
  ScanBwdLaunch launch{0, 0};
  with_bwd_plan<acc_t>(q, [&]<typename Plan>() { launch = {Plan::kR, bwd_smem<Plan>(q.f)}; });
  return launch;
}

template <typename in_t, typename acc_t>
void scan_bwd_cuda_as(const ScanBwdParams& q, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(q.f.batch * q.f.groups * q.nblk);
  with_bwd_plan<acc_t>(q, [&]<typename Plan>() { launch_bwd<in_t, Plan>(q, grid, stream); });
}

}  // namespace markovkit

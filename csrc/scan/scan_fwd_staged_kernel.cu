// Forward of the selective scan, staged plan (scan_fwd_cuda takes it where staged_plan does): kLanes threads per
// channel, each holding kS consecutive states in registers (16, with 1, 2 or 4 lanes for up to 16, 32, 64 states;
// where that leaves fewer blocks than SMs, 4, with 4, 8 or 16 lanes), and a block of kThreads threads, kThreads /
// kLanes channels of one group of one batch row, walks time in tiles of kT steps.
// Per tile the block
//  1. copies the channels' Δ, u, z rows and the group's B / C rows of the tile into shared memory (cp.async,
//     issued one tile ahead, so the copy of tile k + 1 runs behind tile k);
//  2. makes the per-(channel, step) scalars once, Δ = softplus(δ + bias) and Δ·u, and B / C in float (prep);
//  3. runs each thread's states over the tile's steps: no shuffles, no team sums; the kS exps of a step are
//     independent, so the special-function unit sets the pace (run); each thread leaves its part of y;
//  4. sums the parts of y, gates and stores out, coalesced (finish).
// Where: per-step B and C, no cu_seqlens, float accumulators, 9 to 64 states, 16-byte aligned rows, dim / groups a
// multiple of the block's channels and a block for every SM (staged_plan; fewer channels leave the team plans of
// scan_kernel.cu more parallel work).
#include "scan/scan_staged.cuh"

namespace markovkit {
namespace {
using namespace scan_cuda;

// The plan of kLanes threads of kS states per channel for input type in_t: thread (c, s) runs states s·kS + i
// (i < kS) of the block's channel c (thread_of). Shared memory: two raw tiles (the one in use, the one being
// copied), each Δ, u, z (kCh, kT) and B, C (kW, kT) in in_t; then Δ, Δ·u (kT, kRow), the parts of y (kT, kLanes,
// kRow) and B, C (kT, kW) in float.
template <typename in_t, int kLanes, int kS>
struct Plan {
  using In = in_t;
  static constexpr int kCh = kThreads / kLanes;                       // channels per block
  static constexpr int kW = kLanes * kS;                              // states per channel, padded
  static constexpr int kVec = 16 / static_cast<int>(sizeof(in_t));  // elements per 16-byte piece
  static constexpr int kSegs = kT / kVec;                             // pieces per row of a tile
  static constexpr int kPieces = kCh * kSegs;                         // pieces of an activation's tile
  static constexpr int kIters = (kPieces + kThreads - 1) / kThreads;  // of them per thread, at most
  // floats per step of Δ, Δ·u and a part of y, padded (2 mod 8): in prep and finish the lanes of a warp (2 or 4
  // pieces of each of up to 16 or 8 channels, 8 or 4 steps apart) hit distinct banks
  static constexpr int kRow = kCh + 2;
  static constexpr int kAct = kCh * kT, kBC = kW * kT;  // elements of an activation's tile, of B's / C's
  static constexpr int kRaw = (3 * kAct + 2 * kBC) * static_cast<int>(sizeof(in_t));  // bytes of a raw tile
  static constexpr int kBytes =
      2 * kRaw + ((2 + kLanes) * kT * kRow + 2 * kT * kW) * static_cast<int>(sizeof(float));
  // within the 99 KB per block of the GPUs with the least (sm_86, sm_89): no device needs another plan
  static_assert(kBytes <= 99 * 1024, "a block's shared memory fits every sm_80+ GPU");
  unsigned char* base;
  __device__ in_t* raw(int buf, int part) const {  // part: 0 Δ, 1 u, 2 z, 3 B, 4 C
    return reinterpret_cast<in_t*>(base + buf * kRaw) + (part < 3 ? part * kAct : 3 * kAct + (part - 3) * kBC);
  }
  __device__ float* dt() const { return reinterpret_cast<float*>(base + 2 * kRaw); }
  __device__ float* dtu() const { return dt() + kT * kRow; }
  __device__ float* y() const { return dtu() + kT * kRow; }  // part s of step t at (t·kLanes + s)·kRow
  __device__ float* B() const { return y() + kLanes * kT * kRow; }
  __device__ float* C() const { return B() + kT * kW; }
};

// The channel of the block and the lane of the channel (s) of thread tid: a warp holds kChW = 32 / kLanes channels,
// lane l of it channel l % kChW (of the warp's) and lane l / kChW of it. Lanes next to each other then read the same B
// and C (one s): a quarter warp's LDS.128 of a step's B or C reads kLanes / 4 16-byte pieces or one, side by side,
// where channel-major lanes read up to 8 (at 64 states 4, 32 floats apart: 2-way bank conflicts), and the
// shared-memory unit packs lanes 1 apart: two wavefronts a warp, not four to eight.
template <int kLanes>
__device__ __forceinline__ void thread_of(int tid, int& ch, int& s) {
  constexpr int kChW = 32 / kLanes;
  const int lane = tid % 32;
  ch = tid / 32 * kChW + lane % kChW;
  s = lane / kChW;
}

// Copies of tile t0 into raw buffer buf: Δ, u, z rows of the block's channels, B and C's kW rows (zeros past
// dstate and L).
template <typename P>
__device__ void copy_tile(const ScanParams& p, const P& sm, int buf, int64_t bd0, int64_t bc_off, int64_t t0) {
  using in_t = typename P::In;
  const int64_t L = p.seqlen;
  const void* acts[3] = {p.delta, p.u, p.z};
MK_UNROLL
  for (int part = 0; part < 3; ++part) {
    if (acts[part] != nullptr) {  // no z
      copy_rows<in_t, P::kCh>(sm.raw(buf, part), static_cast<const in_t*>(acts[part]) + bd0 * L, P::kCh, L, t0);
    }
  }
  copy_rows<in_t, P::kW>(sm.raw(buf, 3), static_cast<const in_t*>(p.B) + bc_off, p.dstate, L, t0);
  copy_rows<in_t, P::kW>(sm.raw(buf, 4), static_cast<const in_t*>(p.C) + bc_off, p.dstate, L, t0);
}

// The block's kernel. In prep and finish a thread handles the pieces e = tid + j·kThreads (j < kIters, e < kPieces)
// of the tile: channel e / kSegs, steps (e % kSegs)·kVec and on.
template <typename in_t, int kLanes, int kS>
__global__ void __launch_bounds__(kThreads) scan_fwd_staged_kernel(ScanParams p) {
  using P = Plan<in_t, kLanes, kS>;
  extern __shared__ __align__(16) unsigned char scan_staged_smem[];
  const P sm{scan_staged_smem};
  const int64_t L = p.seqlen, N = p.dstate, dim = p.dim;
  const int64_t bd0 = static_cast<int64_t>(blockIdx.x) * P::kCh, b = bd0 / dim, d0 = bd0 % dim;
  const int64_t bc_off = (b * p.groups + d0 / (dim / p.groups)) * N * L;
  const int tid = threadIdx.x;
  int ch, s;
  thread_of<kLanes>(tid, ch, s);
  const int n0 = s * kS;
  const int64_t d = d0 + ch;
  // the thread's states: A·log2(e) and h
  float A2[kS], h[kS];
  load_a2(p, d, n0, 0, A2);
  load_state(state_row<float>(p.h0, b, d, dim, N), n0, 0, N, h);
  // the channels of the thread's pieces: bias and D
  float bias[P::kIters], Dd[P::kIters];
  piece_weights<P::kIters, P::kPieces, P::kSegs>(p, d0, bias, Dd);
  float* ckpt = static_cast<float*>(p.chunk_states) + (bd0 + ch) * p.n_chunks * N;

  // prep: the pieces' Δ and Δ·u into dt, dtu (step-major); B and C in float (step-major, zeros past dstate)
  const auto prep = [&](int buf) {
MK_UNROLL
    for (int j = 0; j < P::kIters; ++j) {
      const int e = tid + j * kThreads, c = e / P::kSegs, t = e % P::kSegs * P::kVec;
      if (e >= P::kPieces) continue;
      float delta[P::kVec], u[P::kVec];
      load_piece(sm.raw(buf, 0) + c * kT + t, delta);
      load_piece(sm.raw(buf, 1) + c * kT + t, u);
MK_UNROLL
      for (int i = 0; i < P::kVec; ++i) {
        const float x = delta[i] + bias[j];
        const float dt = p.softplus ? softplus_thr(x) : x;
        sm.dt()[(t + i) * P::kRow + c] = dt;
        sm.dtu()[(t + i) * P::kRow + c] = dt * u[i];
      }
    }
    bc_to_float<in_t, P::kW, 1, 0>(sm.raw(buf, 3), sm.B(), 2);
  };
  // run: this thread's states over the tile's steps (kWhole: all kT of them)
  const auto run = [&]<bool kWhole>(int steps) {
MK_UNROLL
    for (int t = 0; t < kT; ++t) {
      if (!kWhole && t >= steps) break;
      const float dt = sm.dt()[t * P::kRow + ch], dtu = sm.dtu()[t * P::kRow + ch];
      const float4* Bt = reinterpret_cast<const float4*>(sm.B() + t * P::kW + n0);
      const float4* Ct = reinterpret_cast<const float4*>(sm.C() + t * P::kW + n0);
      float y[4];  // partial sums: four short chains, not one of kS
MK_UNROLL
      for (int k = 0; k < kS / 4; ++k) {
        const float4 Bk = Bt[k], Ck = Ct[k];
        const float Bv[4] = {Bk.x, Bk.y, Bk.z, Bk.w}, Cv[4] = {Ck.x, Ck.y, Ck.z, Ck.w};
MK_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int n = 4 * k + i;
          h[n] = exp2_of(dt * A2[n]) * h[n] + dtu * Bv[i];
          y[i] = k == 0 ? Cv[i] * h[n] : y[i] + Cv[i] * h[n];
        }
      }
      sm.y()[(t * kLanes + s) * P::kRow + ch] = (y[0] + y[1]) + (y[2] + y[3]);
    }
  };
  // finish: the pieces' out = (y + D·u)·silu(z), y the sum of its kLanes parts; one 16-byte store each (pieces past
  // L are not stored)
  const auto finish = [&](int buf, int64_t t0) {
MK_UNROLL
    for (int j = 0; j < P::kIters; ++j) {
      const int e = tid + j * kThreads, c = e / P::kSegs, t = e % P::kSegs * P::kVec;
      if (e >= P::kPieces || t0 + t >= L) continue;
      float u[P::kVec], z[P::kVec];
      load_piece(sm.raw(buf, 1) + c * kT + t, u);
      if (p.z) load_piece(sm.raw(buf, 2) + c * kT + t, z);
      float o[P::kVec];
MK_UNROLL
      for (int i = 0; i < P::kVec; ++i) {
        float y = Dd[j] * u[i];
MK_UNROLL
        for (int part = 0; part < kLanes; ++part) y += sm.y()[((t + i) * kLanes + part) * P::kRow + c];
        if (p.z) y *= z[i] * sigmoid(z[i]);
        o[i] = y;
      }
      store_piece(o, static_cast<in_t*>(p.out) + (bd0 + c) * L + t0 + t);
    }
  };

  copy_tile(p, sm, 0, bd0, bc_off, 0);
  for (int64_t t0 = 0, k = 0; t0 < L; t0 += kT, ++k) {
    const int buf = static_cast<int>(k % 2);
    cp_async_wait_all();
    __syncthreads();  // tile k is in; every thread is done with tile k - 1 (its buffer, dt, dtu, y)
    if (t0 + kT < L) copy_tile(p, sm, 1 - buf, bd0, bc_off, t0 + kT);
    prep(buf);
    if (t0 % kScanChunk == 0) store_state(h, n0, 0, N, ckpt + t0 / kScanChunk * N);  // the state before step t0
    __syncthreads();  // dt, dtu, B, C of tile k are made
    const int steps = L - t0 < kT ? static_cast<int>(L - t0) : kT;
    if (steps == kT) {
      run.template operator()<true>(steps);
    } else {
      run.template operator()<false>(steps);
    }
    __syncthreads();  // y of tile k is made
    finish(buf, t0);
  }
  store_state(h, n0, 0, N, static_cast<float*>(p.last_state) + (b * dim + d) * N);
}

// The staged plan's (lanes, states per lane) for p, or (0, 0) where it does not take p: 16 states per lane where
// that gives a block for every SM, else 4.
StagedPlan staged_plan(const ScanParams& p) {
  if (!staged_inputs(p) || !aligned16(p.out)) return {0, 0};
  for (const int states : {16, 4}) {
    const int lanes = staged_lanes(p.dstate, states);
    if (staged_blocks(p, kThreads / lanes)) return {lanes, states};
  }
  return {0, 0};
}

}  // namespace

bool scan_fwd_staged_cuda(const ScanParams& p, cudaStream_t stream) {
  const StagedPlan plan = staged_plan(p);
  if (plan.lanes == 0) return false;
  dispatch_itype(p.itype, [&]<typename in_t, typename acc_t>() {
    if constexpr (std::is_same_v<acc_t, float>) {
      const auto launch = [&]<int kLanes, int kS>() {
        using P = Plan<in_t, kLanes, kS>;
        const unsigned grid = static_cast<unsigned>(p.batch * p.dim / P::kCh);
        cudaFuncSetAttribute(scan_fwd_staged_kernel<in_t, kLanes, kS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             P::kBytes);
        scan_fwd_staged_kernel<in_t, kLanes, kS><<<grid, kThreads, P::kBytes, stream>>>(p);
      };
      switch (plan.states * 100 + plan.lanes) {
        case 1601: launch.template operator()<1, 16>(); break;
        case 1602: launch.template operator()<2, 16>(); break;
        case 1604: launch.template operator()<4, 16>(); break;
        case 404: launch.template operator()<4, 4>(); break;
        case 408: launch.template operator()<8, 4>(); break;
        default: launch.template operator()<16, 4>(); break;
      }
    }
  });
  return true;
}

}  // namespace markovkit

// Backward of the selective scan, staged plan (scan_bwd_cuda takes it where staged_bwd_plan does; the layout of the
// forward's staged plan): kLanes threads per channel, each holding kS consecutive states in registers (in a lane's
// own order: state_order): kS = 8 with 2, 4 or 8 lanes for up to 16, 32, 64 states, or, where that leaves fewer blocks
// than SMs, kS = 4 with 4, 8 or 16 lanes; a block of kThreads threads, kCh = kThreads / kLanes channels of one group
// of one batch row, walks the chunks last first, each chunk's tiles (kT steps) in visits:
//  - walks W(0) .. W(nt - 2): the tile's state at its start is kept (shared memory, the thread's own), then the
//    thread's states run over the tile (the chunk starts at its checkpoint);
//  - reverses R(nt - 1) .. R(0): from the tile's start the states at its segments' starts (kSeg steps apart) are
//    kept (shared memory, the thread's own); per segment, last first, its steps' h_prev and ā are recomputed into
//    registers and the reverse recurrence runs over them. Per step the thread's 2·kS contributions to dB and dC are
//    summed over the warp's channels (warp_sum_scatter: each lane keeps kKeep sums) into shared memory; per segment
//    the lanes' parts of a step's dΔ, du (and y, for dz) are summed over the channel's lanes (team_sum_steps). After
//    the tile the warps' dB / dC sums are added in warp order into the block's partial, and the per-(channel, step)
//    outputs are made and stored coalesced (finish).
// Each visit's rows (Δ, u, B; for reverses also z, dout, C) are copied into shared memory with cp.async one visit
// ahead and made into floats once (prep: Δ = softplus(δ + bias), Δ·u, dy = dout·silu(z), B and C in each of the
// lanes' state orders). The same conditions as the forward's staged plan (no cu_seqlens: one sequence per batch
// row). No atomics: deterministic.
#include "scan/scan_staged.cuh"

namespace markovkit {
namespace {
using namespace scan_cuda;

constexpr int kSeg = 4;                       // steps per segment: h_prev and ā of kSeg steps in registers
constexpr int kTiles = kScanChunk / kT;       // tiles per chunk
constexpr int kSegsPerTile = kT / kSeg;
// A tile's steps are a multiple of kSeg: the staged plans take rows of 16-byte multiples, 4 or 8 elements.
static_assert(4 % kSeg == 0, "a tile's steps are a multiple of kSeg");

constexpr int log2_of(int x) { return x <= 1 ? 0 : 1 + log2_of(x / 2); }

// Of `levels` halvings over a warp's channels, those that halve a thread's kS states (log2(kS) at most).
constexpr int state_levels(int levels, int kS) { return levels < log2_of(kS) ? levels : log2_of(kS); }

// The plan of kLanes threads per channel for input type in_t: thread (c, s) = (tid / kLanes, tid % kLanes) runs
// states s·kS + (i ^ pm) (i < kS, pm: state_order) of the block's channel c. Shared memory: two raw tiles (the
// visit's, the next's), each δ, u, z, dout (kCh, kT) and B, C (kW, kT) in in_t; then in float Δ, Δ·u, dy and the
// summed parts of dΔ (gA), du (gB), y (kT, kRow each); B, C (kT, kW) in kCopies orders (copy k: state n at
// n ^ (k << kCopyShift)); the chunk's tiles' start states (kTiles, kS, kThreads) and the tile's segments'
// (kSegsPerTile, kS, kThreads), each thread's own; the warps' dB / dC sums (kWarps, 2, kW, kRed).
template <typename in_t, int kLanes, int kS>
struct BwdPlan {
  using In = in_t;
  static constexpr int kCh = kThreads / kLanes;                       // channels per block
  static constexpr int kW = kLanes * kS;                              // states per channel, padded
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kLevels = log2_of(32 / kLanes);                // halvings over the warp's channels: 4 .. 1
  static constexpr int kStateLevels = state_levels(kLevels, kS);
  static constexpr int kKeep = 2 * kS >> kLevels;                     // dB / dC sums a lane keeps per step
  // pm's bits kS / 2 >> m (m < kStateLevels); those below 4 (inside a float4 of B / C) take kCopies values,
  // multiples of 1 << kCopyShift
  static constexpr int kCopyShift = log2_of(kS) - kStateLevels;
  static constexpr int kCopies = 1 << (kStateLevels - (log2_of(kS) > 2 ? log2_of(kS) - 2 : 0));
  static constexpr int kVec = 16 / static_cast<int>(sizeof(in_t));  // elements per 16-byte piece
  static constexpr int kSegs = kT / kVec;                             // pieces per row of a tile
  static constexpr int kPieces = kCh * kSegs;                         // pieces of an activation's tile
  static constexpr int kIters = (kPieces + kThreads - 1) / kThreads;  // of them per thread, at most
  static constexpr int kRow = kCh + 2;  // floats per step of the per-(channel, step) arrays (as the forward's)
  static constexpr int kRed = kT + 1;   // floats per (warp, dB / dC, state) row: the lanes' rows hit distinct banks
  static constexpr int kAct = kCh * kT, kBC = kW * kT;
  static constexpr int kRaw = (4 * kAct + 2 * kBC) * static_cast<int>(sizeof(in_t));  // bytes of a raw tile
  static constexpr int kFloats =
      6 * kT * kRow + 2 * kCopies * kT * kW + (kTiles + kSegsPerTile) * kS * kThreads + kWarps * 2 * kW * kRed;
  static constexpr int kBytes = 2 * kRaw + kFloats * static_cast<int>(sizeof(float));
  // two blocks per SM on sm_90 (as the launch bounds' registers): at most 113 KB each of its 228 KB (sm_80: one)
  static_assert(kBytes <= 113 * 1024, "two blocks fit an SM's shared memory");
  unsigned char* base;
  __device__ in_t* raw(int buf, int part) const {  // part: 0 δ, 1 u, 2 z, 3 dout, 4 B, 5 C
    return reinterpret_cast<in_t*>(base + buf * kRaw) + (part < 4 ? part * kAct : 4 * kAct + (part - 4) * kBC);
  }
  __device__ float* act(int k) const {  // k: 0 Δ, 1 Δ·u, 2 dy, 3 gA, 4 gB, 5 y; step t of channel c at t·kRow + c
    return reinterpret_cast<float*>(base + 2 * kRaw) + k * kT * kRow;
  }
  __device__ float* B(int copy) const { return act(6) + copy * 2 * kT * kW; }
  __device__ float* C(int copy) const { return B(copy) + kT * kW; }
  __device__ float* start() const { return B(kCopies); }  // state i of tile k of thread x: (k·kS + i)·kThreads + x
  __device__ float* seg() const { return start() + kTiles * kS * kThreads; }  // likewise, of segment k
  __device__ float* red() const { return seg() + kSegsPerTile * kS * kThreads; }  // ((w·2 + v)·kW + n)·kRed + t
};

// The lane bit of halving m of the warp's channels that splits the states (m < kStateLevels): the channel bits from
// kLanes up; at 16 states (one level more than the states': kLevels 4 with 8 states a thread, 3 with 4) from
// 2·kLanes up, the lowest going to the dB / dC halving last, so lanes kLanes apart read the same B and C (the
// shared-memory unit then packs their LDS.128: fewer wavefronts).
template <int kLanes, int kLevels, int kStateLevels>
constexpr int state_halving_bit(int m) {
  return kLanes << (kLevels > kStateLevels ? m + 1 : m);
}

// The order of a thread's kS states: slot i holds state n0 + (i ^ pm), pm's bit kS / 2 >> m set where the lane's
// state_halving_bit(m) is: at halving m of warp_sum_scatter a lane and its partner then keep the same slots (the lower
// half) for different states, with no selects. At 64 states with 8 a thread (8 lanes a channel) the bit 4 is flipped
// where the lane's bit 2 is set too (partners share it): lanes s and s + 4 of a channel, 32 floats apart in a row of
// B or C, read its float4 halves in opposite orders (their LDS.128 hit distinct banks).
template <int kLanes, int kLevels, int kS>
__device__ __forceinline__ int state_order(int lane) {
  constexpr int kStateLevels = state_levels(kLevels, kS);
  int pm = kLanes == 8 && kS == 8 && (lane & 4) != 0 ? kS / 2 : 0;
MK_UNROLL
  for (int m = 0; m < kStateLevels; ++m) {
    pm ^= (lane & state_halving_bit<kLanes, kLevels, kStateLevels>(m)) != 0 ? kS / 2 >> m : 0;
  }
  return pm;
}

// Sums over the warp's channels (the lanes differing in the channel bits, kLanes up) of the thread's dB parts vb and
// dC parts vc (slot i: state n0 + (i ^ pm)). Halvings m < state_levels(kLevels, kS) over state_halving_bit(m): each
// lane keeps slots below kS >> (m + 1) and adds the partner's upper ones (the same states). Then, at 16 states (a
// level more than the states'), a last one over lane bit kLanes keeps dC where it is set, dB where not, in vb[0].
// Lane `lane` ends with the sums of vb, vc at slots j < kS >> kLevels (states n0 + (pm | j)), or at 16 states the one
// in vb[0].
template <int kLanes, int kLevels, int kS>
__device__ __forceinline__ void warp_sum_scatter(float (&vb)[kS], float (&vc)[kS], int lane) {
  constexpr int kStateLevels = state_levels(kLevels, kS);
MK_UNROLL
  for (int m = 0; m < kStateLevels; ++m) {
    const int o = state_halving_bit<kLanes, kLevels, kStateLevels>(m), half = kS >> (m + 1);
MK_UNROLL
    for (int i = 0; i < half; ++i) {
      vb[i] += __shfl_xor_sync(0xffffffffu, vb[i + half], o);
      vc[i] += __shfl_xor_sync(0xffffffffu, vc[i + half], o);
    }
  }
  if constexpr (kLevels > kStateLevels) {
    static_assert(kLevels == kStateLevels + 1, "one halving over dB / dC");
    const bool upper = (lane & kLanes) != 0;
    const float keep = upper ? vc[0] : vb[0], give = upper ? vb[0] : vc[0];
    vb[0] = keep + __shfl_xor_sync(0xffffffffu, give, kLanes);
  }
}

// Copies of the visit's tile t0 into raw buffer buf: δ, u (and z, dout where full) rows of the block's channels,
// B (and C where full) rows of its group.
template <typename P>
__device__ void copy_visit(const ScanBwdParams& q, const P& sm, int buf, bool full, int64_t bd0, int64_t bc_off,
                           int64_t t0) {
  using in_t = typename P::In;
  const ScanParams& p = q.f;
  const int64_t L = p.seqlen;
  const void* acts[4] = {p.delta, p.u, full ? p.z : nullptr, full ? q.dout : nullptr};
MK_UNROLL
  for (int part = 0; part < 4; ++part) {
    if (acts[part] != nullptr) {
      copy_rows<in_t, P::kCh>(sm.raw(buf, part), static_cast<const in_t*>(acts[part]) + bd0 * L, P::kCh, L, t0);
    }
  }
  copy_rows<in_t, P::kW>(sm.raw(buf, 4), static_cast<const in_t*>(p.B) + bc_off, p.dstate, L, t0);
  if (full) copy_rows<in_t, P::kW>(sm.raw(buf, 5), static_cast<const in_t*>(p.C) + bc_off, p.dstate, L, t0);
}

// The visits of chunk c: nt - 1 walks, then nt reverses (nt = its tiles); visit v's tile within the chunk.
struct Visit {
  int64_t c;
  int v, nt;
  __device__ bool walk() const { return v < nt - 1; }
  __device__ int tile() const { return walk() ? v : 2 * nt - 2 - v; }
};

__device__ __forceinline__ Visit first_visit(int64_t c, int64_t L) {
  const int64_t steps = L - c * kScanChunk < kScanChunk ? L - c * kScanChunk : kScanChunk;
  return Visit{c, 0, static_cast<int>((steps + kT - 1) / kT)};
}

__device__ __forceinline__ Visit next_visit(const Visit& x, int64_t L) {
  return x.v + 1 < 2 * x.nt - 1 ? Visit{x.c, x.v + 1, x.nt} : first_visit(x.c - 1, L);
}

// The block's kernel. In prep and finish a thread handles the pieces e = tid + j·kThreads (j < kIters, e < kPieces)
// of the tile: channel e / kSegs, steps (e % kSegs)·kVec and on.
template <typename in_t, int kLanes, int kS>
__global__ void __launch_bounds__(kThreads, 2) scan_bwd_staged_kernel(ScanBwdParams q) {
  using P = BwdPlan<in_t, kLanes, kS>;
  extern __shared__ __align__(16) unsigned char scan_bwd_staged_smem[];
  const P sm{scan_bwd_staged_smem};
  const ScanParams& p = q.f;
  const int64_t L = p.seqlen, N = p.dstate, dim = p.dim, dpg = dim / p.groups;
  const int64_t bd0 = static_cast<int64_t>(blockIdx.x) * P::kCh, b = bd0 / dim, d0 = bd0 % dim;
  const int64_t bc_off = (b * p.groups + d0 / dpg) * N * L;
  const int64_t var_off = ((b * p.groups + d0 / dpg) * q.nblk + d0 % dpg / P::kCh) * N * L;
  const int tid = threadIdx.x, ch = tid / kLanes, s = tid % kLanes, n0 = s * kS, lane = tid % 32;
  // the thread's state order (slot i: state n0 + (i ^ pm)) and the copy of B, C in it
  const int pm = state_order<kLanes, P::kLevels, kS>(lane), copy = (pm & 3) >> P::kCopyShift;
  const int64_t d = d0 + ch, bd = bd0 + ch;
  // the thread's states: A·log2(e), the reverse's carry (from d last_state), dA; h the walks' state
  float A2[kS], carry[kS], dA[kS] = {}, h[kS];
  load_a2(p, d, n0, pm, A2);
  load_state(state_row<float>(q.dlast, b, d, dim, N), n0, pm, N, carry);
  // the channels of the thread's pieces: bias, D and the pieces' parts of dD, d delta_bias
  float bias[P::kIters], Dd[P::kIters], dD[P::kIters] = {}, dbias[P::kIters] = {};
  piece_weights<P::kIters, P::kPieces, P::kSegs>(p, d0, bias, Dd);
  const float* ckpt = static_cast<const float*>(p.chunk_states) + bd * p.n_chunks * N;

  // prep: the pieces' Δ, Δ·u (and dy where full) into act, step-major; B (and C) in float, step-major
  const auto prep = [&](int buf, bool full) {
MK_UNROLL
    for (int j = 0; j < P::kIters; ++j) {
      const int e = tid + j * kThreads, c = e / P::kSegs, t = e % P::kSegs * P::kVec;
      if (e >= P::kPieces) continue;
      float delta[P::kVec], u[P::kVec], z[P::kVec], g[P::kVec];
      load_piece(sm.raw(buf, 0) + c * kT + t, delta);
      load_piece(sm.raw(buf, 1) + c * kT + t, u);
      if (full) {
        load_piece(sm.raw(buf, 3) + c * kT + t, g);
        if (p.z) load_piece(sm.raw(buf, 2) + c * kT + t, z);
      }
MK_UNROLL
      for (int i = 0; i < P::kVec; ++i) {
        const float x = delta[i] + bias[j];
        const float dt = p.softplus ? softplus_thr(x) : x;
        const int at = (t + i) * P::kRow + c;
        sm.act(0)[at] = dt;
        sm.act(1)[at] = dt * u[i];
        if (full) sm.act(2)[at] = p.z ? g[i] * (z[i] * sigmoid(z[i])) : g[i];
      }
    }
    bc_to_float<in_t, P::kW, P::kCopies, P::kCopyShift>(sm.raw(buf, 4), sm.B(0), full ? 2 : 1);
  };
  // the B (or C) values of the thread's slots at step t (X: the thread's copy)
  const auto bc_at = [&](const float* X, int t, float (&v)[kS]) {
    const float4* at = reinterpret_cast<const float4*>(X + t * P::kW + n0);
MK_UNROLL
    for (int k = 0; k < kS / 4; ++k) {
      const float4 x = at[k ^ pm / 4];
      v[4 * k] = x.x;
      v[4 * k + 1] = x.y;
      v[4 * k + 2] = x.z;
      v[4 * k + 3] = x.w;
    }
  };
  // step t of the forward recurrence on states x; their h_prev into hp and ā into a where asked (the seg walk)
  const auto advance = [&](int t, float (&x)[kS], float* hp, float* a) {
    const float dt = sm.act(0)[t * P::kRow + ch], dtu = sm.act(1)[t * P::kRow + ch];
    float Bt[kS];
    bc_at(sm.B(copy), t, Bt);
MK_UNROLL
    for (int i = 0; i < kS; ++i) {
      const float ai = exp2_of(dt * A2[i]);
      if (a) {
        hp[i] = x[i];
        a[i] = ai;
      }
      x[i] = ai * x[i] + dtu * Bt[i];
    }
  };
  // reverse of one step t of the tile (h_prev hp, ā a, h ht): the carry moves to step t - 1, dA grows; the warp's
  // dB / dC sums of the step go to red; returns the thread's parts of the step's gA = Σ dh·ā·h_prev·A2, gB = Σ dh·B
  // and y
  struct Parts {
    float gA, gB, y;
  };
  const auto reverse_step = [&](int t, const float (&hp)[kS], const float (&a)[kS], const float (&ht)[kS]) {
    const float dt = sm.act(0)[t * P::kRow + ch], dtu = sm.act(1)[t * P::kRow + ch];
    const float dy = sm.act(2)[t * P::kRow + ch];
    float Bt[kS], Ct[kS], vb[kS], vc[kS];
    bc_at(sm.B(copy), t, Bt);
    bc_at(sm.C(copy), t, Ct);
    Parts r{-0.f, -0.f, -0.f};  // x + -0 is x for every x: the first terms' adds fold away
MK_UNROLL
    for (int i = 0; i < kS; ++i) {
      r.y += Ct[i] * ht[i];
      const float dh = Ct[i] * dy + carry[i];
      vb[i] = dh * dtu;
      vc[i] = dy * ht[i];
      carry[i] = a[i] * dh;
      const float ah = carry[i] * hp[i];
      dA[i] += ah * dt;
      r.gA += ah * A2[i];
      r.gB += dh * Bt[i];
    }
    warp_sum_scatter<kLanes, P::kLevels, kS>(vb, vc, lane);
    float* red = sm.red() + (tid / 32 * 2 * P::kW + n0 + pm) * P::kRed + t;  // ((w·2 + var)·kW + n)·kRed + t
    if constexpr (P::kKeep == 1) {
      red[(lane & kLanes ? P::kW : 0) * P::kRed] = vb[0];
    } else {
MK_UNROLL
      for (int j = 0; j < P::kKeep / 2; ++j) {
        red[j * P::kRed] = vb[j];
        red[(P::kW + j) * P::kRed] = vc[j];
      }
    }
    return r;
  };
  // the reverse over the tile's steps (kWhole: all kT) from its start state x (changed)
  const auto reverse_tile = [&]<bool kWhole>(int steps, float (&x)[kS]) {
    float* starts = sm.seg() + tid;  // the states at the segments' starts
MK_UNROLL
    for (int i = 0; i < kS; ++i) starts[i * kThreads] = x[i];
MK_UNROLL
    for (int t = 0; t < kT - kSeg; ++t) {
      if (!kWhole && t + kSeg >= steps) break;  // no segment starts after step steps - kSeg
      advance(t, x, nullptr, nullptr);
      if ((t + 1) % kSeg == 0) {
MK_UNROLL
        for (int i = 0; i < kS; ++i) starts[((t + 1) / kSeg * kS + i) * kThreads] = x[i];
      }
    }
MK_UNROLL
    for (int e = kSegsPerTile - 1; e >= 0; --e) {
      const int t0 = e * kSeg;
      if (!kWhole && t0 >= steps) continue;  // steps is a multiple of kSeg: the segments left are whole
      float hp[kSeg][kS], a[kSeg][kS], cur[kS];  // the segment's steps' h_prev and ā
MK_UNROLL
      for (int i = 0; i < kS; ++i) cur[i] = starts[(e * kS + i) * kThreads];
MK_UNROLL
      for (int j = 0; j < kSeg; ++j) advance(t0 + j, cur, hp[j], a[j]);
      float pA[kSeg], pB[kSeg], py[kSeg];
MK_UNROLL
      for (int j = kSeg - 1; j >= 0; --j) {  // the state after step j: h_prev of step j + 1, after the last cur
        const Parts r = reverse_step(t0 + j, hp[j], a[j], j + 1 < kSeg ? hp[j + 1] : cur);
        pA[j] = r.gA;
        pB[j] = r.gB;
        py[j] = r.y;
      }
      team_sum_steps<kLanes, kSeg>(pA, s);
      team_sum_steps<kLanes, kSeg>(pB, s);
      if (p.z) team_sum_steps<kLanes, kSeg>(py, s);
      // lane s holds steps s + m·kLanes (in slot m·kLanes) when kSeg > kLanes, else step s % kSeg (lanes below kSeg
      // write it)
      constexpr int kM = kSeg > kLanes ? kSeg / kLanes : 1;
MK_UNROLL
      for (int m = 0; m < kM; ++m) {
        const int slot = kSeg > kLanes ? m * kLanes : 0, j = kSeg > kLanes ? s + m * kLanes : s;
        if (j >= kSeg) continue;
        const int at = (t0 + j) * P::kRow + ch;
        sm.act(3)[at] = pA[slot];
        sm.act(4)[at] = pB[slot];
        sm.act(5)[at] = py[slot];
      }
    }
  };
  // finish of tile t0 (steps of it): the block's dB / dC partials (the warps' sums in warp order); per piece du,
  // ddelta, dz and the parts of dD, d delta_bias
  const auto finish = [&](int buf, int64_t t0, int steps) {
    for (int e = tid; e < 2 * P::kW * kT; e += kThreads) {
      const int var = e / (P::kW * kT), n = e / kT % P::kW, t = e % kT;
      if (n >= N || t >= steps) continue;
      float sum = 0.f;
MK_UNROLL
      for (int w = 0; w < P::kWarps; ++w) sum += sm.red()[((w * 2 + var) * P::kW + n) * P::kRed + t];
      static_cast<float*>(var == 0 ? q.dB_part : q.dC_part)[var_off + n * L + t0 + t] = sum;
    }
MK_UNROLL
    for (int j = 0; j < P::kIters; ++j) {
      const int e = tid + j * kThreads, c = e / P::kSegs, t = e % P::kSegs * P::kVec;
      if (e >= P::kPieces || t >= steps) continue;
      float delta[P::kVec], u[P::kVec], z[P::kVec], g[P::kVec], du[P::kVec], dx[P::kVec], dz[P::kVec];
      load_piece(sm.raw(buf, 0) + c * kT + t, delta);
      load_piece(sm.raw(buf, 1) + c * kT + t, u);
      if (p.z) {
        load_piece(sm.raw(buf, 2) + c * kT + t, z);
        load_piece(sm.raw(buf, 3) + c * kT + t, g);
      }
MK_UNROLL
      for (int i = 0; i < P::kVec; ++i) {
        const int at = (t + i) * P::kRow + c;
        const float dt = sm.act(0)[at], dy = sm.act(2)[at], gA = sm.act(3)[at], gB = sm.act(4)[at];
        const float ddt = gA * float(kLn2) + u[i] * gB;
        dx[i] = p.softplus ? ddt * softplus_thr_grad(delta[i] + bias[j]) : ddt;
        du[i] = dt * gB + Dd[j] * dy;
        if (p.z) {
          const float sz = sigmoid(z[i]);
          dz[i] = g[i] * (sm.act(5)[at] + Dd[j] * u[i]) * sz * (1.f + z[i] * (1.f - sz));
        }
        dbias[j] += dx[i];
        dD[j] += dy * u[i];
      }
      const int64_t at = (bd0 + c) * L + t0 + t;
      store_piece(du, static_cast<in_t*>(q.du) + at);
      store_piece(dx, static_cast<in_t*>(q.ddelta) + at);
      if (p.z) store_piece(dz, static_cast<in_t*>(q.dz) + at);
    }
  };

  Visit vis = first_visit(p.n_chunks - 1, L);
  copy_visit(q, sm, 0, !vis.walk(), bd0, bc_off, vis.c * kScanChunk + vis.tile() * kT);
  for (int k = 0; vis.c >= 0; ++k, vis = next_visit(vis, L)) {
    const int buf = k % 2, tile = vis.tile();
    const int64_t t0 = vis.c * kScanChunk + tile * kT;
    const int steps = L - t0 < kT ? static_cast<int>(L - t0) : kT;
    cp_async_wait_all();
    __syncthreads();  // visit k's tile is in; every thread is done with visit k - 1 (its buffer, act, red)
    const Visit next = next_visit(vis, L);
    if (next.c >= 0) copy_visit(q, sm, 1 - buf, !next.walk(), bd0, bc_off, next.c * kScanChunk + next.tile() * kT);
    prep(buf, !vis.walk());
    if (vis.v == 0) {  // the chunk's checkpoint: the state before its first step
      load_state(ckpt + vis.c * N, n0, pm, N, h);
    }
    __syncthreads();  // act, B, C of the visit are made
    float* start = sm.start() + tile * kS * kThreads + tid;
    if (vis.walk()) {
MK_UNROLL
      for (int i = 0; i < kS; ++i) start[i * kThreads] = h[i];
MK_UNROLL
      for (int t = 0; t < kT; ++t) advance(t, h, nullptr, nullptr);  // walks are of whole tiles
      continue;
    }
    float x0[kS];  // the tile's start: after the walks (its last tile), else kept by its walk
MK_UNROLL
    for (int i = 0; i < kS; ++i) x0[i] = tile == vis.nt - 1 ? h[i] : start[i * kThreads];
    if (steps == kT) {
      reverse_tile.template operator()<true>(steps, x0);
    } else {
      reverse_tile.template operator()<false>(steps, x0);
    }
    __syncthreads();  // the tile's red and parts are made
    finish(buf, t0, steps);
  }
  // per thread: dA and d initial_state of its states; per channel the sums of its pieces' parts of dD, d delta_bias
  store_state(dA, n0, pm, N, static_cast<float*>(q.dA_part) + bd * N);
  store_state(carry, n0, pm, N, static_cast<float*>(q.dh0) + bd * N);
MK_UNROLL
  for (int j = 0; j < P::kIters; ++j) {
    const int e = tid + j * kThreads;
    const float sD = team_sum<P::kSegs>(dD[j]), sbias = team_sum<P::kSegs>(dbias[j]);
    if (e < P::kPieces && e % P::kSegs == 0) {
      static_cast<float*>(q.dD_part)[bd0 + e / P::kSegs] = sD;
      static_cast<float*>(q.dbias_part)[bd0 + e / P::kSegs] = sbias;
    }
  }
}

// Calls f.template operator()<kLanes, kS>() for the plan's lanes and states (8 states: 2, 4 or 8 lanes; 4: 4, 8, 16).
template <typename F>
void with_plan(StagedPlan plan, F&& f) {
  if (plan.states == 8) {
    switch (plan.lanes) {
      case 2: f.template operator()<2, 8>(); break;
      case 4: f.template operator()<4, 8>(); break;
      default: f.template operator()<8, 8>(); break;
    }
  } else {
    switch (plan.lanes) {
      case 4: f.template operator()<4, 4>(); break;
      case 8: f.template operator()<8, 4>(); break;
      default: f.template operator()<16, 4>(); break;
    }
  }
}

// Dynamic shared memory of a block of the plan for p's input type, in bytes.
int64_t staged_bwd_bytes(const ScanParams& p, StagedPlan plan) {
  int64_t bytes = 0;
  dispatch_itype(p.itype, [&]<typename in_t, typename acc_t>() {
    if constexpr (std::is_same_v<acc_t, float>) {
      with_plan(plan, [&]<int kLanes, int kS>() { bytes = BwdPlan<in_t, kLanes, kS>::kBytes; });
    }
  });
  return bytes;
}

// The staged plan for q, or {0, 0} where it does not take q: the forward's staged conditions, dout and the gradients'
// rows 16-byte aligned too; threads of 8 states, or of 4 where those leave fewer blocks than SMs (as the forward's
// 16 and 4); the plan's shared memory within the device's.
StagedPlan staged_bwd_plan(const ScanBwdParams& q) {
  const ScanParams& p = q.f;
  if (!staged_inputs(p) || !aligned16(q.dout) || !aligned16(q.du) || !aligned16(q.ddelta) || !aligned16(q.dz)) {
    return {0, 0};
  }
  for (const int states : {8, 4}) {
    const StagedPlan plan{staged_lanes(p.dstate, states), states};
    if (staged_blocks(p, kThreads / plan.lanes)) {
      return staged_bwd_bytes(p, plan) <= p.smem_optin ? plan : StagedPlan{0, 0};
    }
  }
  return {0, 0};
}

}  // namespace

ScanBwdLaunch scan_bwd_staged_launch(const ScanBwdParams& q) {
  const StagedPlan plan = staged_bwd_plan(q);
  if (plan.lanes == 0) return {0, 0};
  return {kThreads / plan.lanes, staged_bwd_bytes(q.f, plan)};
}

bool scan_bwd_staged_cuda(const ScanBwdParams& q, cudaStream_t stream) {
  const ScanParams& p = q.f;
  const StagedPlan plan = staged_bwd_plan(q);
  if (plan.lanes == 0) return false;
  dispatch_itype(p.itype, [&]<typename in_t, typename acc_t>() {
    if constexpr (std::is_same_v<acc_t, float>) {
      with_plan(plan, [&]<int kLanes, int kS>() {
        using P = BwdPlan<in_t, kLanes, kS>;
        const unsigned grid = static_cast<unsigned>(p.batch * p.dim / P::kCh);
        cudaFuncSetAttribute(scan_bwd_staged_kernel<in_t, kLanes, kS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             P::kBytes);
        scan_bwd_staged_kernel<in_t, kLanes, kS><<<grid, kThreads, P::kBytes, stream>>>(q);
      });
    }
  });
  return true;
}

}  // namespace markovkit

#pragma once
// Pieces shared by the staged plans of the selective scan (scan_fwd_staged_kernel.cu, scan_bwd_staged_kernel.cu): a
// block of kThreads threads walks time in tiles of kT steps, each tile's rows copied into shared memory with
// cp.async (16-byte pieces: copy_rows) and read back as floats.
#include <cstring>

#include "common/cp_async.cuh"
#include "scan/scan_device.cuh"

namespace markovkit {
namespace scan_cuda {

constexpr int kThreads = 128;  // threads per block
constexpr int kT = 16;         // steps per tile

// Copies of the steps [t0, t0 + kT) of kRows rows (length L, src's row r at r·L) into dst (kRows, kT): 16-byte
// pieces, zeros past L and in rows r >= valid (every thread of the block calls it).
template <typename in_t, int kRows>
__device__ __forceinline__ void copy_rows(in_t* dst, const in_t* src, int64_t valid, int64_t L, int64_t t0) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(in_t)), kSegs = kT / kVec;
  constexpr int kPieces = kRows * kSegs;
MK_UNROLL
  for (int j = 0; j < (kPieces + kThreads - 1) / kThreads; ++j) {
    const int e = threadIdx.x + j * kThreads, r = e / kSegs, q = e % kSegs;
    const int64_t t = t0 + q * kVec;
    const bool in = r < valid && t < L;
    if (e < kPieces) cp_async_16_or_zero(dst + r * kT + q * kVec, src + (in ? r * L + t : 0), in);
  }
}

// The first `parts` of B, C (raw: kW rows of kT steps each, in_t) into dst (kT steps of kW, float, C after B) in
// kCopies copies, copy k 2·kT·kW floats on with state n at n ^ (k << kShift) (the staged backward's lanes' state
// orders; the forward makes one): lane-consecutive writes, n fastest (every thread of the block calls it).
template <typename in_t, int kW, int kCopies, int kShift>
__device__ __forceinline__ void bc_to_float(const in_t* raw, float* dst, int parts) {
  for (int e = threadIdx.x; e < parts * kW * kT; e += kThreads) {
    const int part = e / (kW * kT), t = e / kW % kT, n = e % kW;
    const float x = to_acc((part == 0 ? raw : raw + kW * kT)[n * kT + t]);
MK_UNROLL
    for (int k = 0; k < kCopies; ++k) (dst + k * 2 * kT * kW + part * kT * kW)[t * kW + (n ^ k << kShift)] = x;
  }
}

// The kVec elements of a 16-byte piece in shared memory, as floats.
template <typename in_t, int kVec>
__device__ __forceinline__ void load_piece(const in_t* at, float (&v)[kVec]) {
  in_t e[kVec];
  const uint4 raw = *reinterpret_cast<const uint4*>(at);
  memcpy(e, &raw, sizeof(raw));
MK_UNROLL
  for (int i = 0; i < kVec; ++i) v[i] = to_acc(e[i]);
}

// kVec floats stored as one 16-byte piece of in_t at `at` (global memory).
template <typename in_t, int kVec>
__device__ __forceinline__ void store_piece(const float (&v)[kVec], in_t* at) {
  in_t o[kVec];
MK_UNROLL
  for (int i = 0; i < kVec; ++i) o[i] = store_cast<in_t>(v[i]);
  uint4 raw;
  memcpy(&raw, o, sizeof(raw));
  *reinterpret_cast<uint4*>(at) = raw;
}

// A thread's kS states are n0 + (i ^ order) in its slots i (order 0: in order; the staged backward's lanes each have
// their own, state_order).

// States of row src (N,) into the slots v: zeros past N or where src is null.
template <int kS>
__device__ __forceinline__ void load_state(const float* src, int n0, int order, int64_t N, float (&v)[kS]) {
MK_UNROLL
  for (int i = 0; i < kS; ++i) v[i] = n0 + (i ^ order) < N && src ? src[n0 + (i ^ order)] : 0.f;
}

// A·log2(e) of channel d's states into the slots A2 (-1 past dstate: those states stay 0, and decay, so that
// exp2(Δ·A2) is 0, not NaN, for Δ = inf).
template <int kS>
__device__ __forceinline__ void load_a2(const ScanParams& p, int64_t d, int n0, int order, float (&A2)[kS]) {
  const int64_t N = p.dstate;
  const float* A = static_cast<const float*>(p.A) + d * N;
MK_UNROLL
  for (int i = 0; i < kS; ++i) A2[i] = n0 + (i ^ order) < N ? A[n0 + (i ^ order)] * float(kLog2e) : -1.f;
}

// delta_bias and D of the channels of a thread's pieces e = tid + j·kThreads (j < kIters): channel e / kSegs of the
// block's, from d0 on (the first where e >= kPieces).
template <int kIters, int kPieces, int kSegs>
__device__ __forceinline__ void piece_weights(const ScanParams& p, int64_t d0, float (&bias)[kIters],
                                              float (&Dd)[kIters]) {
MK_UNROLL
  for (int j = 0; j < kIters; ++j) {
    const int e = threadIdx.x + j * kThreads;
    const int64_t dj = d0 + (e < kPieces ? e / kSegs : 0);
    bias[j] = p.delta_bias ? static_cast<const float*>(p.delta_bias)[dj] : 0.f;
    Dd[j] = p.D ? static_cast<const float*>(p.D)[dj] : 0.f;
  }
}

// The slots h into their states of dst (N,), those below N.
template <int kS>
__device__ __forceinline__ void store_state(const float (&h)[kS], int n0, int order, int64_t N, float* dst) {
MK_UNROLL
  for (int i = 0; i < kS; ++i) {
    if (n0 + (i ^ order) < N) dst[n0 + (i ^ order)] = h[i];
  }
}

// Whether the staged plans take p's inputs (each plan checks its outputs' alignment too): steps (the first tile's
// copy comes before any test of them), per-step B and C, no cu_seqlens, float accumulators, 9 to 64 states, 16-byte
// aligned rows of u, delta, z, B and C.
inline bool staged_inputs(const ScanParams& p) {
  const int64_t elem_bytes = p.itype == DType::kFloat32 ? 4 : 2;
  return p.seqlen > 0 && p.itype != DType::kFloat64 && p.var_B && p.var_C && p.cu_seqlens == nullptr &&
         p.dstate > 8 && p.dstate <= 64 && rows_aligned(p, elem_bytes) && aligned16(p.u) && aligned16(p.delta) &&
         aligned16(p.z);
}

// A staged plan: threads per channel (lanes) and states per thread; {0, 0}: none takes the call.
struct StagedPlan {
  int lanes, states;
};

// The fewest lanes (a power of 2) of `states` states each that hold dstate states.
inline int staged_lanes(int64_t dstate, int states) {
  int lanes = 1;
  while (lanes * states < dstate) lanes *= 2;
  return lanes;
}

// Whether blocks of `channels` channels of one group tile dim / groups and give a block for every SM (fewer
// channels leave the team plans more parallel work).
inline bool staged_blocks(const ScanParams& p, int64_t channels) {
  return (p.dim / p.groups) % channels == 0 && p.batch * p.dim / channels >= p.sm_count;
}

}  // namespace scan_cuda
}  // namespace markovkit

#pragma once
// Sliding-window causal attention: params structs and the mask rules shared by the CPU kernel and the CUDA
// kernels.
//
// Layouts (all contiguous, 64-bit offsets):
//   q, out, dout, dq: (batch, seqlen, heads, headdim)     k, v, dk, dv: (batch, seqlen, kv_heads, headdim)
//   lse, dlse, delta: (batch, heads, seqlen), float32 (float64 for float64 inputs)
// Query head h reads kv head h / (heads / kv_heads) (consecutive query heads share a kv head).
//
// Mask: query i sees key j iff j <= i and (i - j < window or j < sink): the last `window` keys including
// itself plus the first `sink` keys. FlashAttention's equivalent is causal=True, window_size=(window-1, 0)
// (without sink). Every row sees at least its own key, so no row is empty.
#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"
#ifdef MARKOVKIT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace markovkit {

struct SwaShape {
  int64_t batch, seqlen, heads, kv_heads, headdim;
  int64_t window;  // >= 1, keys including self
  int64_t sink;    // >= 0, leading keys always visible (causally)
  double scale;    // softmax scale applied to q·k
  DType dtype;     // of q, k, v, out (the accumulators are float32, float64 for float64)
};

struct SwaFwdParams {
  SwaShape s;
  const void* q;
  const void* k;
  const void* v;
  void* out;
  void* lse;  // natural-log logsumexp of the scaled scores of each row
  int cc;     // CUDA: compute capability of the device (10 major + minor), which picks the kernel
};

struct SwaBwdParams {
  SwaShape s;
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const void* lse;
  const void* dlse;  // nullptr: zero
  void* delta;       // workspace: the backward's first pass writes rowsum(dout * out) - dlse here
  void* dq;
  void* dk;
  void* dv;
  int cc;  // CUDA: compute capability of the device (10 major + minor), which picks the kernels
};

// Position in lse, dlse, delta (batch, heads, seqlen) of row `row` = (b * seqlen + i) * heads + h of q, out.
MK_HOST_DEVICE int64_t swa_stat_index(int64_t row, int64_t seqlen, int64_t heads) {
  const int64_t h = row % heads, bi = row / heads;
  return (bi / seqlen * heads + h) * seqlen + bi % seqlen;
}

// The window's rules on positions of one index type I: int64_t on the CPU, int in the CUDA kernels (check_inputs
// bounds their positions, window and sink below 2^31 - 256).
template <typename I>
MK_HOST_DEVICE bool swa_allowed(I i, I j, I window, I sink) {
  return j <= i && (i - j < window || j < sink);
}

// Query rows [i0, i1) see keys only in [0, swa_sink_end) and [swa_window_begin, i1): two disjoint ranges,
// so a key is never counted twice.
template <typename I>
MK_HOST_DEVICE I swa_window_begin(I i0, I window) {
  return i0 - window + 1 > 0 ? i0 - window + 1 : 0;
}

template <typename I>
MK_HOST_DEVICE I swa_sink_end(I i0, I window, I sink) {
  const I begin = swa_window_begin(i0, window);
  return sink < begin ? sink : begin;
}

// Key j0's tile [j0, j1) is seen by queries in [j0, swa_query_end) only (min(j1 - 1 + window, seqlen),
// written so that a window near INT64_MAX cannot overflow).
template <typename I>
MK_HOST_DEVICE I swa_query_end(I j1, I seqlen, I window, I sink, I j0) {
  if (j0 < sink || window >= seqlen - (j1 - 1)) return seqlen;
  return j1 - 1 + window;
}

// True when every (i, j) of rows [i0, i1) x keys [j0, j1) is allowed: such tiles need no mask.
template <typename I>
MK_HOST_DEVICE bool swa_tile_full(I i0, I i1, I j0, I j1, I window, I sink) {
  return j1 - 1 <= i0 && (i1 - 1 - j0 < window || j1 <= sink);
}

// True when no (i, j) of rows [i0, i1) x keys [j0, j1) is allowed: every key lies after every row, or the
// nearest pair (i0, j1 - 1) is outside the window and no key is a sink.
template <typename I>
MK_HOST_DEVICE bool swa_tile_empty(I i0, I i1, I j0, I j1, I window, I sink) {
  return j0 > i1 - 1 || (i0 - (j1 - 1) >= window && j0 >= sink);
}

void swa_forward_cpu(const SwaFwdParams& p);
void swa_backward_cpu(const SwaBwdParams& p);
#ifdef MARKOVKIT_WITH_CUDA
// Dynamic shared memory per block of the forward or backward kernels at this headdim (either dtype) on a device
// of compute capability cc.
int64_t swa_cuda_smem_bytes(int64_t headdim, int cc, bool backward);
void swa_forward_cuda(const SwaFwdParams& p, cudaStream_t stream);
void swa_backward_cuda(const SwaBwdParams& p, cudaStream_t stream);
// The Hopper kernels (swa_fwd_sm90_kernel.cu, swa_bwd_sm90_kernel.cu): whether they run this headdim at compute
// capability cc (a build with sm_90a, an sm_90 device), their shared memory, their launchers (the backward's after
// the delta kernel of swa_kernel.cu).
bool swa_sm90_applies(int64_t headdim, int cc);
int64_t swa_fwd_sm90_smem_bytes(int64_t headdim);
int64_t swa_bwd_sm90_smem_bytes(int64_t headdim);
void swa_forward_sm90(const SwaFwdParams& p, cudaStream_t stream);
void swa_backward_sm90(const SwaBwdParams& p, cudaStream_t stream);
#endif

}  // namespace markovkit

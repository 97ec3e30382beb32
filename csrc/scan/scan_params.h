#pragma once
// Selective scan (Mamba-1 S6): params structs and the scalar math shared by the CPU and CUDA kernels.
//
// Recurrence per (b, d, n), t in [0, L):
//   Δ_t = softplus(δ_t + bias_d) (or δ_t + bias_d);  ā = exp(Δ_t A_dn);  h_t = ā h_prev + Δ_t B_nt u_t;
//   y_t = Σ_n C_nt h_t + D_d u_t;  out_t = y_t · silu(z_t) (or y_t).
// h_prev is h_{t-1}, except at the first step of a sequence where it is initial_state[s] (or 0). Without
// cu_seqlens each batch row is one sequence (s = b); with cu_seqlens (batch 1) the row holds sequences
// s = 0..nseq-1 at [cu[s], cu[s+1]).
//
// Checkpoints: chunk_states[b, d, c, n] = the h_prev seen by step t = c·kScanChunk. The backward recomputes
// the states of one chunk from its checkpoint and runs the reverse recurrence
//   dh_t = C_t dy_t + carry,  carry = ā_{t+1} dh_{t+1} (or dlast_state[s] at the last step of sequence s),
//   d initial_state[s] = ā_t dh_t at the first step t of sequence s.
// Reductions over batch and channels go through per-task partial buffers summed in a fixed order, so the
// backward is deterministic (bitwise repeatable) on both devices; there are no atomics.
#include <cmath>
#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"
#ifdef MARKOVKIT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace markovkit {

constexpr int64_t kScanChunk = 64;    // steps between saved checkpoints
constexpr int64_t kScanMaxDstate = 256;

// Activations (u, delta, z, per-step B/C, out, du, ...) are `itype`; weights (A, D, delta_bias, constant
// B/C, initial_state, last_state, chunk_states) and all math are float32, or float64 when itype is float64.
// Every tensor is contiguous.
struct ScanParams {
  int64_t batch, dim, seqlen, dstate;
  int64_t groups;         // of per-step B/C: channel d uses group d / (dim / groups)
  int64_t n_chunks;       // ceil(seqlen / kScanChunk)
  int64_t nseq;           // sequences: batch, or cu_seqlens.numel() - 1
  DType itype;
  bool var_B, var_C;      // B/C per step (batch, groups, dstate, seqlen) or constant (dim, dstate)
  bool softplus;
  const void* u;          // (batch, dim, seqlen)
  const void* delta;      // (batch, dim, seqlen)
  const void* A;          // (dim, dstate)
  const void* B;          // see var_B
  const void* C;          // see var_C
  const void* D;          // (dim,) or null
  const void* z;          // (batch, dim, seqlen) or null
  const void* delta_bias; // (dim,) or null
  const void* h0;         // initial_state (nseq, dim, dstate) or null
  const int32_t* cu_seqlens;  // (nseq + 1,) or null; requires batch == 1, cu[0] = 0, cu[nseq] = seqlen
  void* out;              // (batch, dim, seqlen)
  void* last_state;       // (nseq, dim, dstate)
  void* chunk_states;     // (batch, dim, n_chunks, dstate), a flat tensor to torch
  int sm_count;           // CUDA: multiprocessors of the device (the plans of both passes depend on it)
  int smem_optin;         // CUDA: the most dynamic shared memory a block may have, in bytes (the backward's plans)
};

// The backward writes per-task partial sums (accumulator type = the weight type); the glue reduces them
// in a fixed order with scan_reduce_* below. A task owns `blk` consecutive channels of one group of one
// batch row: tasks (batch, groups, nblk) with nblk = ceil(dim / groups / blk).
struct ScanBwdParams {
  ScanParams f;
  const void* dout;       // (batch, dim, seqlen)
  const void* dlast;      // (nseq, dim, dstate) or null
  int64_t blk, nblk;
  void* du;               // (batch, dim, seqlen)
  void* ddelta;           // (batch, dim, seqlen)
  void* dz;               // (batch, dim, seqlen) or null
  void* dh0;              // (nseq, dim, dstate)
  void* dA_part;          // (batch, dim, dstate)
  void* dD_part;          // (batch, dim)
  void* dbias_part;       // (batch, dim)
  void* dB_part;          // constant: (batch, dim, dstate); per step: (batch, groups, nblk, dstate, seqlen),
                          // on the CPU (batch, groups, nblk, seqlen, dstate)
  void* dC_part;          // likewise
};

// One decode step (Mamba-1 shapes), state updated in place.
struct ScanStepParams {
  int64_t batch, dim, dstate, groups;
  DType itype;            // x, dt, z, B, C, out
  bool softplus;
  void* state;            // (batch, dim, dstate) weight type, or (state_rows, dim, dstate) with rows
  const void* rows;       // (batch,) int32 / int64 (rows64): the state row of batch element b, negative: a padding
                          // slot (out 0, no state touched); or null (row b)
  bool rows64;
  int64_t state_rows;
  const void* x;          // (batch, dim)
  const void* dt;         // (batch, dim)
  const void* A;          // (dim, dstate)
  const void* B;          // (batch, groups, dstate)
  const void* C;          // (batch, groups, dstate)
  const void* D;          // (dim,) or null
  const void* z;          // (batch, dim) or null
  const void* dt_bias;    // (dim,) or null
  void* out;              // (batch, dim)
};

// out[o, i] = Σ_k part[o, k, i] for k = 0..K-1 in order; part in the accumulator type, out in `out_type`.
struct ScanReduceParams {
  const void* part;
  void* out;
  int64_t outer, K, inner;
  DType acc_type, out_type;
};

MK_HOST_DEVICE float mk_exp(float x) { return expf(x); }
MK_HOST_DEVICE double mk_exp(double x) { return exp(x); }
MK_HOST_DEVICE float mk_log1p(float x) { return log1pf(x); }
MK_HOST_DEVICE double mk_log1p(double x) { return log1p(x); }

// softplus with the threshold of the peer's kernels: x above 20 passes through.
template <typename T>
MK_HOST_DEVICE T softplus_thr(T x) {
  return x <= T(20) ? mk_log1p(mk_exp(x)) : x;
}

// d softplus_thr / dx.
template <typename T>
MK_HOST_DEVICE T softplus_thr_grad(T x) {
  return x <= T(20) ? T(1) / (T(1) + mk_exp(-x)) : T(1);
}

template <typename T>
MK_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + mk_exp(-x));
}

// Sequence layout of one batch row: local sequences 0..count-1.
struct SeqBounds {
  const int32_t* cu;
  int64_t nseq, seqlen;
  MK_HOST_DEVICE int64_t count() const { return cu ? nseq : 1; }
  MK_HOST_DEVICE int64_t begin(int64_t s) const { return cu ? cu[s] : 0; }
  MK_HOST_DEVICE int64_t end(int64_t s) const { return cu ? cu[s + 1] : seqlen; }
  // index into (nseq, ...) tensors of local sequence s of row b
  MK_HOST_DEVICE int64_t global(int64_t s, int64_t b) const { return cu ? s : b; }
};

MK_HOST_DEVICE SeqBounds seq_bounds(const ScanParams& p) { return SeqBounds{p.cu_seqlens, p.nseq, p.seqlen}; }

void scan_fwd_cpu(const ScanParams& p);
void scan_bwd_cpu(const ScanBwdParams& p);
void scan_step_cpu(const ScanStepParams& p);
void scan_reduce_cpu(const ScanReduceParams& p);
#ifdef MARKOVKIT_WITH_CUDA
void scan_fwd_cuda(const ScanParams& p, cudaStream_t stream);
void scan_bwd_cuda(const ScanBwdParams& p, cudaStream_t stream);
void scan_step_cuda(const ScanStepParams& p, cudaStream_t stream);
void scan_reduce_cuda(const ScanReduceParams& p, cudaStream_t stream);
// The backward's launch on CUDA for q (its f.sm_count and f.smem_optin set; blk, nblk and the partials not read):
// channels per task (the glue sizes the partial buffers with it) and the dynamic shared memory of a block in bytes
// (over f.smem_optin where no plan fits the device: the glue refuses q).
struct ScanBwdLaunch {
  int64_t blk, smem;
};
ScanBwdLaunch scan_bwd_cuda_launch(const ScanBwdParams& q);
#endif

}  // namespace markovkit

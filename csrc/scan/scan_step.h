#pragma once
// One decode step of one (b, d) channel, shared by the CPU kernel (scan_cpu.cpp) and the CUDA kernel
// (scan_kernel.cu); the state is updated in place (see ScanStepParams):
//   dt = softplus(dt_i + dt_bias_d) (or dt_i + dt_bias_d);  h_n = exp(dt A_dn) h_n + dt B_n x_i;
//   y = Σ_n C_n h_n + D_d x_i;  out_i = y · silu(z_i) (or y).
// The caller's Ops supplies what differs per device, for activations in_t and math in acc_t:
//   static acc_t load(in_t);   static in_t store(acc_t);   static acc_t exp(acc_t) (the dstate loop's exp).
// Torch-free: the CPU passes scan_half.h types with static_cast, CUDA the cuda_fp16 / cuda_bf16 intrinsics.
#include <cstdint>

#include "common/macros.h"
#include "scan/scan_params.h"

namespace markovkit {

// The state row of batch element b (p.rows, else b; negative: a padding slot).
MK_HOST_DEVICE int64_t scan_step_row(const ScanStepParams& p, int64_t b) {
  if (!p.rows) return b;
  return p.rows64 ? static_cast<const int64_t*>(p.rows)[b] : static_cast<const int32_t*>(p.rows)[b];
}

// i = b * dim + d, a channel of (batch, dim), whose state is row `row` (>= 0) of p.state.
template <typename in_t, typename acc_t, typename Ops>
MK_HOST_DEVICE void scan_step_channel(const ScanStepParams& p, int64_t i, int64_t row) {
  const int64_t N = p.dstate, b = i / p.dim, d = i % p.dim, g = d / (p.dim / p.groups);
  if (row < 0) {
    static_cast<in_t*>(p.out)[i] = Ops::store(acc_t(0));
    return;
  }
  acc_t x = Ops::load(static_cast<const in_t*>(p.dt)[i]);
  if (p.dt_bias) x += static_cast<const acc_t*>(p.dt_bias)[d];
  const acc_t dt = p.softplus ? softplus_thr(x) : x;
  const acc_t xt = Ops::load(static_cast<const in_t*>(p.x)[i]);
  const acc_t* A = static_cast<const acc_t*>(p.A) + d * N;                      // (dstate,)
  const in_t* Bt = static_cast<const in_t*>(p.B) + (b * p.groups + g) * N;     // (dstate,)
  const in_t* Ct = static_cast<const in_t*>(p.C) + (b * p.groups + g) * N;     // (dstate,)
  acc_t* h = static_cast<acc_t*>(p.state) + (row * p.dim + d) * N;             // (dstate,)
  acc_t y = p.D ? static_cast<const acc_t*>(p.D)[d] * xt : acc_t(0);
  for (int64_t n = 0; n < N; ++n) {
    h[n] = Ops::exp(dt * A[n]) * h[n] + dt * Ops::load(Bt[n]) * xt;
    y += Ops::load(Ct[n]) * h[n];
  }
  if (p.z) {
    const acc_t zt = Ops::load(static_cast<const in_t*>(p.z)[i]);
    y *= zt * sigmoid(zt);
  }
  static_cast<in_t*>(p.out)[i] = Ops::store(y);
}

}  // namespace markovkit

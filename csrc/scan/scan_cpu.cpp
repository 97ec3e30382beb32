// CPU kernels of the selective scan: threads over (batch x dim) channels, sequential over time, inner loop
// over dstate. The backward recomputes one chunk of states from its checkpoint, then runs the reverse
// recurrence over the chunk (see scan_params.h).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "scan/scan_params.h"

namespace markovkit {
namespace {

// exp without library calls and with integer-only selects, so that the dstate loops vectorize (floating
// compares would not be if-converted under the default -ftrapping-math): |x| saturated at 100 on its bit
// pattern, x = k ln2 + r (Cody-Waite), e^r by the Cephes expf polynomial, 2^k from exponent bits with k
// clamped to [-127, 128] (2^-127 -> 0, 2^128 -> inf). Relative error a few ulp; results below 2^-126 flush
// to 0 and above 2^127 overflow to inf; NaN comes out as 0 or inf.
inline float cpu_exp(float x) {
  const int32_t bits = std::bit_cast<int32_t>(x);
  int32_t mag = bits & 0x7fffffff;
  mag = mag < 0x42c80000 ? mag : 0x42c80000;  // 100.0f
  x = std::bit_cast<float>((bits & static_cast<int32_t>(0x80000000u)) | mag);
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int32_t ki = static_cast<int32_t>(k);  // |k| <= 145
  ki = ki < -127 ? -127 : (ki > 128 ? 128 : ki);
  return p * std::bit_cast<float>((ki + 127) << 23);
}
inline double cpu_exp(double x) { return std::exp(x); }

// Pointers of one (b, d) channel. in_t: activation type; acc_t: weight / math type.
template <typename in_t, typename acc_t>
struct Channel {
  int64_t L, N;
  bool var_B, var_C;
  const in_t *u, *delta, *z;
  const acc_t* A;                 // (N,)
  const in_t *Bv, *Cv;            // per step: element (n, t) at [n * L + t]; or null
  const acc_t *Bc, *Cc;           // constant (N,) otherwise
  acc_t Dd, bias;

  Channel(const ScanParams& p, int64_t b, int64_t d) : L(p.seqlen), N(p.dstate), var_B(p.var_B), var_C(p.var_C) {
    const int64_t row = (b * p.dim + d) * L;
    const int64_t g = d / (p.dim / p.groups);
    u = static_cast<const in_t*>(p.u) + row;
    delta = static_cast<const in_t*>(p.delta) + row;
    z = p.z ? static_cast<const in_t*>(p.z) + row : nullptr;
    A = static_cast<const acc_t*>(p.A) + d * N;
    Bv = p.var_B ? static_cast<const in_t*>(p.B) + (b * p.groups + g) * N * L : nullptr;
    Cv = p.var_C ? static_cast<const in_t*>(p.C) + (b * p.groups + g) * N * L : nullptr;
    Bc = p.var_B ? nullptr : static_cast<const acc_t*>(p.B) + d * N;
    Cc = p.var_C ? nullptr : static_cast<const acc_t*>(p.C) + d * N;
    Dd = p.D ? static_cast<const acc_t*>(p.D)[d] : acc_t(0);
    bias = p.delta_bias ? static_cast<const acc_t*>(p.delta_bias)[d] : acc_t(0);
  }
  // B and C of step t into (N,) buffers.
  void load_BC(int64_t t, acc_t* Bt, acc_t* Ct) const {
    for (int64_t n = 0; n < N; ++n) {
      Bt[n] = var_B ? static_cast<acc_t>(Bv[n * L + t]) : Bc[n];
      Ct[n] = var_C ? static_cast<acc_t>(Cv[n * L + t]) : Cc[n];
    }
  }
  acc_t pre_delta(int64_t t) const { return static_cast<acc_t>(delta[t]) + bias; }
};

template <typename acc_t>
void load_state(const void* src, int64_t s, int64_t d, int64_t dim, int64_t N, acc_t* h) {
  if (src == nullptr) {
    std::fill(h, h + N, acc_t(0));
    return;
  }
  const acc_t* p = static_cast<const acc_t*>(src) + (s * dim + d) * N;
  std::copy(p, p + N, h);
}

// h <- ā h + Δ B u over n; returns Σ_n C h.
template <typename acc_t>
acc_t step(int64_t N, const acc_t* A, const acc_t* Bt, const acc_t* Ct, acc_t dt, acc_t u, acc_t* h) {
  const acc_t du = dt * u;
  for (int64_t n = 0; n < N; ++n) h[n] = cpu_exp(dt * A[n]) * h[n] + du * Bt[n];
  acc_t y = 0;
  for (int64_t n = 0; n < N; ++n) y += Ct[n] * h[n];
  return y;
}

template <typename in_t, typename acc_t>
void fwd_channel(const ScanParams& p, int64_t b, int64_t d, acc_t* h, acc_t* Bt, acc_t* Ct) {
  const Channel<in_t, acc_t> ch(p, b, d);
  const SeqBounds sb = seq_bounds(p);
  const int64_t N = p.dstate;
  acc_t* ckpt = static_cast<acc_t*>(p.chunk_states) + (b * p.dim + d) * p.n_chunks * N;
  in_t* out = static_cast<in_t*>(p.out) + (b * p.dim + d) * p.seqlen;
  for (int64_t s = 0; s < sb.count(); ++s) {
    const int64_t sg = sb.global(s, b);
    load_state(p.h0, sg, d, p.dim, N, h);
    for (int64_t t = sb.begin(s); t < sb.end(s); ++t) {
      if (t % kScanChunk == 0) std::copy(h, h + N, ckpt + (t / kScanChunk) * N);
      const acc_t x = ch.pre_delta(t);
      const acc_t dt = p.softplus ? softplus_thr(x) : x;
      const acc_t ut = static_cast<acc_t>(ch.u[t]);
      ch.load_BC(t, Bt, Ct);
      acc_t y = step(N, ch.A, Bt, Ct, dt, ut, h) + ch.Dd * ut;
      if (ch.z) {
        const acc_t zt = static_cast<acc_t>(ch.z[t]);
        y *= zt * sigmoid(zt);
      }
      out[t] = static_cast<in_t>(y);
    }
    std::copy(h, h + N, static_cast<acc_t*>(p.last_state) + (sg * p.dim + d) * N);
  }
}

template <typename in_t, typename acc_t>
void fwd(const ScanParams& p) {
  at::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(3 * p.dstate);
    for (int64_t i = begin; i < end; ++i) {
      fwd_channel<in_t, acc_t>(p, i / p.dim, i % p.dim, buf.data(), buf.data() + p.dstate,
                               buf.data() + 2 * p.dstate);
    }
  });
}

// Scratch of one backward task, reused over its channels.
template <typename acc_t>
struct BwdScratch {
  std::vector<acc_t> hprev, abar;  // (kScanChunk, N): h_prev and exp(Δ A) of each step of the chunk
  std::vector<acc_t> dts, dx_ddt;  // (kScanChunk,): Δ and dΔ/dδ of each step of the chunk
  std::vector<acc_t> h, carry, Bt, Ct, dA, dB, dC;  // (N,)
  explicit BwdScratch(int64_t N)
      : hprev(kScanChunk * N), abar(kScanChunk * N), dts(kScanChunk), dx_ddt(kScanChunk), h(N), carry(N), Bt(N),
        Ct(N), dA(N), dB(N), dC(N) {}
};

// Per-channel sums of one channel's backward, added into the task's partials.
template <typename in_t, typename acc_t>
void bwd_channel(const ScanBwdParams& q, int64_t b, int64_t d, int64_t blk, BwdScratch<acc_t>& w) {
  const ScanParams& p = q.f;
  const Channel<in_t, acc_t> ch(p, b, d);
  const SeqBounds sb = seq_bounds(p);
  const int64_t N = p.dstate, L = p.seqlen, dim = p.dim;
  const int64_t row = (b * dim + d) * L;
  const in_t* dout = static_cast<const in_t*>(q.dout) + row;
  in_t* du_out = static_cast<in_t*>(q.du) + row;
  in_t* ddelta_out = static_cast<in_t*>(q.ddelta) + row;
  in_t* dz_out = q.dz ? static_cast<in_t*>(q.dz) + row : nullptr;
  const acc_t* ckpt = static_cast<const acc_t*>(p.chunk_states) + (b * dim + d) * p.n_chunks * N;
  acc_t* dh0 = static_cast<acc_t*>(q.dh0);
  const int64_t g = d / (dim / p.groups);
  // per-step dB / dC partial of this task, time-major on the CPU: (L, N)
  const int64_t var_off = ((b * p.groups + g) * q.nblk + blk) * N * L;
  acc_t* dBv = p.var_B ? static_cast<acc_t*>(q.dB_part) + var_off : nullptr;
  acc_t* dCv = p.var_C ? static_cast<acc_t*>(q.dC_part) + var_off : nullptr;

  std::fill(w.dA.begin(), w.dA.end(), acc_t(0));
  std::fill(w.dB.begin(), w.dB.end(), acc_t(0));
  std::fill(w.dC.begin(), w.dC.end(), acc_t(0));
  acc_t dD = 0, dbias = 0;
  int64_t s = sb.count() - 1;
  // trailing empty sequences: their initial state passes straight to their last state
  auto skip_empty = [&]() {
    while (s >= 0 && sb.begin(s) == sb.end(s)) {
      load_state(q.dlast, sb.global(s, b), d, dim, N, dh0 + (sb.global(s, b) * dim + d) * N);
      --s;
    }
  };
  skip_empty();
  for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kScanChunk, t1 = std::min(t0 + kScanChunk, L);
    // recompute h_prev over the chunk
    int64_t sf = s;
    while (sb.begin(sf) > t0 || sb.end(sf) <= t0) --sf;
    std::copy(ckpt + c * N, ckpt + (c + 1) * N, w.h.begin());
    for (int64_t t = t0; t < t1; ++t) {
      while (sb.end(sf) <= t) ++sf;
      if (t == sb.begin(sf) && t > t0) load_state(p.h0, sb.global(sf, b), d, dim, N, w.h.data());
      const acc_t x = ch.pre_delta(t);
      const acc_t dt = p.softplus ? softplus_thr(x) : x;
      w.dts[t - t0] = dt;
      w.dx_ddt[t - t0] = p.softplus ? softplus_thr_grad(x) : acc_t(1);
      const acc_t dtu = dt * static_cast<acc_t>(ch.u[t]);
      ch.load_BC(t, w.Bt.data(), w.Ct.data());
      acc_t* hp = w.hprev.data() + (t - t0) * N;
      acc_t* ab = w.abar.data() + (t - t0) * N;
      acc_t* h = w.h.data();
      const acc_t* Bt = w.Bt.data();
      for (int64_t n = 0; n < N; ++n) {
        hp[n] = h[n];
        ab[n] = cpu_exp(dt * ch.A[n]);
        h[n] = ab[n] * h[n] + dtu * Bt[n];
      }
    }
    // reverse recurrence
    for (int64_t t = t1 - 1; t >= t0; --t) {
      if (t == sb.end(s) - 1) load_state(q.dlast, sb.global(s, b), d, dim, N, w.carry.data());
      const acc_t dt = w.dts[t - t0];
      const acc_t ut = static_cast<acc_t>(ch.u[t]);
      const acc_t* hp = w.hprev.data() + (t - t0) * N;
      const acc_t* ab = w.abar.data() + (t - t0) * N;
      ch.load_BC(t, w.Bt.data(), w.Ct.data());
      acc_t dy = static_cast<acc_t>(dout[t]);
      if (ch.z) {
        acc_t y = ch.Dd * ut;
        for (int64_t n = 0; n < N; ++n) y += w.Ct[n] * (ab[n] * hp[n] + dt * w.Bt[n] * ut);
        const acc_t zt = static_cast<acc_t>(ch.z[t]), sz = sigmoid(zt);
        dz_out[t] = static_cast<in_t>(dy * y * sz * (acc_t(1) + zt * (acc_t(1) - sz)));
        dy *= zt * sz;
      }
      dD += dy * ut;
      acc_t du = ch.Dd * dy, ddt = 0;
      // dB, dC targets: the per-step partial's row t, or the per-channel sums
      acc_t* dBt = p.var_B ? dBv + t * N : w.dB.data();
      acc_t* dCt = p.var_C ? dCv + t * N : w.dC.data();
      const acc_t *Bt = w.Bt.data(), *Ct = w.Ct.data(), *A = ch.A;
      acc_t *carry = w.carry.data(), *dA = w.dA.data();
      const acc_t dtu = dt * ut;
      for (int64_t n = 0; n < N; ++n) {
        const acc_t a = ab[n];
        const acc_t dh = Ct[n] * dy + carry[n];
        dCt[n] += dy * (a * hp[n] + dtu * Bt[n]);
        dBt[n] += dh * dtu;
        dA[n] += dh * hp[n] * a * dt;
        ddt += dh * (hp[n] * a * A[n] + Bt[n] * ut);
        du += dh * dt * Bt[n];
        carry[n] = a * dh;
      }
      const acc_t dx = ddt * w.dx_ddt[t - t0];
      dbias += dx;
      du_out[t] = static_cast<in_t>(du);
      ddelta_out[t] = static_cast<in_t>(dx);
      if (t == sb.begin(s)) {
        std::copy(w.carry.begin(), w.carry.end(), dh0 + (sb.global(s, b) * dim + d) * N);
        --s;
        skip_empty();
      }
    }
  }
  const int64_t bd = b * dim + d;
  std::copy(w.dA.begin(), w.dA.end(), static_cast<acc_t*>(q.dA_part) + bd * N);
  if (!p.var_B) std::copy(w.dB.begin(), w.dB.end(), static_cast<acc_t*>(q.dB_part) + bd * N);
  if (!p.var_C) std::copy(w.dC.begin(), w.dC.end(), static_cast<acc_t*>(q.dC_part) + bd * N);
  static_cast<acc_t*>(q.dD_part)[bd] = dD;
  static_cast<acc_t*>(q.dbias_part)[bd] = dbias;
}

// Tasks (batch, groups, nblk); a task runs its channels in ascending order, so the per-step dB / dC
// partials (zero-initialised by the glue) get a fixed summation order.
template <typename in_t, typename acc_t>
void bwd(const ScanBwdParams& q) {
  const ScanParams& p = q.f;
  const int64_t dpg = p.dim / p.groups;
  at::parallel_for(0, p.batch * p.groups * q.nblk, 1, [&](int64_t begin, int64_t end) {
    BwdScratch<acc_t> w(p.dstate);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % q.nblk, g = (task / q.nblk) % p.groups, b = task / (q.nblk * p.groups);
      const int64_t d_end = std::min(dpg, (blk + 1) * q.blk);
      for (int64_t k = blk * q.blk; k < d_end; ++k) bwd_channel<in_t, acc_t>(q, b, g * dpg + k, blk, w);
    }
  });
}

template <typename in_t, typename acc_t>
void step_op(const ScanStepParams& p) {
  const int64_t N = p.dstate, dpg = p.dim / p.groups;
  at::parallel_for(0, p.batch * p.dim, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.dim, d = i % p.dim, g = d / dpg;
      acc_t x = static_cast<acc_t>(static_cast<const in_t*>(p.dt)[i]);
      if (p.dt_bias) x += static_cast<const acc_t*>(p.dt_bias)[d];
      const acc_t dt = p.softplus ? softplus_thr(x) : x;
      const acc_t xt = static_cast<acc_t>(static_cast<const in_t*>(p.x)[i]);
      const acc_t* A = static_cast<const acc_t*>(p.A) + d * N;
      const in_t* Bt = static_cast<const in_t*>(p.B) + (b * p.groups + g) * N;
      const in_t* Ct = static_cast<const in_t*>(p.C) + (b * p.groups + g) * N;
      acc_t* h = static_cast<acc_t*>(p.state) + i * N;
      acc_t y = p.D ? static_cast<const acc_t*>(p.D)[d] * xt : acc_t(0);
      for (int64_t n = 0; n < N; ++n) {
        h[n] = cpu_exp(dt * A[n]) * h[n] + dt * static_cast<acc_t>(Bt[n]) * xt;
        y += static_cast<acc_t>(Ct[n]) * h[n];
      }
      if (p.z) {
        const acc_t zt = static_cast<acc_t>(static_cast<const in_t*>(p.z)[i]);
        y *= zt * sigmoid(zt);
      }
      static_cast<in_t*>(p.out)[i] = static_cast<in_t>(y);
    }
  });
}

template <typename acc_t, typename out_t>
void reduce(const ScanReduceParams& p) {
  const acc_t* part = static_cast<const acc_t*>(p.part);
  out_t* out = static_cast<out_t*>(p.out);
  at::parallel_for(0, p.outer * p.inner, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t o = i / p.inner, j = i % p.inner;
      acc_t s = 0;
      for (int64_t k = 0; k < p.K; ++k) s += part[(o * p.K + k) * p.inner + j];
      out[i] = static_cast<out_t>(s);
    }
  });
}

// Calls f.template operator()<in_t, acc_t>() for the activation type.
template <typename F>
void dispatch_itype(DType itype, F&& f) {
  switch (itype) {
    case DType::kFloat64: f.template operator()<double, double>(); break;
    case DType::kFloat32: f.template operator()<float, float>(); break;
    case DType::kFloat16: f.template operator()<c10::Half, float>(); break;
    case DType::kBFloat16: f.template operator()<c10::BFloat16, float>(); break;
  }
}

}  // namespace

void scan_fwd_cpu(const ScanParams& p) {
  dispatch_itype(p.itype, [&]<typename in_t, typename acc_t>() { fwd<in_t, acc_t>(p); });
}

void scan_bwd_cpu(const ScanBwdParams& p) {
  dispatch_itype(p.f.itype, [&]<typename in_t, typename acc_t>() { bwd<in_t, acc_t>(p); });
}

void scan_step_cpu(const ScanStepParams& p) {
  dispatch_itype(p.itype, [&]<typename in_t, typename acc_t>() { step_op<in_t, acc_t>(p); });
}

void scan_reduce_cpu(const ScanReduceParams& p) {
  if (p.acc_type == DType::kFloat64) {
    reduce<double, double>(p);
    return;
  }
  dispatch_itype(p.out_type, [&]<typename out_t, typename acc_t>() { reduce<float, out_t>(p); });
}

}  // namespace markovkit

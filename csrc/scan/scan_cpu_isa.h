// Body of one instruction-set copy of the CPU scan loops: include after defining SCAN_CPU_ISA (namespace),
// SCAN_CPU_KERNELS (the getter's name) and SCAN_CPU_VEC_BYTES (SIMD width), with <cmath> and scan/scan_half.h
// included. No include guard: each copy is its own translation unit.
//
// A channel's state h (dstate,) lives in vectors (dstate padded to Np, a multiple of 32 bytes, with
// A = B = C = 0, so the padding lanes of h stay 0 and add nothing). Per-step B / C of the channel's
// (batch, group) are first copied time-major and padded, (seqlen, Np), so each step reads contiguous
// vectors; a thread keeps that copy while its consecutive channels share (batch, group). Scratch comes from
// the caller: nothing is allocated in code built for the wider instruction set.
#include "scan/scan_cpu_entry.h"

namespace markovkit {
namespace SCAN_CPU_ISA {
namespace {

typedef float vf __attribute__((vector_size(SCAN_CPU_VEC_BYTES)));
typedef double vd __attribute__((vector_size(SCAN_CPU_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(SCAN_CPU_VEC_BYTES)));

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using type = vf;
};
template <>
struct VecOf<double> {
  using type = vd;
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename acc_t>
constexpr int kLanes = SCAN_CPU_VEC_BYTES / sizeof(acc_t);

// e^x lane-wise: x clamped to [-100, 100] (NaN passes), x = k ln2 + r (Cody-Waite), e^r by the Cephes expf
// polynomial, 2^k from exponent bits with k clamped to [-127, 128] (2^-127 -> 0, 2^128 -> inf). Relative
// error a few ulp; results below 2^-126 flush to 0 and above 2^127 overflow to inf.
inline vf vexp(vf x) {
  const vf lo_x = vf{} - 100.0f, hi_x = vf{} + 100.0f;
  x = x < lo_x ? lo_x : x;
  x = x > hi_x ? hi_x : x;
  const vf k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  const vf r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi lo = vi{} - 127, hi = vi{} + 128;
  vi ki = __builtin_convertvector(k, vi);  // |k| <= 145
  ki = ki < lo ? lo : ki;
  ki = ki > hi ? hi : ki;
  return p * (vf)((ki + 127) << 23);
}
inline vd vexp(vd x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

// log(u) lane-wise for positive normal u (Cephes logf): u = m 2^e with m in [sqrt(1/2), sqrt(2)).
inline vf vlog(vf u) {
  const vi bits = (vi)u;
  vi e = ((bits >> 23) & 0xff) - 126;
  vf m = (vf)((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const vi below = m < vf{} + 0.707106781186547524f;  // -1 where true
  e += below;
  m = (below ? m + m : m) - 1.0f;
  const vf z = m * m;
  vf p = vf{} + 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  const vf ef = __builtin_convertvector(e, vf);
  p = p * m * z + ef * -2.12194440e-4f - z * 0.5f;
  return (m + p) + ef * 0.693359375f;
}

// softplus_thr lane-wise as max(x, 0) + log1p(e^-|x|) (above 20 the second term is below half an ulp of x,
// so x comes out as with the threshold); log1p(y) = log(1 + y) + the rounding error of 1 + y, over 1 + y.
// Relative error about 1e-7; results below 2^-126 (x below about -87) flush to 0.
inline vf vsoftplus(vf x) {
  const vf y = vexp((vf)((vi)x | static_cast<int32_t>(0x80000000u)));  // e^-|x|
  const vf w = 1.0f + y;
  const vf pos = x > vf{} ? x : vf{};
  return pos + (vlog(w) + (y - (w - 1.0f)) / w);
}
inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }
// softplus_thr_grad: sigmoid rounds to 1 above 20 in float
inline vf vsoftplus_grad(vf x) { return vsigmoid(x); }

inline vd vsoftplus(vd x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = softplus_thr(x[i]);
  return x;
}
inline vd vsigmoid(vd x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = sigmoid(x[i]);
  return x;
}
inline vd vsoftplus_grad(vd x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = softplus_thr_grad(x[i]);
  return x;
}

// Lane sum: upper half onto lower half while more than 4 lanes, then pairs.
template <typename V>
auto hsum(V v) {
  constexpr int W = sizeof(V) / sizeof(v[0]);
  if constexpr (W == 8) {
    using Mask = decltype(v < v);
    v += __builtin_shuffle(v, Mask{4, 5, 6, 7, 0, 1, 2, 3});
  }
  if constexpr (W == 2) {
    return v[0] + v[1];
  } else {
    return (v[0] + v[2]) + (v[1] + v[3]);
  }
}

// 32-byte aligned start of a scratch area.
template <typename acc_t>
acc_t* align32(void* p) {
  return reinterpret_cast<acc_t*>((reinterpret_cast<uintptr_t>(p) + 31) & ~uintptr_t(31));
}

// dst (Np,) <- src (N,) and zero padding, or all zero when src is null.
template <typename src_t, typename acc_t>
void load_padded(const src_t* src, int64_t N, int64_t Np, acc_t* dst, acc_t pad = acc_t(0)) {
  for (int64_t n = 0; n < Np; ++n) dst[n] = src && n < N ? static_cast<acc_t>(src[n]) : pad;
}

template <typename acc_t>
const acc_t* state_row(const void* src, int64_t s, int64_t d, int64_t dim, int64_t N) {
  return src ? static_cast<const acc_t*>(src) + (s * dim + d) * N : nullptr;
}

template <typename acc_t>
void store(const acc_t* src, int64_t N, acc_t* dst) {
  for (int64_t n = 0; n < N; ++n) dst[n] = src[n];
}

// Per-step X (batch, groups, N, L) of (b, g), time-major and padded: dst (L, Np).
template <typename in_t, typename acc_t>
void time_major(const ScanParams& p, const void* X, int64_t bg, int64_t Np, acc_t* dst) {
  const int64_t N = p.dstate, L = p.seqlen;
  const in_t* src = static_cast<const in_t*>(X) + bg * N * L;
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t n = N; n < Np; ++n) dst[t * Np + n] = acc_t(0);
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t t = 0; t < L; ++t) dst[t * Np + n] = static_cast<acc_t>(src[n * L + t]);
  }
}

// One channel's inputs: scalars and the padded (Np,) rows of A and of constant B / C; B and C of step t
// are at Bs + t * Bstep (Bstep = Np per step, 0 constant), likewise C.
template <typename in_t, typename acc_t>
struct Channel {
  const in_t *u, *delta, *z;
  acc_t Dd, bias;
  const Vec<acc_t>* A;
  const acc_t *Bs, *Cs;
  int64_t Bstep, Cstep;

  // rows: 3 Np scratch for A, constant B, constant C; BCt: the time-major per-step B and C (L, Np) each.
  Channel(const ScanParams& p, int64_t b, int64_t d, int64_t Np, acc_t* rows, const acc_t* BCt) {
    const int64_t N = p.dstate, row = (b * p.dim + d) * p.seqlen;
    u = static_cast<const in_t*>(p.u) + row;
    delta = static_cast<const in_t*>(p.delta) + row;
    z = p.z ? static_cast<const in_t*>(p.z) + row : nullptr;
    Dd = p.D ? static_cast<const acc_t*>(p.D)[d] : acc_t(0);
    bias = p.delta_bias ? static_cast<const acc_t*>(p.delta_bias)[d] : acc_t(0);
    // padding states (B = C = h0 = 0) decay with A = -1: exp(Δ·0) would be NaN for Δ = inf, and its NaN would
    // reach every earlier step's gradient
    load_padded(static_cast<const acc_t*>(p.A) + d * N, N, Np, rows, acc_t(-1));
    A = reinterpret_cast<const Vec<acc_t>*>(rows);
    if (!p.var_B) load_padded(static_cast<const acc_t*>(p.B) + d * N, N, Np, rows + Np);
    if (!p.var_C) load_padded(static_cast<const acc_t*>(p.C) + d * N, N, Np, rows + 2 * Np);
    Bs = p.var_B ? BCt : rows + Np;
    Cs = p.var_C ? BCt + p.seqlen * Np : rows + 2 * Np;
    Bstep = p.var_B ? Np : 0;
    Cstep = p.var_C ? Np : 0;
  }
  const Vec<acc_t>* B(int64_t t) const { return reinterpret_cast<const Vec<acc_t>*>(Bs + t * Bstep); }
  const Vec<acc_t>* C(int64_t t) const { return reinterpret_cast<const Vec<acc_t>*>(Cs + t * Cstep); }
  acc_t pre_delta(int64_t t) const { return static_cast<acc_t>(delta[t]) + bias; }
};

// Per step t in [t0, t0 + n), n <= kScanChunk, into 32-byte aligned (kScanChunk,) buffers: Δ_t into dt and,
// where not null, dΔ/dδ into grad.
template <typename in_t, typename acc_t>
void deltas(const Channel<in_t, acc_t>& ch, bool softplus, int64_t t0, int64_t n, acc_t* dt, acc_t* grad) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  for (int64_t j = 0; j < n; j += W) {
    V x;
    for (int64_t l = 0; l < W; ++l) x[l] = j + l < n ? ch.pre_delta(t0 + j + l) : acc_t(0);
    *reinterpret_cast<V*>(dt + j) = softplus ? vsoftplus(x) : x;
    if (grad) *reinterpret_cast<V*>(grad + j) = softplus ? vsoftplus_grad(x) : V{} + acc_t(1);
  }
}

// sigmoid(z_t) for t in [t0, t0 + n), n <= kScanChunk, into a 32-byte aligned (kScanChunk,) buffer.
template <typename in_t, typename acc_t>
void sigmoids(const in_t* z, int64_t t0, int64_t n, acc_t* out) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  for (int64_t j = 0; j < n; j += W) {
    V x;
    for (int64_t l = 0; l < W; ++l) x[l] = j + l < n ? static_cast<acc_t>(z[t0 + j + l]) : acc_t(0);
    *reinterpret_cast<V*>(out + j) = vsigmoid(x);
  }
}

// Copies per-step B / C of (b, g) time-major into BCt unless the previous channel had them already.
template <typename in_t, typename acc_t>
void prepare_BC(const ScanParams& p, int64_t b, int64_t g, int64_t Np, acc_t* BCt, int64_t& cached) {
  const int64_t bg = b * p.groups + g;
  if (!(p.var_B || p.var_C) || bg == cached) return;
  if (p.var_B) time_major<in_t>(p, p.B, bg, Np, BCt);
  if (p.var_C) time_major<in_t>(p, p.C, bg, Np, BCt + p.seqlen * Np);
  cached = bg;
}

// h <- exp(Δ A) h + Δ u B over the nv vectors of h; returns Σ_n C h.
template <typename acc_t>
acc_t step(int64_t nv, const Vec<acc_t>* A, const Vec<acc_t>* B, const Vec<acc_t>* C, acc_t dt, acc_t dtu,
           Vec<acc_t>* h) {
  Vec<acc_t> acc = {};
  for (int64_t i = 0; i < nv; ++i) {
    h[i] = vexp(A[i] * dt) * h[i] + B[i] * dtu;
    acc += C[i] * h[i];
  }
  return hsum(acc);
}

// Forward of channels [begin, end); work: scan_cpu_fwd_work_bytes.
template <typename in_t, typename acc_t>
void fwd_range(const ScanParams& p, int64_t begin, int64_t end, void* work) {
  using V = Vec<acc_t>;
  const int64_t N = p.dstate, L = p.seqlen, Np = scan_cpu_padded(N, sizeof(acc_t)), nv = Np / kLanes<acc_t>;
  acc_t* BCt = align32<acc_t>(work);  // (2, L, Np)
  acc_t* rows = BCt + 2 * L * Np;     // (3, Np)
  V* h = reinterpret_cast<V*>(rows + 3 * Np);
  acc_t* hs = rows + 3 * Np;
  acc_t* dts = hs + Np;               // (kScanChunk,) Δ of a block of steps
  acc_t* sz = dts + kScanChunk;       // (kScanChunk,) sigmoid(z) of the block
  const SeqBounds sb = seq_bounds(p);
  int64_t cached = -1;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / p.dim, d = i % p.dim;
    prepare_BC<in_t>(p, b, d / (p.dim / p.groups), Np, BCt, cached);
    const Channel<in_t, acc_t> ch(p, b, d, Np, rows, BCt);
    acc_t* ckpt = static_cast<acc_t*>(p.chunk_states) + i * p.n_chunks * N;
    in_t* out = static_cast<in_t*>(p.out) + i * L;
    for (int64_t s = 0; s < sb.count(); ++s) {
      const int64_t sg = sb.global(s, b);
      load_padded(state_row<acc_t>(p.h0, sg, d, p.dim, N), N, Np, hs);
      for (int64_t t0 = sb.begin(s); t0 < sb.end(s); t0 += kScanChunk) {
        const int64_t n = sb.end(s) - t0 < kScanChunk ? sb.end(s) - t0 : kScanChunk;
        deltas(ch, p.softplus, t0, n, dts, static_cast<acc_t*>(nullptr));
        if (ch.z) sigmoids(ch.z, t0, n, sz);
        for (int64_t t = t0; t < t0 + n; ++t) {
          if (t % kScanChunk == 0) store(hs, N, ckpt + (t / kScanChunk) * N);
          const acc_t dt = dts[t - t0], ut = static_cast<acc_t>(ch.u[t]);
          acc_t y = step(nv, ch.A, ch.B(t), ch.C(t), dt, dt * ut, h) + ch.Dd * ut;
          if (ch.z) y *= static_cast<acc_t>(ch.z[t]) * sz[t - t0];
          out[t] = static_cast<in_t>(y);
        }
      }
      store(hs, N, static_cast<acc_t*>(p.last_state) + (sg * p.dim + d) * N);
    }
  }
}

// Scratch of one backward thread, carved from its work area (scan_cpu_bwd_work_bytes).
template <typename acc_t>
struct BwdWork {
  using V = Vec<acc_t>;
  acc_t *BCt, *dBl, *dCl;  // (2, L, Np) per-step B, C; (L, Np) each: the task's per-step dB, dC sums
  acc_t* rows;             // (3, Np): Channel rows
  V *h, *carry, *dA, *dBc, *dCc;  // (nv,)
  V *hprev, *abar;                // (kScanChunk, nv): h_prev and exp(Δ A) of each step of the chunk
  acc_t *dts, *dx_ddt, *ys, *sz;  // (kScanChunk,): Δ, dΔ/dδ, pre-gate output, sigmoid(z) of each step

  BwdWork(void* work, int64_t L, int64_t Np) {
    BCt = align32<acc_t>(work);
    dBl = BCt + 2 * L * Np;
    dCl = dBl + L * Np;
    rows = dCl + L * Np;
    V* v = reinterpret_cast<V*>(rows + 3 * Np);
    const int64_t nv = Np / kLanes<acc_t>;
    h = v;
    carry = v + nv;
    dA = v + 2 * nv;
    dBc = v + 3 * nv;
    dCc = v + 4 * nv;
    hprev = v + 5 * nv;
    abar = hprev + kScanChunk * nv;
    dts = reinterpret_cast<acc_t*>(abar + kScanChunk * nv);
    dx_ddt = dts + kScanChunk;
    ys = dx_ddt + kScanChunk;
    sz = ys + kScanChunk;
  }
};

template <typename acc_t>
void zero(Vec<acc_t>* v, int64_t nv) {
  for (int64_t i = 0; i < nv; ++i) v[i] = Vec<acc_t>{};
}

// Backward of one channel; its per-step dB / dC go into the task's sums w.dBl / w.dCl.
template <typename in_t, typename acc_t>
void bwd_channel(const ScanBwdParams& q, int64_t b, int64_t d, BwdWork<acc_t>& w) {
  using V = Vec<acc_t>;
  const ScanParams& p = q.f;
  const int64_t N = p.dstate, L = p.seqlen, dim = p.dim;
  const int64_t Np = scan_cpu_padded(N, sizeof(acc_t)), nv = Np / kLanes<acc_t>;
  const Channel<in_t, acc_t> ch(p, b, d, Np, w.rows, w.BCt);
  const SeqBounds sb = seq_bounds(p);
  const int64_t bd = b * dim + d, row = bd * L;
  const in_t* dout = static_cast<const in_t*>(q.dout) + row;
  in_t* du_out = static_cast<in_t*>(q.du) + row;
  in_t* ddelta_out = static_cast<in_t*>(q.ddelta) + row;
  in_t* dz_out = q.dz ? static_cast<in_t*>(q.dz) + row : nullptr;
  const acc_t* ckpt = static_cast<const acc_t*>(p.chunk_states) + bd * p.n_chunks * N;
  acc_t* dh0 = static_cast<acc_t*>(q.dh0);
  acc_t* hs = reinterpret_cast<acc_t*>(w.h);
  acc_t* carry_s = reinterpret_cast<acc_t*>(w.carry);
  zero<acc_t>(w.dA, nv);
  zero<acc_t>(w.dBc, nv);
  zero<acc_t>(w.dCc, nv);
  acc_t dD = 0, dbias = 0;
  int64_t s = sb.count() - 1;
  // trailing empty sequences: their initial state passes straight to their last state
  auto skip_empty = [&]() {
    while (s >= 0 && sb.begin(s) == sb.end(s)) {
      const int64_t sg = sb.global(s, b);
      const acc_t* g = state_row<acc_t>(q.dlast, sg, d, dim, N);
      for (int64_t n = 0; n < N; ++n) dh0[(sg * dim + d) * N + n] = g ? g[n] : acc_t(0);
      --s;
    }
  };
  skip_empty();
  for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kScanChunk, t1 = t0 + kScanChunk < L ? t0 + kScanChunk : L;
    // recompute h_prev over the chunk
    int64_t sf = s;
    while (sb.begin(sf) > t0 || sb.end(sf) <= t0) --sf;
    load_padded(ckpt + c * N, N, Np, hs);
    deltas(ch, p.softplus, t0, t1 - t0, w.dts, w.dx_ddt);
    if (ch.z) sigmoids(ch.z, t0, t1 - t0, w.sz);
    for (int64_t t = t0; t < t1; ++t) {
      while (sb.end(sf) <= t) ++sf;
      if (t == sb.begin(sf) && t > t0) load_padded(state_row<acc_t>(p.h0, sb.global(sf, b), d, dim, N), N, Np, hs);
      const acc_t dt = w.dts[t - t0], ut = static_cast<acc_t>(ch.u[t]);
      const acc_t dtu = dt * ut;
      const V *A = ch.A, *Bt = ch.B(t), *Ct = ch.C(t);
      V* hp = w.hprev + (t - t0) * nv;
      V* ab = w.abar + (t - t0) * nv;
      V acc = {};
      for (int64_t k = 0; k < nv; ++k) {
        hp[k] = w.h[k];
        ab[k] = vexp(A[k] * dt);
        w.h[k] = ab[k] * w.h[k] + Bt[k] * dtu;
        acc += Ct[k] * w.h[k];
      }
      if (ch.z) w.ys[t - t0] = hsum(acc) + ch.Dd * ut;
    }
    // reverse recurrence
    for (int64_t t = t1 - 1; t >= t0; --t) {
      if (t == sb.end(s) - 1) load_padded(state_row<acc_t>(q.dlast, sb.global(s, b), d, dim, N), N, Np, carry_s);
      const acc_t dt = w.dts[t - t0];
      const acc_t ut = static_cast<acc_t>(ch.u[t]);
      acc_t dy = static_cast<acc_t>(dout[t]);
      if (ch.z) {
        const acc_t zt = static_cast<acc_t>(ch.z[t]), sz = w.sz[t - t0];
        dz_out[t] = static_cast<in_t>(dy * w.ys[t - t0] * sz * (acc_t(1) + zt * (acc_t(1) - sz)));
        dy *= zt * sz;
      }
      dD += dy * ut;
      // dB, dC targets: the task's per-step sums at step t, or the channel's sums
      V* dBt = p.var_B ? reinterpret_cast<V*>(w.dBl + t * Np) : w.dBc;
      V* dCt = p.var_C ? reinterpret_cast<V*>(w.dCl + t * Np) : w.dCc;
      const V *A = ch.A, *Bt = ch.B(t), *Ct = ch.C(t);
      const V* hp = w.hprev + (t - t0) * nv;
      const V* ab = w.abar + (t - t0) * nv;
      const acc_t dtu = dt * ut;
      V qA = {}, dhB = {};  // Σ dh h_prev ā A and Σ dh B, lane-wise
      for (int64_t k = 0; k < nv; ++k) {
        const V dh = Ct[k] * dy + w.carry[k];
        const V dha = dh * ab[k];
        const V qk = dha * hp[k];
        dCt[k] += (ab[k] * hp[k] + Bt[k] * dtu) * dy;
        dBt[k] += dh * dtu;
        w.dA[k] += qk * dt;
        qA += qk * A[k];
        dhB += dh * Bt[k];
        w.carry[k] = dha;
      }
      const acc_t sdhB = hsum(dhB);
      const acc_t dx = (hsum(qA) + sdhB * ut) * w.dx_ddt[t - t0];
      dbias += dx;
      du_out[t] = static_cast<in_t>(ch.Dd * dy + sdhB * dt);
      ddelta_out[t] = static_cast<in_t>(dx);
      if (t == sb.begin(s)) {
        store(carry_s, N, dh0 + (sb.global(s, b) * dim + d) * N);
        --s;
        skip_empty();
      }
    }
  }
  store(reinterpret_cast<const acc_t*>(w.dA), N, static_cast<acc_t*>(q.dA_part) + bd * N);
  if (!p.var_B) store(reinterpret_cast<const acc_t*>(w.dBc), N, static_cast<acc_t*>(q.dB_part) + bd * N);
  if (!p.var_C) store(reinterpret_cast<const acc_t*>(w.dCc), N, static_cast<acc_t*>(q.dC_part) + bd * N);
  static_cast<acc_t*>(q.dD_part)[bd] = dD;
  static_cast<acc_t*>(q.dbias_part)[bd] = dbias;
}

// (L, Np) task sums -> the task's (L, N) per-step partial.
template <typename acc_t>
void store_steps(const acc_t* src, int64_t L, int64_t N, int64_t Np, acc_t* dst) {
  for (int64_t t = 0; t < L; ++t) store(src + t * Np, N, dst + t * N);
}

// Backward of tasks [begin, end); a task runs its channels in ascending order, so its per-step dB / dC
// sums have a fixed summation order.
template <typename in_t, typename acc_t>
void bwd_range(const ScanBwdParams& q, int64_t begin, int64_t end, void* work) {
  const ScanParams& p = q.f;
  const int64_t N = p.dstate, L = p.seqlen, Np = scan_cpu_padded(N, sizeof(acc_t));
  const int64_t dpg = p.dim / p.groups;
  BwdWork<acc_t> w(work, L, Np);
  int64_t cached = -1;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t blk = task % q.nblk, g = (task / q.nblk) % p.groups, b = task / (q.nblk * p.groups);
    prepare_BC<in_t>(p, b, g, Np, w.BCt, cached);
    for (int64_t i = 0; i < L * Np; ++i) {
      if (p.var_B) w.dBl[i] = acc_t(0);
      if (p.var_C) w.dCl[i] = acc_t(0);
    }
    const int64_t d_end = (blk + 1) * q.blk < dpg ? (blk + 1) * q.blk : dpg;
    for (int64_t k = blk * q.blk; k < d_end; ++k) bwd_channel<in_t, acc_t>(q, b, g * dpg + k, w);
    const int64_t var_off = ((b * p.groups + g) * q.nblk + blk) * N * L;
    if (p.var_B) store_steps(w.dBl, L, N, Np, static_cast<acc_t*>(q.dB_part) + var_off);
    if (p.var_C) store_steps(w.dCl, L, N, Np, static_cast<acc_t*>(q.dC_part) + var_off);
  }
}

template <typename in_t, typename acc_t>
ScanCpuKernels kernels() {
  return {&fwd_range<in_t, acc_t>, &bwd_range<in_t, acc_t>};
}

}  // namespace
}  // namespace SCAN_CPU_ISA

ScanCpuKernels SCAN_CPU_KERNELS(DType itype) {
  using namespace SCAN_CPU_ISA;
  switch (itype) {
    case DType::kFloat64: return kernels<double, double>();
    case DType::kFloat32: return kernels<float, float>();
    case DType::kFloat16: return kernels<ScanHalf, float>();
    case DType::kBFloat16: return kernels<ScanBFloat16, float>();
  }
  return {nullptr, nullptr};
}

}  // namespace markovkit

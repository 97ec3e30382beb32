#pragma once
// Gillespie's direct method for Markov jump processes: the params structs and the per-path code shared by
// the CPU kernels (mjp_cpu.cpp) and the CUDA kernels (mjp_kernel.cu). No torch headers.
//
// Randomness. Path `path` of process `b` draws Philox blocks under key = seed with the counter
//   lo = draw index, hi = ((process_offset + b) << 32) | (path_offset + path),
// so a path's output depends only on (seed, global process id, global path id) and its inputs: CPU, CUDA and any
// split of the batch, over processes or paths, agree bit for bit. Draw 0 (CTMC with p0 only): words 0-1 give the
// uniform of the initial state. Draw k + 1 is the k-th jump: words 0-1 give U1 (holding time -log(U1) / q),
// words 2-3 give U2 (the destination: the first channel whose cumulative rate exceeds U2 q). All arithmetic is
// fp64 additions, multiplications and divisions in a fixed order (no a * b + c forms a compiler could fuse; -log
// by mjp_neg_log, not libm), so both devices round alike.
//
// Recording (right-continuous paths): grid value k is the state entered at the last jump with time <= t_k,
// the initial state when there is none. Every path starts at time 0.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/macros.h"
#include "common/philox.h"
#ifdef MARKOVKIT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace markovkit {

// Integer type of the state outputs: the smallest one that holds every state of S.
enum class StateType : int { kUInt8, kInt16, kInt32 };

// The reaction kernels keep one path's counts and propensities in thread-local arrays of these sizes.
constexpr int kMjpMaxSpecies = 32;
constexpr int kMjpMaxReactions = 128;

struct CtmcParams {
  const double* rates;   // (Bq, S, S) off-diagonal rates (diagonal ignored); Bq = 1 when shared
  double* exit;          // (Bq, S) exit rates, filled by the exit pass before the simulation
  int64_t n_q;           // Bq: 1 (shared Q) or B
  const int64_t* x0;     // (B, P) initial states, or nullptr when drawn from p0
  const double* p0;      // (Bp, S) initial weights (not necessarily normalised), Bp = 1 or B; or nullptr
  int64_t p0_stride;     // 0 (shared p0) or S
  const double* grid;    // grid mode: element (b, path, k) at b * grid_b_stride + path * grid_p_stride + k
  int64_t grid_b_stride, grid_p_stride, L;
  double t_end;          // events mode: record the jumps at times <= t_end (may be +inf)
  int64_t max_events;    // events mode: M
  void* states;          // grid mode (B, P, L); events mode (B, P, M) state after each event
  void* initial;         // events mode (B, P): the initial state
  double* times;         // events mode (B, P, M) jump times, +inf past the last one
  int64_t* counts;       // events mode (B, P) jumps recorded (<= M)
  bool* overflow;        // events mode (B, P) true when a jump at time <= t_end was left out
  int64_t B, P, S;
  uint64_t seed;
  int64_t process_offset;  // global id of process 0 of this batch
  int64_t path_offset;     // global id of path 0 of each process
  StateType state_type;
};

struct ReactionParams {
  const int32_t* reactants;  // (R, N) alpha
  const int32_t* change;     // (R, N) nu = beta - alpha
  const uint8_t* affects;    // (R, R) 1 where firing reaction r changes a reactant count of reaction r2
  const double* rates;       // (Bk, R) mass-action constants k_r; Bk = 1 when shared
  int64_t rates_stride;      // 0 (shared) or R
  const int64_t* x0;         // (B, P, N) initial counts
  const double* grid;        // as in CtmcParams
  int64_t grid_b_stride, grid_p_stride, L;
  int64_t* out;              // (B, P, L, N) counts on the grid
  int64_t B, P, R, N;
  uint64_t seed;
  int64_t process_offset;    // as in CtmcParams
  int64_t path_offset;       // as in CtmcParams
  int32_t* exploded;         // (1,) set to 1 where a path's total propensity overflowed to inf (the glue raises)
};

MK_HOST_DEVICE uint64_t mjp_counter_hi(int64_t b, int64_t path) {
  return (static_cast<uint64_t>(b) << 32) | static_cast<uint64_t>(path);
}

// Sum of w[0..n) in index order, skipping index `skip`.
MK_HOST_DEVICE double mjp_row_sum(const double* w, int64_t n, int64_t skip) {
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    if (j != skip) total += w[j];
  }
  return total;
}

// The first index j != skip with w[j] > 0 whose running sum exceeds `threshold` (= U * total); the last
// positive one when rounding leaves none.
MK_HOST_DEVICE int64_t mjp_pick(const double* w, int64_t n, int64_t skip, double threshold) {
  double cum = 0.0;
  int64_t last = skip;
  for (int64_t j = 0; j < n; ++j) {
    if (j == skip || !(w[j] > 0.0)) continue;
    cum += w[j];
    last = j;
    if (cum > threshold) return j;
  }
  return last;
}

// fp64 products and sums rounded one by one: nvcc would otherwise fuse a * b + c into an fma, which the host
// compiler (x86-64 without -mfma) does not, and the two devices would round differently. These emit PTX mul.rn /
// add.rn, which ptxas never fuses; a plain product (PTX mul.f64, fusable with an add it feeds) appears only where
// its result reaches comparisons and further products, never a sum.
MK_HOST_DEVICE double mjp_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

MK_HOST_DEVICE double mjp_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// -log(u) for u in (0, 1), within 2 ulp, by the same operations on both devices (libm's log and CUDA's log
// differ in the last bit). u = m 2^e with m in [~1/sqrt 2, ~sqrt 2); log m = 2 atanh(s), s = (m - 1) / (m + 1),
// |s| < 0.172, summed to s^23; e ln 2 in two parts (fdlibm's split: e * kLn2Hi is exact).
MK_HOST_DEVICE double mjp_neg_log(double u) {
  constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  constexpr uint64_t kMantissa = 0x000FFFFFFFFFFFFFull, kHalf = 0x3FE0000000000000ull;
  constexpr uint32_t kSqrtHalfHigh = 0x3FE6A09Eu;  // upper 32 bits of 1/sqrt(2) as a double
  uint64_t bits;
  memcpy(&bits, &u, sizeof(bits));
  // u is normal and positive: u = m 2^e with m = (1 + mantissa) / 2 in [1/2, 1) and e = exponent field - 1022.
  // When the upper 32 bits of m are below those of 1/sqrt 2 (bit patterns order like positive doubles),
  // m doubles and e drops by one. Integer selects on 32-bit words, no branch: the CPU kernel vectorises this.
  const uint64_t mantissa = bits & kMantissa;
  const uint64_t low = static_cast<uint32_t>((kHalf | mantissa) >> 32) < kSqrtHalfHigh ? 1 : 0;
  const double ed = static_cast<double>(static_cast<int32_t>(bits >> 52) - 1022 - static_cast<int32_t>(low));
  bits = (kHalf + (low << 52)) | mantissa;
  double m;
  memcpy(&m, &bits, sizeof(m));
  const double s = (m - 1.0) / (m + 1.0);
  const double z = mjp_mul(s, s);
  double poly = 1.0 / 23.0;
  MK_UNROLL
  for (int k = 10; k >= 1; --k) poly = mjp_add(1.0 / (2 * k + 1), mjp_mul(z, poly));
  const double two_s = s + s;
  const double log_m = mjp_add(two_s, mjp_mul(two_s, mjp_mul(z, poly)));
  return -mjp_add(mjp_mul(ed, kLn2Hi), mjp_add(log_m, mjp_mul(ed, kLn2Lo)));
}

// The two uniforms of a jump: U1 (holding time) from words 0-1, U2 (destination) from words 2-3.
MK_HOST_DEVICE void mjp_jump_uniforms(uint64_t seed, uint64_t draw, uint64_t hi, double* u_time, double* u_dest) {
  const Philox4 r = philox_block(seed, draw, hi);
  *u_time = uniform_double(r.v[0], r.v[1]);
  *u_dest = uniform_double(r.v[2], r.v[3]);
}

// The jump time after t for the unit exponential e = -log(U1) at exit rate q: t + e / q, +inf when q = 0.
MK_HOST_DEVICE double mjp_jump_time(double t, double e, double q) {
  return q > 0.0 ? t + e / q : std::numeric_limits<double>::infinity();
}

// Events mode: whether the jump at t_next is recorded: at or before t_end, and finite (e / q overflows to +inf for
// an exit rate q below about 5e-309: no jump, as for q = 0).
MK_HOST_DEVICE bool mjp_event_recorded(double t_next, double t_end) {
  return t_next <= t_end && t_next < std::numeric_limits<double>::infinity();
}

// Time of the next jump after t at exit rate q (+inf when q = 0), and the destination uniform.
MK_HOST_DEVICE double mjp_next_time(uint64_t seed, uint64_t draw, uint64_t hi, double t, double q,
                                    double* u_dest) {
  if (!(q > 0.0)) return std::numeric_limits<double>::infinity();
  double u_time;
  mjp_jump_uniforms(seed, draw, hi, &u_time, u_dest);
  return mjp_jump_time(t, mjp_neg_log(u_time), q);
}

// Jump table of row x of a rate matrix, w: (S,): cum[j] = the running sum mjp_pick(w, S, x, .) holds after
// index j (the same additions in the same order); returns the last j != x with w[j] > 0 (x when none).
MK_HOST_DEVICE int64_t mjp_jump_table_row(const double* w, int64_t S, int64_t x, double* cum) {
  double total = 0.0;
  int64_t last = x;
  for (int64_t j = 0; j < S; ++j) {
    if (j != x && w[j] > 0.0) {
      total += w[j];
      last = j;
    }
    cum[j] = total;
  }
  return last;
}

// mjp_pick through the jump table of its row: cum is non-decreasing and flat at skipped indices, so the first
// j with cum[j] > threshold is the number of entries <= threshold (a branch-free count up to 32 states, a
// binary search beyond).
MK_HOST_DEVICE int64_t mjp_pick_table(const double* cum, int64_t S, int64_t last, double threshold) {
  int64_t below = 0;
  if (S <= 32) {
    for (int64_t j = 0; j < S; ++j) below += cum[j] <= threshold;
  } else {
    for (int64_t n = S; n > 0;) {  // cum[j] <= threshold for every j < below; n entries from below unknown
      const int64_t half = n / 2;
      if (cum[below + half] <= threshold) {
        below += half + 1;
        n -= half + 1;
      } else {
        n = half;
      }
    }
  }
  return below < S ? below : last;
}

template <typename Out>
MK_HOST_DEVICE Out* mjp_states(void* base, int64_t offset) {
  return static_cast<Out*>(base) + offset;
}

MK_HOST_DEVICE int64_t ctmc_initial_state(const CtmcParams& p, int64_t b, int64_t path, uint64_t hi) {
  if (p.x0 != nullptr) return p.x0[b * p.P + path];
  const double* w = p.p0 + b * p.p0_stride;
  const Philox4 r = philox_block(p.seed, 0, hi);
  return mjp_pick(w, p.S, -1, uniform_double(r.v[0], r.v[1]) * mjp_row_sum(w, p.S, -1));
}

// Writes a row of states, Out: (L,), in runs of equal values in index order, through aligned 8-byte words: a word
// collects in a register (a run fills its slots at once) and is stored when complete. On a GPU the threads of a
// warp write different rows, so every store is a memory transaction of its own: one per word instead of one per
// value. The values before the row's first word boundary and after its last one are stored one by one (those
// words are shared with the neighbouring rows).
template <typename Out>
class MjpRowWriter {
 public:
  MK_HOST_DEVICE MjpRowWriter(Out* row, int64_t L) : row_(row), L_(L) {
    const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) / sizeof(Out)) % kPerWord;
    head_ = misaligned == 0 ? 0 : kPerWord - misaligned;
  }

  // Row values k .. end - 1 = value, where k is the first index not yet written (runs cover 0 .. L - 1 in turn).
  MK_HOST_DEVICE void fill(int64_t k, int64_t end, Out value) {
    for (; k < end && k < head_; ++k) row_[k] = value;
    const uint64_t repeated = kRepeat * static_cast<Unsigned>(value);  // value in every slot
    while (k < end) {
      const int64_t slot = (k - head_) & (kPerWord - 1);
      const int64_t count = end - k < kPerWord - slot ? end - k : kPerWord - slot;  // slots this run fills here
      const uint64_t kept = (uint64_t{1} << (kBits * slot)) - 1;                    // the slots before it
      word_ = (word_ & kept) | (repeated << (kBits * slot));
      k += count;
      const int64_t first = k - slot - count;  // row index of the word's slot 0
      if (slot + count == kPerWord) {
        *reinterpret_cast<uint64_t*>(row_ + first) = word_;
      } else if (k == L_) {  // the row ends inside the word
        for (int64_t j = first; j < k; ++j) {
          row_[j] = static_cast<Out>(static_cast<Unsigned>(word_ >> (kBits * (j - first))));
        }
      }
    }
  }

 private:
  using Unsigned = std::make_unsigned_t<Out>;
  static constexpr int kBits = 8 * sizeof(Out);
  static constexpr int64_t kPerWord = 8 / sizeof(Out);
  static constexpr uint64_t kRepeat = ~uint64_t{0} / ((uint64_t{1} << kBits) - 1);  // 1 in every slot
  Out* row_;
  int64_t L_, head_;
  uint64_t word_ = 0;
};

// One path of the grid record as a resumable loop (the CUDA kernel runs several paths per thread, each starting
// where the last one ended): the constructor takes path `path` of process b to its initial state; step() makes
// one jump after storing the state at the grid points before it, and returns false (doing nothing more) once the
// row is full. rates: (S, S) and exit: (S,) of process b. The fields of p live in members (registers): the
// stores through the row (a char type for uint8) would otherwise force reloading them after every write.
template <typename Out>
class CtmcGridPath {
 public:
  MK_HOST_DEVICE CtmcGridPath(const CtmcParams& p, const double* rates, const double* exit, int64_t b,
                              int64_t path)
      : rates_(rates),
        exit_(exit),
        grid_(p.grid + b * p.grid_b_stride + path * p.grid_p_stride),
        out_(mjp_states<Out>(p.states, (b * p.P + path) * p.L), p.L),
        seed_(p.seed),
        hi_(mjp_counter_hi(p.process_offset + b, p.path_offset + path)),
        S_(p.S),
        L_(p.L),
        x_(ctmc_initial_state(p, b, path, hi_)) {}

  MK_HOST_DEVICE bool step() {
    double u_dest = 0.0;
    const double q = exit_[x_];
    const double t_next = mjp_next_time(seed_, draw_, hi_, t_, q, &u_dest);
    int64_t end = k_;  // grid points before the jump: found first, then filled (no stores in the search)
    while (end < L_ && grid_[end] < t_next) ++end;
    out_.fill(k_, end, static_cast<Out>(x_));
    k_ = end;
    if (k_ == L_) return false;
    x_ = mjp_pick(rates_ + x_ * S_, S_, x_, u_dest * q);
    t_ = t_next;
    ++draw_;
    return true;
  }

 private:
  const double* rates_;
  const double* exit_;
  const double* grid_;
  MjpRowWriter<Out> out_;
  uint64_t seed_, hi_;
  int64_t S_, L_, x_;
  uint64_t draw_ = 1;  // Philox draw of the next jump
  double t_ = 0.0;     // time of the last jump
  int64_t k_ = 0;      // next grid index to write
};

// One path of the events record as a resumable loop, like CtmcGridPath: step() records the next jump if its time
// is <= t_end and fewer than max_events are recorded; else (absorbed, past the horizon, or max_events recorded)
// it writes the count, the overflow flag and the padding, and returns false.
template <typename Out>
class CtmcEventsPath {
 public:
  MK_HOST_DEVICE CtmcEventsPath(const CtmcParams& p, const double* rates, const double* exit, int64_t b,
                                int64_t path)
      : rates_(rates),
        exit_(exit),
        times_(p.times + (b * p.P + path) * p.max_events),
        states_(mjp_states<Out>(p.states, (b * p.P + path) * p.max_events)),
        count_(p.counts + b * p.P + path),
        overflow_(p.overflow + b * p.P + path),
        seed_(p.seed),
        hi_(mjp_counter_hi(p.process_offset + b, p.path_offset + path)),
        t_end_(p.t_end),
        S_(p.S),
        M_(p.max_events),
        x_(ctmc_initial_state(p, b, path, hi_)) {
    mjp_states<Out>(p.initial, b * p.P + path)[0] = static_cast<Out>(x_);
  }

  MK_HOST_DEVICE bool step() {
    double u_dest = 0.0;
    const double q = exit_[x_];
    const double t_next = mjp_next_time(seed_, draw_, hi_, t_, q, &u_dest);
    const bool jumps = mjp_event_recorded(t_next, t_end_);
    if (jumps && n_ < M_) {
      x_ = mjp_pick(rates_ + x_ * S_, S_, x_, u_dest * q);
      t_ = t_next;
      ++draw_;
      times_[n_] = t_;
      states_[n_++] = static_cast<Out>(x_);
      return true;
    }
    *count_ = n_;
    *overflow_ = jumps;
    for (int64_t m = n_; m < M_; ++m) {
      times_[m] = std::numeric_limits<double>::infinity();
      states_[m] = static_cast<Out>(x_);
    }
    return false;
  }

 private:
  const double* rates_;
  const double* exit_;
  double* times_;
  Out* states_;
  int64_t* count_;
  bool* overflow_;
  uint64_t seed_, hi_;
  double t_end_;
  int64_t S_, M_, x_;
  uint64_t draw_ = 1;  // Philox draw of the next jump
  double t_ = 0.0;     // time of the last jump
  int64_t n_ = 0;      // jumps recorded
};

// *flag = 1 from any number of threads at once (the same value: no order needed).
MK_HOST_DEVICE void mjp_set_flag(int32_t* flag) {
#ifdef __CUDA_ARCH__
  *flag = 1;
#else
  __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
#endif
}

// Stochastic mass action: k_r prod_s C(x_s, alpha_rs), the binomials as running products (x - m) / (alpha - m):
// factors >= 1, so a partial product overflows only where the propensity does ((x - m) / (m + 1) passed C(x, x / 2)
// on the way: 1100 A -> 0 at x = 1100, propensity k, overflowed).
MK_HOST_DEVICE double mjp_propensity(const int32_t* alpha, double k, const int64_t* x, int64_t n_species) {
  double a = k;
  for (int64_t s = 0; s < n_species; ++s) {
    for (int32_t m = 0; m < alpha[s]; ++m) {
      if (x[s] <= m) return 0.0;
      a = mjp_mul(a, static_cast<double>(x[s] - m) / static_cast<double>(alpha[s] - m));
    }
  }
  return a;
}

// alpha, nu: (R, N); k: (R,) of process b; affects: (R, R) (all in shared memory on CUDA). The propensities
// live in a per-path array; after reaction r fires only those with affects[r, r2] are recomputed (the same
// values a full recomputation gives), and their total is summed afresh in index order at every step.
MK_HOST_DEVICE void reaction_grid_path(const ReactionParams& p, const int32_t* alpha, const int32_t* nu,
                                       const double* k, const uint8_t* affects, int64_t b, int64_t path) {
  const uint64_t hi = mjp_counter_hi(p.process_offset + b, p.path_offset + path);
  const uint64_t seed = p.seed;
  const int64_t i = b * p.P + path;
  const int64_t R = p.R, N = p.N, L = p.L;
  const double* grid = p.grid + b * p.grid_b_stride + path * p.grid_p_stride;
  int64_t* out = p.out + i * L * N;
  int64_t x[kMjpMaxSpecies];
  for (int64_t s = 0; s < N; ++s) x[s] = p.x0[i * N + s];
  double a[kMjpMaxReactions];
  for (int64_t r = 0; r < R; ++r) a[r] = mjp_propensity(alpha + r * N, k[r], x, N);
  double t = 0.0;
  int64_t step = 0;
  for (uint64_t draw = 1;; ++draw) {
    const double a0 = mjp_row_sum(a, R, -1);
    if (!(a0 < std::numeric_limits<double>::infinity())) {  // no next event time: -1 from here, flagged
      for (; step < L; ++step) {
        for (int64_t s = 0; s < N; ++s) out[step * N + s] = -1;
      }
      mjp_set_flag(p.exploded);
      return;
    }
    double u_dest = 0.0;
    const double t_next = mjp_next_time(seed, draw, hi, t, a0, &u_dest);
    int64_t end = step;
    while (end < L && grid[end] < t_next) ++end;
    for (; step < end; ++step) {
      for (int64_t s = 0; s < N; ++s) out[step * N + s] = x[s];
    }
    if (step == L) return;
    const int64_t fired = mjp_pick(a, R, -1, u_dest * a0);
    for (int64_t s = 0; s < N; ++s) x[s] += nu[fired * N + s];
    for (int64_t r = 0; r < R; ++r) {
      if (affects[fired * R + r]) a[r] = mjp_propensity(alpha + r * N, k[r], x, N);
    }
    t = t_next;
  }
}

void ctmc_exit_rates_cpu(const CtmcParams& p);
void ctmc_grid_cpu(const CtmcParams& p);
void ctmc_events_cpu(const CtmcParams& p);
void reactions_grid_cpu(const ReactionParams& p);
#ifdef MARKOVKIT_WITH_CUDA
void ctmc_exit_rates_cuda(const CtmcParams& p, cudaStream_t stream);
void ctmc_grid_cuda(const CtmcParams& p, cudaStream_t stream);
void ctmc_events_cuda(const CtmcParams& p, cudaStream_t stream);
void reactions_grid_cuda(const ReactionParams& p, cudaStream_t stream);
#endif

}  // namespace markovkit

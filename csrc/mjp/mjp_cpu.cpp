// CPU kernels of the Gillespie simulators: paths are independent, so threads split (process, path) freely.
#if defined(__GNUC__) && !defined(__clang__)
// No a * b + c fused into an fma even when the build targets a CPU with FMA (-march=native): the CUDA kernels round
// every product and sum on its own (mjp.h), and the two devices must produce the same paths. (GCC contracts across
// inlined calls by default; clang only within one expression, which mjp.h never writes.)
#pragma GCC optimize("fp-contract=off")
#endif
#include <ATen/Parallel.h>

#include <vector>

#include "mjp/mjp.h"

namespace markovkit {
namespace {

// Runs fn(b, path) for every path of every process.
template <typename Fn>
void for_each_path(int64_t B, int64_t P, const Fn& fn) {
  at::parallel_for(0, B * P, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i / P, i % P);
  });
}

// Jump tables of every row of every rate matrix (mjp_jump_table_row). cum: (Bq, S, S), last: (Bq, S).
void ctmc_jump_tables(const CtmcParams& p, double* cum, int64_t* last) {
  at::parallel_for(0, p.n_q * p.S, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      last[row] = mjp_jump_table_row(p.rates + row * p.S, p.S, row % p.S, cum + row * p.S);
    }
  });
}

// The CPU kernels run the jumps of kLanes paths interleaved (one jump of every lane per round), so that the
// latency chains of different paths overlap and the draws of a round vectorise; a lane whose path is done
// takes the next path of the range. Per path, the same operations as CtmcGridPath and CtmcEventsPath (mjp.h),
// destinations through the jump tables (the same picks as mjp_pick): the output is bitwise that of the CUDA
// kernels.
constexpr int kLanes = 8;
constexpr int64_t kGridBlock = 16;  // grid points compared (and states stored) per step of the fill

struct Lane {
  int64_t path;       // flat index b * P + path; -1 when the lane is idle
  uint64_t hi, draw;  // Philox counter
  int64_t x, k;       // current state; grid mode: next grid index to write, events mode: jumps recorded
  double t;           // time of the last jump
  const double* grid;  // grid mode: the path's grid row
  const double* cum;   // jump tables and exit rates of the lane's process
  const int64_t* last;
  const double* exit;
};

// Writes x at the grid points k.. before t_next; returns the first index not written (L when the path is done).
// Whole blocks of kGridBlock are stored unconditionally: the stores past the returned index stay in the
// path's row and are overwritten by later jumps.
template <typename Out>
int64_t fill_before(const double* grid, int64_t L, int64_t k, double t_next, Out x, Out* out) {
  for (;;) {
    if (k + kGridBlock > L) {
      while (k < L && grid[k] < t_next) out[k++] = x;
      return k;
    }
    int64_t below = 0;  // the grid is non-decreasing: the points < t_next form a prefix of the block
    for (int64_t j = 0; j < kGridBlock; ++j) below += grid[k + j] < t_next;
    for (int64_t j = 0; j < kGridBlock; ++j) out[k + j] = x;
    k += below;
    if (below < kGridBlock) return k;
  }
}

// The lane's jump at t_next, exit rate q, destination uniform u_dest: its new state, time and draw.
void lane_jump(Lane& lane, int64_t S, double t_next, double u_dest, double q) {
  lane.x = mjp_pick_table(lane.cum + lane.x * S, S, lane.last[lane.x], u_dest * q);
  lane.t = t_next;
  ++lane.draw;
}

// Grid mode (CtmcGridPath): records the state up to the next jump; false when the grid is full.
template <typename Out>
struct GridRecord {
  static void start(const CtmcParams&, Lane&) {}

  static bool step(const CtmcParams& p, Lane& lane, double e, double u_dest) {
    const double q = lane.exit[lane.x];
    const double t_next = mjp_jump_time(lane.t, e, q);
    Out* out = mjp_states<Out>(p.states, lane.path * p.L);
    lane.k = fill_before(lane.grid, p.L, lane.k, t_next, static_cast<Out>(lane.x), out);
    if (lane.k == p.L) return false;
    lane_jump(lane, p.S, t_next, u_dest, q);
    return true;
  }
};

// Events mode (CtmcEventsPath): records the next jump at time <= t_end; at the end of the path (absorbed,
// past the horizon, or max_events recorded) the count, the overflow flag and the padding; false then.
template <typename Out>
struct EventsRecord {
  static void start(const CtmcParams& p, Lane& lane) { mjp_states<Out>(p.initial, lane.path)[0] = lane.x; }

  static bool step(const CtmcParams& p, Lane& lane, double e, double u_dest) {
    const int64_t M = p.max_events;
    double* times = p.times + lane.path * M;
    Out* states = mjp_states<Out>(p.states, lane.path * M);
    const double q = lane.exit[lane.x];
    const double t_next = mjp_jump_time(lane.t, e, q);
    const bool jumps = mjp_event_recorded(t_next, p.t_end);
    if (jumps && lane.k < M) {
      lane_jump(lane, p.S, t_next, u_dest, q);
      times[lane.k] = lane.t;
      states[lane.k++] = static_cast<Out>(lane.x);
      return true;
    }
    p.counts[lane.path] = lane.k;
    p.overflow[lane.path] = jumps;
    for (int64_t m = lane.k; m < M; ++m) {
      times[m] = std::numeric_limits<double>::infinity();
      states[m] = static_cast<Out>(lane.x);
    }
    return false;
  }
};

// The paths begin..end (flat indices b * P + path) recorded by Record, kLanes at a time.
template <typename Record>
void ctmc_lanes(const CtmcParams& p, const double* cum, const int64_t* last, int64_t begin, int64_t end) {
  const int64_t S = p.S, P = p.P;
  const int64_t q_stride = p.n_q == 1 ? 0 : 1;
  Lane lanes[kLanes] = {};
  int64_t next = begin, busy = 0;
  const auto start = [&](Lane& lane) {
    if (next == end) {
      lane.path = -1;
      return;
    }
    const int64_t i = next++, b = i / P, path = i % P;
    const int64_t qb = b * q_stride;
    lane = {i, mjp_counter_hi(p.process_offset + b, p.path_offset + path), 1, 0, 0, 0.0,
            p.grid + b * p.grid_b_stride + path * p.grid_p_stride, cum + qb * S * S, last + qb * S, p.exit + qb * S};
    lane.x = ctmc_initial_state(p, b, path, lane.hi);
    Record::start(p, lane);
    ++busy;
  };
  for (Lane& lane : lanes) start(lane);
  double u_time[kLanes], u_dest[kLanes], e[kLanes];
  while (busy > 0) {
    for (int l = 0; l < kLanes; ++l) mjp_jump_uniforms(p.seed, lanes[l].draw, lanes[l].hi, &u_time[l], &u_dest[l]);
    for (int l = 0; l < kLanes; ++l) e[l] = mjp_neg_log(u_time[l]);  // branch-free: vectorises over lanes
    for (int l = 0; l < kLanes; ++l) {
      if (lanes[l].path < 0 || Record::step(p, lanes[l], e[l], u_dest[l])) continue;
      --busy;
      start(lanes[l]);
    }
  }
}

template <template <typename> class Record, typename Out>
void ctmc_typed(const CtmcParams& p) {
  std::vector<double> cum(p.n_q * p.S * p.S);
  std::vector<int64_t> last(p.n_q * p.S);
  ctmc_jump_tables(p, cum.data(), last.data());
  at::parallel_for(0, p.B * p.P, kLanes, [&](int64_t begin, int64_t end) {
    ctmc_lanes<Record<Out>>(p, cum.data(), last.data(), begin, end);
  });
}

template <template <typename> class Record>
void ctmc_cpu(const CtmcParams& p) {
  switch (p.state_type) {
    case StateType::kUInt8: return ctmc_typed<Record, uint8_t>(p);
    case StateType::kInt16: return ctmc_typed<Record, int16_t>(p);
    case StateType::kInt32: return ctmc_typed<Record, int32_t>(p);
  }
}

}  // namespace

void ctmc_exit_rates_cpu(const CtmcParams& p) {
  for (int64_t row = 0; row < p.n_q * p.S; ++row) {
    p.exit[row] = mjp_row_sum(p.rates + row * p.S, p.S, row % p.S);
  }
}

void ctmc_grid_cpu(const CtmcParams& p) { ctmc_cpu<GridRecord>(p); }

void ctmc_events_cpu(const CtmcParams& p) { ctmc_cpu<EventsRecord>(p); }

void reactions_grid_cpu(const ReactionParams& p) {
  for_each_path(p.B, p.P, [&](int64_t b, int64_t path) {
    reaction_grid_path(p, p.reactants, p.change, p.rates + b * p.rates_stride, p.affects, b, path);
  });
}

}  // namespace markovkit

// CPU kernels of the Gillespie simulators: paths are independent, so threads split (process, path) freely.
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

template <typename Out>
void ctmc_events_typed(const CtmcParams& p) {
  const int64_t q_stride = p.n_q == 1 ? 0 : 1;
  for_each_path(p.B, p.P, [&](int64_t b, int64_t path) {
    const double* rates = p.rates + b * q_stride * p.S * p.S;
    ctmc_events_path<Out>(p, rates, p.exit + b * q_stride * p.S, b, path);
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

// Grid mode on CPU: the jumps of kLanes paths interleave (one jump of every lane per round), so that the
// latency chains of different paths overlap and the draws of a round vectorise; a lane whose path is done
// takes the next path of the range. Per path, the same operations as ctmc_grid_path (mjp.h), destinations
// through the jump tables (the same picks as mjp_pick): the output is bitwise that of the CUDA kernel.
constexpr int kLanes = 8;
constexpr int64_t kGridBlock = 16;  // grid points compared (and states stored) per step of the fill

struct Lane {
  int64_t path;       // flat index b * P + path; -1 when the lane is idle
  uint64_t hi, draw;  // Philox counter
  int64_t x, k;       // current state, next grid index to write
  double t;           // time of the last jump
  const double* grid;
  const double* cum;  // jump tables and exit rates of the lane's process
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

template <typename Out>
void ctmc_grid_range(const CtmcParams& p, const double* cum, const int64_t* last, int64_t begin, int64_t end) {
  const int64_t S = p.S, L = p.L, P = p.P;
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
    lane = {i, mjp_counter_hi(p.process_offset + b, path), 1, 0, 0, 0.0,
            p.grid + b * p.grid_b_stride + path * p.grid_p_stride, cum + qb * S * S, last + qb * S, p.exit + qb * S};
    lane.x = ctmc_initial_state(p, b, path, lane.hi);
    ++busy;
  };
  for (Lane& lane : lanes) start(lane);
  double u_time[kLanes], u_dest[kLanes], e[kLanes];
  while (busy > 0) {
    for (int l = 0; l < kLanes; ++l) mjp_jump_uniforms(p.seed, lanes[l].draw, lanes[l].hi, &u_time[l], &u_dest[l]);
    for (int l = 0; l < kLanes; ++l) e[l] = mjp_neg_log(u_time[l]);  // branch-free: vectorises over lanes
    for (int l = 0; l < kLanes; ++l) {
      Lane& lane = lanes[l];
      if (lane.path < 0) continue;
      const double q = lane.exit[lane.x];
      const double t_next = mjp_jump_time(lane.t, e[l], q);
      Out* out = mjp_states<Out>(p.states, lane.path * L);
      lane.k = fill_before(lane.grid, L, lane.k, t_next, static_cast<Out>(lane.x), out);
      if (lane.k == L) {
        --busy;
        start(lane);
        continue;
      }
      lane.x = mjp_pick_table(lane.cum + lane.x * S, S, lane.last[lane.x], u_dest[l] * q);
      lane.t = t_next;
      ++lane.draw;
    }
  }
}

template <typename Out>
void ctmc_grid_typed(const CtmcParams& p) {
  std::vector<double> cum(p.n_q * p.S * p.S);
  std::vector<int64_t> last(p.n_q * p.S);
  ctmc_jump_tables(p, cum.data(), last.data());
  at::parallel_for(0, p.B * p.P, kLanes, [&](int64_t begin, int64_t end) {
    ctmc_grid_range<Out>(p, cum.data(), last.data(), begin, end);
  });
}

}  // namespace

void ctmc_exit_rates_cpu(const CtmcParams& p) {
  for (int64_t row = 0; row < p.n_q * p.S; ++row) {
    p.exit[row] = mjp_row_sum(p.rates + row * p.S, p.S, row % p.S);
  }
}

void ctmc_grid_cpu(const CtmcParams& p) {
  switch (p.state_type) {
    case StateType::kUInt8: return ctmc_grid_typed<uint8_t>(p);
    case StateType::kInt16: return ctmc_grid_typed<int16_t>(p);
    case StateType::kInt32: return ctmc_grid_typed<int32_t>(p);
  }
}

void ctmc_events_cpu(const CtmcParams& p) {
  switch (p.state_type) {
    case StateType::kUInt8: return ctmc_events_typed<uint8_t>(p);
    case StateType::kInt16: return ctmc_events_typed<int16_t>(p);
    case StateType::kInt32: return ctmc_events_typed<int32_t>(p);
  }
}

void reactions_grid_cpu(const ReactionParams& p) {
  for_each_path(p.B, p.P, [&](int64_t b, int64_t path) {
    reaction_grid_path(p, p.reactants, p.change, p.rates + b * p.rates_stride, p.affects, b, path);
  });
}

}  // namespace markovkit

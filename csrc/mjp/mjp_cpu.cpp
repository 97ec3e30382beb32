// CPU kernels of the Gillespie simulators: paths are independent, so threads split (process, path) freely.
#include <ATen/Parallel.h>

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

template <typename Out, bool kEvents>
void ctmc_typed(const CtmcParams& p) {
  const int64_t q_stride = p.n_q == 1 ? 0 : 1;
  for_each_path(p.B, p.P, [&](int64_t b, int64_t path) {
    const double* rates = p.rates + b * q_stride * p.S * p.S;
    const double* exit = p.exit + b * q_stride * p.S;
    if constexpr (kEvents) {
      ctmc_events_path<Out>(p, rates, exit, b, path);
    } else {
      ctmc_grid_path<Out>(p, rates, exit, b, path);
    }
  });
}

template <bool kEvents>
void ctmc_dispatch(const CtmcParams& p) {
  switch (p.state_type) {
    case StateType::kUInt8: return ctmc_typed<uint8_t, kEvents>(p);
    case StateType::kInt16: return ctmc_typed<int16_t, kEvents>(p);
    case StateType::kInt32: return ctmc_typed<int32_t, kEvents>(p);
  }
}

}  // namespace

void ctmc_exit_rates_cpu(const CtmcParams& p) {
  for (int64_t row = 0; row < p.n_q * p.S; ++row) {
    p.exit[row] = mjp_row_sum(p.rates + row * p.S, p.S, row % p.S);
  }
}

void ctmc_grid_cpu(const CtmcParams& p) { ctmc_dispatch<false>(p); }

void ctmc_events_cpu(const CtmcParams& p) { ctmc_dispatch<true>(p); }

void reactions_grid_cpu(const ReactionParams& p) {
  for_each_path(p.B, p.P, [&](int64_t b, int64_t path) {
    reaction_grid_path(p, p.reactants, p.change, p.rates + b * p.rates_stride, p.affects, b, path);
  });
}

}  // namespace markovkit

// Glue for the Gillespie simulators: input checks, params, stream; CPU and CUDA registrations.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "common/backend.h"
#include "common/torch_checks.h"
#include "mjp/mjp.h"

namespace markovkit {
namespace {

constexpr int64_t kMaxIndex = int64_t{1} << 32;  // processes and paths each fill 32 bits of the counter
constexpr int64_t kMaxStoichiometry = int64_t{1} << 30;

StateType state_type_for(int64_t S) {
  if (S <= 256) return StateType::kUInt8;
  if (S <= 32768) return StateType::kInt16;
  return StateType::kInt32;
}

at::ScalarType scalar_type_of(StateType t) {
  switch (t) {
    case StateType::kUInt8: return at::kByte;
    case StateType::kInt16: return at::kShort;
    case StateType::kInt32: return at::kInt;
  }
  return at::kInt;
}

// The value checks of one call (NaN, negative rates, states out of range, ...) with a single host sync:
// each check adds a 0-dim bool "failed" tensor on the inputs' device and a message builder; run() copies
// all flags to the host at once and raises the message of the first failed check, in the order added.
// A builder runs only on the error path, so it may read values from the device (e.g. the offending minimum).
class ValueChecks {
 public:
  void add(const at::Tensor& failed, std::function<std::string()> message) {
    failed_.push_back(failed.any());
    messages_.push_back(std::move(message));
  }

  void run() const {
    if (failed_.empty()) return;
    const at::Tensor flags = at::stack(failed_).cpu();  // the one sync
    const bool* failed = flags.data_ptr<bool>();
    for (size_t i = 0; i < messages_.size(); ++i) {
      TORCH_CHECK(!failed[i], messages_[i]());
    }
  }

 private:
  std::vector<at::Tensor> failed_;
  std::vector<std::function<std::string()>> messages_;
};

void check_integral(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), name,
              ": expected an integer dtype, got ", t.scalar_type());
}

void check_sizes(int64_t processes, int64_t paths, int64_t process_offset, int64_t path_offset) {
  TORCH_CHECK(processes >= 0, "processes: expected >= 0, got ", processes);
  TORCH_CHECK(process_offset >= 0 && process_offset <= kMaxIndex - processes,  // no int64 overflow
              "process_offset: expected process_offset >= 0 and process_offset + processes <= 2^32, got ",
              process_offset, " + ", processes);
  TORCH_CHECK(paths >= 0 && paths < kMaxIndex, "paths: expected 0 <= paths < 2^32, got ", paths);
  TORCH_CHECK(path_offset >= 0 && path_offset <= kMaxIndex - paths,
              "path_offset: expected path_offset >= 0 and path_offset + paths <= 2^32, got ", path_offset, " + ",
              paths);
}

// Non-negative finite weights: rates or initial distributions. `what` names them in the message.
void check_weights(ValueChecks& checks, const at::Tensor& w, const char* name, const char* what) {
  checks.add(at::isnan(w), [=] { return c10::str(name, ": expected ", what, " without NaN, got NaN"); });
  checks.add(at::isinf(w), [=] { return c10::str(name, ": expected finite ", what, ", got inf"); });
  checks.add(w < 0, [=] { return c10::str(name, ": expected ", what, " >= 0, got ", w.min().item<double>()); });
}

// Finite sums over the last dim of finite weights (rates of 1e308 each can sum to inf: a path would then stop its
// clock, or pick the last destination every time); returns the sums.
at::Tensor check_finite_sums(ValueChecks& checks, const at::Tensor& w, const char* name, const char* what) {
  at::Tensor sums = w.sum(-1);
  checks.add(at::isinf(sums), [=] {
    return c10::str(name, ": expected a finite ", what, ", got inf (weights too large to add in float64)");
  });
  return sums;
}

// The observation times as fp64 with their strides in (process, path, k).
struct Grid {
  at::Tensor values;
  int64_t b_stride, p_stride, L;
};

Grid prepare_grid(ValueChecks& checks, const at::Tensor& t_grid, int64_t B, int64_t P, const at::Tensor& ref,
                  const char* ref_name) {
  check_dtype(t_grid, "t_grid", {at::kFloat, at::kDouble});
  check_same_device(t_grid, "t_grid", ref, ref_name);
  const int64_t d = t_grid.dim();
  TORCH_CHECK(d >= 1 && d <= 3, "t_grid: expected shape (L,), (processes, L) or (processes, paths, L), got ",
              t_grid.sizes());
  TORCH_CHECK(d < 2 || t_grid.size(0) == B, "t_grid: expected ", B, " processes in dim 0, got shape ",
              t_grid.sizes());
  TORCH_CHECK(d < 3 || t_grid.size(1) == P, "t_grid: expected ", P, " paths in dim 1, got shape ",
              t_grid.sizes());
  at::Tensor g = t_grid.to(at::kDouble).contiguous();
  checks.add(~at::isfinite(g), [] { return std::string("t_grid: expected finite times, got NaN or inf"); });
  checks.add(g < 0, [=] {
    return c10::str("t_grid: expected times >= 0 (every path starts at time 0), got ", g.min().item<double>());
  });
  const int64_t L = g.size(-1);
  if (L > 1) {
    const at::Tensor drops = g.diff(1, -1) < 0;  // (..., L - 1): t[k] > t[k + 1]
    checks.add(drops, [=] {
      // the first decrease, as (row of the grid flattened to (-1, L), k)
      const int64_t i = drops.flatten().nonzero()[0][0].item<int64_t>(), row = i / (L - 1), k = i % (L - 1);
      const at::Tensor rows = g.view({-1, L});
      return c10::str("t_grid: expected times non-decreasing along the last dim, got ", rows[row][k].item<double>(),
                      " then ", rows[row][k + 1].item<double>(), " at index ", k + 1, " of row ", row);
    });
  }
  return {g, d == 1 ? 0 : (d == 2 ? L : P * L), d == 3 ? L : 0, L};
}

// Q -> fp64 off-diagonal rates (diagonal zeroed) and room for the exit rates; fills the Q fields of p.
std::pair<at::Tensor, at::Tensor> prepare_rates(ValueChecks& checks, const at::Tensor& Q, int64_t B, CtmcParams& p) {
  check_dtype(Q, "Q", {at::kFloat, at::kDouble});
  TORCH_CHECK((Q.dim() == 2 || Q.dim() == 3) && Q.size(-1) == Q.size(-2) && Q.size(-1) >= 1,
              "Q: expected shape (S, S) or (processes, S, S) with S >= 1, got ", Q.sizes());
  TORCH_CHECK(Q.dim() == 2 || Q.size(0) == B, "Q: expected ", B, " processes in dim 0, got shape ", Q.sizes());
  const int64_t S = Q.size(-1);
  const at::Tensor diag = at::eye(S, Q.options().dtype(at::kBool));
  at::Tensor rates = Q.to(at::kDouble).masked_fill(diag, 0.0).contiguous();
  check_weights(checks, rates, "Q", "off-diagonal rates");
  check_finite_sums(checks, rates, "Q", "exit rate (the off-diagonal sum of a row)");
  p.n_q = Q.dim() == 2 ? 1 : B;
  at::Tensor exit = at::empty({p.n_q, S}, rates.options());
  p.rates = rates.data_ptr<double>();
  p.exit = exit.data_ptr<double>();
  p.S = S;
  p.state_type = state_type_for(S);
  return {rates, exit};
}

// x0 (processes, paths) or p0 (S,) / (processes, S): exactly one. Fills the initial-state fields of p.
at::Tensor prepare_initial(ValueChecks& checks, const std::optional<at::Tensor>& x0,
                           const std::optional<at::Tensor>& p0, const at::Tensor& Q, CtmcParams& p) {
  TORCH_CHECK(x0.has_value() != p0.has_value(), "x0, p0: expected exactly one of them, got ",
              x0.has_value() ? "both" : "neither");
  p.x0 = nullptr;
  p.p0 = nullptr;
  if (x0.has_value()) {
    check_integral(*x0, "x0");
    check_same_device(*x0, "x0", Q, "Q");
    check_shape(*x0, "x0", {p.B, p.P});
    at::Tensor x = x0->to(at::kLong).contiguous();
    const int64_t S = p.S;
    checks.add((x < 0) | (x >= S), [=] {
      return c10::str("x0: expected states in [0, ", S, "), got values in [", x.min().item<int64_t>(), ", ",
                      x.max().item<int64_t>(), "]");
    });
    p.x0 = x.data_ptr<int64_t>();
    return x;
  }
  check_dtype(*p0, "p0", {at::kFloat, at::kDouble});
  check_same_device(*p0, "p0", Q, "Q");
  TORCH_CHECK((p0->dim() == 1 || (p0->dim() == 2 && p0->size(0) == p.B)) && p0->size(-1) == p.S,
              "p0: expected shape (", p.S, ",) or (", p.B, ", ", p.S, "), got ", p0->sizes());
  at::Tensor w = p0->to(at::kDouble).contiguous();
  // a row of tiny weights (below 2^-960: a threshold U * sum there loses bits, or is 0, for subnormal sums) scaled
  // by 2^1000, exactly: its draw becomes right, every other row's stays bit for bit
  w = at::where(w.amax(-1, /*keepdim=*/true) < std::ldexp(1.0, -960), w * std::ldexp(1.0, 1000), w);
  check_weights(checks, w, "p0", "probabilities");
  checks.add(check_finite_sums(checks, w, "p0", "sum") <= 0, [] {
    return std::string("p0: expected every distribution to have a positive sum, got a zero row");
  });
  p.p0 = w.data_ptr<double>();
  p.p0_stride = p0->dim() == 1 ? 0 : p.S;
  return w;
}

void run_ctmc(const CtmcParams& p, const at::Tensor& ref, bool events) {
  MK_LAUNCH(ref, (ctmc_exit_rates_cpu(p), events ? ctmc_events_cpu(p) : ctmc_grid_cpu(p)),
            (ctmc_exit_rates_cuda(p, stream), events ? ctmc_events_cuda(p, stream) : ctmc_grid_cuda(p, stream)));
}

at::Tensor ctmc_grid(const at::Tensor& Q, const std::optional<at::Tensor>& x0, const std::optional<at::Tensor>& p0,
                     const at::Tensor& t_grid, int64_t processes, int64_t paths, int64_t seed,
                     int64_t process_offset, int64_t path_offset) {
  check_sizes(processes, paths, process_offset, path_offset);
  CtmcParams p{};
  p.B = processes;
  p.P = paths;
  p.seed = static_cast<uint64_t>(seed);
  p.process_offset = process_offset;
  p.path_offset = path_offset;
  ValueChecks checks;
  const auto keep_rates = prepare_rates(checks, Q, processes, p);
  const at::Tensor keep_initial = prepare_initial(checks, x0, p0, Q, p);
  const Grid grid = prepare_grid(checks, t_grid, processes, paths, Q, "Q");
  checks.run();
  p.grid = grid.values.data_ptr<double>();
  p.grid_b_stride = grid.b_stride;
  p.grid_p_stride = grid.p_stride;
  p.L = grid.L;
  at::Tensor states = at::empty({processes, paths, grid.L}, Q.options().dtype(scalar_type_of(p.state_type)));
  p.states = states.data_ptr();
  run_ctmc(p, Q, false);
  return states;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ctmc_events(
    const at::Tensor& Q, const std::optional<at::Tensor>& x0, const std::optional<at::Tensor>& p0,
    const at::Tensor& horizon, int64_t processes, int64_t paths, int64_t max_events, int64_t seed,
    int64_t process_offset, int64_t path_offset) {
  check_sizes(processes, paths, process_offset, path_offset);
  TORCH_CHECK(horizon.numel() == 1 && horizon.scalar_type() == at::kDouble && horizon.device().is_cpu(),
              "t_end: expected a one-element float64 CPU tensor, got ", horizon.sizes(), " ", horizon.scalar_type(),
              " on ", horizon.device());
  const double t_end = horizon.item<double>();
  TORCH_CHECK(t_end >= 0, "t_end: expected a horizon >= 0 (+inf for no horizon), got ", t_end);
  TORCH_CHECK(max_events >= 0, "max_events: expected >= 0, got ", max_events);
  CtmcParams p{};
  p.B = processes;
  p.P = paths;
  p.seed = static_cast<uint64_t>(seed);
  p.process_offset = process_offset;
  p.path_offset = path_offset;
  p.t_end = t_end;
  p.max_events = max_events;
  ValueChecks checks;
  const auto keep_rates = prepare_rates(checks, Q, processes, p);
  const at::Tensor keep_initial = prepare_initial(checks, x0, p0, Q, p);
  checks.run();
  const auto state_dtype = Q.options().dtype(scalar_type_of(p.state_type));
  at::Tensor initial = at::empty({processes, paths}, state_dtype);
  at::Tensor times = at::empty({processes, paths, max_events}, Q.options().dtype(at::kDouble));
  at::Tensor states = at::empty({processes, paths, max_events}, state_dtype);
  at::Tensor counts = at::empty({processes, paths}, Q.options().dtype(at::kLong));
  at::Tensor overflow = at::empty({processes, paths}, Q.options().dtype(at::kBool));
  p.initial = initial.data_ptr();
  p.times = times.data_ptr<double>();
  p.states = states.data_ptr();
  p.counts = counts.data_ptr<int64_t>();
  p.overflow = overflow.data_ptr<bool>();
  run_ctmc(p, Q, true);
  return {initial, times, states, counts, overflow};
}

// reactants, products: (R, N) -> int32 alpha, nu = beta - alpha, and uint8 affects (R, R): firing r changes
// the count of a reactant of r2.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_stoichiometry(
    ValueChecks& checks, const at::Tensor& reactants, const at::Tensor& products, const at::Tensor& x0) {
  check_integral(reactants, "reactants");
  check_integral(products, "products");
  check_same_device(reactants, "reactants", x0, "x0");
  check_same_device(products, "products", x0, "x0");
  TORCH_CHECK(reactants.dim() == 2 && reactants.size(0) <= kMjpMaxReactions,
              "reactants: expected shape (reactions, species) with at most ", kMjpMaxReactions, " reactions, got ",
              reactants.sizes());
  check_shape(products, "products", reactants.sizes());
  TORCH_CHECK(reactants.size(1) == x0.size(-1), "reactants: expected ", x0.size(-1),
              " species (the last dim of x0), got shape ", reactants.sizes());
  for (const auto& coefficients : {std::pair{reactants, "reactants"}, std::pair{products, "products"}}) {
    const at::Tensor t = coefficients.first.to(at::kLong);
    const char* name = coefficients.second;
    checks.add((t < 0) | (t >= kMaxStoichiometry), [=] {
      return c10::str(name, ": expected stoichiometric coefficients in [0, 2^30), got values in [",
                      t.min().item<int64_t>(), ", ", t.max().item<int64_t>(), "]");
    });
  }
  at::Tensor alpha = reactants.to(at::kInt).contiguous();
  at::Tensor nu = (products.to(at::kInt) - alpha).contiguous();
  at::Tensor affects = at::matmul(nu.ne(0).to(at::kFloat), alpha.gt(0).to(at::kFloat).t()).gt(0).to(at::kByte);
  return {alpha, nu, affects.contiguous()};
}

at::Tensor reactions_grid(const at::Tensor& reactants, const at::Tensor& products, const at::Tensor& rates,
                          const at::Tensor& x0, const at::Tensor& t_grid, int64_t seed,
                          int64_t process_offset, int64_t path_offset) {
  check_integral(x0, "x0");
  TORCH_CHECK(x0.dim() == 3 && x0.size(2) >= 1 && x0.size(2) <= kMjpMaxSpecies,
              "x0: expected shape (processes, paths, species) with 1 <= species <= ", kMjpMaxSpecies, ", got ",
              x0.sizes());
  const int64_t B = x0.size(0), P = x0.size(1), N = x0.size(2);
  check_sizes(B, P, process_offset, path_offset);
  ValueChecks checks;
  const auto [alpha, nu, affects] = prepare_stoichiometry(checks, reactants, products, x0);
  const int64_t R = alpha.size(0);
  check_dtype(rates, "rates", {at::kFloat, at::kDouble});
  check_same_device(rates, "rates", x0, "x0");
  TORCH_CHECK((rates.dim() == 1 || (rates.dim() == 2 && rates.size(0) == B)) && rates.size(-1) == R,
              "rates: expected shape (", R, ",) or (", B, ", ", R, "), got ", rates.sizes());
  at::Tensor k = rates.to(at::kDouble).contiguous();
  check_weights(checks, k, "rates", "rate constants");
  at::Tensor x = x0.to(at::kLong).contiguous();
  checks.add(x < 0, [=] { return c10::str("x0: expected counts >= 0, got ", x.min().item<int64_t>()); });
  const Grid grid = prepare_grid(checks, t_grid, B, P, x0, "x0");
  checks.run();
  at::Tensor out = at::empty({B, P, grid.L, N}, x.options());
  at::Tensor exploded = at::zeros({1}, x.options().dtype(at::kInt));
  const ReactionParams p{alpha.data_ptr<int32_t>(), nu.data_ptr<int32_t>(), affects.data_ptr<uint8_t>(),
                         k.data_ptr<double>(), rates.dim() == 1 ? 0 : R, x.data_ptr<int64_t>(),
                         grid.values.data_ptr<double>(), grid.b_stride, grid.p_stride, grid.L,
                         out.data_ptr<int64_t>(), B, P, R, N, static_cast<uint64_t>(seed), process_offset,
                         path_offset, exploded.data_ptr<int32_t>()};
  MK_LAUNCH(x0, reactions_grid_cpu(p), reactions_grid_cuda(p, stream));
  TORCH_CHECK(exploded.item<int32_t>() == 0,
              "rates: expected finite propensities, got a path whose total propensity overflowed to inf (rate "
              "constants times the counts' binomials beyond float64: its next event time is undefined)");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(markovkit, CPU, m) {
  m.impl("mjp_ctmc_grid", &ctmc_grid);
  m.impl("mjp_ctmc_events", &ctmc_events);
  m.impl("mjp_reactions_grid", &reactions_grid);
}

#ifdef MARKOVKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(markovkit, CUDA, m) {
  m.impl("mjp_ctmc_grid", &ctmc_grid);
  m.impl("mjp_ctmc_events", &ctmc_events);
  m.impl("mjp_reactions_grid", &reactions_grid);
}
#endif

}  // namespace markovkit

// Glue for mafbm_step / mafbm_step_backward / mafbm_simulate: checks, params, stream; CPU and CUDA
// registrations.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "common/backend.h"
#include "common/torch_checks.h"
#include "mafbm/mafbm_step.h"

namespace markovkit {
namespace {

// Checks that `t` is like `ref` (dtype, device) and has the given shape.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, at::IntArrayRef shape,
                const char* ref_name) {
  check_same_device(t, name, ref, ref_name);
  check_same_dtype(t, name, ref, ref_name);
  check_shape(t, name, shape);
}

// A tensor like `ref` (dtype, device) of the given shape, made contiguous.
at::Tensor checked(const at::Tensor& t, const char* name, const at::Tensor& ref, at::IntArrayRef shape,
                   const char* ref_name = "x") {
  check_like(t, name, ref, shape, ref_name);
  return t.contiguous();
}

// The step's coefficient tensors: omega, drop, phi (K,), factor (K, R), 1 ≤ R ≤ K ≤ 16. Returns (K, R).
std::pair<int64_t, int64_t> check_coefficients(const at::Tensor& omega, const at::Tensor& drop,
                                               const at::Tensor& phi, const at::Tensor& factor) {
  TORCH_CHECK(omega.dim() == 1 && omega.size(0) >= 1 && omega.size(0) <= kMafbmMaxK,
              "omega: expected shape (K,) with 1 <= K <= ", kMafbmMaxK, ", got ", omega.sizes());
  const int64_t K = omega.size(0);
  TORCH_CHECK(factor.dim() == 2 && factor.size(0) == K && factor.size(1) >= 1 && factor.size(1) <= K,
              "factor: expected shape (K=", K, ", R) with 1 <= R <= K, got ", factor.sizes());
  check_shape(drop, "drop", {K});
  check_shape(phi, "phi", {K});
  return {K, factor.size(1)};
}

void check_step_scalars(double dt, int64_t step) {
  TORCH_CHECK(dt > 0 && std::isfinite(dt), "dt: expected a positive finite time step, got ", dt);
  TORCH_CHECK(step >= 0, "step: expected a non-negative step index, got ", step);
}

// The stream of the call's first element: path_offset·per_path, checked so that the streams of every path
// (path_offset + paths) stay below 2^63 (the simulator's start streams have that bit set).
uint64_t first_stream(int64_t path_offset, int64_t paths, int64_t per_path) {
  constexpr int64_t kStreams = std::numeric_limits<int64_t>::max();
  TORCH_CHECK(path_offset >= 0 && path_offset <= kStreams / std::max<int64_t>(per_path, 1) - paths,
              "path_offset: expected an index >= 0 with (path_offset + paths) * ", per_path,
              " < 2^63 (the streams' range), got ", path_offset, " with ", paths, " paths");
  return static_cast<uint64_t>(path_offset) * static_cast<uint64_t>(per_path);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mafbm_step(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& drift_in, const at::Tensor& diffusion_in,
    const at::Tensor& omega_in, const at::Tensor& drop_in, const at::Tensor& phi_in, const at::Tensor& factor_in,
    double dt, const std::optional<at::Tensor>& control_in, const std::optional<at::Tensor>& noise_in,
    int64_t seed, int64_t step, int64_t path_offset) {
  check_dtype(x_in, "x", {at::kFloat, at::kDouble});
  TORCH_CHECK(x_in.dim() == 2, "x: expected shape (paths, dims), got ", x_in.sizes());
  const auto [K, R] = check_coefficients(omega_in, drop_in, phi_in, factor_in);
  check_step_scalars(dt, step);
  const int64_t P = x_in.size(0), D = x_in.size(1);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = checked(y_in, "y", x, {P, D, K});
  const at::Tensor drift = checked(drift_in, "drift", x, {P, D});
  const at::Tensor diffusion = checked(diffusion_in, "diffusion", x, {P, D});
  const at::Tensor omega = checked(omega_in, "omega", x, {K});
  const at::Tensor drop = checked(drop_in, "drop", x, {K});
  const at::Tensor phi = checked(phi_in, "phi", x, {K});
  const at::Tensor factor = checked(factor_in, "factor", x, {K, R});
  std::optional<at::Tensor> control, noise;
  if (control_in.has_value()) control = checked(*control_in, "control", x, {P, D});
  if (noise_in.has_value()) noise = checked(*noise_in, "noise", x, {P, D, R});
  // at::empty, not empty_like: one dispatcher call instead of two (the inputs are contiguous here)
  at::Tensor x_next = at::empty({P, D}, x.options()), y_next = at::empty({P, D, K}, x.options());
  at::Tensor kl = at::empty({P}, x.options());
  const MafbmStepParams p{x.data_ptr(), y.data_ptr(), drift.data_ptr(), diffusion.data_ptr(),
                          ptr_or_null(control), ptr_or_null(noise), omega.data_ptr(), drop.data_ptr(),
                          phi.data_ptr(), factor.data_ptr(), x_next.data_ptr(), y_next.data_ptr(), kl.data_ptr(),
                          P, D, static_cast<int>(K), static_cast<int>(R), dt, static_cast<uint64_t>(seed),
                          static_cast<uint64_t>(step), dtype_of(x, "x"), first_stream(path_offset, P, D)};
  MK_LAUNCH(x, mafbm_step_cpu(p), mafbm_step_cuda(p, stream));
  return {x_next, y_next, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mafbm_step_backward(
    const at::Tensor& grad_x_in, const at::Tensor& grad_y_in, const at::Tensor& grad_kl_in, const at::Tensor& y_in,
    const at::Tensor& diffusion_in, const at::Tensor& omega_in, const at::Tensor& drop_in, const at::Tensor& phi_in,
    const at::Tensor& factor_in, double dt, const std::optional<at::Tensor>& control_in,
    const std::optional<at::Tensor>& noise_in, int64_t seed, int64_t step, int64_t path_offset) {
  check_dtype(grad_x_in, "grad_x_next", {at::kFloat, at::kDouble});
  TORCH_CHECK(grad_x_in.dim() == 2, "grad_x_next: expected shape (paths, dims), got ", grad_x_in.sizes());
  const auto [K, R] = check_coefficients(omega_in, drop_in, phi_in, factor_in);
  check_step_scalars(dt, step);
  const int64_t P = grad_x_in.size(0), D = grad_x_in.size(1);
  const at::Tensor gx = grad_x_in.contiguous();
  const at::Tensor gy = checked(grad_y_in, "grad_y_next", gx, {P, D, K}, "grad_x_next");
  check_like(grad_kl_in, "grad_kl", gx, {P}, "grad_x_next");  // any stride: an expanded one is not copied
  const at::Tensor y = checked(y_in, "y", gx, {P, D, K}, "grad_x_next");
  const at::Tensor diffusion = checked(diffusion_in, "diffusion", gx, {P, D}, "grad_x_next");
  const at::Tensor omega = checked(omega_in, "omega", gx, {K}, "grad_x_next");
  const at::Tensor drop = checked(drop_in, "drop", gx, {K}, "grad_x_next");
  const at::Tensor phi = checked(phi_in, "phi", gx, {K}, "grad_x_next");
  const at::Tensor factor = checked(factor_in, "factor", gx, {K, R}, "grad_x_next");
  std::optional<at::Tensor> control, noise;
  if (control_in.has_value()) control = checked(*control_in, "control", gx, {P, D}, "grad_x_next");
  if (noise_in.has_value()) noise = checked(*noise_in, "noise", gx, {P, D, R}, "grad_x_next");
  at::Tensor grad_y = at::empty({P, D, K}, gx.options()), grad_drift = at::empty({P, D}, gx.options());
  at::Tensor grad_diffusion = at::empty({P, D}, gx.options()), grad_control = at::empty({P, D}, gx.options());
  at::Tensor grad_omega_rows = at::empty({mafbm_omega_rows(P), K}, gx.options());
  at::Tensor grad_omega = at::empty({K}, gx.options());
  const MafbmStepBackwardParams p{gx.data_ptr(), gy.data_ptr(), grad_kl_in.data_ptr(), y.data_ptr(),
                                  diffusion.data_ptr(), ptr_or_null(control), ptr_or_null(noise), omega.data_ptr(),
                                  drop.data_ptr(), phi.data_ptr(), factor.data_ptr(), grad_y.data_ptr(),
                                  grad_drift.data_ptr(), grad_diffusion.data_ptr(), grad_control.data_ptr(),
                                  grad_omega_rows.data_ptr(), grad_omega.data_ptr(), P, D, grad_kl_in.stride(0),
                                  static_cast<int>(K), static_cast<int>(R), dt, static_cast<uint64_t>(seed),
                                  static_cast<uint64_t>(step), dtype_of(gx, "grad_x_next"),
                                  first_stream(path_offset, P, D)};
  MK_LAUNCH(gx, mafbm_step_backward_cpu(p), mafbm_step_backward_cuda(p, stream));
  return {grad_y, grad_drift, grad_diffusion, grad_control, grad_omega};
}

// The two ops as the autograd function calls them: seed, step and path_offset are SymInt in their schemas (the
// kernels take int64_t), passed on unguarded, so a torch.compile'd step keeps one graph for every value.
using StepOp = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, double, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    c10::SymInt, c10::SymInt, c10::SymInt);
using StepBackwardOp = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, c10::SymInt, c10::SymInt, c10::SymInt);

// Autograd of mafbm_step in C++ (not torch.library.register_autograd): the Python autograd path costs more host
// time per step than the step's kernels. Gradients for x, y, drift, diffusion, omega and control.
class MafbmStepFunction : public torch::autograd::Function<MafbmStepFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& y, const at::Tensor& drift,
      const at::Tensor& diffusion, const at::Tensor& omega, const at::Tensor& drop, const at::Tensor& phi,
      const at::Tensor& factor, double dt, const std::optional<at::Tensor>& control,
      const std::optional<at::Tensor>& noise, c10::SymInt seed, c10::SymInt step, c10::SymInt path_offset) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("markovkit::mafbm_step", "").typed<StepOp>();
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [x_next, y_next, kl] = op.call(x, y, drift, diffusion, omega, drop, phi, factor, dt, control, noise, seed,
                                        step, path_offset);
    ctx->save_for_backward({y, diffusion, omega, drop, phi, factor, control.value_or(at::Tensor()),
                            noise.value_or(at::Tensor())});
    ctx->saved_data["dt"] = dt;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["step"] = step;
    ctx->saved_data["path_offset"] = path_offset;
    return {x_next, y_next, kl};
  }

  // grads: (x_next, y_next, kl), materialised (zeros for unused outputs). One backward kernel: it also writes
  // grad_drift and grad_omega's partial sums (added in a fixed order: deterministic).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("markovkit::mafbm_step_backward", "")
                               .typed<StepBackwardOp>();
    const auto saved = ctx->get_saved_variables();
    // drop, phi, factor (constants of the scheme: mafbm.py) and a given noise (used as it is) have no derivative;
    // edges: x, y, drift, diffusion, omega, drop, phi, factor, then control and noise where given
    std::vector<std::pair<size_t, const char*>> constants{{5, "drop"}, {6, "phi"}, {7, "factor"}};
    if (saved[7].defined()) constants.emplace_back(saved[6].defined() ? 9 : 8, "noise");
    for (const auto& [edge, name] : constants) {
      TORCH_CHECK(!ctx->needs_input_grad(edge), "mafbm_step: the derivative for '", name, "' is not implemented ",
                  "(a constant of the step); pass it detached");
    }
    const auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    const std::optional<at::Tensor> control = optional(saved[6]);
    // Without create_graph no graph of the backward is recorded: skip the Autograd and ADInplaceOrView keys,
    // whose boxed fallbacks (the backward op has no autograd kernel) cost more host time than the kernel's glue.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    auto [grad_y, grad_drift, grad_diffusion, grad_control, grad_omega] =
        op.call(grads[0], grads[1], grads[2], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                ctx->saved_data["dt"].toDouble(), control, optional(saved[7]), ctx->saved_data["seed"].toSymInt(),
                ctx->saved_data["step"].toSymInt(), ctx->saved_data["path_offset"].toSymInt());
    const at::Tensor none;
    return {grads[0], grad_y, grad_drift, grad_diffusion, grad_omega, none, none, none, none,
            control.has_value() ? grad_control : none, none, none, none, none};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mafbm_step_autograd(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& drift, const at::Tensor& diffusion,
    const at::Tensor& omega, const at::Tensor& drop, const at::Tensor& phi, const at::Tensor& factor, double dt,
    const std::optional<at::Tensor>& control, const std::optional<at::Tensor>& noise, c10::SymInt seed,
    c10::SymInt step, c10::SymInt path_offset) {
  const auto out = MafbmStepFunction::apply(x, y, drift, diffusion, omega, drop, phi, factor, dt, control, noise,
                                            seed, step, path_offset);
  return {out[0], out[1], out[2]};
}

// A coefficient tensor of the simulator as float64 host values. The kernel gets the values as its argument,
// so they must be on the host: a device tensor would cost a device->host copy and sync on every call.
at::Tensor host_values(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cpu(), name, ": expected a CPU tensor (the simulator's coefficients are kernel arguments), "
              "got a tensor on ", t.device());
  return t.detach().to(at::kDouble).contiguous();
}

// Checks the simulator's inputs and fills everything of its params but the output pointers.
MafbmSimulateParams simulate_params(const at::Tensor& x0, const at::Tensor& omega_in, const at::Tensor& drop_in,
                                    const at::Tensor& factor_in, const std::optional<at::Tensor>& factor0_in,
                                    int64_t n_steps, double dt, double theta, double mu, double sigma,
                                    int64_t save_every, int64_t seed, int64_t path_offset) {
  check_dtype(x0, "x0", {at::kFloat, at::kDouble});
  TORCH_CHECK(x0.dim() == 1, "x0: expected shape (paths,), got ", x0.sizes());
  TORCH_CHECK(omega_in.dim() == 1 && omega_in.size(0) >= 1 && omega_in.size(0) <= kMafbmMaxK,
              "omega: expected shape (K,) with 1 <= K <= ", kMafbmMaxK, ", got ", omega_in.sizes());
  const int64_t K = omega_in.size(0);
  check_shape(drop_in, "drop", {K});
  TORCH_CHECK(factor_in.dim() == 2 && factor_in.size(0) == K && factor_in.size(1) >= 1 && factor_in.size(1) <= K,
              "factor: expected shape (K=", K, ", R) with 1 <= R <= K, got ", factor_in.sizes());
  if (factor0_in.has_value()) {
    TORCH_CHECK(factor0_in->dim() == 2 && factor0_in->size(0) == K && factor0_in->size(1) >= 1 &&
                    factor0_in->size(1) <= K,
                "factor0: expected shape (K=", K, ", R0) with 1 <= R0 <= K, got ", factor0_in->sizes());
  }
  TORCH_CHECK(n_steps >= 0, "n_steps: expected a non-negative number of steps, got ", n_steps);
  TORCH_CHECK(dt > 0 && std::isfinite(dt), "dt: expected a positive finite time step, got ", dt);
  TORCH_CHECK(save_every >= 1, "save_every: expected a positive stride, got ", save_every);
  MafbmSimulateParams p{};
  p.x0 = x0.data_ptr();
  p.paths = x0.size(0);
  p.n_steps = n_steps;
  p.save_every = save_every;
  p.K = static_cast<int>(K);
  p.R = static_cast<int>(factor_in.size(1));
  p.R0 = factor0_in.has_value() ? static_cast<int>(factor0_in->size(1)) : 0;
  std::copy_n(host_values(omega_in, "omega").data_ptr<double>(), K, p.omega);
  std::copy_n(host_values(drop_in, "drop").data_ptr<double>(), K, p.drop);
  std::copy_n(host_values(factor_in, "factor").data_ptr<double>(), K * p.R, p.factor);
  if (factor0_in.has_value()) {
    std::copy_n(host_values(*factor0_in, "factor0").data_ptr<double>(), K * p.R0, p.factor0);
  }
  p.dt = dt;
  p.theta = theta;
  p.mu = mu;
  p.sigma = sigma;
  p.seed = static_cast<uint64_t>(seed);
  p.first_stream = first_stream(path_offset, p.paths, 1);
  p.dtype = dtype_of(x0, "x0");
  return p;
}

void run_simulate(const MafbmSimulateParams& p, const at::Tensor& x0) {
  MK_LAUNCH(x0, mafbm_simulate_cpu(p), mafbm_simulate_cuda(p, stream));
}

at::Tensor mafbm_simulate(const at::Tensor& x0_in, const at::Tensor& omega, const at::Tensor& drop,
                          const at::Tensor& factor, const std::optional<at::Tensor>& factor0, int64_t n_steps,
                          double dt, double theta, double mu, double sigma, int64_t save_every, int64_t seed,
                          int64_t path_offset) {
  const at::Tensor x0 = x0_in.contiguous();
  MafbmSimulateParams p = simulate_params(x0, omega, drop, factor, factor0, n_steps, dt, theta, mu, sigma,
                                          save_every, seed, path_offset);
  at::Tensor out = at::empty({p.paths, n_steps / save_every + 1}, x0.options());
  p.out = out.data_ptr();
  run_simulate(p, x0);
  return out;
}

// -> (4, paths): per-path dL/dx0 and the per-path terms of dL/dθ, dL/dμ, dL/dσ (summed by the caller).
at::Tensor mafbm_simulate_backward(const at::Tensor& grad_out_in, const at::Tensor& x0_in, const at::Tensor& omega,
                                   const at::Tensor& drop, const at::Tensor& factor,
                                   const std::optional<at::Tensor>& factor0, int64_t n_steps, double dt,
                                   double theta, double mu, double sigma, int64_t save_every, int64_t seed,
                                   int64_t path_offset) {
  const at::Tensor x0 = x0_in.contiguous();
  MafbmSimulateParams p = simulate_params(x0, omega, drop, factor, factor0, n_steps, dt, theta, mu, sigma,
                                          save_every, seed, path_offset);
  const at::Tensor grad_out = checked(grad_out_in, "grad_out", x0, {p.paths, n_steps / save_every + 1}, "x0");
  at::Tensor partials = at::empty({4, p.paths}, x0.options());
  p.grad_out = grad_out.data_ptr();
  p.partials = partials.data_ptr();
  run_simulate(p, x0);
  return partials;
}

}  // namespace

TORCH_LIBRARY_IMPL(markovkit, Autograd, m) {
  m.impl("mafbm_step", &mafbm_step_autograd);
}

TORCH_LIBRARY_IMPL(markovkit, CPU, m) {
  m.impl("mafbm_step", &mafbm_step);
  m.impl("mafbm_step_backward", &mafbm_step_backward);
  m.impl("mafbm_simulate", &mafbm_simulate);
  m.impl("mafbm_simulate_backward", &mafbm_simulate_backward);
}

#ifdef MARKOVKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(markovkit, CUDA, m) {
  m.impl("mafbm_step", &mafbm_step);
  m.impl("mafbm_step_backward", &mafbm_step_backward);
  m.impl("mafbm_simulate", &mafbm_simulate);
  m.impl("mafbm_simulate_backward", &mafbm_simulate_backward);
}
#endif

}  // namespace markovkit

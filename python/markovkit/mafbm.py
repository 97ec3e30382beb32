"""MA-fBM SDE ops: one fused step of the augmented (X, Y_1..Y_K) system, and whole fractional OU paths.

Per latent dimension (one Brownian motion W shared by the K modes), with ω the weights and γ the rates
(`markovkit.fbm.omega`, `markovkit.fbm.gamma_grid`) and an optional control u (posterior, Girsanov):
    dY_k = (−γ_k Y_k + u) dt + dW,    dX = b dt + σ Σ_k ω_k dY_k,    KL += ½ u² dt.
Schemes (Itô; b, σ, u held at their start-of-step values): "euler" (Euler-Maruyama, stable for
γ_max·dt < 2, biased well before) and "exact" (the exact OU transition of the Y block, any dt).
"""
import functools
import math
import warnings

import torch

from markovkit import fbm

_SCHEMES = ("euler", "exact")


def _check_scheme(scheme: str) -> None:
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme: expected 'euler' or 'exact', got {scheme!r}")


def _check_euler(gamma_max: float, dt: float) -> None:
    """Refuse unstable Euler steps, warn about biased ones (the authors' limit γ_max·dt < 0.5)."""
    if gamma_max * dt >= 2:
        raise ValueError(f"dt: Euler-Maruyama is unstable for gamma_max*dt >= 2, got {gamma_max}*{dt} = "
                         f"{gamma_max * dt:.3g}; use a smaller dt or scheme='exact'")
    if gamma_max * dt > 0.5:
        warnings.warn(f"gamma_max*dt = {gamma_max * dt:.3g} > 0.5: the Euler step inflates the fast modes' "
                      "variance (by 2/(2 - gamma*dt)); consider scheme='exact'", stacklevel=3)


def _step_coefficients(gamma: torch.Tensor, dt: float, scheme: str):
    """(drop, phi, factor) of the step in float64 (no checks: traceable). "exact": factor = V √Λ of the eigen-
    decomposition of Σ(dt), full rank K (no truncation, tiny negative eigenvalues clamped)."""
    g = gamma.to(torch.float64)
    if scheme == "euler":
        return g * dt, torch.full_like(g, dt), torch.full((g.shape[0], 1), math.sqrt(dt), dtype=torch.float64)
    g_sum = g[:, None] + g[None, :]
    safe = torch.where(g_sum == 0, torch.ones_like(g_sum), g_sum)
    cov = torch.where(g_sum == 0, torch.full_like(g_sum, dt), -torch.expm1(-safe * dt) / safe)
    lam, vec = torch.linalg.eigh(cov)
    safe_g = torch.where(g == 0, torch.ones_like(g), g)
    phi = torch.where(g == 0, torch.full_like(g, dt), -torch.expm1(-safe_g * dt) / safe_g)
    return -torch.expm1(-g * dt), phi, vec * lam.clamp_min(0).sqrt()


@functools.lru_cache(maxsize=64)
def _cached_coefficients(gamma: tuple, dt: float, scheme: str, dtype: torch.dtype, device: torch.device):
    g = torch.tensor(gamma, dtype=torch.float64)
    if not bool((g >= 0).all()):
        raise ValueError(f"gamma: expected non-negative rates, got {list(gamma)}")
    if not dt > 0:
        raise ValueError(f"dt: expected a positive time step, got {dt}")
    if scheme == "euler":
        _check_euler(max(gamma), dt)
    # contiguous: "exact"'s factor inherits the column-major strides of eigh, which the op would copy every call
    return tuple(c.to(dtype=dtype, device=device, memory_format=torch.contiguous_format)
                 for c in _step_coefficients(g, dt, scheme))


def step_coefficients(gamma, dt: float, scheme: str = "euler", *, dtype=torch.float32, device=None):
    """(drop (K,), phi (K,), factor (K, R)) of `mafbm_step`: y' = y − drop·y + phi·u + factor @ z.

    R = 1 for "euler", R = K for "exact" (an eigen-root of Σ(dt)); `noise` given to `mafbm_step` has shape
    (paths, dims, R). Eager calls are memoised on (gamma, dt, scheme, dtype, device).
    """
    _check_scheme(scheme)
    if not isinstance(device, torch.device):
        device = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling():
        return tuple(c.to(dtype=dtype, device=device) for c in _step_coefficients(gamma, dt, scheme))
    if not isinstance(gamma, torch.Tensor):  # a tensor's values are read as they are (as_tensor costs a µs a step)
        gamma = torch.as_tensor(gamma, dtype=torch.float64)
    rates = tuple(gamma.tolist()) if gamma.dim() == 1 else ()
    if not rates:
        raise ValueError(f"gamma: expected a 1-d tensor of K >= 1 rates, got shape {tuple(gamma.shape)}")
    return _cached_coefficients(rates, float(dt), scheme, dtype, device)


def mafbm_step(x, y, drift, diffusion, omega, gamma, dt: float, *, control=None, noise=None, seed=None,
               step: int = 0, scheme: str = "euler"):
    """One step of the augmented MA-fBM SDE -> (x_next (paths, dims), y_next (paths, dims, K), kl (paths,)).

    x, drift, diffusion, control: (paths, dims); y: (paths, dims, K); omega: (K,) (differentiable);
    gamma: (K,) non-negative rates (a constant: no gradient); kl = ½ dt Σ_dims u².
    Noise: `noise` (paths, dims, R) standard normals (R = 1 for "euler", K for "exact"), or drawn from the
    Philox stream of `seed` at (path, dim, step) (see csrc/mafbm/mafbm_step.h for the counter layout).
    Gradients: x, y, drift, diffusion, control, omega. float32 or float64, CPU or CUDA.
    """
    if noise is None and seed is None:
        raise ValueError("seed: expected an int seed when noise is not given, got None")
    drop, phi, factor = step_coefficients(gamma, dt, scheme, dtype=x.dtype, device=x.device)
    if omega.dtype != x.dtype:
        omega = omega.to(x.dtype)
    # the overload itself: the packet's overload resolution costs host time on every step
    return torch.ops.markovkit.mafbm_step.default(x, y, drift, diffusion, omega, drop, phi, factor, float(dt), control,
                                                  noise, 0 if seed is None else seed, step)


def mafbm_simulate(x0, n_steps: int, dt: float, omega, gamma, *, theta=0.0, mu=0.0, sigma=1.0, save_every: int = 1,
                   seed: int, scheme: str = "exact", kind: str = "I"):
    """Whole fractional OU paths dX = θ(μ − X) dt + σ dB̂ in one kernel -> (paths, n_steps // save_every + 1).

    x0: (paths,) float32/float64 (CPU or CUDA); column j is X at step j·save_every. θ = 0, σ = 1 gives
    MA-fBM paths. kind "I" starts Y from its stationary law N(0, 1/(γ_i + γ_j)), "II" from 0.
    "exact" draws r ≤ K normals per step (the low-rank root of Σ(dt) accurate to 1e-6 on diag Σ and ωᵀΣω).
    The drift term is an Euler step in X; the noise of X is exact in distribution for "exact".
    Differentiable in x0 and in theta, mu, sigma when given as scalar tensors: the backward re-runs the paths
    with forward tangents (same draws), so its memory is O(paths), not paths x steps x K.
    """
    _check_scheme(scheme)
    fbm._check_kind(kind)
    w = torch.as_tensor(omega, dtype=torch.float64).detach().cpu()
    drop, _, factor = fbm.ou_transition(gamma, dt, scheme, omega=w)
    if scheme == "euler":
        _check_euler(float(torch.as_tensor(gamma).max()), dt)
    factor0 = fbm.stationary_factor(gamma, w) if kind == "I" else None
    consts = (w, drop, factor, factor0, int(n_steps), float(dt), int(save_every), int(seed))
    params = [p if isinstance(p, torch.Tensor) else torch.tensor(float(p), dtype=torch.float64)
              for p in (theta, mu, sigma)]
    if torch.is_grad_enabled() and (x0.requires_grad or any(p.requires_grad for p in params)):
        return _Simulate.apply(x0, *params, consts)
    return _simulate(x0, *(float(p) for p in params), consts)


def _simulate(x0, theta: float, mu: float, sigma: float, consts):
    w, drop, factor, factor0, n_steps, dt, save_every, seed = consts
    return torch.ops.markovkit.mafbm_simulate(x0, w, drop, factor, factor0, n_steps, dt, theta, mu, sigma,
                                              save_every, seed)


class _Simulate(torch.autograd.Function):
    """Autograd of the simulator for x0 (paths,) and the scalar tensors θ, μ, σ."""

    @staticmethod
    def forward(ctx, x0, theta, mu, sigma, consts):
        ctx.consts, ctx.scalars = consts, (float(theta), float(mu), float(sigma))
        ctx.save_for_backward(x0)
        return _simulate(x0, *ctx.scalars, consts)

    @staticmethod
    def backward(ctx, grad_out):
        (x0,) = ctx.saved_tensors
        w, drop, factor, factor0, n_steps, dt, save_every, seed = ctx.consts
        partials = torch.ops.markovkit.mafbm_simulate_backward(grad_out.contiguous(), x0.detach(), w, drop, factor,
                                                               factor0, n_steps, dt, *ctx.scalars, save_every,
                                                               seed)
        sums = partials[1:].sum(1).double().cpu()
        return partials[0], sums[0], sums[1], sums[2], None


# --- fakes ----------------------------------------------------------------------------------------------

def _contiguous_like(t):
    """The kernels write fresh contiguous outputs, whatever the inputs' strides."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("markovkit::mafbm_step")
def _(x, y, drift, diffusion, omega, drop, phi, factor, dt, control=None, noise=None, seed=0, step=0):
    return _contiguous_like(x), _contiguous_like(y), x.new_empty(x.shape[:1])


@torch.library.register_fake("markovkit::mafbm_step_backward")
def _(grad_x_next, grad_y_next, grad_kl, y, diffusion, omega, drop, phi, factor, dt, control, noise, seed, step):
    g = _contiguous_like(grad_x_next)
    return _contiguous_like(y), g, torch.empty_like(g), torch.empty_like(g), g.new_empty(omega.shape)


@torch.library.register_fake("markovkit::mafbm_simulate")
def _(x0, omega, drop, factor, factor0, n_steps, dt, theta, mu, sigma, save_every, seed):
    return x0.new_empty((x0.shape[0], n_steps // save_every + 1))


@torch.library.register_fake("markovkit::mafbm_simulate_backward")
def _(grad_out, x0, omega, drop, factor, factor0, n_steps, dt, theta, mu, sigma, save_every, seed):
    return x0.new_empty((4, x0.shape[0]))


# The autograd of mafbm_step is registered in C++ (csrc/mafbm/mafbm.cpp): the Python path of
# torch.library.register_autograd costs more host time per step than the kernels.

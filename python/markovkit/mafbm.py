"""MA-fBM SDE ops: one fused step of the augmented (X, Y_1..Y_K) system, and whole fractional OU paths.

Per latent dimension (one Brownian motion W shared by the K modes), with ω the weights and γ the rates
(`markovkit.fbm.omega`, `markovkit.fbm.gamma_grid`) and an optional control u (posterior, Girsanov):
    dY_k = (−γ_k Y_k + u) dt + dW,    dX = b dt + σ Σ_k ω_k dY_k,    KL += ½ u² dt.
Schemes (Itô; b, σ, u held at their start-of-step values): "euler" (Euler-Maruyama, stable for
γ_max·dt < 2, biased well before) and "exact" (the exact OU transition of the Y block, any dt).
"""
import functools
import math
import os
import sys
import warnings

import torch

from markovkit import fbm
from markovkit._checks import check_devices, check_host
from markovkit.philox import check_position, check_seed

_SCHEMES = ("euler", "exact")
# frames in these folders are not the user's: a warning is attributed to the first frame outside them
_INTERNAL_DIRS = tuple(os.path.join(os.path.dirname(m.__file__), "") for m in (fbm, torch))


def _check_scheme(scheme: str) -> None:
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme: expected 'euler' or 'exact', got {scheme!r}")


def _check_dt(dt: float) -> None:
    if not 0 < dt < math.inf:
        raise ValueError(f"dt: expected a positive finite time step, got {dt}")


def _warn_at_caller(message: str) -> None:
    """warnings.warn attributed to the first frame outside markovkit and torch: the user's line."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, stacklevel=level)


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing: dynamo cannot trace warnings.warn
def _warn_euler_bias(gamma_dt: float) -> None:
    _warn_at_caller(f"gamma_max*dt = {gamma_dt:.3g} > 0.5: the Euler step inflates the fast modes' variance "
                    "(by 2/(2 - gamma*dt)); consider scheme='exact'")


def _check_euler(gamma_max: float, dt: float) -> None:
    """Refuse unstable Euler steps, warn about biased ones (the authors' limit γ_max·dt < 0.5)."""
    if gamma_max * dt >= 2:
        raise ValueError(f"dt: Euler-Maruyama is unstable for gamma_max*dt >= 2, got {gamma_max}*{dt} = "
                         f"{gamma_max * dt:.3g}; use a smaller dt or scheme='exact'")
    if gamma_max * dt > 0.5:
        _warn_euler_bias(gamma_max * dt)


def _check_step_constants(rates: tuple, dt: float, scheme: str) -> None:
    """Rates >= 0, dt > 0 and the Euler limits, on Python numbers: run eagerly and while torch.compile traces."""
    fbm._check_rates(rates, zero_ok=True)
    _check_dt(dt)
    if scheme == "euler":
        _check_euler(max(rates), dt)


def _as_rates(gamma) -> torch.Tensor:
    """gamma as a (K,) tensor; a tensor is used as it is (as_tensor costs a µs a step)."""
    g = gamma if isinstance(gamma, torch.Tensor) else torch.tensor(gamma, dtype=torch.float64)
    fbm._check_gamma_shape(g)
    return g


def _rates_key(gamma) -> tuple:
    """gamma's values as floats, the memo's key: a list or tuple of numbers is read as it is (making a tensor of it
    cost 4 µs of a step's ~20 µs of host time)."""
    if isinstance(gamma, (list, tuple)) and gamma and all(isinstance(v, (int, float)) for v in gamma):
        return tuple(float(v) for v in gamma)
    return tuple(_as_rates(gamma).tolist())


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
    _check_step_constants(gamma, dt, scheme)
    g = torch.tensor(gamma, dtype=torch.float64)
    # contiguous: "exact"'s factor inherits the column-major strides of eigh, which the op would copy every call
    return tuple(c.to(dtype=dtype, device=device, memory_format=torch.contiguous_format)
                 for c in _step_coefficients(g, dt, scheme))


def _coefficients(gamma, dt: float, scheme: str, dtype, device):
    """(drop, phi, factor) for mafbm_step; eager calls return the memoised tensors themselves (read-only)."""
    _check_scheme(scheme)
    if not isinstance(device, torch.device):
        device = torch.device("cpu") if device is None else torch.device(device)
    if not torch.compiler.is_compiling():
        return _cached_coefficients(_rates_key(gamma), float(dt), scheme, dtype, device)
    g = _as_rates(gamma)
    # traced: a list or tuple gamma is a constant of the trace, checked as in eager; a tensor's values are unknown
    if isinstance(gamma, torch.Tensor):
        _check_dt(dt)
    else:
        _check_step_constants(tuple(gamma), dt, scheme)
    # detached: gamma is a constant (no gradient), as eagerly, where its values are read
    return tuple(c.to(dtype=dtype, device=device) for c in _step_coefficients(g.detach(), dt, scheme))


def step_coefficients(gamma, dt: float, scheme: str = "euler", *, dtype=torch.float32, device=None):
    """(drop (K,), phi (K,), factor (K, R)) of `mafbm_step`: y' = y − drop·y + phi·u + factor @ z.

    R = 1 for "euler", R = K for "exact" (an eigen-root of Σ(dt)); `noise` given to `mafbm_step` has shape
    (paths, dims, R). Returns new tensors: the ones `mafbm_step` memoises on (gamma, dt, scheme, dtype, device)
    cannot be changed through them.
    """
    return tuple(c.clone() for c in _coefficients(gamma, dt, scheme, dtype, device))


def mafbm_step(x, y, drift, diffusion, omega, gamma, dt: float, *, control=None, noise=None, seed=None,
               step: int = 0, scheme: str = "euler", path_offset: int = 0):
    """One step of the augmented MA-fBM SDE -> (x_next (paths, dims), y_next (paths, dims, K), kl (paths,)).

    x, drift, diffusion, control: (paths, dims); y: (paths, dims, K); omega: (K,) (differentiable);
    gamma: (K,) non-negative rates (a constant: no gradient); kl = ½ dt Σ_dims u².
    Noise: either `noise` (paths, dims, R) standard normals (R = 1 for "euler", K for "exact"), or `seed`, an int
    in [-2**63, 2**63): drawn from its Philox stream at (path_offset + path, dim, step) (see csrc/mafbm/mafbm_step.h
    for the counter layout): paths split over calls draw what one call draws when each call passes the global index
    of its first path as path_offset. Gradients: x, y, drift, diffusion, control, omega. float32 or float64, CPU or
    CUDA; K <= 16 modes. float32 suits weights of moderate size (K = 5); large ones cancel in ω·y (type II, K = 7,
    γ_max = 20: max |ω| = 2.6e4, and float32 paths 1e-2 off float64's after 100 steps in a review): use float64.
    Under torch.compile, gamma and dt are checked when they are Python numbers (a list gamma, a float dt); the
    values of a tensor gamma are not known while tracing and go unchecked there.
    """
    if (noise is None) == (seed is None):
        raise ValueError("seed: expected an int seed when noise is not given, got None" if noise is None else
                         f"seed: expected None when noise is given (the noise is used as it is), got {seed}")
    drop, phi, factor = _coefficients(gamma, dt, scheme, x.dtype, x.device)
    fbm._check_omega_shape(omega, drop.shape[0])
    if omega.dtype != x.dtype:
        omega = omega.to(x.dtype)
    # the overload itself: the packet's overload resolution costs host time on every step
    return torch.ops.markovkit.mafbm_step.default(x, y, drift, diffusion, omega, drop, phi, factor, float(dt), control,
                                                  noise, 0 if seed is None else check_seed(seed, "mafbm_step"),
                                                  check_position(step, "step", "mafbm_step"),
                                                  check_position(path_offset, "path_offset", "mafbm_step"))


def mafbm_simulate(x0, n_steps: int, dt: float, omega, gamma, *, theta=0.0, mu=0.0, sigma=1.0, save_every: int = 1,
                   seed: int, scheme: str = "exact", kind: str = "I", path_offset: int = 0):
    """Whole fractional OU paths dX = θ(μ − X) dt + σ dB̂ in one kernel -> (paths, n_steps // save_every + 1).

    x0: (paths,) float32/float64 (CPU or CUDA); column j is X at step j·save_every. θ = 0, σ = 1 gives
    MA-fBM paths. omega, gamma: (K,), K <= 16; seed: an int in [-2**63, 2**63). kind "I" starts Y from its
    stationary law N(0, 1/(γ_i + γ_j)) (so γ > 0), "II" from 0. Path p draws from the Philox streams of path
    path_offset + p: paths split over calls give what one call gives when each passes its first path's index.
    "exact" draws r ≤ K normals per step (the low-rank root of Σ(dt) accurate to 1e-6 on diag Σ and ωᵀΣω; where
    no rank below K is, the full root, whose rounding reached 3e-5 at K = 16, γ_max = 10 in a review).
    The drift term is an Euler step in X; the noise of X is exact in distribution for "exact".
    Differentiable in x0 and in theta, mu, sigma when given as scalar tensors: the backward re-runs the paths
    with forward tangents (same draws), so its memory is O(paths), not paths x steps x K.
    omega (hence H) gets no gradient here: omega is detached. To learn H, step with `mafbm_step`, which is
    differentiable in omega, with omega = fbm.omega(H, ...) of a tensor H (as markovkit.nn.FractionalSDE does).
    Under torch.compile the coefficients are solved on the host (eigendecompositions in float64) outside the graph:
    graph breaks, so fullgraph=True refuses it; the op itself (torch.ops.markovkit.mafbm_simulate) traces.
    """
    _check_scheme(scheme)
    _check_dt(dt)
    fbm._check_kind(kind)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int):
        raise TypeError(f"n_steps: expected an int, got {n_steps!r}")
    for name, p in (("theta", theta), ("mu", mu), ("sigma", sigma)):
        if isinstance(p, torch.Tensor) and p.dim() != 0:
            raise ValueError(f"{name}: expected a number or a 0-dim tensor, got a tensor of shape {tuple(p.shape)}")
    g = fbm._as_gamma(gamma, zero_ok=True)
    w = fbm._as_omega(omega, len(g))
    seed = check_seed(seed, "mafbm_simulate")
    drop, _, factor = fbm.ou_transition(g, dt, scheme, omega=w)
    if scheme == "euler":
        _check_euler(float(g.max()), dt)
    factor0 = fbm.stationary_factor(g, w) if kind == "I" else None
    consts = (w, drop, factor, factor0, int(n_steps), float(dt), int(save_every), int(seed),
              check_position(path_offset, "path_offset", "mafbm_simulate"))
    params = [p if isinstance(p, torch.Tensor) else torch.tensor(float(p), dtype=torch.float64)
              for p in (theta, mu, sigma)]
    if torch.is_grad_enabled() and (x0.requires_grad or any(p.requires_grad for p in params)):
        return _Simulate.apply(x0, *params, consts)
    return _simulate(x0, *(float(p) for p in params), consts)


def _simulate(x0, theta: float, mu: float, sigma: float, consts):
    w, drop, factor, factor0, n_steps, dt, save_every, seed, path_offset = consts
    return torch.ops.markovkit.mafbm_simulate(x0, w, drop, factor, factor0, n_steps, dt, theta, mu, sigma,
                                              save_every, seed, path_offset)


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
        w, drop, factor, factor0, n_steps, dt, save_every, seed, path_offset = ctx.consts
        partials = torch.ops.markovkit.mafbm_simulate_backward(grad_out.contiguous(), x0.detach(), w, drop, factor,
                                                               factor0, n_steps, dt, *ctx.scalars, save_every,
                                                               seed, path_offset)
        sums = partials[1:].sum(1).double().cpu()
        return partials[0], sums[0], sums[1], sums[2], None


# --- fakes ----------------------------------------------------------------------------------------------

def _contiguous_like(t):
    """The kernels write fresh contiguous outputs, whatever the inputs' strides."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("markovkit::mafbm_step")
def _(x, y, drift, diffusion, omega, drop, phi, factor, dt, control=None, noise=None, seed=0, step=0, path_offset=0):
    check_devices("x", x=x, y=y, drift=drift, diffusion=diffusion, omega=omega, drop=drop, phi=phi, factor=factor,
                  control=control, noise=noise)
    return _contiguous_like(x), _contiguous_like(y), x.new_empty(x.shape[:1])


@torch.library.register_fake("markovkit::mafbm_step_backward")
def _(grad_x_next, grad_y_next, grad_kl, y, diffusion, omega, drop, phi, factor, dt, control, noise, seed, step,
      path_offset=0):
    check_devices("grad_x_next", grad_x_next=grad_x_next, grad_y_next=grad_y_next, grad_kl=grad_kl, y=y,
                  diffusion=diffusion, omega=omega, drop=drop, phi=phi, factor=factor, control=control, noise=noise)
    g = _contiguous_like(grad_x_next)
    return _contiguous_like(y), g, torch.empty_like(g), torch.empty_like(g), g.new_empty(omega.shape)


@torch.library.register_fake("markovkit::mafbm_simulate")
def _(x0, omega, drop, factor, factor0, n_steps, dt, theta, mu, sigma, save_every, seed, path_offset=0):
    check_host(x0, omega=omega, drop=drop, factor=factor, factor0=factor0)
    return x0.new_empty((x0.shape[0], n_steps // save_every + 1))


@torch.library.register_fake("markovkit::mafbm_simulate_backward")
def _(grad_out, x0, omega, drop, factor, factor0, n_steps, dt, theta, mu, sigma, save_every, seed,
      path_offset=0):
    check_devices("x0", x0=x0, grad_out=grad_out)
    check_host(x0, omega=omega, drop=drop, factor=factor, factor0=factor0)
    return x0.new_empty((4, x0.shape[0]))


# The autograd of mafbm_step is registered in C++ (csrc/mafbm/mafbm.cpp): the Python path of
# torch.library.register_autograd costs more host time per step than the kernels.

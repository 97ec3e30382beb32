"""Host math of Markov-approximate fractional Brownian motion (MA-fBM), in float64 torch.

B̂(t) = Σ_k ω_k Y_k(t) (type II, Riemann-Liouville, Y(0) = 0) or Σ_k ω_k (Y_k(t) − Y_k(0)) (type I,
Mandelbrot-van Ness, Y(0) from the stationary law), dY_k = −γ_k Y_k dt + dW with one shared W.
The weights ω minimise ∫_0^T E[(B(t) − B̂(t))²] dt = ωᵀAω − 2bᵀω + c, so A ω = b (A does not depend on H).

Normalisation: type I targets *standard* fBM, Var B(t) = t^{2H}; type II targets the Riemann-Liouville
process (1/Γ(a)) ∫_0^t (t−s)^{a−1} dW(s), a = H + ½, whose variance is t^{2H} / (2H Γ(a)²).

Everything is differentiable in H: torch has no derivative of the incomplete gamma function in its first
argument, so `_RegularizedGammaP` supplies one (series of ∂/∂a of the power series of P), and the scaled
upper function e^x Q(a, x) is a Gauss-Laguerre sum for x ≥ 10 (plain torch ops, so autograd follows).
"""
import math

import numpy as np
import torch

_F64 = torch.float64
_KINDS = ("I", "II")


# --- argument checks ------------------------------------------------------------------------------------

def _as_hurst(H) -> torch.Tensor:
    H = H if isinstance(H, torch.Tensor) else torch.tensor(float(H), dtype=_F64)
    if H.numel() != 1:
        raise ValueError(f"H: expected a scalar Hurst index, got shape {tuple(H.shape)}")
    h = float(H.detach())
    if not 0.0 < h < 1.0:
        raise ValueError(f"H: expected a Hurst index in (0, 1), got {h}")
    return H.to(_F64).reshape(())


def _as_gamma(gamma) -> torch.Tensor:
    gamma = torch.as_tensor(gamma, dtype=_F64).detach().cpu()
    if gamma.dim() != 1 or gamma.numel() < 1:
        raise ValueError(f"gamma: expected a 1-d tensor of K >= 1 rates, got shape {tuple(gamma.shape)}")
    if not bool((gamma > 0).all()):
        raise ValueError(f"gamma: expected positive rates, got {gamma.tolist()}")
    return gamma


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind: expected 'I' or 'II', got {kind!r}")


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value}")
    return value


# --- the γ grid -----------------------------------------------------------------------------------------

def gamma_grid(K: int, gamma_max: float) -> torch.Tensor:
    """K rates geometric on [1/γ_max, γ_max]: γ_k = r^{k − (K+1)/2}, r = γ_max^{2/(K−1)} (K = 1: [1]).

    K = 5, γ_max = 20 gives [0.05, 0.2236, 1, 4.4721, 20]. Returns (K,) float64.
    """
    if int(K) != K or K < 1:
        raise ValueError(f"K: expected an integer number of modes >= 1, got {K}")
    gamma_max = _check_positive(gamma_max, "gamma_max")
    if K == 1:
        return torch.ones(1, dtype=_F64)
    log_r = 2.0 * math.log(gamma_max) / (K - 1)
    k = torch.arange(1, K + 1, dtype=_F64)
    return torch.exp(log_r * (k - (K + 1) / 2))


# --- incomplete gamma functions, differentiable in a ----------------------------------------------------

def _series_terms(a: torch.Tensor, x: torch.Tensor):
    """log of the terms x^{a+n} e^{−x} / Γ(a+n+1), n = 0..N−1, of P(a, x), and n. Shapes (..., N)."""
    n_max = int(float(x.max()) + 12.0 * math.sqrt(float(x.max())) + 40.0)
    n = torch.arange(n_max, dtype=_F64)
    a_n = a.unsqueeze(-1) + n
    log_x = torch.log(x).unsqueeze(-1)
    return a_n * log_x - x.unsqueeze(-1) - torch.lgamma(a_n + 1), a_n


class _RegularizedGammaP(torch.autograd.Function):
    """P(a, x) = γ(a, x)/Γ(a) with ∂P/∂a = Σ_n t_n (ln x − ψ(a+n+1)), t_n the power-series terms."""

    @staticmethod
    def forward(ctx, a, x):
        ctx.save_for_backward(a, x)
        return torch.special.gammainc(a, x)

    @staticmethod
    def backward(ctx, grad):
        a, x = ctx.saved_tensors
        a_b, x_b = torch.broadcast_tensors(a, x)
        grad_a = grad_x = None
        if ctx.needs_input_grad[0]:
            log_t, a_n = _series_terms(a_b, x_b)
            dp_da = (torch.exp(log_t) * (torch.log(x_b).unsqueeze(-1) - torch.digamma(a_n + 1))).sum(-1)
            grad_a = (grad * dp_da).sum_to_size(a.shape)
        if ctx.needs_input_grad[1]:
            density = torch.exp((a_b - 1) * torch.log(x_b) - x_b - torch.lgamma(a_b))
            grad_x = (grad * density).sum_to_size(x.shape)
        return grad_a, grad_x


def gammainc(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Regularised lower incomplete gamma P(a, x) (x > 0), differentiable in a and x (float64)."""
    return _RegularizedGammaP.apply(a, x)


_LAGUERRE_NODES, _LAGUERRE_WEIGHTS = (torch.from_numpy(v) for v in np.polynomial.laguerre.laggauss(60))


def gammaincc_scaled(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """e^x Q(a, x) without overflow (x > 0), differentiable in a and x.

    x < 10: e^x (1 − P(a, x)); x ≥ 10: x^{a−1}/Γ(a) ∫_0^∞ e^{−s} (1 + s/x)^{a−1} ds by 60-point Gauss-Laguerre.
    """
    a, x = torch.broadcast_tensors(a, x)
    small = x < 10
    x_small = torch.where(small, x, torch.ones_like(x))
    x_large = torch.where(small, torch.full_like(x, 10.0), x)
    by_p = torch.exp(x_small) * (1 - gammainc(a, x_small))
    ratio = torch.log1p(_LAGUERRE_NODES / x_large.unsqueeze(-1))
    integral = (_LAGUERRE_WEIGHTS * torch.exp((a.unsqueeze(-1) - 1) * ratio)).sum(-1)
    by_laguerre = torch.exp((a - 1) * torch.log(x_large) - torch.lgamma(a)) * integral
    return torch.where(small, by_p, by_laguerre)


# --- the optimal weights --------------------------------------------------------------------------------

def gram(gamma, T: float, kind: str = "I") -> torch.Tensor:
    """A_ij = ∫_0^T E[(Y_i − Y_i(0)·[I])(Y_j − Y_j(0)·[I])] dt: (K, K) float64, independent of H."""
    gamma, T = _as_gamma(gamma), _check_positive(T, "T")
    _check_kind(kind)
    g_sum = gamma[:, None] + gamma[None, :]
    if kind == "II":
        return (T + torch.expm1(-g_sum * T) / g_sum) / g_sum
    e = torch.expm1(-gamma * T) / gamma
    return (2 * T + e[:, None] + e[None, :]) / g_sum


def cross(H, gamma, T: float, kind: str = "I") -> torch.Tensor:
    """b_k = ∫_0^T E[B(t) B̂_k(t)] dt in the code normalisation 1/Γ(a) (type I: target variance V_H t^{2H})."""
    H, gamma, T = _as_hurst(H), _as_gamma(gamma), _check_positive(T, "T")
    _check_kind(kind)
    a = H + 0.5
    z = gamma * T
    if kind == "II":
        return T * gamma**-a * gammainc(a, z) - a * gamma ** (-a - 1) * gammainc(a + 1, z)
    return (2 * T * gamma**-a - T**a / (gamma * torch.exp(torch.lgamma(a + 1)))
            + (torch.exp(-z) - gammaincc_scaled(a, z)) / gamma ** (a + 1))


def _variance_factor(H: torch.Tensor) -> torch.Tensor:
    """V_H = 1/(Γ(2H+1) sin πH): type I (code normalisation) variance over t^{2H}."""
    return 1 / (torch.exp(torch.lgamma(2 * H + 1)) * torch.sin(math.pi * H))


def target_energy(H, T: float, kind: str = "I") -> torch.Tensor:
    """c = ∫_0^T E[B(t)²] dt in the code normalisation (type I: V_H T^{2H+1}/(2H+1))."""
    H, T = _as_hurst(H), _check_positive(T, "T")
    _check_kind(kind)
    if kind == "II":
        return T ** (2 * H + 1) / (2 * H * (2 * H + 1) * torch.exp(2 * torch.lgamma(H + 0.5)))
    return _variance_factor(H) * T ** (2 * H + 1) / (2 * H + 1)


def omega(H, gamma, T: float = 1.0, kind: str = "I") -> torch.Tensor:
    """Optimal weights (K,) float64 by A ω = b; type I scaled by 1/√V_H so that it targets standard fBM.

    H: float or scalar tensor in (0, 1) (gradients flow to a tensor H); gamma: (K,) positive rates;
    T: the horizon the L2 error is taken over.
    """
    A, b = gram(gamma, T, kind), cross(H, gamma, T, kind)
    w = torch.linalg.solve(A, b)
    if kind == "I":
        w = w / torch.sqrt(_variance_factor(_as_hurst(H)))
    return w


def approximation_error(H, gamma, T: float = 1.0, kind: str = "I") -> torch.Tensor:
    """Relative L2 error E*/c = 1 − bᵀω*/c of the optimal weights (independent of the normalisation)."""
    A, b = gram(gamma, T, kind), cross(H, gamma, T, kind)
    return 1 - b @ torch.linalg.solve(A, b) / target_energy(H, T, kind)


# --- covariances ----------------------------------------------------------------------------------------

def _grid(s) -> torch.Tensor:
    return torch.as_tensor(s, dtype=_F64).reshape(-1)


def _exp_integral(rate: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 − e^{−rate·t})/rate, = t at rate 0."""
    safe = torch.where(rate == 0, torch.ones_like(rate), rate)
    return torch.where(rate == 0, t, -torch.expm1(-safe * t) / safe)


def mafbm_cov(s, t, omega, gamma, kind: str = "I") -> torch.Tensor:
    """Cov(B̂(s_i), B̂(t_j)): (len(s), len(t)) float64, the exact law of the Markov approximation.

    Type II allows γ = 0 (a Brownian mode); type I needs γ > 0 (a stationary start).
    """
    _check_kind(kind)
    w = torch.as_tensor(omega, dtype=_F64).detach().cpu()
    g = torch.as_tensor(gamma, dtype=_F64).detach().cpu()
    s, t = _grid(s), _grid(t)
    lo = torch.minimum(s[:, None], t[None, :])[..., None, None]
    hi = torch.maximum(s[:, None], t[None, :])[..., None, None]
    g_i, g_j = g[:, None], g[None, :]
    if kind == "II":
        cov_y = torch.exp(-g_j * (hi - lo)) * _exp_integral(g_i + g_j, lo)
    else:
        cov_y = (torch.exp(-g_j * (hi - lo)) - torch.exp(-g_j * hi) - torch.exp(-g_i * lo) + 1) / (g_i + g_j)
    return torch.einsum("i,stij,j->st", w, cov_y, w)


def fbm_cov(s, t, H: float) -> torch.Tensor:
    """Standard fBM: ½(s^{2H} + t^{2H} − |t − s|^{2H}). (len(s), len(t)) float64."""
    h2 = 2 * float(_as_hurst(H))
    s, t = _grid(s)[:, None], _grid(t)[None, :]
    return 0.5 * (s**h2 + t**h2 - (t - s).abs() ** h2)


def rl_fbm_cov(s, t, H: float) -> torch.Tensor:
    """Riemann-Liouville fBM: (1/Γ(a)²) ∫_0^{min} (s−u)^{a−1} (t−u)^{a−1} du by tanh-sinh quadrature.

    Accurate to ~1e-10 relative; (len(s), len(t)) float64.
    """
    a = float(_as_hurst(H)) + 0.5
    s, t = _grid(s)[:, None], _grid(t)[None, :]
    lo, gap = torch.minimum(s, t)[..., None], (t - s).abs()[..., None]
    tau = torch.arange(-4.5, 4.5 + 1e-12, 1 / 32, dtype=_F64)
    arg = math.pi * torch.sinh(tau)
    # v = lo·σ(arg) ∈ (0, lo), dv = lo·σ(arg)σ(−arg)·π cosh τ dτ
    v = lo * torch.sigmoid(arg)
    dv = lo * torch.sigmoid(arg) * torch.sigmoid(-arg) * math.pi * torch.cosh(tau) / 32
    integrand = torch.exp((a - 1) * (torch.log(v) + torch.log(gap + v)))
    return (integrand * dv).sum(-1) / math.gamma(a) ** 2


# --- the transition of the Y block ----------------------------------------------------------------------

def _low_rank_factor(cov: torch.Tensor, w, tol: float) -> torch.Tensor:
    """L (K, r), L Lᵀ ≈ cov, with the smallest r whose relative error of diag(cov) and of wᵀ cov w is < tol."""
    lam, vec = torch.linalg.eigh(cov)
    lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)
    full_diag, full_w = torch.diagonal(cov), w @ cov @ w
    for r in range(1, len(lam) + 1):
        L = vec[:, :r] * lam[:r].sqrt()
        approx = L @ L.T
        diag_err = ((torch.diagonal(approx) - full_diag).abs() / full_diag.clamp_min(1e-300)).max()
        w_err = (w @ approx @ w - full_w).abs() / full_w.abs().clamp_min(1e-300)
        if diag_err < tol and w_err < tol:
            return L
    return vec * lam.sqrt()


def ou_transition(gamma, dt: float, scheme: str = "exact", omega=None, tol: float = 1e-6):
    """Coefficients of one step y' = y − drop ⊙ y + phi·u + factor @ z, z ~ N(0, I_r), float64 on the CPU.

    scheme "exact": drop = 1 − e^{−γh}, phi = (1 − e^{−γh})/γ, factor = low-rank root of Σ_ij =
    (1 − e^{−(γ_i+γ_j)h})/(γ_i+γ_j) (rank r chosen by `tol` on diag Σ and ωᵀΣω; ω = 1 when not given).
    scheme "euler": drop = γh, phi = h, factor = √h · 1 (K, 1).
    γ = 0 is allowed (a Brownian mode). Returns (drop (K,), phi (K,), factor (K, r)).
    """
    g = torch.as_tensor(gamma, dtype=_F64).detach().cpu()
    if g.dim() != 1 or g.numel() < 1:
        raise ValueError(f"gamma: expected a 1-d tensor of K >= 1 rates, got shape {tuple(g.shape)}")
    if not bool((g >= 0).all()):
        raise ValueError(f"gamma: expected non-negative rates, got {g.tolist()}")
    h = _check_positive(dt, "dt")
    if scheme == "euler":
        return g * h, torch.full_like(g, h), torch.full((len(g), 1), math.sqrt(h), dtype=_F64)
    if scheme != "exact":
        raise ValueError(f"scheme: expected 'euler' or 'exact', got {scheme!r}")
    w = torch.ones_like(g) if omega is None else torch.as_tensor(omega, dtype=_F64).detach().cpu()
    cov = _exp_integral(g[:, None] + g[None, :], torch.tensor(h, dtype=_F64))
    return -torch.expm1(-g * h), _exp_integral(g, torch.tensor(h, dtype=_F64)), _low_rank_factor(cov, w, tol)


def stationary_factor(gamma, omega=None, tol: float = 1e-6) -> torch.Tensor:
    """Low-rank root (K, r) of the stationary covariance Σ∞_ij = 1/(γ_i + γ_j) (type I start), float64."""
    g = _as_gamma(gamma)
    w = torch.ones_like(g) if omega is None else torch.as_tensor(omega, dtype=_F64).detach().cpu()
    return _low_rank_factor(1 / (g[:, None] + g[None, :]), w, tol)

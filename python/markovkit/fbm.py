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


def _check_gamma_shape(gamma: torch.Tensor) -> None:
    if gamma.dim() != 1 or gamma.shape[0] < 1:
        raise ValueError(f"gamma: expected a 1-d tensor of K >= 1 rates, got shape {tuple(gamma.shape)}")


def _check_rates(rates, *, zero_ok: bool = False) -> None:
    """rates (Python numbers): positive and finite, or non-negative where zero_ok (γ = 0 is a Brownian mode)."""
    if not all((r >= 0 if zero_ok else r > 0) and r < math.inf for r in rates):
        expected = "non-negative finite" if zero_ok else "positive finite"
        raise ValueError(f"gamma: expected {expected} rates, got {list(rates)}")


def _check_omega_shape(omega: torch.Tensor, K: int) -> None:
    if omega.shape != (K,):
        raise ValueError(f"omega: expected shape ({K},), one weight per rate of gamma (len(gamma) = {K}), "
                         f"got shape {tuple(omega.shape)}")


def _as_gamma(gamma, *, zero_ok: bool = False) -> torch.Tensor:
    """(K,) float64 CPU rates: positive, or non-negative where zero_ok (γ = 0 is a Brownian mode)."""
    gamma = torch.as_tensor(gamma, dtype=_F64).detach().cpu()
    _check_gamma_shape(gamma)
    _check_rates(gamma.tolist(), zero_ok=zero_ok)
    return gamma


def _as_omega(omega, K: int) -> torch.Tensor:
    """(K,) float64 CPU weights, one per rate."""
    omega = torch.as_tensor(omega, dtype=_F64).detach().cpu()
    _check_omega_shape(omega, K)
    return omega


def _as_times(times, name: str) -> torch.Tensor:
    """(n,) float64 times, all >= 0 (the processes start at time 0)."""
    times = torch.as_tensor(times, dtype=_F64).reshape(-1)
    bad = ~(times >= 0)
    if bool(bad.any()):
        raise ValueError(f"{name}: expected times >= 0, got {times[bad].tolist()}")
    return times


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind: expected 'I' or 'II', got {kind!r}")


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not 0 < value < math.inf:
        raise ValueError(f"{name}: expected a positive finite number, got {value}")
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
    return torch.where(z <= 1, _cross_one_small(a, z, gamma, T), _cross_one(a, z, gamma, T))


def _cross_one(a, z, gamma, T):
    """Type I b_k as written: its terms of size γ^{−a−1} cancel where z = γT is small."""
    return (2 * T * gamma**-a - T**a / (gamma * torch.exp(torch.lgamma(a + 1)))
            + (torch.exp(-z) - gammaincc_scaled(a, z)) / gamma ** (a + 1))


def _cross_one_small(a, z, gamma, T):
    """Type I b_k for z = γT <= 1 without the cancellation: with e^{−z} − Q e^z = −2 sinh z + e^z P and
    P(a, z) = z^a e^{−z}/Γ(a+1) Σ_n z^n/(a+1)_n, b = −2γ^{−a−1}(sinh z − z) + T^a/(γΓ(a+1)) Σ_{n≥1} z^n/(a+1)_n.
    Both series to 30 terms (their tails below 1e-30 at z <= 1)."""
    term, rising = torch.ones_like(z), torch.zeros_like(z)
    for n in range(1, 31):
        term = term * z / (a + n)
        rising = rising + term
    odd, sinh_minus_z = z, torch.zeros_like(z)
    for k in range(1, 16):
        odd = odd * z * z / ((2 * k) * (2 * k + 1))
        sinh_minus_z = sinh_minus_z + odd
    return -2 * gamma ** (-a - 1) * sinh_minus_z + T**a / (gamma * torch.exp(torch.lgamma(a + 1))) * rising


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


def _optimal_weights(H, gamma, T: float, kind: str):
    """ω* (K,) minimising ωᵀAω − 2bᵀω in the code normalisation, and bᵀω* (a scalar); differentiable in H.

    A is Cauchy-like (type II, γ_max = 20, T = 1: cond 1.7e16 at K = 10, up to ~1e24 beyond): a plain solve
    returns weights whose error is orders of magnitude above the optimum. So A is Jacobi-scaled,
    S = D A D with D = diag(A)^{-1/2}, and solved on the eigenvectors v of S whose eigenvalue λ exceeds
    K·eps·λ_max; smaller ones are below the rounding error of S and their terms only add noise. On the
    kept subspace ω* is the exact minimiser and bᵀω* = Σ (vᵀDb)²/λ, a sum of positive terms, so c − bᵀω* is
    the error of the weights returned (no cancellation of large terms). A does not depend on H.
    """
    A, b = gram(gamma, T, kind), cross(H, gamma, T, kind)  # (K, K), (K,)
    d = torch.diagonal(A).rsqrt()  # (K,)
    lam, vec = torch.linalg.eigh(d[:, None] * A * d)  # (K,) ascending, (K, K)
    keep = lam > len(lam) * torch.finfo(_F64).eps * lam[-1]
    lam, vec = lam[keep], vec[:, keep]  # (r,), (K, r)
    coef = vec.T @ (d * b)  # (r,)
    return d * (vec @ (coef / lam)), (coef**2 / lam).sum()


def omega(H, gamma, T: float = 1.0, kind: str = "I") -> torch.Tensor:
    """Optimal weights (K,) float64 (A ω = b, solved as in `_optimal_weights`); type I scaled by 1/√V_H so that
    it targets standard fBM.

    H: float or scalar tensor in (0, 1) (gradients flow to a tensor H); gamma: (K,) positive rates;
    T: the horizon the L2 error is taken over.
    """
    w, _ = _optimal_weights(H, gamma, T, kind)
    if kind == "I":
        w = w / torch.sqrt(_variance_factor(_as_hurst(H)))
    return w


def approximation_error(H, gamma, T: float = 1.0, kind: str = "I") -> torch.Tensor:
    """Relative L2 error E/c = 1 − bᵀω/c of the weights `omega` returns (independent of the normalisation)."""
    _, explained = _optimal_weights(H, gamma, T, kind)
    return 1 - explained / target_energy(H, T, kind)


# --- covariances ----------------------------------------------------------------------------------------

def _exp_integral(rate: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 − e^{−rate·t})/rate, = t at rate 0."""
    safe = torch.where(rate == 0, torch.ones_like(rate), rate)
    return torch.where(rate == 0, t, -torch.expm1(-safe * t) / safe)


def mafbm_cov(s, t, omega, gamma, kind: str = "I") -> torch.Tensor:
    """Cov(B̂(s_i), B̂(t_j)): (len(s), len(t)) float64, the exact law of the Markov approximation.

    s, t: times >= 0; omega, gamma: (K,). Type II allows γ = 0 (a Brownian mode); type I needs γ > 0 (its
    stationary start has variance 1/(2γ)).
    """
    _check_kind(kind)
    g = _as_gamma(gamma, zero_ok=True)
    if kind == "I" and not bool((g > 0).all()):
        raise ValueError(f"gamma: kind 'I' (stationary start, variance 1/(2 gamma)) needs positive rates, got "
                         f"{g.tolist()}; a rate of 0 is allowed for kind 'II' only")
    w = _as_omega(omega, len(g))
    s, t = _as_times(s, "s"), _as_times(t, "t")
    lo = torch.minimum(s[:, None], t[None, :])[..., None, None]  # (S, T, 1, 1)
    hi = torch.maximum(s[:, None], t[None, :])[..., None, None]
    g_i, g_j = g[:, None], g[None, :]  # (K, 1), (1, K)
    if kind == "II":
        cov_y = torch.exp(-g_j * (hi - lo)) * _exp_integral(g_i + g_j, lo)
    else:
        cov_y = (torch.exp(-g_j * (hi - lo)) - torch.exp(-g_j * hi) - torch.exp(-g_i * lo) + 1) / (g_i + g_j)
    return torch.einsum("i,stij,j->st", w, cov_y, w)


def fbm_cov(s, t, H: float) -> torch.Tensor:
    """Standard fBM: ½(s^{2H} + t^{2H} − |t − s|^{2H}), s, t >= 0. (len(s), len(t)) float64."""
    h2 = 2 * float(_as_hurst(H))
    s, t = _as_times(s, "s")[:, None], _as_times(t, "t")[None, :]
    return 0.5 * (s**h2 + t**h2 - (t - s).abs() ** h2)


def _tanh_sinh_unit():
    """Tanh-sinh rule on (0, 1): log x (N,) and weights (N,), ∫_0^1 f ≈ Σ w f(x), x = σ(π sinh τ), τ = k/16,
    |τ| <= 4.5 (N = 145; the nodes reach e^{−141} from either end)."""
    tau = torch.arange(-72, 73, dtype=_F64) / 16
    arg = math.pi * torch.sinh(tau)
    weight = torch.sigmoid(arg) * torch.sigmoid(-arg) * math.pi * torch.cosh(tau) / 16
    return torch.nn.functional.logsigmoid(arg), weight


_UNIT_LOG_X, _UNIT_W = _tanh_sinh_unit()


def _split_unit_rule(log_cut: torch.Tensor):
    """Tanh-sinh on (0, y*) and (y*, 1), y* = e^{log_cut} (...) in [0, 1]: log y and weights, both (..., 2N)."""
    cut = torch.exp(log_cut)[..., None]
    # y* = 0 (log_cut = −inf): the left piece has weight 0; its nodes are moved to (0, 1) to stay finite
    log_left = torch.where(cut > 0, log_cut[..., None], 0.0) + _UNIT_LOG_X
    log_right = torch.logaddexp(log_cut[..., None], torch.log1p(-cut) + _UNIT_LOG_X)
    return torch.cat([log_left, log_right], -1), torch.cat([cut * _UNIT_W, (1 - cut) * _UNIT_W], -1)


def rl_fbm_cov(s, t, H: float) -> torch.Tensor:
    """Riemann-Liouville fBM: (1/Γ(a)²) ∫_0^lo v^{a−1} (gap + v)^{a−1} dv, lo = min(s, t), gap = |t − s|.

    v = lo·y^{1/(2H)} turns the v^{2H−1} singularity of the diagonal into a constant; the y-integral is split at
    y* = min(gap/lo, 1)^{2H} (v = gap, where (gap + v)^{a−1} turns from ~gap^{a−1} to ~v^{a−1}) and each piece is
    a tanh-sinh sum. Agrees with the closed forms (t^{2H}/(2H Γ(a)²) on the diagonal, the ₂F₁ form off it) to
    ~1e-13 relative for H in [0.01, 0.99]. s, t >= 0; (len(s), len(t)) float64.
    """
    H = float(_as_hurst(H))
    a, p = H + 0.5, 1 / (2 * H)
    s, t = _as_times(s, "s")[:, None], _as_times(t, "t")[None, :]
    lo, gap = torch.minimum(s, t), (t - s).abs()  # (S, T)
    lo_pos = torch.where(lo > 0, lo, torch.ones_like(lo))  # lo = 0 (covariance 0) is masked below
    log_y, w = _split_unit_rule(2 * H * torch.log(torch.clamp(gap / lo_pos, max=1)))  # (S, T, 2N)
    log_lo, log_gap = torch.log(lo_pos)[..., None], torch.log(gap)[..., None]  # (S, T, 1)
    # lo^a p y^{pa−1} (gap + lo y^p)^{a−1}: the integrand of dy after v = lo y^p
    log_f = a * log_lo + (p * a - 1) * log_y + (a - 1) * torch.logaddexp(log_gap, log_lo + p * log_y)
    cov = p * (w * torch.exp(log_f)).sum(-1) / math.gamma(a) ** 2
    return torch.where(lo > 0, cov, 0.0)


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
    g = _as_gamma(gamma, zero_ok=True)
    h = _check_positive(dt, "dt")
    if scheme == "euler":
        return g * h, torch.full_like(g, h), torch.full((len(g), 1), math.sqrt(h), dtype=_F64)
    if scheme != "exact":
        raise ValueError(f"scheme: expected 'euler' or 'exact', got {scheme!r}")
    w = torch.ones_like(g) if omega is None else _as_omega(omega, len(g))
    cov = _exp_integral(g[:, None] + g[None, :], torch.tensor(h, dtype=_F64))
    return -torch.expm1(-g * h), _exp_integral(g, torch.tensor(h, dtype=_F64)), _low_rank_factor(cov, w, tol)


def stationary_factor(gamma, omega=None, tol: float = 1e-6) -> torch.Tensor:
    """Low-rank root (K, r) of the stationary covariance Σ∞_ij = 1/(γ_i + γ_j) (type I start), float64."""
    g = _as_gamma(gamma)
    w = torch.ones_like(g) if omega is None else _as_omega(omega, len(g))
    return _low_rank_factor(1 / (g[:, None] + g[None, :]), w, tol)

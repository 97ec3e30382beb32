"""FractionalSDE: a latent SDE driven by Markov-approximate fBM, with a learnable Hurst index, trained by the
ELBO of Daems et al. (ICLR 2024) on top of markovkit.mafbm_step."""
import math

import torch
from torch import nn

import markovkit
from markovkit import fbm
from markovkit.mafbm import _check_scheme
from markovkit.philox import check_position, check_seed

_START_KEY = 0x59305F5354415254  # xor'ed into the seed for Y(0)'s stream (apart from the steps' streams)


def _check_x0(x0: torch.Tensor, paths: int, dims: int, paths_is: str) -> None:
    if x0.shape != (paths, dims):
        raise ValueError(f"x0: expected shape ({paths}, {dims}) = ({paths_is}, dims), got {tuple(x0.shape)}")


def _mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, n_out))


class FractionalSDE(nn.Module):
    """dX = b(X, t) dt + σ(X) dB̂^H per latent dimension, B̂^H the K-mode MA-fBM (type I or II).

    hurst: a float in (0, 1) fixes H; None learns it as sigmoid(hurst_raw), started at H = ½. gamma, the K rates,
    is a float64 constant (not a buffer: .float() or .to(dtype) leave it as it is).
    Networks: drift b([x, t]) (dims), diagonal diffusion σ = softplus(net(x)) (dims), posterior control
    u([sin t, cos t, x, vec(y), context]) (dims), its last layer zero so training starts at the prior.
    ω(H) is recomputed (differentiably) on every call for `horizon`, the time span the weights are fit on.
    """

    def __init__(self, dims: int, *, K: int = 5, gamma_max: float = 20.0, kind: str = "I", hurst=None,
                 horizon: float = 1.0, hidden: int = 64, context_dims: int = 0, scheme: str = "exact",
                 drift: bool = True, sigma_init: float = 1.0):
        super().__init__()
        fbm._check_kind(kind)
        _check_scheme(scheme)
        if hurst is not None and not 0.0 < float(hurst) < 1.0:
            raise ValueError(f"hurst: expected a float in (0, 1), or None to learn it, got {hurst}")
        if not 1 <= K <= 16:
            raise ValueError(f"K: expected 1 <= K <= 16 (the step kernels' limit), got {K}")
        self.dims, self.kind, self.horizon, self.scheme = dims, kind, float(horizon), scheme
        self.context_dims = context_dims
        self.gamma = fbm.gamma_grid(K, gamma_max)  # (K,) float64 on the CPU, where the weights are solved
        self.fixed_hurst = None if hurst is None else float(hurst)
        self.hurst_raw = nn.Parameter(torch.zeros(())) if hurst is None else None
        self.drift = _mlp(dims + 1, dims, hidden) if drift else None
        self.diffusion = nn.Linear(dims, dims)
        nn.init.zeros_(self.diffusion.weight)
        nn.init.constant_(self.diffusion.bias, math.log(math.expm1(sigma_init)))
        self.control = _mlp(2 + dims * (K + 1) + context_dims, dims, hidden)
        nn.init.zeros_(self.control[-1].weight)
        nn.init.zeros_(self.control[-1].bias)
        # full rank (tol 0): a rank chosen for one ω would not hold for the ω(H) of a learnt H
        self._start_factor = fbm.stationary_factor(self.gamma, tol=0.0) if kind == "I" else None

    @property
    def K(self) -> int:
        return self.gamma.numel()

    def hurst(self) -> torch.Tensor:
        if self.hurst_raw is None:
            return torch.tensor(self.fixed_hurst, dtype=torch.float64)
        return torch.sigmoid(self.hurst_raw.double())

    def omega(self) -> torch.Tensor:
        # the (K,) weights are solved on the CPU in float64 whatever the module's device
        return fbm.omega(self.hurst().cpu(), self.gamma, self.horizon, self.kind)

    def _initial_y(self, paths: int, like: torch.Tensor, seed: int, path_offset: int) -> torch.Tensor:
        """Y(0): stationary N(0, 1/(γ_i + γ_j)) for type I, 0 for type II. (paths, dims, K). Path p's K normals
        per dim are elements ((path_offset + p)·dims + d)·K .. of the Philox stream of seed ^ _START_KEY."""
        if self._start_factor is None:
            return like.new_zeros(paths, self.dims, self.K)
        r0 = self._start_factor.shape[1]
        z = markovkit.philox_normal((paths, self.dims, r0), seed ^ _START_KEY, path_offset * self.dims * r0,
                                    dtype=torch.float64)
        return (z @ self._start_factor.T).to(like)

    def _coefficients(self, x, t):
        tcol = torch.full_like(x[:, :1], t)
        b = self.drift(torch.cat([x, tcol], 1)) if self.drift is not None else torch.zeros_like(x)
        return b, nn.functional.softplus(self.diffusion(x))

    def _control(self, x, y, t, context):
        feats = [torch.full_like(x[:, :1], math.sin(t)), torch.full_like(x[:, :1], math.cos(t)), x, y.flatten(1)]
        if context is not None:
            feats.append(context)
        return self.control(torch.cat(feats, 1))

    def _run(self, x0, n_steps, dt, seed, posterior, context_fn, path_offset):
        """Steps from x0 (paths, dims): returns X at steps 0..n (paths, n + 1, dims) and Σ_n kl (paths,)."""
        check_seed(seed, "FractionalSDE")
        check_position(path_offset, "path_offset", "FractionalSDE")
        if posterior and (context_fn is None) != (self.context_dims == 0):
            raise ValueError(f"context_fn: expected a function giving (paths, {self.context_dims}) context features "
                             f"where context_dims > 0, else None; got {context_fn!r} with {self.context_dims}")
        omega, gamma = self.omega().to(x0.device, x0.dtype), self.gamma
        x, y = x0, self._initial_y(x0.shape[0], x0, seed, path_offset).to(x0.device)
        kl, xs = x0.new_zeros(x0.shape[0]), [x0]
        for n in range(n_steps):
            t = n * dt
            # the networks' outputs in the state's dtype (under autocast they come in bfloat16 / float16)
            b, sigma = (c.to(x.dtype) for c in self._coefficients(x, t))
            u = None
            if posterior:
                u = self._control(x, y, t, None if context_fn is None else context_fn(n, x)).to(x.dtype)
            x, y, step_kl = markovkit.mafbm_step(x, y, b, sigma, omega, gamma, dt, control=u, seed=seed, step=n,
                                                 scheme=self.scheme, path_offset=path_offset)
            kl = kl + step_kl
            xs.append(x)
        return torch.stack(xs, 1), kl

    @torch.no_grad()
    def sample(self, paths: int, n_steps: int, dt: float, *, seed: int, x0=None, posterior: bool = False,
               context_fn=None, path_offset: int = 0) -> torch.Tensor:
        """Paths of the prior (or the posterior): (paths, n_steps + 1, dims) on the module's device.

        seed: the noise's Philox seed (and Y(0)'s); the same seed gives the same paths in the same dtype (float32 and
        float64 draw their normals differently from one seed: not the same paths). x0: (paths, dims) or None
        (zeros). path_offset: the global index of the first path, so that paths sampled in chunks (one seed, each
        chunk's offset) are those of one call, to rounding (the networks' matmuls round by batch size).
        """
        if x0 is None:
            w = self.control[0].weight
            x0 = torch.zeros(paths, self.dims, device=w.device, dtype=w.dtype)
        _check_x0(x0, paths, self.dims, "paths")
        return self._run(x0, n_steps, dt, seed, posterior, context_fn, path_offset)[0]

    def elbo(self, obs: torch.Tensor, times: torch.Tensor, *, dt: float, obs_std: float, seed: int,
             samples: int = 16, x0=None, context_fn=None, path_offset: int = 0) -> torch.Tensor:
        """Monte Carlo ELBO per sequence: E_Q[Σ_i log N(obs_i | X(t_i), obs_std²)] − E_Q[½ ∫ |u|² dt].

        obs: (batch, n_obs, dims) at `times` (n_obs,) on the dt grid; samples posterior paths per sequence
        (paths = batch·samples, sequence-major). seed: the paths' noise (a training loop passes a new one each
        step, or it fits one draw). x0: (batch·samples, dims) or None (zeros). context_fn(n, x) -> (paths,
        context_dims) feeds the control (the paths of this call). path_offset: the global index of the first path (a
        batch's first sequence times samples), as in `sample`. Returns the mean over sequences (a scalar).
        """
        if obs.dim() != 3 or obs.shape[2] != self.dims:
            raise ValueError(f"obs: expected shape (batch, n_obs, {self.dims}), got {tuple(obs.shape)}")
        for value, name in ((dt, "dt"), (obs_std, "obs_std")):
            if not float(value) > 0:
                raise ValueError(f"{name}: expected a positive float, got {value!r}")
        if samples < 1:
            raise ValueError(f"samples: expected a positive int, got {samples!r}")
        batch, n_obs, dims = obs.shape
        t = torch.as_tensor(times, dtype=torch.float64)
        if t.shape != (n_obs,):
            raise ValueError(f"times: expected shape ({n_obs},) = (n_obs,) of obs, got {tuple(t.shape)}")
        idx = torch.round(t / dt).long()
        # off the grid by 1e-6 of the step count at most (float32 times: 0.3 is 30.0000012 steps of 0.01), and by
        # 0.01 step at most however far
        tol = (1e-6 * idx.clamp_min(1)).clamp_max(1e-2)
        if not (bool((t >= 0).all()) and bool(((t / dt - idx).abs() <= tol).all())):
            raise ValueError(f"times: expected multiples of dt = {dt}, >= 0, got {times}")
        paths = batch * samples
        if x0 is None:
            x0 = obs.new_zeros(paths, dims)
        _check_x0(x0, paths, self.dims, "batch*samples")
        xs, kl = self._run(x0, int(idx.max()), dt, seed, True, context_fn, path_offset)
        target = obs.repeat_interleave(samples, 0)  # (paths, n_obs, dims)
        resid = (xs[:, idx.to(xs.device)] - target) / obs_std
        loglik = (-0.5 * resid**2 - math.log(obs_std) - 0.5 * math.log(2 * math.pi)).sum((1, 2))
        return (loglik - kl).mean()

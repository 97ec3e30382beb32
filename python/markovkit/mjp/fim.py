"""The synthetic training data of FIM-MJP (Berghaus et al., NeurIPS 2024, arXiv 2406.06419): random CTMCs with
2-6 states, 300 paths each, observed on regular or irregular grids over [0, 10] with 1% label noise.

The original generator is not public. What is known (model card, released configs and test fixtures, see the
mjp notes) is the default of `FimConfig`; the rate prior's hyperprior, the link survival probability and the
noise model (flip to a uniformly chosen *other* state) are guesses fitted to the released fixtures and are
configurable. Also guessed: no state is absorbing (a state whose links all die keeps one to a uniformly
chosen other state; the fixtures' exit rates are 0.21 or more at 5%, 767/800 six-state processes irreducible),
and the stationary start, exact (a linear solve), is given only to processes irreducible on their states (the
others have no unique stationary law, or one that vanishes on some states): they start from Dirichlet(1, ..., 1),
so no p0 is one-hot. `python -m markovkit.mjp.fim --processes N --out FILE` writes a dataset (torch.save of the dict
that `generate` returns) with a progress bar.

Reproducibility: everything comes from markovkit's Philox streams (bitwise equal on CPU and CUDA), at positions
fixed by the global process index: the parameters from the stream of `seed ^ _PARAM_KEY` (one region per kind of
draw), the paths from simulate_ctmc under `seed` with the process's global index as its stream id, masks and
noise from the stream of `seed ^ _NOISE_KEY`. Generation stays on `device` from the parameters to the returned
tensors. A dataset is the same for any chunking, and on CPU and CUDA up to the last bits of the float64 math
(libm, matrix_exp) behind the parameters.
"""
import argparse
import contextlib
import math
from dataclasses import dataclass

import torch

import markovkit
from markovkit._progress import Progress
from markovkit.mjp.ops import simulate_ctmc, state_dtype
from markovkit.philox import check_seed

_NOISE_KEY = 0x5DEECE66D  # xor'ed into the seed for the mask / noise stream (kept apart from the paths' stream)
_PARAM_KEY = 0x2545F4914F6CDD1D  # likewise for the parameters' stream
_REGION = 1 << 44  # stream positions per kind of parameter draw (region r starts at r * _REGION)
_GAMMA_ROUNDS = 30  # rejection rounds a Gamma draw has regions for (P(an entry needs more) < 0.05^30)


@dataclass(frozen=True)
class FimConfig:
    """The priors (defaults: FIM-MJP's as far as known). A process draws its number of states n from `states`,
    its links among them (all w.p. `fully_connected`, else each w.p. `p_survival`; a state left without any
    keeps the link to a uniformly chosen other state), a Beta(a, b) rate per link, and p0: w.p.
    `stationary_start` the stationary distribution if the process is irreducible, else Dirichlet(1, ..., 1).
    Checked on construction (ValueError naming the field); frozen so it stays checked."""
    states: tuple = (2, 3, 4, 5, 6)
    state_weights: tuple = (1, 1, 1, 1, 5)  # 5k processes each for 2-5 states, 25k for 6 (of 45k)
    max_states: int = 6                     # every process padded ("upscaled") to this many states
    paths: int = 300
    grid_points: int = 100                  # the fine regular grid on [0, t_max]
    t_max: float = 10.0
    fully_connected: float = 0.5            # P(all links present); else each link survives w.p. p_survival,
    p_survival: float = 0.5                 # a state left without links keeps one (guess; fixtures: 9-20 of 30
                                            # off-diagonals zero, no absorbing state)
    beta_a: tuple = (0.4, 1.2)              # rate ~ Beta(a, b), a and b uniform per process in these ranges
    beta_b: tuple = (1.0, 2.2)              # (guess; fixture fits: a ~ 0.67-0.77, b ~ 1.46-1.55)
    stationary_start: float = 0.45          # P(p0 = stationary distribution | irreducible); else Dirichlet(1)
    grid: str = "mixed"                     # "reg", "rand" or "mixed" (each process picks one, 50/50)
    strides: tuple = (1, 2, 3, 4)           # "reg": every stride-th grid point (100/50/34/25 points)
    keep_probs: tuple = (0.25, 0.5)         # "rand": per-path Bernoulli mask on the fine grid
    noise: float = 0.01                     # P(an observation is replaced by a uniformly chosen other state)

    def __post_init__(self):
        _expect(_is_int(self.max_states) and self.max_states >= 2, "max_states", "an integer >= 2", self.max_states)
        _expect(len(self.states) > 0 and all(_is_int(n) and 2 <= n <= self.max_states for n in self.states),
                "states", f"a non-empty tuple of integers in [2, max_states={self.max_states}]", self.states)
        _expect(len(self.state_weights) == len(self.states) and all(w >= 0 for w in self.state_weights)
                and sum(self.state_weights) > 0, "state_weights",
                f"{len(self.states)} weights >= 0 (one per entry of states) with a positive sum", self.state_weights)
        for name in ("paths", "grid_points"):
            _expect(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1",
                    getattr(self, name))
        _expect(0 < self.t_max < math.inf, "t_max", "a finite time > 0", self.t_max)
        for name in ("fully_connected", "p_survival", "stationary_start", "noise"):
            _expect(0 <= getattr(self, name) <= 1, name, "a probability in [0, 1]", getattr(self, name))
        for name in ("beta_a", "beta_b"):
            bounds = getattr(self, name)
            _expect(len(bounds) == 2 and 0 < bounds[0] <= bounds[1] < math.inf, name,
                    "a range (low, high) with 0 < low <= high < inf", bounds)
        _expect(self.grid in ("reg", "rand", "mixed"), "grid", "'reg', 'rand' or 'mixed'", self.grid)
        _expect(len(self.strides) > 0 and all(_is_int(k) and k >= 1 for k in self.strides), "strides",
                "a non-empty tuple of integers >= 1", self.strides)
        _expect(len(self.keep_probs) > 0 and all(0 < p <= 1 for p in self.keep_probs), "keep_probs",
                "a non-empty tuple of probabilities in (0, 1]", self.keep_probs)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _expect(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"FimConfig: {name}: expected {expected}, got {got!r}")


def _irreducible(links: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """(N,) bool: each state of a process reaches each other one along its links (N, S, S) bool; inside (N, S)
    marks the process's states. Reachability in <= k steps is (A | I)^k > 0: squared until k >= S - 1."""
    S = links.shape[-1]
    reach = links | torch.eye(S, dtype=torch.bool, device=links.device)  # (N, S, S)
    steps = 1
    while steps < S - 1:
        reach = (reach.double() @ reach.double()) > 0
        steps *= 2
    pairs = inside.unsqueeze(2) & inside.unsqueeze(1)  # (N, S, S)
    return (reach | ~pairs).flatten(1).all(-1)


def _stationary_distribution(Q: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """pi (N, S) with pi Q = 0, sum(pi) = 1 and pi = 0 on padded states, for generators Q (N, S, S) irreducible on
    their states inside (N, S) bool (state 0 always among them). Solves Q^T pi = 0 with the first equation
    replaced by sum(pi) = 1 and a padded state's by pi_j = 0 (nonsingular for irreducible Q)."""
    N, S = inside.shape
    eye = torch.eye(S, dtype=Q.dtype, device=Q.device)
    system = torch.where(inside.unsqueeze(2), Q.transpose(1, 2), eye)  # (N, S, S): row j: sum_i pi_i Q_ij = 0
    system[:, 0] = 1.0  # sum(pi) = 1 (the padded pi are 0)
    pi = torch.linalg.solve(system, eye[0].expand(N, S)).clamp_min(0)  # rounding may leave -1e-17 where pi ~ 0
    return pi / pi.sum(-1, keepdim=True)


class _Draws:
    """The parameters' Philox uniforms / normals (float64) on `device`: `uniform(region, shape)` gives process i
    (of the leading dimension) the values at positions region * _REGION + i * width + (0 .. width - 1),
    width = prod(shape[1:]), whatever the number of processes."""

    def __init__(self, seed: int, device):
        self.seed, self.device = seed ^ _PARAM_KEY, device  # in [-2**63, 2**63) as seed is

    def uniform(self, region: int, shape) -> torch.Tensor:
        return markovkit.philox_uniform(shape, self.seed, region * _REGION, dtype=torch.float64, device=self.device)

    def normal(self, region: int, shape) -> torch.Tensor:
        return markovkit.philox_normal(shape, self.seed, region * _REGION, dtype=torch.float64, device=self.device)


def _choice(u: torch.Tensor, values, weights=None) -> torch.Tensor:
    """values[j] with probability weights[j] / sum (uniform without weights) for each uniform in u."""
    values = torch.tensor(values, device=u.device)
    values = values.double() if values.is_floating_point() else values
    w = torch.ones(len(values), dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
    cdf = (w.cumsum(0) / w.sum()).to(u.device)
    return values[torch.searchsorted(cdf, u, right=True).clamp_max(len(values) - 1)]


def _gamma(draws: _Draws, region: int, shape: torch.Tensor) -> torch.Tensor:
    """Gamma(shape, 1) variates for positive shapes (any tensor shape (N, ...)): Marsaglia-Tsang for shape + 1
    (acceptance > 95%), then G(shape) = G(shape + 1) U^(1/shape). Round r of the rejection draws every entry's
    candidate from regions region + 1 + 2r (normals) and region + 2 + 2r (uniforms); region holds the boost
    uniforms. Exact: the rounds repeat until every entry is accepted (error past _GAMMA_ROUNDS)."""
    d = shape + 2.0 / 3.0  # (shape + 1) - 1/3
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.full_like(shape, float("nan"))
    pending = torch.ones_like(shape, dtype=torch.bool)
    r = 0
    while bool(pending.any()):
        if r == _GAMMA_ROUNDS:
            raise RuntimeError("fim: a Gamma draw was rejected in every round")
        z = draws.normal(region + 1 + 2 * r, shape.shape)
        u = draws.uniform(region + 2 + 2 * r, shape.shape)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        take = pending & ok
        out = torch.where(take, d * v, out)
        pending &= ~take
        r += 1
    return out * draws.uniform(region, shape.shape) ** (1.0 / shape)


def _beta(draws: _Draws, region: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Beta(a, b) = X / (X + Y), X ~ Gamma(a), Y ~ Gamma(b) (regions region .. region + 4 _GAMMA_ROUNDS + 1)."""
    x = _gamma(draws, region, a)
    return x / (x + _gamma(draws, region + 2 * _GAMMA_ROUNDS + 1, b))


def _other_state(state: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A state of 0..k-1 other than `state`, uniformly chosen by the uniforms u (shapes broadcast)."""
    return (state + 1 + (u * (k - 1)).long()) % k


def _links(draws: _Draws, n: torch.Tensor, inside: torch.Tensor, config: FimConfig) -> torch.Tensor:
    """The links (N, S, S) bool of processes with n (N,) states, inside (N, S) = state < n: all w.p.
    fully_connected, else each w.p. p_survival; a state left without outgoing links keeps the one to a uniformly
    chosen other state."""
    N, S = inside.shape
    state = torch.arange(S, device=n.device)
    k = n.unsqueeze(1)  # (N, 1)
    links = inside.unsqueeze(2) & inside.unsqueeze(1) & ~torch.eye(S, dtype=torch.bool, device=n.device)
    full = draws.uniform(1, (N,)) < config.fully_connected
    links &= full.view(N, 1, 1) | (draws.uniform(2, (N, S, S)) < config.p_survival)
    other = _other_state(state, draws.uniform(10, (N, S)), k)  # (N, S)
    stranded = inside & ~links.any(-1)  # (N, S)
    return links | (stranded.unsqueeze(2) & (state == other.unsqueeze(2)))


def sample_parameters(processes: int, config: FimConfig, seed: int, device="cpu") -> dict:
    """Per-process draws from the priors, on `device`: rates (N, S, S) generators, num_states (N,), p0 (N, S),
    stationary (N,) (p0 is the stationary distribution), is_rand (N,), stride (N,), keep_prob (N,);
    S = config.max_states, padded states have no rates and p0 = 0."""
    if processes < 0:
        raise ValueError(f"sample_parameters: processes: expected >= 0, got {processes}")
    draws = _Draws(check_seed(seed, "sample_parameters"), device)
    N, S = processes, config.max_states
    n = _choice(draws.uniform(0, (N,)), config.states, config.state_weights)
    inside = torch.arange(S, device=device) < n.unsqueeze(1)  # (N, S)
    links = _links(draws, n, inside, config)
    a = config.beta_a[0] + (config.beta_a[1] - config.beta_a[0]) * draws.uniform(3, (N, 1, 1))
    b = config.beta_b[0] + (config.beta_b[1] - config.beta_b[0]) * draws.uniform(4, (N, 1, 1))
    rates = _beta(draws, 100, a.expand(N, S, S).contiguous(), b.expand(N, S, S).contiguous())
    Q = torch.where(links, rates, 0.0)
    Q = Q - torch.diag_embed(Q.sum(-1))
    dirichlet = -torch.log(draws.uniform(5, (N, S))) * inside  # Gamma(1) variates
    p0 = dirichlet / dirichlet.sum(-1, keepdim=True)
    stationary = (draws.uniform(6, (N,)) < config.stationary_start) & _irreducible(links, inside)
    p0[stationary] = _stationary_distribution(Q[stationary], inside[stationary])
    is_rand = {"reg": torch.zeros(N, dtype=torch.bool, device=device),
               "rand": torch.ones(N, dtype=torch.bool, device=device)}.get(config.grid)
    return {
        "rates": Q, "num_states": n, "p0": p0, "stationary": stationary,
        "is_rand": draws.uniform(7, (N,)) < 0.5 if is_rand is None else is_rand,
        "stride": _choice(draws.uniform(8, (N,)), config.strides),
        "keep_prob": _choice(draws.uniform(9, (N,)), config.keep_probs),
    }


def _observe(states, params, first: int, config: FimConfig, seed: int):
    """Masks and noisy observations of the clean states (n, paths, L) of processes first .. first + n - 1."""
    n, paths, L = states.shape
    device = states.device
    u = markovkit.philox_uniform((n, paths, L, 3), seed ^ _NOISE_KEY, first * paths * L * 3, device=device)
    stride = params["stride"].view(n, 1, 1)
    keep = params["keep_prob"].view(n, 1, 1).float()
    regular = (torch.arange(L, device=device) % stride == 0).expand(n, paths, L)
    mask = torch.where(params["is_rand"].view(n, 1, 1), u[..., 0] < keep, regular)
    k = params["num_states"].view(n, 1, 1)
    flipped = _other_state(states.long(), u[..., 2], k)
    observations = torch.where(u[..., 1] < config.noise, flipped, states.long()).to(torch.int16)
    return observations, mask


def generate(processes: int, config: FimConfig = FimConfig(), seed: int = 0, device="cpu", chunk: int = 1000,
             progress: bool = False) -> dict:
    """A FIM-MJP dataset of `processes` processes, generated and returned on `device`; seed in [-2**63, 2**63).

    Returns rates (N, S, S) float32 generators, num_states (N,), initial_distribution (N, S) float32,
    times (L,) float32 normalised to [0, 1] (multiply by time_scale), time_scale, states (N, paths, L) uint8
    (clean), observations (N, paths, L) int16 (noisy), mask (N, paths, L) bool (observed grid points).
    """
    check_seed(seed, "generate")
    if chunk < 1:
        raise ValueError(f"generate: chunk: expected >= 1 processes per call, got {chunk}")
    params = sample_parameters(processes, config, seed, device)
    t = torch.linspace(0, config.t_max, config.grid_points, dtype=torch.float64, device=device)
    shape = (processes, config.paths, config.grid_points)
    states = torch.empty(shape, dtype=state_dtype(config.max_states), device=device)
    observations = torch.empty(shape, dtype=torch.int16, device=device)
    mask = torch.empty(shape, dtype=torch.bool, device=device)
    with Progress(processes, "fim-mjp") if progress else contextlib.nullcontext() as bar:
        for first in range(0, processes, chunk):
            last = min(first + chunk, processes)
            part = {k: v[first:last] for k, v in params.items()}
            states[first:last] = simulate_ctmc(part["rates"], None, t, p0=part["p0"], paths=config.paths, seed=seed,
                                               process_offset=first)
            observations[first:last], mask[first:last] = _observe(states[first:last], part, first, config, seed)
            if bar is not None:
                bar.update(last - first, f"{last}/{processes} processes")
    return {
        "rates": params["rates"].float(), "num_states": params["num_states"],
        "initial_distribution": params["p0"].float(), "times": (t / config.t_max).float(),
        "time_scale": config.t_max, "states": states, "observations": observations, "mask": mask,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m markovkit.mjp.fim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, required=True, help="number of random processes")
    parser.add_argument("--out", required=True, help="output file (torch.save of a dict of tensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paths", type=int, default=FimConfig.paths, help="paths per process")
    parser.add_argument("--grid", choices=["reg", "rand", "mixed"], default=FimConfig.grid)
    parser.add_argument("--noise", type=float, default=FimConfig.noise, help="label flip probability")
    parser.add_argument("--chunk", type=int, default=1000, help="processes simulated per call")
    args = parser.parse_args(argv)
    config = FimConfig(paths=args.paths, grid=args.grid, noise=args.noise)
    data = generate(args.processes, config, args.seed, args.device, args.chunk, progress=True)
    torch.save({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in data.items()}, args.out)
    print(f"wrote {args.out}: {args.processes} processes x {args.paths} paths x {config.grid_points} points")


if __name__ == "__main__":
    main()

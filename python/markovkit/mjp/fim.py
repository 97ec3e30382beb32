"""The synthetic training data of FIM-MJP (Berghaus et al., NeurIPS 2024, arXiv 2406.06419): random CTMCs with
2-6 states, 300 paths each, observed on regular or irregular grids over [0, 10] with 1% label noise.

The original generator is not public. What is known (model card, released configs and test fixtures, see the
mjp notes) is the default of `FimConfig`; the rate prior's hyperprior, the link survival probability and the
noise model (flip to a uniformly chosen *other* state) are guesses fitted to the released fixtures and are
configurable. `python -m markovkit.mjp.fim --processes N --out FILE` writes a dataset (torch.save of the dict
that `generate` returns) with a progress bar.

Reproducibility: parameters come from a numpy Generator seeded with `seed`; paths from simulate_ctmc under
`seed` with the process's global index as its stream id; masks and noise from markovkit's Philox stream at
positions fixed by the global process index. A dataset is the same on CPU and CUDA and for any chunking.
"""
import argparse
import contextlib
from dataclasses import dataclass

import numpy as np
import torch

import markovkit
from markovkit._progress import Progress
from markovkit.mjp.ops import simulate_ctmc

_NOISE_KEY = 0x5DEECE66D  # xor'ed into the seed for the mask / noise stream (kept apart from the paths' stream)


@dataclass
class FimConfig:
    states: tuple = (2, 3, 4, 5, 6)
    state_weights: tuple = (1, 1, 1, 1, 5)  # 5k processes each for 2-5 states, 25k for 6 (of 45k)
    max_states: int = 6                     # every process padded ("upscaled") to this many states
    paths: int = 300
    grid_points: int = 100                  # the fine regular grid on [0, t_max]
    t_max: float = 10.0
    fully_connected: float = 0.5            # P(all links present); else each link survives w.p. p_survival
    p_survival: float = 0.5                 # guess (fixtures: 9-20 of 30 off-diagonals zero)
    beta_a: tuple = (0.4, 1.2)              # rate ~ Beta(a, b), a and b uniform per process in these ranges
    beta_b: tuple = (1.0, 2.2)              # (guess; fixture fits: a ~ 0.67-0.77, b ~ 1.46-1.55)
    stationary_start: float = 0.45          # P(p0 = stationary distribution); else p0 ~ Dirichlet(1, ..., 1)
    grid: str = "mixed"                     # "reg", "rand" or "mixed" (each process picks one, 50/50)
    strides: tuple = (1, 2, 3, 4)           # "reg": every stride-th grid point (100/50/34/25 points)
    keep_probs: tuple = (0.25, 0.5)         # "rand": per-path Bernoulli mask on the fine grid
    noise: float = 0.01                     # P(an observation is replaced by a uniformly chosen other state)


def _limit_distribution(Q: torch.Tensor, num_states: torch.Tensor) -> torch.Tensor:
    """The distribution reached from the uniform one after a long time: the stationary distribution for
    irreducible Q, a valid limit for the others. Q: (N, S, S) generators, padded states excluded."""
    S = Q.shape[-1]
    uniform = (torch.arange(S).unsqueeze(0) < num_states.unsqueeze(1)).double()
    uniform /= uniform.sum(-1, keepdim=True)
    pi = (uniform.unsqueeze(1) @ torch.linalg.matrix_exp(Q * 1e3)).squeeze(1).clamp_min(0)
    return pi / pi.sum(-1, keepdim=True)


def sample_parameters(processes: int, config: FimConfig, seed: int) -> dict:
    """Per-process draws from the priors: rates (N, S, S) generators, num_states (N,), p0 (N, S), is_rand (N,),
    stride (N,), keep_prob (N,); S = config.max_states, padded states have no rates and p0 = 0."""
    rng = np.random.default_rng(seed)
    S = config.max_states
    weights = np.asarray(config.state_weights, dtype=np.float64)
    n = rng.choice(np.asarray(config.states), size=processes, p=weights / weights.sum())
    inside = np.arange(S)[None, :] < n[:, None]  # (N, S)
    links = inside[:, :, None] & inside[:, None, :] & ~np.eye(S, dtype=bool)
    full = rng.random(processes) < config.fully_connected
    links &= full[:, None, None] | (rng.random((processes, S, S)) < config.p_survival)
    a = rng.uniform(*config.beta_a, size=(processes, 1, 1))
    b = rng.uniform(*config.beta_b, size=(processes, 1, 1))
    rates = np.where(links, rng.beta(a, b, size=(processes, S, S)), 0.0)
    Q = torch.from_numpy(rates)
    Q = Q - torch.diag_embed(Q.sum(-1))
    num_states = torch.from_numpy(n)
    dirichlet = rng.gamma(1.0, size=(processes, S)) * inside
    p0 = torch.from_numpy(dirichlet / dirichlet.sum(-1, keepdims=True))
    stationary = torch.from_numpy(rng.random(processes) < config.stationary_start)
    p0 = torch.where(stationary.unsqueeze(1), _limit_distribution(Q, num_states), p0)
    kind = {"reg": np.zeros(processes, bool), "rand": np.ones(processes, bool)}.get(config.grid)
    is_rand = rng.random(processes) < 0.5 if kind is None else kind
    return {
        "rates": Q, "num_states": num_states, "p0": p0, "is_rand": torch.from_numpy(is_rand),
        "stride": torch.from_numpy(rng.choice(np.asarray(config.strides), size=processes)),
        "keep_prob": torch.from_numpy(rng.choice(np.asarray(config.keep_probs), size=processes)),
    }


def _observe(states, params, first: int, config: FimConfig, seed: int):
    """Masks and noisy observations of the clean states (n, paths, L) of processes first .. first + n - 1."""
    n, paths, L = states.shape
    device = states.device
    u = markovkit.philox_uniform((n, paths, L, 3), seed ^ _NOISE_KEY, first * paths * L * 3, device=device)
    stride = params["stride"].to(device).view(n, 1, 1)
    keep = params["keep_prob"].to(device).view(n, 1, 1).float()
    regular = (torch.arange(L, device=device) % stride == 0).expand(n, paths, L)
    mask = torch.where(params["is_rand"].to(device).view(n, 1, 1), u[..., 0] < keep, regular)
    k = params["num_states"].to(device).view(n, 1, 1)
    shift = 1 + (u[..., 2] * (k - 1)).long()  # a uniformly chosen other state
    flipped = (states.long() + shift) % k
    observations = torch.where(u[..., 1] < config.noise, flipped, states.long()).to(torch.int16)
    return observations, mask


def generate(processes: int, config: FimConfig = FimConfig(), seed: int = 0, device="cpu", chunk: int = 1000,
             progress: bool = False) -> dict:
    """A FIM-MJP dataset of `processes` processes.

    Returns rates (N, S, S) float32 generators, num_states (N,), initial_distribution (N, S) float32,
    times (L,) float32 normalised to [0, 1] (multiply by time_scale), time_scale, states (N, paths, L) uint8
    (clean), observations (N, paths, L) int16 (noisy), mask (N, paths, L) bool (observed grid points).
    """
    params = sample_parameters(processes, config, seed)
    t = torch.linspace(0, config.t_max, config.grid_points, dtype=torch.float64)
    states, observations, masks = [], [], []
    with Progress(processes, "fim-mjp") if progress else contextlib.nullcontext() as bar:
        for first in range(0, processes, chunk):
            last = min(first + chunk, processes)
            part = {k: v[first:last] for k, v in params.items()}
            x = simulate_ctmc(part["rates"].to(device), None, t.to(device), p0=part["p0"].to(device),
                              paths=config.paths, seed=seed, process_offset=first)
            obs, mask = _observe(x, part, first, config, seed)
            states.append(x.cpu())
            observations.append(obs.cpu())
            masks.append(mask.cpu())
            if bar is not None:
                bar.update(last - first, f"{last}/{processes} processes")
    return {
        "rates": params["rates"].float(), "num_states": params["num_states"],
        "initial_distribution": params["p0"].float(), "times": (t / config.t_max).float(),
        "time_scale": config.t_max, "states": torch.cat(states), "observations": torch.cat(observations),
        "mask": torch.cat(masks),
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
    torch.save(data, args.out)
    print(f"wrote {args.out}: {args.processes} processes x {args.paths} paths x {config.grid_points} points")


if __name__ == "__main__":
    main()

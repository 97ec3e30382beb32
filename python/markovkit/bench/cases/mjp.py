"""Gillespie simulation: CTMC paths on a 100-point grid over [0, 10] (six-state chains with FIM-prior rates,
one rate matrix per process), the FIM-MJP-size generation, and mass-action networks; against the vectorised
eager-PyTorch direct method (markovkit.reference). CTMC rates count expected jumps (exact, from expm).

Published CPU anchors for the Vilar oscillator (one trajectory to t = 200; Armavica/rebop `benches/vilar`,
GillesPy2_paper `performance-testing`): rebop ~19 ms, StochKit ~41 ms, GillesPy2 C++ ~66-163 ms,
JumpProcesses.jl ~68 ms. GillesPy2 is benchmarked here only when importable."""
import os
import sys
import warnings

import torch

import markovkit
from markovkit.bench.case import Case, cases
from markovkit.mjp import fim, systems
from markovkit.reference import mjp_ctmc_direct, mjp_reactions_direct

T, L = 10.0, 100


def _fim_processes(processes: int, states: tuple = (6,)):
    config = fim.FimConfig(states=states, state_weights=(1,) * len(states))
    params = fim.sample_parameters(processes, config, seed=0)
    return params["rates"], params["p0"]


def _expected_jumps(Q, p0, paths: int) -> float:
    return float(systems.expected_jumps(Q, p0, T).sum()) * paths


def _ctmc_case(name, processes, paths, device, with_reference):
    Q, p0 = _fim_processes(processes)
    g = torch.Generator().manual_seed(0)
    x0 = torch.multinomial(p0.float(), paths, replacement=True, generator=g)  # (processes, paths)
    Qd, x0d = Q.to(device), x0.to(device)
    grid = torch.linspace(0, T, L, dtype=torch.float64, device=device)
    jumps = _expected_jumps(Q, p0, paths)
    return Case(
        family="mjp", name=name, shape=f"{processes}x{paths} chains, S=6, L={L}, T={T:g}", dtype=torch.float64,
        ours=lambda: markovkit.simulate_ctmc(Qd, x0d, grid, seed=1),
        reference=(lambda: mjp_ctmc_direct(Qd, x0d, grid)) if with_reference else None,
        bytes=processes * paths * L + x0d.numel() * 8, rate=(jumps, "jumps"),
    )


@cases("mjp")
def ctmc_cases(device: torch.device, quick: bool):
    if quick:
        sizes = [(32, 64)]
    elif device.type == "cpu":
        sizes = [(64, 1024)]
    else:
        sizes = [(64, 1024), (4096, 1024)]  # 65,536 and 4,194,304 chains
    for processes, paths in sizes:
        yield _ctmc_case("ctmc grid", processes, paths, device, with_reference=processes * paths <= 65536)


@cases("mjp")
def fim_cases(device: torch.device, quick: bool):
    """simulate_ctmc at the FIM-MJP training-set size: 45k processes (2-6 states, padded to 6), 300 paths,
    100 grid points, initial states drawn from p0 in the kernel."""
    processes = 100 if quick else (2000 if device.type == "cpu" else 45000)
    Q, p0 = _fim_processes(processes, states=(2, 3, 4, 5, 6))
    Qd, p0d = Q.to(device), p0.to(device)
    grid = torch.linspace(0, T, L, dtype=torch.float64, device=device)
    yield Case(
        family="mjp", name="fim generation", shape=f"{processes}x300 paths, S<=6, L={L}", dtype=torch.float64,
        ours=lambda: markovkit.simulate_ctmc(Qd, None, grid, p0=p0d, paths=300, seed=1),
        bytes=processes * 300 * L, rate=(_expected_jumps(Q, p0, 300), "jumps"),
    )
    # the whole dataset on the device: parameters, paths, masks, noise (4 output bytes per grid point)
    yield Case(
        family="mjp", name="fim dataset (fim.generate)", shape=f"{processes}x300 paths, S<=6, L={L}",
        dtype=torch.float64, ours=lambda: fim.generate(processes, device=device, chunk=5000),
        bytes=processes * 300 * L * 4,
    )


@cases("mjp")
def reaction_cases(device: torch.device, quick: bool):
    """Production, decay and dimerisation: 0 -> P (10), P -> 0 (0.1), 2P -> D (0.01), D -> 2P (1), from 0
    (about 30 reactions per unit time once P settles; quick mode stops at t = 1)."""
    paths = 256 if quick else (4096 if device.type == "cpu" else 262144)
    horizon = 1.0 if quick else T
    reactants = torch.tensor([[0, 0], [1, 0], [2, 0], [0, 1]], device=device)
    products = torch.tensor([[1, 0], [0, 0], [0, 1], [2, 0]], device=device)
    rates = torch.tensor([10.0, 0.1, 0.01, 1.0], dtype=torch.float64, device=device)
    x0 = torch.zeros(1, paths, 2, dtype=torch.long, device=device)
    grid = torch.linspace(0, horizon, L, dtype=torch.float64, device=device)
    yield Case(
        family="mjp", name="reactions grid", shape=f"{paths} paths, 4 reactions, 2 species, L={L}, T={horizon:g}",
        dtype=torch.float64,
        ours=lambda: markovkit.simulate_reactions(reactants, products, rates, x0, grid, seed=1),
        reference=(lambda: mjp_reactions_direct(reactants, products, rates, x0, grid)) if paths <= 65536 else None,
        bytes=paths * L * 2 * 8, rate=(paths, "paths"),
    )


def _gillespy2_ssa(reactants, products, rates, x0, horizon: float, points: int, trajectories: int):
    """A callable running GillesPy2's C++ SSA solver (built here, outside the timing: a few seconds of g++) for
    `trajectories` trajectories of the same network on the same grid; None when gillespy2 is not importable
    or its solver does not build."""
    try:
        import gillespy2
    except ImportError:
        return None
    model = gillespy2.Model(name="network")
    names = [f"s{i}" for i in range(len(x0))]
    model.add_species([gillespy2.Species(name=n, initial_value=int(v)) for n, v in zip(names, x0)])
    for r, k in enumerate(rates.tolist()):
        model.add_parameter(gillespy2.Parameter(name=f"k{r}", expression=k))
        model.add_reaction(gillespy2.Reaction(
            name=f"r{r}", rate=f"k{r}",
            reactants={n: int(a) for n, a in zip(names, reactants[r]) if a},
            products={n: int(b) for n, b in zip(names, products[r]) if b}))
    model.timespan(gillespy2.TimeSpan.linspace(t=horizon, num_points=points))
    # GillesPy2 runs SCons from PATH, else as a module of the resolved base interpreter, which lacks it when
    # this virtual environment is not activated: put the environment's bin first while it builds.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + path
    try:
        solver = gillespy2.SSACSolver(model=model)
    except gillespy2.core.gillespyError.BuildError as error:  # no C++ toolchain: no peer, and say why
        warnings.warn(f"gillespy2 is importable but its C++ SSA solver did not build: {error}")
        return None
    finally:
        os.environ["PATH"] = path
    return lambda: model.run(solver=solver, number_of_trajectories=trajectories, seed=1)


@cases("mjp")
def vilar_cases(device: torch.device, quick: bool):
    """The Vilar oscillator to t = 200 (about 5.6e5 reactions per trajectory), 201 grid points; on the CPU
    (full sizes) against GillesPy2's C++ SSA solver, one process, same trajectories and grid, when importable
    (its time includes starting the solver process and reading its output back, as in published benchmarks)."""
    paths = 2 if quick else (32 if device.type == "cpu" else 4096)
    horizon = 2.0 if quick else 200.0
    network = systems.vilar_oscillator()
    reactants, products, rates, x0 = (t.to(device) for t in network)
    x0 = x0.expand(1, paths, -1).contiguous()
    grid = torch.linspace(0, horizon, 201, dtype=torch.float64, device=device)
    peers = {}
    if device.type == "cpu" and not quick:
        gillespy2 = _gillespy2_ssa(*network, horizon, 201, paths)
        if gillespy2 is not None:
            peers["gillespy2 SSACSolver"] = gillespy2
    yield Case(
        family="mjp", name="vilar oscillator", shape=f"{paths} paths, 16 reactions, 9 species, T={horizon:g}",
        dtype=torch.float64,
        ours=lambda: markovkit.simulate_reactions(reactants, products, rates, x0, grid, seed=1),
        peers=peers, bytes=paths * 201 * 9 * 8, rate=(paths, "trajectories"),
    )

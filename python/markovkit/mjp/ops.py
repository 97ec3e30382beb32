"""Gillespie simulation of Markov jump processes (one rate matrix per process) and of mass-action reaction
networks, by the exact direct method, on CPU and CUDA. Wrappers and fake kernels of the compiled ops.

Randomness: path ``p`` of process ``b`` draws from the Philox stream of ``seed`` at counter
``(draw, ((process_offset + b) << 32) | (path_offset + p))``: draw 0 gives the initial state (when drawn from
``p0``), draw ``k + 1`` the holding time and destination of jump ``k``. A path's output depends only on (seed,
global process id, global path id) and its inputs, so CPU and CUDA agree bit for bit, and so do batches split
into pieces (pass ``process_offset`` = the global id of a piece's first process, ``path_offset`` that of its
first path). Times are fp64 throughout.

Recording: paths start at time 0 and are right-continuous: the value at grid time t is the state entered at
the last jump with time <= t (the initial state when there is none). The ops are not differentiable.
"""
from typing import NamedTuple, Optional

import torch

from markovkit._checks import check_devices
from markovkit.philox import check_position, check_seed


def state_dtype(num_states: int) -> torch.dtype:
    """The smallest integer dtype holding the states 0..num_states-1: uint8, int16 or int32."""
    if num_states <= 256:
        return torch.uint8
    return torch.int16 if num_states <= 32768 else torch.int32


class CtmcEvents(NamedTuple):
    """Every jump of every path, padded to ``max_events`` per path.

    initial: (processes, paths) the state at time 0.
    times: (processes, paths, max_events) fp64 jump times, increasing; +inf after the last recorded one.
    states: (processes, paths, max_events) the state entered at each jump; after the last recorded jump, the
        final state (so ``states[..., k]`` is always the state from ``times[..., k]`` on).
    counts: (processes, paths) int64, jumps recorded (<= max_events).
    overflow: (processes, paths) bool, True when a further jump at time <= t_end happened but was not
        recorded (the record is then cut at max_events jumps; with t_end = inf it means the path never
        got absorbed).
    """

    initial: torch.Tensor
    times: torch.Tensor
    states: torch.Tensor
    counts: torch.Tensor
    overflow: torch.Tensor


def _processes(Q, x0, p0, t_grid) -> int:
    if Q.dim() == 3:
        return Q.shape[0]
    if x0 is not None and x0.dim() == 2:
        return x0.shape[0]
    if p0 is not None and p0.dim() == 2:
        return p0.shape[0]
    if isinstance(t_grid, torch.Tensor) and t_grid.dim() >= 2:
        return t_grid.shape[0]
    return 1


def simulate_ctmc(Q: torch.Tensor, x0: Optional[torch.Tensor], t_grid, *, seed: int,
                  p0: Optional[torch.Tensor] = None, paths: Optional[int] = None, record: str = "grid",
                  max_events: Optional[int] = None, process_offset: int = 0, path_offset: int = 0):
    """Paths of continuous-time Markov chains on the states 0..S-1, each process with its own rates.

    Q: (processes, S, S) or (S, S) shared; off-diagonal rates >= 0, the diagonal is ignored (derived). A state
        whose off-diagonal row is zero is absorbing.
    x0: (processes, paths) integer initial states; or None and p0: (processes, S) or (S,) initial
        distributions (non-negative weights, normalised internally) with ``paths`` paths per process.
    t_grid: record="grid": observation times >= 0, non-decreasing, shape (L,), (processes, L) or
        (processes, paths, L). record="events": the horizon t_end (a float or a one-element tensor;
        ``math.inf`` records exactly ``max_events`` jumps per path, or until absorption). Under torch.compile a
        tensor horizon changes without a new graph; a float is a constant of the graph.
    seed: an int in [-2**63, 2**63), the 64-bit Philox key (a negative seed is its two's complement).
    process_offset, path_offset: the global ids of the first process and path of this call (module docstring):
        pieces of a batch give the batch's paths; process_offset + processes and path_offset + paths <= 2**32.
    Returns record="grid": states (processes, paths, L) in ``state_dtype(S)``; record="events": CtmcEvents.
    Cost: one step per jump, every jump simulated (exact): record="grid" has no cap, so a path with exit rates
    around r runs about r·t_grid[-1] steps (r = 1e8 to t = 1: seconds per path); a call cannot be interrupted.
    """
    if x0 is None and p0 is None:
        raise ValueError("simulate_ctmc: give the initial states x0 or the initial distributions p0")
    if x0 is not None and paths is not None and paths != x0.shape[-1]:
        raise ValueError(f"simulate_ctmc: paths={paths} but x0 has shape {tuple(x0.shape)}")
    if x0 is None and paths is None:
        raise ValueError("simulate_ctmc: with p0, give the number of paths per process (paths=...)")
    check_seed(seed, "simulate_ctmc")
    check_position(process_offset, "process_offset", "simulate_ctmc")
    check_position(path_offset, "path_offset", "simulate_ctmc")
    processes = _processes(Q, x0, p0, t_grid)
    paths = x0.shape[-1] if x0 is not None else paths
    Q, p0 = Q.detach(), None if p0 is None else p0.detach()  # not differentiable: no graph to the outputs
    if record == "grid":
        return torch.ops.markovkit.mjp_ctmc_grid(Q, x0, p0, t_grid, processes, paths, seed, process_offset,
                                                 path_offset)
    if record == "events":
        if max_events is None:
            raise ValueError("simulate_ctmc: record='events' needs max_events (the output is padded to it)")
        if isinstance(t_grid, torch.Tensor) and t_grid.numel() != 1:
            raise ValueError("simulate_ctmc: t_grid: with record='events', expected the horizon t_end (a float or "
                             f"a one-element tensor), got a tensor of shape {tuple(t_grid.shape)}")
        t_end = torch.as_tensor(t_grid, dtype=torch.float64).detach().reshape(()).cpu()
        out = torch.ops.markovkit.mjp_ctmc_events(Q, x0, p0, t_end, processes, paths, max_events, seed,
                                                  process_offset, path_offset)
        return CtmcEvents(*out)
    raise ValueError(f"simulate_ctmc: record must be 'grid' or 'events', got {record!r}")


def simulate_reactions(reactants: torch.Tensor, products: torch.Tensor, rates: torch.Tensor, x0: torch.Tensor,
                       t_grid: torch.Tensor, *, seed: int, process_offset: int = 0,
                       path_offset: int = 0) -> torch.Tensor:
    """Mass-action reaction networks by Gillespie's direct method.

    reactants, products: (R, species) non-negative integer stoichiometries below 2**30 (reaction r turns
        sum_s reactants[r, s] S_s into sum_s products[r, s] S_s); at most 32 species and 128 reactions.
    rates: (processes, R) or (R,) stochastic rate constants k_r >= 0; the propensity is
        k_r prod_s binomial(x_s, reactants[r, s]) (Gillespie's convention: 2A -> B fires at k x (x - 1) / 2).
    x0: (processes, paths, species) integer initial counts.
    t_grid: (L,), (processes, L) or (processes, paths, L) observation times >= 0, non-decreasing.
    seed: an int in [-2**63, 2**63), the 64-bit Philox key (a negative seed is its two's complement).
    process_offset, path_offset: as in simulate_ctmc.
    Returns counts (processes, paths, L, species) int64 (a count past 2**63 - 1 wraps unchecked; an overflowing
    propensity is refused). Cost: one step per reaction event up to t_grid[-1], no cap (as simulate_ctmc's grid
    record); a call cannot be interrupted. A CTMC is the network with one-hot species and one
    reaction S_i -> S_j per nonzero rate Q_ij; listed in row-major (i, j) order it gives the same paths as
    simulate_ctmc for the same seed.
    """
    check_seed(seed, "simulate_reactions")
    check_position(process_offset, "process_offset", "simulate_reactions")
    check_position(path_offset, "path_offset", "simulate_reactions")
    return torch.ops.markovkit.mjp_reactions_grid(reactants, products, rates.detach(), x0, t_grid, seed,
                                                  process_offset, path_offset)


@torch.library.register_fake("markovkit::mjp_ctmc_grid")
def _(Q, x0, p0, t_grid, processes, paths, seed, process_offset=0, path_offset=0):
    check_devices("Q", Q=Q, x0=x0, p0=p0, t_grid=t_grid)
    return Q.new_empty((processes, paths, t_grid.shape[-1]), dtype=state_dtype(Q.shape[-1]))


@torch.library.register_fake("markovkit::mjp_ctmc_events")
def _(Q, x0, p0, t_end, processes, paths, max_events, seed, process_offset=0, path_offset=0):
    check_devices("Q", Q=Q, x0=x0, p0=p0)
    dtype = state_dtype(Q.shape[-1])
    return (
        Q.new_empty((processes, paths), dtype=dtype),
        Q.new_empty((processes, paths, max_events), dtype=torch.float64),
        Q.new_empty((processes, paths, max_events), dtype=dtype),
        Q.new_empty((processes, paths), dtype=torch.int64),
        Q.new_empty((processes, paths), dtype=torch.bool),
    )


@torch.library.register_fake("markovkit::mjp_reactions_grid")
def _(reactants, products, rates, x0, t_grid, seed, process_offset=0, path_offset=0):
    check_devices("x0", reactants=reactants, products=products, rates=rates, x0=x0, t_grid=t_grid)
    return x0.new_empty((x0.shape[0], x0.shape[1], t_grid.shape[-1], x0.shape[2]), dtype=torch.int64)

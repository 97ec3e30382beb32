"""The CUDA Gillespie kernels (csrc/mjp/mjp_kernel.cu) run by the emulator: the same paths as the CPU kernels,
bit for bit (the design promise of mjp.h: same Philox counters, same fp64 operations in the same order).

Launch plans: the CTMC kernel (grid and events records) runs one path per thread up to 2^18 paths, several beyond.
The reaction kernels: fewer than 32 paths per process -> the flat kernel (threads over (process, path)); else
blocks over (process, chunk of paths) with the network and rate constants staged in shared memory when
R (8 + 8 N + R) bytes fit in 48 KiB, read from global memory otherwise; more than 256 paths -> several chunks per
process.
"""
import math

import pytest
import torch

from markovkit.mjp import fim, simulate_ctmc, simulate_reactions, state_dtype
from test_mjp import bad_input_cases

# (processes, paths, S) for the CTMC kernel: few and many paths per process, S from 2 to 257 (int16 states)
CTMC_SIZES = {
    "few paths": (40, 3, 5),             # exit kernel over 200 rows
    "several blocks, S=2": (100, 7, 2),  # 700 paths over 3 blocks of 256
    "few paths, int16": (2, 5, 257),
    "S=6": (3, 37, 6),
    "more paths than a block": (2, 300, 6),
    "S=77": (2, 33, 77),
    "S=78": (2, 33, 78),
    "int16": (1, 260, 257),
}


def rates_with_absorbing(B, S, seed):
    """(B, S, S) sparse random rates with mean exit rate ~1; state 1 absorbs in process 0."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.rand(B, S, S, generator=g, dtype=torch.float64) * (torch.rand(B, S, S, generator=g) < 0.6)
    Q = Q * (2.0 / (0.6 * S))
    Q[0, 1 % S] = 0.0
    return Q


def sorted_grid(*shape, horizon=6.0, seed=0):
    """Non-decreasing times on [0, horizon] with t = 0 first and a repeated time."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.sort(torch.rand(*shape, generator=g, dtype=torch.float64) * horizon, -1).values
    grid[..., 0] = 0.0
    grid[..., 4] = grid[..., 3]
    return grid


def assert_events_equal(a, b):
    for name, x, y in zip(a._fields, a, b):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("size", CTMC_SIZES)
def test_ctmc_grid_equals_the_cpu_kernel(emulated, size):
    """Grid record, bit for bit against the CPU kernel (which picks destinations through jump tables, the CUDA
    kernel by a linear scan and stores the rows through 8-byte words): x0 with per-process Q and a
    (processes, paths, L) grid; p0 with a shared Q and an (L,) grid; x0 with a (processes, L) grid; rows of
    every alignment, shorter than a word and of whole words."""
    B, P, S = CTMC_SIZES[size]
    Q = rates_with_absorbing(B, S, seed=S)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, S, (B, P), generator=g)
    x0[0, 0] = 1 % S  # starts absorbed
    p0 = torch.rand(B, S, generator=g, dtype=torch.float64)
    runs = [
        dict(Q=Q, x0=x0, t_grid=sorted_grid(B, P, 23)),
        dict(Q=Q[-1], x0=None, p0=p0[-1], paths=P, t_grid=sorted_grid(19, seed=1).float(), path_offset=2**32 - P),
        dict(Q=Q.float(), x0=x0, t_grid=sorted_grid(B, 21, seed=2), process_offset=2**32 - B),
        dict(Q=Q, x0=x0, t_grid=sorted_grid(B, 5, seed=3)),  # rows shorter than an 8-byte word
        dict(Q=Q, x0=x0, t_grid=sorted_grid(16, seed=4)),  # rows of whole words
    ]
    for kwargs in runs:
        cpu = simulate_ctmc(seed=2**40 + 7, **kwargs)
        with emulated():
            cuda = simulate_ctmc(seed=2**40 + 7, **kwargs)
        assert cuda.dtype == state_dtype(S) and cuda.shape == cpu.shape
        assert torch.equal(cuda, cpu)
        assert bool((cuda[0, 0] == 1 % S).all()) or kwargs["x0"] is None
        assert len(cuda.unique()) > 1


@pytest.mark.parametrize("record", ["grid", "events"])
def test_ctmc_with_several_paths_per_thread(emulated, record):
    """266,240 paths: threads 0..4095 of the CTMC kernel's 2^18 run a second path, of another process (its own
    rates, grid row and initial draw from p0), after their first."""
    B, P, S = 512, 520, 3
    Q = rates_with_absorbing(B, S, seed=11)
    p0 = torch.rand(B, S, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    t = sorted_grid(B, 6, horizon=3.0, seed=5) if record == "grid" else 3.0
    kwargs = dict(p0=p0, paths=P, seed=3, record=record, max_events=4)
    cpu = simulate_ctmc(Q, None, t, **kwargs)
    with emulated():
        cuda = simulate_ctmc(Q, None, t, **kwargs)
    if record == "grid":
        assert torch.equal(cuda, cpu) and bool((cpu[..., 0] != cpu[..., -1]).any())
    else:
        assert_events_equal(cuda, cpu)
        assert bool(cpu.overflow.any()) and bool((cpu.counts < 4).any())


@pytest.mark.parametrize("size", CTMC_SIZES)
def test_ctmc_events_equal_the_cpu_kernel(emulated, size):
    """Events record (padded to max_events, counts, overflow flag), bit for bit: a horizon with max_events too
    small for some paths, and no horizon (exactly max_events jumps, or absorption)."""
    B, P, S = CTMC_SIZES[size]
    Q = rates_with_absorbing(B, S, seed=S + 1)
    x0 = torch.randint(0, S, (B, P), generator=torch.Generator().manual_seed(2))
    x0[0, 0] = 1 % S
    for t_end, max_events, path_offset in [(4.0, 6, 0), (math.inf, 5, 9)]:
        kwargs = dict(record="events", max_events=max_events, seed=3, path_offset=path_offset)
        cpu = simulate_ctmc(Q, x0, t_end, **kwargs)
        with emulated():
            cuda = simulate_ctmc(Q, x0, t_end, **kwargs)
        assert_events_equal(cuda, cpu)
        assert bool(cpu.overflow.any())
        assert cpu.counts[0, 0] == 0 and not cpu.overflow[0, 0] and bool(torch.isinf(cpu.times[0, 0]).all())


def test_ctmc_grid_on_jump_times_equals_the_cpu_kernel(emulated):
    """Grid times at the paths' jump times and the float64 just below them (random grids never hit one), bit for
    bit; test_mjp.py checks the CPU kernel's states there (the state entered, the one before)."""
    Q = torch.tensor([[0, 1.0, 2.0], [0.5, 0, 0.5], [3.0, 0.1, 0]], dtype=torch.float64)
    x0 = torch.randint(0, 3, (1, 500), generator=torch.Generator().manual_seed(0))
    times = simulate_ctmc(Q, x0, math.inf, seed=7, record="events", max_events=10).times
    grid = torch.stack([torch.nextafter(times, torch.zeros_like(times)), times], -1).flatten(-2)
    cpu = simulate_ctmc(Q, x0, grid, seed=7)
    with emulated():
        assert torch.equal(simulate_ctmc(Q, x0, grid, seed=7), cpu)


def test_ctmc_events_of_a_subnormal_exit_rate(emulated):
    """Exit rate 1e-310: the holding time e / q overflows to +inf, which is no jump (as for q = 0) even with no
    horizon, on both kernels: no event at time inf, no overflow."""
    Q = torch.tensor([[0.0, 1e-310], [1.0, 0.0]], dtype=torch.float64)
    x0 = torch.zeros(1, 3, dtype=torch.long)
    kwargs = dict(record="events", max_events=4, seed=0)
    cpu = simulate_ctmc(Q, x0, math.inf, **kwargs)
    with emulated():
        cuda = simulate_ctmc(Q, x0, math.inf, **kwargs)
    assert_events_equal(cuda, cpu)
    assert bool((cpu.counts == 0).all()) and not bool(cpu.overflow.any()) and bool((cpu.states == 0).all())


def test_ctmc_batch_split_and_empty_shapes(emulated):
    """Two halves (process_offset) equal the whole under emulation, and the whole equals the CPU kernel; zero
    paths, zero grid points and max_events = 0 launch nothing or write nothing."""
    B, P, S = 4, 40, 6
    Q = rates_with_absorbing(B, S, seed=9)
    p0 = torch.rand(B, S, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grid = sorted_grid(B, 17)
    x0 = torch.randint(0, S, (B, P), generator=torch.Generator().manual_seed(4))
    kw = dict(x0=None, paths=P, seed=5)
    cpu = simulate_ctmc(Q, t_grid=grid, p0=p0, **kw)
    events_cpu = simulate_ctmc(Q, t_grid=3.0, p0=p0, record="events", max_events=8, **kw)
    with emulated():
        whole = simulate_ctmc(Q, t_grid=grid, p0=p0, **kw)
        halves = [simulate_ctmc(Q[h], t_grid=grid[h], p0=p0[h], process_offset=h.start, **kw)
                  for h in (slice(0, 1), slice(1, 4))]
        events = simulate_ctmc(Q, t_grid=3.0, p0=p0, record="events", max_events=8, **kw)
        events_halves = [simulate_ctmc(Q[h], t_grid=3.0, p0=p0[h], record="events", max_events=8,
                                       process_offset=h.start, **kw) for h in (slice(0, 2), slice(2, 4))]
        no_paths = simulate_ctmc(Q, torch.zeros(B, 0, dtype=torch.long), grid[0], seed=5)
        no_times = simulate_ctmc(Q, torch.zeros(B, 3, dtype=torch.long), torch.zeros(0), seed=5)
        no_events = simulate_ctmc(Q, x0[:, :9], 1.0, seed=5, record="events", max_events=0)
    assert torch.equal(whole, cpu) and torch.equal(torch.cat(halves), whole)
    assert_events_equal(events, events_cpu)
    for field, a, b in zip(events._fields, events, zip(*events_halves)):
        assert torch.equal(torch.cat(b), a), field
    assert no_paths.shape == (B, 0, 17) and no_times.shape == (B, 3, 0)
    assert_events_equal(no_events, simulate_ctmc(Q, x0[:, :9], 1.0, seed=5, record="events", max_events=0))
    assert no_events.times.shape == (B, 9, 0) and bool((no_events.counts == 0).all())
    assert bool(no_events.overflow.any()) and not bool(no_events.overflow.all())  # jumped before t = 1 or not


def conversion_network(N, R, seed):
    """R reactions on N species: A_i -> A_j and 2 A_i -> A_j conversions, one birth 0 -> A_0 and one death
    A_1 -> 0 (bounded counts); reactants, products (R, N)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, N, (R,), generator=g)
    dst = (src + 1 + torch.randint(0, N - 1, (R,), generator=g)) % N
    eye = torch.eye(N, dtype=torch.long)
    reactants = eye[src] * (1 + (torch.rand(R, generator=g) < 0.3).long().unsqueeze(-1))
    products = eye[dst]
    reactants[0], products[0] = 0, eye[0]
    reactants[1], products[1] = eye[1], 0
    return reactants, products


# (processes, paths, species, reactions): one per launch plan of the reaction launcher
REACTION_PLANS = {
    "flat": (9, 5, 3, 4),
    "staged": (2, 40, 4, 6),
    "staged, chunks": (1, 270, 2, 3),
    "staged, most reactions": (1, 33, 20, 128),   # 128 (8 + 160 + 128) = 37,888 bytes
    "global, largest": (1, 33, 32, 128),          # 128 (8 + 256 + 128) = 50,176 bytes: not staged
    "flat, largest": (2, 3, 32, 128),
}


@pytest.mark.parametrize("plan", REACTION_PLANS)
def test_reactions_equal_the_cpu_kernel(emulated, plan):
    """Counts on the grid, bit for bit: per-process rates (processes, R) with a (processes, paths, L) grid and
    shared rates (R,) with an (L,) grid."""
    B, P, N, R = REACTION_PLANS[plan]
    reactants, products = conversion_network(N, R, seed=R)
    g = torch.Generator().manual_seed(4)
    rates = torch.rand(B, R, generator=g, dtype=torch.float64) * (4.0 / R)
    rates[:, 0] *= R  # births keep the system busy
    x0 = torch.randint(0, 6, (B, P, N), generator=g)
    for k, grid in [(rates, sorted_grid(B, P, 13, horizon=2.0)), (rates[0].float(), sorted_grid(11, horizon=2.0))]:
        cpu = simulate_reactions(reactants, products, k, x0, grid, seed=8)
        with emulated():
            cuda = simulate_reactions(reactants, products, k, x0, grid, seed=8)
        assert torch.equal(cuda, cpu)
        assert bool((cpu[..., 0, :] == x0).all()) and bool((cpu >= 0).all())
        assert not torch.equal(cpu[..., -1, :], x0)


def test_reactions_batch_split(emulated):
    reactants, products = conversion_network(3, 5, seed=1)
    rates = torch.rand(3, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    x0 = torch.randint(0, 4, (3, 34, 3), generator=torch.Generator().manual_seed(5))
    grid = sorted_grid(9, horizon=2.0)
    with emulated():
        whole = simulate_reactions(reactants, products, rates, x0, grid, seed=2)
        head = simulate_reactions(reactants, products, rates[:1], x0[:1], grid, seed=2)
        tail = simulate_reactions(reactants, products, rates[1:], x0[1:], grid, seed=2, process_offset=1)
        later_paths = simulate_reactions(reactants, products, rates, x0[:, 20:], grid, seed=2, path_offset=20)
    assert torch.equal(torch.cat([head, tail]), whole) and torch.equal(later_paths, whole[:, 20:])
    assert torch.equal(whole, simulate_reactions(reactants, products, rates, x0, grid, seed=2))


def test_bad_input_errors_through_the_cuda_glue(emulated):
    """Every input error raised with the CUDA branch of the glue selected: the same message as the CPU branch."""
    for fn, pattern in bad_input_cases():
        messages = []
        for emulate in (False, True):
            with pytest.raises((RuntimeError, ValueError), match=pattern) as error:
                if emulate:
                    with emulated():
                        fn()
                else:
                    fn()
            messages.append(str(error.value))
        assert messages[0] == messages[1]


def test_fim_generation_through_the_cuda_kernels(emulated):
    """markovkit.mjp.fim with every op on its CUDA kernel (Philox parameters, paths, masks, noise): the CPU dataset,
    bit for bit (the torch code around the ops is the same on both devices)."""
    config = fim.FimConfig(paths=9)
    cpu = fim.generate(7, config, seed=3, chunk=4)
    with emulated():
        cuda = fim.generate(7, config, seed=3, chunk=7)
    for name in ("rates", "initial_distribution", "states", "observations", "mask"):
        assert torch.equal(cpu[name], cuda[name]), name

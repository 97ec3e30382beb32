"""Gillespie simulators: exact statistical tests against fp64 oracles (expm, analytic moments), recording and
reproducibility invariants, op contract (opcheck, torch.compile) and input errors.

Every statistical test has a false-alarm rate of at most ALPHA (Bonferroni over its sub-tests), so this file
fails by chance with probability < 1e-3; the seeds are fixed, so a pass is reproducible.
"""
import math

import numpy as np
import pytest
import scipy.stats
import torch

import markovkit
from markovkit.mjp import simulate_ctmc, simulate_reactions, state_dtype, systems
from markovkit.reference import mjp_ctmc_direct
from conftest import HAS_CUDA

ALPHA = 1e-4


def chi2_pvalue(counts, probs) -> float:
    """Pearson's goodness-of-fit p-value of `counts` against `probs`; cells with expectation < 5 are merged."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    expected = np.asarray(probs, dtype=np.float64).ravel() * counts.sum()
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
        if expected[-1] == 0:
            assert counts[-1] == 0, "counts in cells of probability 0"
            counts, expected = counts[:-1], expected[:-1]
    if len(counts) < 2:
        return 1.0
    return float(scipy.stats.chi2.sf(((counts - expected) ** 2 / expected).sum(), len(counts) - 1))


def z_pvalue(sample, mean) -> float:
    """Two-sided p-value of the sample mean against `mean` (CLT, sample standard deviation)."""
    sample = np.asarray(sample, dtype=np.float64)
    z = (sample.mean() - mean) / (sample.std(ddof=1) / math.sqrt(len(sample)))
    return float(2 * scipy.stats.norm.sf(abs(z)))


def assert_all_pass(pvalues: dict, alpha=ALPHA):
    worst = min(pvalues, key=pvalues.get)
    assert pvalues[worst] > alpha / len(pvalues), f"{worst}: p = {pvalues[worst]:.3g} ({len(pvalues)} tests)"


def ratchets(*Vs):
    return torch.stack([systems.flashing_ratchet(V) for V in Vs])


# --- CTMC: exact distributions -------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["x0", "p0"])
def test_marginals_and_pairs_match_expm(device, init):
    """X(t_k) ~ p0 expm(Q t_k), each time on its own disjoint block of paths, and (X(s), X(t)) ~
    p_i(s) expm(Q (t - s))_ij on another block; two processes with different Q."""
    Q = ratchets(1.0, 2.0)
    times = torch.linspace(0.1, 2.5, 25, dtype=torch.float64)
    block, pair_block = 4000, 20000
    paths = block * len(times) + pair_block
    if init == "x0":
        p0 = torch.eye(6, dtype=torch.float64)[0].expand(2, 6)
        kwargs = dict(x0=torch.zeros(2, paths, dtype=torch.long, device=device))
    else:
        weights = torch.tensor([1.0, 2.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
        p0 = (weights / weights.sum()).expand(2, 6)
        kwargs = dict(x0=None, p0=weights.to(device), paths=paths)
    states = simulate_ctmc(Q.to(device), t_grid=times.to(device), seed=5, **kwargs).long().cpu()
    exact = systems.marginals(Q, p0, times)  # (2, L, 6)
    pvalues = {}
    for b in range(2):
        for k in range(len(times)):
            x = states[b, k * block:(k + 1) * block, k]
            pvalues[f"process {b} t={times[k]:.1f}"] = chi2_pvalue(torch.bincount(x, minlength=6), exact[b, k])
        s, t = 9, 14  # times 1.0 and 1.5
        x = states[b, -pair_block:]
        pairs = torch.bincount(x[:, s] * 6 + x[:, t], minlength=36)
        joint = exact[b, s].unsqueeze(-1) * torch.linalg.matrix_exp(systems.generator(Q[b]) * (times[t] - times[s]))
        pvalues[f"process {b} pair"] = chi2_pvalue(pairs, joint)
    assert_all_pass(pvalues)


def jumps_from_events(events):
    """(source, destination, holding time) of every recorded jump, flattened over processes and paths."""
    prev = torch.cat([events.initial.unsqueeze(-1), events.states[..., :-1]], -1).long()
    start = torch.cat([torch.zeros_like(events.times[..., :1]), events.times[..., :-1]], -1)
    ok = torch.isfinite(events.times)
    return prev[ok], events.states.long()[ok], (events.times - start)[ok]


def test_jump_chain_and_holding_times(device):
    """Event-count mode (no horizon, 40 jumps per path): destinations from i ~ Multinomial(K_i.), holding
    times in i ~ Exp(q_i) (exact Gamma test of the sum and KS), holding time independent of destination."""
    Q = systems.flashing_ratchet(1.0)
    x0 = torch.arange(6000, device=device).remainder(6).reshape(1, -1)
    events = simulate_ctmc(Q.to(device), x0, math.inf, seed=11, record="events", max_events=40)
    assert bool(events.overflow.all()) and bool((events.counts == 40).all())
    src, dst, tau = (v.cpu() for v in jumps_from_events(events))
    q = -Q.diagonal()
    pvalues = {}
    for i in range(6):
        here = src == i
        K = (Q[i] / q[i]).clamp_min(0)
        pvalues[f"jump chain from {i}"] = chi2_pvalue(torch.bincount(dst[here], minlength=6), K)
        scaled = (tau[here] * q[i]).numpy()
        g = scipy.stats.gamma.cdf(scaled.sum(), len(scaled))
        pvalues[f"holding sum in {i}"] = 2 * min(g, 1 - g)
        pvalues[f"holding KS in {i}"] = scipy.stats.kstest(scaled, "expon").pvalue
        quartile = np.searchsorted(scipy.stats.expon.ppf([0.25, 0.5, 0.75]), scaled)
        table = np.zeros((6, 4))
        np.add.at(table, (dst[here].numpy(), quartile), 1)
        table = table[table.sum(1) > 0]
        pvalues[f"holding vs destination in {i}"] = scipy.stats.chi2_contingency(table).pvalue
    assert_all_pass(pvalues)


def test_mean_jump_count(device):
    """E N(2.5) from state 0 of the V = 1 ratchet is int_0^2.5 p(t) . q dt = 6.8467."""
    Q = systems.flashing_ratchet(1.0)
    e0 = torch.eye(6, dtype=torch.float64)[0]
    exact = systems.expected_jumps(Q, e0, 2.5).item()
    assert abs(exact - 6.8467) < 1e-4
    x0 = torch.zeros(1, 20000, dtype=torch.long, device=device)
    events = simulate_ctmc(Q.to(device), x0, 2.5, seed=3, record="events", max_events=64)
    assert not bool(events.overflow.any())
    assert bool((events.times[..., :1] > 0).all()) and float(events.times[torch.isfinite(events.times)].max()) <= 2.5
    assert z_pvalue(events.counts.double().cpu(), exact) > ALPHA


def test_ratchet_stationary_distribution_and_entropy_production(device):
    """Reference values of the notes; then from p0 = pi: occupation fractions on [0, T] have mean pi exactly,
    and (1/T) sum over jumps of ln(Q_ij / Q_ji) has mean equal to the entropy production rate."""
    table = {1: ([0.30119, 0.13654, 0.06227, 0.20030, 0.15914, 0.14057], 0.1792),
             2: ([0.39641, 0.08428, 0.01931, 0.22410, 0.14607, 0.12983], 0.5656),
             3: ([0.44744, 0.04633, 0.00623, 0.23686, 0.13658, 0.12656], 0.9927)}
    for V, (pi, ep) in table.items():
        Q = systems.flashing_ratchet(V)
        torch.testing.assert_close(systems.stationary_distribution(Q), torch.tensor(pi, dtype=torch.float64),
                                   atol=6e-6, rtol=0)
        assert abs(systems.entropy_production(Q).item() - ep) < 1e-4
    assert systems.entropy_production(systems.flashing_ratchet(0.0)).abs().item() < 1e-12
    Q = systems.flashing_ratchet(1.0)
    pi = systems.stationary_distribution(Q)
    T, paths = 20.0, 4000
    events = simulate_ctmc(Q.to(device), None, T, p0=pi.to(device), paths=paths, seed=21, record="events",
                           max_events=250)
    assert not bool(events.overflow.any())
    ends = torch.cat([events.times, torch.full_like(events.times[..., :1], math.inf)], -1).clamp_max(T)
    starts = torch.cat([torch.zeros_like(events.times[..., :1]), events.times], -1).clamp_max(T)
    visited = torch.cat([events.initial.unsqueeze(-1), events.states], -1).long()
    occupancy = torch.zeros(1, paths, 6, dtype=torch.float64, device=device)
    occupancy.scatter_add_(-1, visited, (ends - starts) / T)
    src, dst, _ = jumps_from_events(events)
    log_ratio = torch.log(Q.to(device)[src, dst] / Q.to(device)[dst, src])
    path_of_jump = torch.arange(paths, device=device).unsqueeze(-1).expand(paths, 250)[torch.isfinite(events.times[0])]
    ep = torch.zeros(paths, dtype=torch.float64, device=device).index_add_(0, path_of_jump, log_ratio) / T
    pvalues = {f"occupancy of {i}": z_pvalue(occupancy[0, :, i].cpu(), pi[i].item()) for i in range(6)}
    pvalues["entropy production"] = z_pvalue(ep.cpu(), systems.entropy_production(Q).item())
    assert_all_pass(pvalues)


def test_absorbing_states(device):
    """0 -> 1 (rate 1), 0 -> 2 (rate 1), 2 -> 1 (rate 0.5); 1 absorbs."""
    Q = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    x0 = torch.zeros(1, 8000, dtype=torch.long, device=device)
    states = simulate_ctmc(Q.to(device), x0, torch.tensor([0.0, 1.0, 30.0], device=device), seed=1).long().cpu()
    assert bool((states[..., 0] == 0).all())
    exact = systems.marginals(Q, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([1.0]))[0]
    assert chi2_pvalue(torch.bincount(states[0, :, 1], minlength=3), exact) > ALPHA
    assert bool((states[0, states[0, :, 1] == 1, 2] == 1).all())
    events = simulate_ctmc(Q.to(device), x0, math.inf, seed=1, record="events", max_events=5)
    assert not bool(events.overflow.any()) and bool((events.counts >= 1).all() & (events.counts <= 2).all())
    assert bool((events.states[..., -1] == 1).all()) and bool(torch.isinf(events.times[..., 2:]).all())


def test_output_dtype_holds_the_states(device):
    assert [state_dtype(n) for n in (2, 256, 257, 32768, 32769)] == [torch.uint8] * 2 + [torch.int16] * 2 + [torch.int32]
    S = 300  # a ring 0 -> 1 -> ... -> 299 -> 0 at rate 100: from 250, states past 255 within 0.1
    Q = torch.diag(torch.full((S - 1,), 100.0), 1)
    Q[-1, 0] = 100.0
    x0 = torch.full((1, 64), 250, dtype=torch.long, device=device)
    states = simulate_ctmc(Q.to(device), x0, torch.linspace(0, 1, 11, device=device), seed=0)
    assert states.dtype == torch.int16 and int(states.max()) > 255 and int(states.min()) >= 0
    small = simulate_ctmc(systems.protein_folding().to(device), x0[:, :4] * 0, torch.ones(3, device=device), seed=0)
    assert small.dtype == torch.uint8


# --- CTMC: recording and reproducibility ---------------------------------------------------------------------


def random_rates(B, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    rates = torch.rand(B, S, S, generator=g, dtype=torch.float64)
    return rates * (torch.rand(B, S, S, generator=g) < 0.7)


def test_grid_record_equals_event_record(device):
    """Same seed, same path: the grid value at t is the state after the last event at or before t (RCLL),
    including duplicated grid times and t = 0; grid shapes (L,), (processes, L), (processes, paths, L) agree."""
    B, P, S, L = 4, 300, 5, 40
    Q = random_rates(B, S).to(device)
    g = torch.Generator().manual_seed(1)
    grid = torch.sort(torch.rand(B, P, L, generator=g, dtype=torch.float64) * 4, -1).values
    grid[..., 0] = 0.0
    grid[..., 5] = grid[..., 6]
    grid = grid.to(device)
    x0 = torch.randint(0, S, (B, P), generator=g).to(device)
    states = simulate_ctmc(Q, x0, grid, seed=9)
    events = simulate_ctmc(Q, x0, 4.0, seed=9, record="events", max_events=200)
    assert not bool(events.overflow.any())
    idx = torch.searchsorted(events.times, grid, right=True)  # events at or before each grid time
    after = torch.cat([events.initial.unsqueeze(-1), events.states], -1).gather(-1, idx)
    assert torch.equal(states, after)
    assert torch.equal(states[..., 0], x0.to(states.dtype))
    shared = simulate_ctmc(Q, x0, grid[0, 0], seed=9)
    per_process = simulate_ctmc(Q, x0, grid[:, 0], seed=9)
    assert torch.equal(shared, simulate_ctmc(Q, x0, grid[0, 0].expand(B, P, L), seed=9))
    assert torch.equal(per_process, simulate_ctmc(Q, x0, grid[:, :1].expand(B, P, L), seed=9))


@pytest.mark.parametrize("record", ["grid", "events"])
def test_batch_split_invariance(device, record):
    """Processes split over calls (with process_offset), or fewer paths, give the same paths; shared Q equals
    the same Q repeated per process."""
    B, P, S = 6, 50, 4
    Q = random_rates(B, S, seed=2).to(device)
    p0 = torch.rand(B, S, dtype=torch.float64).to(device)
    t = 3.0 if record == "events" else torch.linspace(0, 3, 13, device=device)
    kw = dict(seed=77, record=record, max_events=100)

    def run(Q, p0, paths, offset=0):
        out = simulate_ctmc(Q, None, t, p0=p0, paths=paths, process_offset=offset, **kw)
        return out if record == "grid" else torch.cat([out.initial.unsqueeze(-1).double(), out.times,
                                                       out.states.double(), out.counts.unsqueeze(-1).double()], -1)

    full = run(Q, p0, P)
    assert torch.equal(torch.cat([run(Q[:2], p0[:2], P), run(Q[2:], p0[2:], P, offset=2)]), full)
    assert torch.equal(run(Q, p0, 17), full[:, :17])
    assert torch.equal(run(Q[3:4], p0[3:4], P, offset=3), full[3:4])
    shared = simulate_ctmc(Q[0], None, t, p0=p0[0], paths=P, **kw)
    repeated = simulate_ctmc(Q[:1].expand(3, S, S), None, t, p0=p0[:1].expand(3, S), paths=P, **kw)
    first = shared if record == "grid" else shared.times
    assert torch.equal(first, (repeated if record == "grid" else repeated.times)[:1])


def test_reference_direct_method_matches_expm():
    """The eager reference (the benchmarks' peer) samples the right marginal."""
    Q = ratchets(1.0)
    x0 = torch.zeros(1, 6000, dtype=torch.long)
    states = mjp_ctmc_direct(Q, x0, torch.tensor([0.5, 2.5]), torch.Generator().manual_seed(0))
    exact = systems.marginals(Q[0], torch.eye(6, dtype=torch.float64)[0], torch.tensor([0.5, 2.5]))
    pvalues = {f"half {h}": chi2_pvalue(torch.bincount(states[0, h * 3000:(h + 1) * 3000, h], minlength=6), exact[h])
               for h in range(2)}
    assert_all_pass(pvalues)

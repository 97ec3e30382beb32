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
from markovkit.reference import mjp_ctmc_direct, mjp_reactions_direct
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


def test_protein_folding_stationary_distribution():
    pi = systems.stationary_distribution(systems.protein_folding())
    assert (pi - torch.tensor([0.752, 0.248], dtype=torch.float64)).abs().max() < 1e-3


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
    dtypes = [state_dtype(n) for n in (2, 256, 257, 32768, 32769)]
    assert dtypes == [torch.uint8] * 2 + [torch.int16] * 2 + [torch.int32]
    S = 300  # a ring 0 -> 1 -> ... -> 299 -> 0 at rate 100: from 250, states past 255 within 0.1
    Q = torch.diag(torch.full((S - 1,), 100.0), 1)
    Q[-1, 0] = 100.0
    x0 = torch.full((1, 64), 250, dtype=torch.long, device=device)
    states = simulate_ctmc(Q.to(device), x0, torch.linspace(0, 1, 11, device=device), seed=0)
    assert states.dtype == torch.int16 and int(states.max()) > 255 and int(states.min()) >= 0
    small = simulate_ctmc(systems.protein_folding().to(device), x0[:, :4] * 0, torch.ones(3, device=device), seed=0)
    assert small.dtype == torch.uint8
    empty = simulate_ctmc(Q.to(device), x0[:, :0].expand(3, 0), torch.ones(3, device=device), seed=0)
    assert empty.shape == (3, 0, 3)


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


@pytest.mark.parametrize("paths,S", [(1, 4), (3, 4), (37, 4), (37, 40)])
def test_grid_record_on_long_grids(device, paths, S):
    """Fewer paths than the CPU kernel interleaves, dense grids (many points between jumps, blocks and a
    tail), repeated times, an absorbing state, and more states than the CPU kernel's linear destination
    search takes: the grid record is still the event record read at the grid times."""
    if S == 4:
        Q = torch.tensor([[0.0, 0.3, 0.0, 0.1], [0.2, 0.0, 0.05, 0.0], [0.0, 0.0, 0.0, 0.0], [0.4, 0.0, 0.6, 0.0]],
                         dtype=torch.float64)
    else:
        Q = random_rates(1, S, seed=5)[0] / S
        Q[2] = 0.0
    Q = Q.to(device)
    g = torch.Generator().manual_seed(3)
    grid = torch.sort(torch.rand(2, 203, generator=g, dtype=torch.float64) * 30, -1).values
    grid[:, 100:110] = grid[:, 100:101]
    grid = grid.to(device)
    x0 = torch.randint(0, S, (2, paths), generator=g).to(device)
    states = simulate_ctmc(Q, x0, grid, seed=4)
    events = simulate_ctmc(Q, x0, 30.0, seed=4, record="events", max_events=400)
    assert not bool(events.overflow.any())
    idx = torch.searchsorted(events.times, grid.unsqueeze(1).expand(2, paths, 203).contiguous(), right=True)
    after = torch.cat([events.initial.unsqueeze(-1), events.states], -1).gather(-1, idx)
    assert torch.equal(states, after)


@pytest.mark.parametrize("record", ["grid", "events"])
def test_batch_split_invariance(device, record):
    """Processes or paths split over calls (with process_offset, path_offset), or fewer paths, give the same paths;
    shared Q equals the same Q repeated per process."""
    B, P, S = 6, 50, 4
    Q = random_rates(B, S, seed=2).to(device)
    p0 = torch.rand(B, S, dtype=torch.float64).to(device)
    t = 3.0 if record == "events" else torch.linspace(0, 3, 13, device=device)
    kw = dict(seed=77, record=record, max_events=100)

    def run(Q, p0, paths, offset=0, path_offset=0):
        out = simulate_ctmc(Q, None, t, p0=p0, paths=paths, process_offset=offset, path_offset=path_offset, **kw)
        return out if record == "grid" else torch.cat([out.initial.unsqueeze(-1).double(), out.times,
                                                       out.states.double(), out.counts.unsqueeze(-1).double()], -1)

    full = run(Q, p0, P)
    assert torch.equal(torch.cat([run(Q[:2], p0[:2], P), run(Q[2:], p0[2:], P, offset=2)]), full)
    assert torch.equal(run(Q, p0, 17), full[:, :17])
    assert torch.equal(run(Q, p0, P - 17, path_offset=17), full[:, 17:])  # paths split over calls
    assert not torch.equal(run(Q, p0, P - 17), full[:, 17:])
    assert torch.equal(run(Q[3:4], p0[3:4], P, offset=3), full[3:4])
    shared = simulate_ctmc(Q[0], None, t, p0=p0[0], paths=P, **kw)
    repeated = simulate_ctmc(Q[:1].expand(3, S, S), None, t, p0=p0[:1].expand(3, S), paths=P, **kw)
    first = shared if record == "grid" else shared.times
    assert torch.equal(first, (repeated if record == "grid" else repeated.times)[:1])


def test_grid_times_on_jump_times_read_the_state_entered(device):
    """RCLL at the jump times themselves: a grid time equal to a path's jump time reads the state the jump entered,
    the float64 just below it the state before (random grids never hit a jump time: `<` for `<=` passed them)."""
    Q = torch.tensor([[0, 1.0, 2.0], [0.5, 0, 0.5], [3.0, 0.1, 0]], dtype=torch.float64, device=device)
    x0 = torch.randint(0, 3, (1, 2000), generator=torch.Generator().manual_seed(0)).to(device)
    events = simulate_ctmc(Q, x0, math.inf, seed=7, record="events", max_events=10)
    below = torch.nextafter(events.times, torch.zeros_like(events.times))
    states = simulate_ctmc(Q, x0, torch.stack([below, events.times], -1).flatten(-2), seed=7).long()
    before = torch.cat([events.initial.unsqueeze(-1), events.states[..., :-1]], -1).long()
    assert torch.equal(states[..., 1::2], events.states.long()) and torch.equal(states[..., 0::2], before)


def test_high_order_reaction_fires_at_its_rate(device):
    """1100 A -> 0 from 1100 molecules: propensity k C(1100, 1100) = k (the binomial's running product once passed
    C(1100, 550) ~ 1e329 and the call refused an 'overflowed' propensity). P(fired by t = 1) = 1 - e^-k."""
    k, paths = 0.7, 4000
    reactants, products = torch.tensor([[1100]], device=device), torch.tensor([[0]], device=device)
    rates = torch.tensor([k], dtype=torch.float64, device=device)
    counts = simulate_reactions(reactants, products, rates, torch.full((1, paths, 1), 1100, device=device),
                                torch.tensor([0.0, 1.0], device=device), seed=3)
    assert set(counts[0, :, 0, 0].tolist()) == {1100} and set(counts[0, :, 1, 0].tolist()) <= {0, 1100}
    fired = (counts[0, :, 1, 0] == 0).sum().item()
    p = 1 - math.exp(-k)
    assert abs(fired - paths * p) < 5 * math.sqrt(paths * p * (1 - p))


def test_reference_direct_method_matches_expm():
    """The eager reference (the benchmarks' peer) samples the right marginal."""
    Q = ratchets(1.0)
    x0 = torch.zeros(1, 6000, dtype=torch.long)
    states = mjp_ctmc_direct(Q, x0, torch.tensor([0.5, 2.5]), torch.Generator().manual_seed(0))
    exact = systems.marginals(Q[0], torch.eye(6, dtype=torch.float64)[0], torch.tensor([0.5, 2.5]))
    pvalues = {f"half {h}": chi2_pvalue(torch.bincount(states[0, h * 3000:(h + 1) * 3000, h], minlength=6), exact[h])
               for h in range(2)}
    assert_all_pass(pvalues)


# --- reaction networks ---------------------------------------------------------------------------------------


def test_birth_death_network_is_poisson(device):
    """0 -> A (k1), A -> 0 (k2) from A = 0: A(t) ~ Poisson(k1/k2 (1 - exp(-k2 t))); two processes with their
    own rates, each time on a disjoint block of paths: distribution, mean and variance."""
    reactants, products = torch.tensor([[0], [1]]), torch.tensor([[1], [0]])
    rates = torch.tensor([[10.0, 1.0], [3.0, 0.5]], dtype=torch.float64)
    times = torch.tensor([0.2, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    block = 3000
    x0 = torch.zeros(2, block * len(times), 1, dtype=torch.long)
    counts = simulate_reactions(reactants.to(device), products.to(device), rates.to(device), x0.to(device),
                                times.to(device), seed=8)[..., 0].cpu()
    pvalues = {}
    for b in range(2):
        k1, k2 = rates[b].tolist()
        for k, t in enumerate(times.tolist()):
            x = counts[b, k * block:(k + 1) * block, k].numpy()
            mu = k1 / k2 * (1 - math.exp(-k2 * t))
            support = np.arange(x.max() + 2)
            probs = scipy.stats.poisson.pmf(support, mu)
            probs[-1] = scipy.stats.poisson.sf(support[-2], mu)  # the last cell is the tail
            pvalues[f"process {b} t={t} distribution"] = chi2_pvalue(np.bincount(x, minlength=len(support)), probs)
            pvalues[f"process {b} t={t} mean"] = z_pvalue(x, mu)
            var_z = (x.var(ddof=1) - mu) / math.sqrt((mu + 2 * mu * mu) / len(x))  # Var S^2 ~ (mu4 - s^4) / n
            pvalues[f"process {b} t={t} variance"] = float(2 * scipy.stats.norm.sf(abs(var_z)))
    assert_all_pass(pvalues)


def test_dimerization_matches_finite_state_projection(device):
    """2A <-> B (k_f for 2A -> B at k_f A (A - 1) / 2, k_b B) from (A, B) = (10, 0): B(t) against expm of the
    6-state generator; A + 2B is conserved."""
    kf, kb = 0.2, 1.0
    Q = torch.zeros(6, 6, dtype=torch.float64)
    for b in range(6):
        a = 10 - 2 * b
        if b < 5:
            Q[b, b + 1] = kf * a * (a - 1) / 2
        if b > 0:
            Q[b, b - 1] = kb * b
    times = torch.tensor([0.1, 0.3, 1.0, 3.0], dtype=torch.float64)
    block = 5000
    x0 = torch.tensor([10, 0]).expand(1, block * len(times), 2)
    reactants, products = torch.tensor([[2, 0], [0, 1]]), torch.tensor([[0, 1], [2, 0]])
    counts = simulate_reactions(reactants.to(device), products.to(device), torch.tensor([kf, kb], device=device),
                                x0.to(device), times.to(device), seed=4).cpu()
    assert bool((counts[..., 0] + 2 * counts[..., 1] == 10).all())
    exact = systems.marginals(Q, torch.eye(6, dtype=torch.float64)[0], times)
    pvalues = {f"t={t}": chi2_pvalue(torch.bincount(counts[0, k * block:(k + 1) * block, k, 1], minlength=6), exact[k])
               for k, t in enumerate(times.tolist())}
    assert_all_pass(pvalues)


def one_hot_network(Q):
    """The CTMC Q (B, S, S) as a reaction network: reaction S_i -> S_j for every i != j in row-major order."""
    S = Q.shape[-1]
    pairs = [(i, j) for i in range(S) for j in range(S) if i != j]
    eye = torch.eye(S, dtype=torch.long)
    reactants = torch.stack([eye[i] for i, _ in pairs])
    products = torch.stack([eye[j] for _, j in pairs])
    rates = torch.stack([Q[:, i, j] for i, j in pairs], -1)
    return reactants, products, rates


def test_ctmc_equals_its_reaction_network(device):
    """Same seed: the one-hot reaction network reproduces the CTMC's paths exactly (same uniforms, same
    cumulative sums), hence also its distribution."""
    B, P, S = 3, 400, 5
    Q = random_rates(B, S, seed=4)
    reactants, products, rates = one_hot_network(Q)
    x0 = torch.randint(0, S, (B, P), generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(0, 5, 21, dtype=torch.float64)
    states = simulate_ctmc(Q.to(device), x0.to(device), grid.to(device), seed=12)
    counts = simulate_reactions(reactants.to(device), products.to(device), rates.to(device),
                                torch.nn.functional.one_hot(x0, S).to(device), grid.to(device), seed=12)
    assert bool((counts.sum(-1) == 1).all())
    assert torch.equal(counts.argmax(-1).to(states.dtype), states)


def test_vilar_oscillator_conserves_its_genes(device):
    """DA + DA' = 1 and DR + DR' = 1 along every path; counts stay >= 0; the repressor R oscillates."""
    reactants, products, rates, x0 = (t.to(device) for t in systems.vilar_oscillator())
    grid = torch.linspace(0, 50, 101, device=device)
    counts = simulate_reactions(reactants, products, rates, x0.expand(1, 8, 9), grid, seed=3)[0].cpu()
    assert bool((counts[..., 0] + counts[..., 1] == 1).all() & (counts[..., 2] + counts[..., 3] == 1).all())
    assert bool((counts >= 0).all())
    assert int(counts[..., 7].max()) > 500 and int(counts[:, 50:, 7].min()) < 50


def test_reactions_batch_split_invariance(device):
    reactants, products = torch.tensor([[0, 0], [1, 0], [1, 0], [0, 1]]), torch.tensor([[1, 0], [0, 0], [1, 1], [0, 0]])
    rates = torch.rand(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 5
    x0 = torch.randint(0, 5, (5, 30, 2), generator=torch.Generator().manual_seed(3))
    args = [t.to(device) for t in (reactants, products, rates, x0)]
    grid = torch.linspace(0, 2, 9, device=device)
    full = simulate_reactions(*args, grid, seed=1)
    head = simulate_reactions(*args[:2], args[2][:2], args[3][:2], grid, seed=1)
    tail = simulate_reactions(*args[:2], args[2][2:], args[3][2:], grid, seed=1, process_offset=2)
    assert torch.equal(torch.cat([head, tail]), full)
    assert torch.equal(simulate_reactions(*args[:3], args[3][:, :7], grid, seed=1), full[:, :7])
    assert torch.equal(simulate_reactions(*args[:3], args[3][:, 7:], grid, seed=1, path_offset=7), full[:, 7:])
    assert not torch.equal(simulate_reactions(*args, grid, seed=2), full)


# --- devices, op contract, errors ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cpu_and_cuda_paths_are_identical():
    B, P, S = 7, 700, 6  # 700 paths: three blocks per process in the CUDA reaction kernel
    Q = random_rates(B, S, seed=5)
    Q[2, 3] = 0  # an absorbing state in process 2
    p0 = torch.rand(B, S, dtype=torch.float64)
    grid = torch.sort(torch.rand(B, P, 50, dtype=torch.float64) * 8, -1).values
    for record, t in [("grid", grid), ("grid", grid[0, 0]), ("events", 8.0), ("events", math.inf)]:
        kw = dict(p0=p0, paths=P, seed=2**40 + 3, record=record, max_events=60, process_offset=5)
        cpu = simulate_ctmc(Q, None, t, **kw)
        cuda = simulate_ctmc(Q.cuda(), None, t.cuda() if torch.is_tensor(t) else t, **{**kw, "p0": p0.cuda()})
        for a, b in zip(*(([cpu], [cuda]) if record == "grid" else (cpu, cuda))):
            assert torch.equal(a, b.cpu()), record
    # 2.56M paths: the CUDA grid kernel runs 8 paths per thread.
    Q_many, x0_many = random_rates(64, S, seed=7), torch.randint(0, S, (64, 40000))
    grid_many = torch.linspace(0, 5, 11, dtype=torch.float64)
    cpu = simulate_ctmc(Q_many, x0_many, grid_many, seed=4)
    assert torch.equal(simulate_ctmc(Q_many.cuda(), x0_many.cuda(), grid_many.cuda(), seed=4).cpu(), cpu)
    reactants, products, rates = one_hot_network(Q)
    reactants = torch.cat([reactants, torch.tensor([[2, 0, 0, 0, 0, 0]])])  # a dimerisation-like channel
    products = torch.cat([products, torch.tensor([[0, 1, 0, 0, 0, 0]])])
    rates = torch.cat([rates, torch.full((B, 1), 0.01, dtype=torch.float64)], -1)
    x0 = torch.randint(0, 20, (B, P, S))
    cpu = simulate_reactions(reactants, products, rates, x0, grid, seed=6)
    cuda = simulate_reactions(reactants.cuda(), products.cuda(), rates.cuda(), x0.cuda(), grid.cuda(), seed=6)
    assert torch.equal(cpu, cuda.cpu())
    # Few paths per process: the flat CUDA reaction kernel.
    Q, x0 = random_rates(300, S, seed=6), torch.randint(0, S, (300, 3))
    for record, t in [("grid", grid[0, 0]), ("events", 8.0)]:
        cpu = simulate_ctmc(Q, x0, t, seed=9, record=record, max_events=60)
        cuda = simulate_ctmc(Q.cuda(), x0.cuda(), t.cuda() if torch.is_tensor(t) else t, seed=9, record=record,
                             max_events=60)
        for a, b in zip(*(([cpu], [cuda]) if record == "grid" else (cpu, cuda))):
            assert torch.equal(a, b.cpu()), record
    reactants, products, rates = one_hot_network(Q)
    x0 = torch.nn.functional.one_hot(x0, S)
    cpu = simulate_reactions(reactants, products, rates, x0, grid[0, 0], seed=6)
    cuda = simulate_reactions(reactants.cuda(), products.cuda(), rates.cuda(), x0.cuda(), grid[0, 0].cuda(), seed=6)
    assert torch.equal(cpu, cuda.cpu())


def test_opcheck(device):
    Q = random_rates(2, 4).to(device)
    x0 = torch.randint(0, 4, (2, 5)).to(device)
    p0 = torch.rand(4, dtype=torch.float64, device=device)
    grid = torch.linspace(0, 1, 6, device=device)
    ops = torch.ops.markovkit
    torch.library.opcheck(ops.mjp_ctmc_grid, (Q, x0, None, grid, 2, 5, 3, 0))
    torch.library.opcheck(ops.mjp_ctmc_grid, (Q[0].float(), None, p0, grid.expand(2, 5, 6), 2, 5, 3, 1, 7))
    torch.library.opcheck(ops.mjp_ctmc_events, (Q, None, p0, torch.tensor(2.0, dtype=torch.float64), 2, 5, 8, 3, 0, 7))
    reactants, products, rates = (t.to(device) for t in one_hot_network(Q.cpu()))
    x_counts = torch.randint(0, 3, (2, 5, 4), device=device)
    torch.library.opcheck(ops.mjp_reactions_grid, (reactants, products, rates, x_counts, grid, 3, 0, 7))


def test_compile_fullgraph(device):
    Q = random_rates(3, 4).to(device)
    x0 = torch.randint(0, 4, (3, 16)).to(device)
    grid = torch.linspace(0, 2, 5, device=device)
    reactants, products, rates = (t.to(device) for t in one_hot_network(Q.cpu()))

    def f(Q, x0, grid):
        states = simulate_ctmc(Q, x0, grid, seed=1)
        events = simulate_ctmc(Q, x0, 2.0, seed=1, record="events", max_events=12)
        counts = simulate_reactions(reactants, products, rates, torch.nn.functional.one_hot(x0, 4), grid, seed=1)
        return states.long() + 1, events.counts, counts.argmax(-1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for a, b in zip(compiled(Q, x0, grid), f(Q, x0, grid)):
        assert torch.equal(a, b)


def test_compiled_events_take_new_horizons_and_sizes_without_new_graphs(device):
    """record='events' under torch.compile(fullgraph=True): a tensor horizon, max_events and paths (p0 mode) change
    without a graph per value (a float horizon failed with fullgraph; each new int made a graph); the eager paths."""
    Q = random_rates(2, 4).to(device)
    p0 = torch.rand(4, dtype=torch.float64, device=device)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(t_end, max_events, paths):
        events = simulate_ctmc(Q, None, t_end, p0=p0, paths=paths, seed=4, record="events", max_events=max_events)
        return events.times, events.counts

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    for t_end, max_events, paths in [(1.0, 6, 5), (2.5, 9, 7), (0.5, 4, 3), (3.0, 11, 6)]:
        horizon = torch.tensor(t_end, dtype=torch.float64)
        for a, b in zip(compiled(horizon, max_events, paths), f(horizon, max_events, paths)):
            assert torch.equal(a, b)
    assert len(graphs) <= 2  # the first sizes, then dynamic ones


def test_a_p0_that_requires_grad_is_a_constant():
    """The ops have no derivative: p0 is detached as Q is, so the event times carry no graph (a loss that used them
    failed in backward on the op's missing derivative)."""
    Q = random_rates(1, 3)
    p0 = torch.rand(3, dtype=torch.float64, requires_grad=True)
    events = simulate_ctmc(Q, None, 2.0, p0=p0, paths=4, seed=0, record="events", max_events=5)
    assert events.times.grad_fn is None and not events.times.requires_grad


def test_tiny_initial_weights_draw_their_distribution():
    """p0 of subnormal weights (normalised internally): the draw's threshold U * sum lost bits (three equal weights
    5e-324 drew 1/6, 1/3, 1/2); such rows are scaled by 2^1000, exactly. Rows of ordinary weights: unchanged."""
    Q = torch.zeros(3, 3, dtype=torch.float64)  # no jumps: the states are the initial draws
    p0 = torch.tensor([[5e-324] * 3, [1e-310, 2e-310, 1e-310]], dtype=torch.float64)
    states = simulate_ctmc(Q.expand(2, 3, 3), None, torch.tensor([0.0]), p0=p0, paths=30000, seed=11)[:, :, 0]
    pvalues = {f"row {r}": chi2_pvalue(torch.bincount(states[r].long(), minlength=3), p0[r] / p0[r].sum())
               for r in range(2)}
    assert_all_pass(pvalues)
    ordinary = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    draws = simulate_ctmc(Q, None, torch.tensor([0.0]), p0=ordinary, paths=64, seed=11)
    scaled = simulate_ctmc(Q, None, torch.tensor([0.0]), p0=ordinary * 2.0**-1000, paths=64, seed=11)
    assert torch.equal(draws, scaled)  # 2^-1000 scaled back by 2^1000: the same threshold bit for bit


def bad_input_cases():
    """(call, message pattern) of every input error of the ops; also run through the CUDA glue under emulation."""
    Q = systems.flashing_ratchet(1.0)
    x0 = torch.zeros(1, 4, dtype=torch.long)
    grid = torch.linspace(0, 1, 5)
    bad_q = Q.clone()
    bad_q[0, 1] = -0.5
    nan_q = Q.clone()
    nan_q[2, 0] = math.nan
    inf_q = Q.clone()
    inf_q[1, 0] = math.inf
    ones = torch.ones(1, 2, 1, dtype=torch.long)  # x0 of the reaction cases
    return [
        (lambda: simulate_ctmc(bad_q, x0, grid, seed=0), r"Q: expected off-diagonal rates >= 0, got -0.5"),
        # process_offset >= 2**63 failed in the dispatcher's int check, naming no argument
        (lambda: simulate_ctmc(Q, x0, grid, seed=0, process_offset=2**63),
         r"simulate_ctmc: process_offset: expected an int in \[0, 2\*\*63\), got 9223372036854775808"),
        (lambda: simulate_reactions(*one_hot_network(Q[None]), torch.nn.functional.one_hot(x0, 6), grid, seed=0,
                                    process_offset=2**63), r"simulate_reactions: process_offset: expected an int"),
        (lambda: simulate_ctmc(nan_q, x0, grid, seed=0), r"Q: expected off-diagonal rates without NaN"),
        (lambda: simulate_ctmc(Q[:, :5], x0, grid, seed=0), r"Q: expected shape \(S, S\) or \(processes, S, S\)"),
        (lambda: simulate_ctmc(Q.expand(2, 6, 6), x0, grid, seed=0), r"x0: expected shape \[2, 4\]"),
        (lambda: simulate_ctmc(Q, x0 + 6, grid, seed=0), r"x0: expected states in \[0, 6\), got values in \[6, 6\]"),
        (lambda: simulate_ctmc(Q, x0.float(), grid, seed=0), r"x0: expected an integer dtype, got Float"),
        (lambda: simulate_ctmc(Q, x0, grid.flip(0), seed=0),
         r"t_grid: expected times non-decreasing along the last dim, got 1 then 0.75 at index 1 of row 0"),
        (lambda: simulate_ctmc(Q, x0, grid - 1, seed=0), r"t_grid: expected times >= 0"),
        (lambda: simulate_ctmc(Q, x0, grid * math.nan, seed=0), r"t_grid: expected finite times"),
        (lambda: simulate_ctmc(Q, x0, grid.expand(3, 5), seed=0), r"t_grid: expected 1 processes in dim 0"),
        (lambda: simulate_ctmc(Q, x0, grid.expand(1, 3, 5), seed=0), r"t_grid: expected 4 paths in dim 1"),
        (lambda: simulate_ctmc(inf_q, x0, grid, seed=0), r"Q: expected finite off-diagonal rates, got inf"),
        (lambda: simulate_ctmc(torch.full((6, 6), 1e308, dtype=torch.float64), x0, grid, seed=0),
         r"Q: expected a finite exit rate \(the off-diagonal sum of a row\), got inf \(weights too large to add in "
         r"float64\)"),
        (lambda: simulate_ctmc(Q, None, grid, p0=torch.full((6,), 1e308, dtype=torch.float64), paths=3, seed=0),
         r"p0: expected a finite sum, got inf"),
        (lambda: simulate_ctmc(Q, None, grid, p0=torch.zeros(6), paths=3, seed=0),
         r"p0: expected every distribution to have a positive sum"),
        (lambda: simulate_ctmc(Q, x0, grid, seed=0, process_offset=-1), r"process_offset: expected"),
        # process_offset + processes overflowed int64 and passed: the streams of another offset were reused
        (lambda: simulate_ctmc(Q, x0, grid, seed=0, process_offset=2**63 - 1), r"process_offset: expected .* <= 2\^32, "
                                                                               r"got 9223372036854775807 \+ "),
        (lambda: simulate_ctmc(Q, x0, grid, seed=0, path_offset=2**32 - 1),
         r"path_offset: expected path_offset >= 0 and path_offset \+ paths <= 2\^32, got 4294967295 \+ "),
        (lambda: simulate_ctmc(Q, x0, grid, seed=0, path_offset=-1), r"simulate_ctmc: path_offset: expected an int"),
        (lambda: simulate_ctmc(Q, x0, 1.0, seed=0, record="events", max_events=-1), r"max_events: expected >= 0"),
        (lambda: simulate_ctmc(Q, None, grid, p0=-torch.ones(6), paths=3, seed=0), r"p0: expected probabilities >= 0"),
        (lambda: simulate_ctmc(Q, None, grid, p0=torch.ones(5), paths=3, seed=0), r"p0: expected shape \(6,\)"),
        (lambda: simulate_ctmc(Q, None, grid, seed=0), r"give the initial states x0 or the initial distributions"),
        (lambda: simulate_ctmc(Q, x0, 1.0, seed=0, record="events"), r"record='events' needs max_events"),
        (lambda: simulate_ctmc(Q, x0, -1.0, seed=0, record="events", max_events=3), r"t_end: expected a horizon >= 0"),
        (lambda: simulate_ctmc(Q, x0, grid, seed=0, record="jumps"), r"record must be 'grid' or 'events'"),
        (lambda: simulate_ctmc(Q, x0, grid, seed=0, record="events", max_events=3),
         r"t_grid: with record='events', expected the horizon t_end \(a float or a one-element tensor\), got a "
         r"tensor of shape \(5,\)"),
        (lambda: simulate_ctmc(Q, x0, grid, seed=2**63), r"simulate_ctmc: seed: expected an int in "
         r"\[-2\*\*63, 2\*\*63\) \(the 64-bit Philox key\), got 9223372036854775808"),
        (lambda: simulate_ctmc(Q, x0, 1.0, seed=-2**63 - 1, record="events", max_events=3),
         r"simulate_ctmc: seed: expected"),
        (lambda: torch.ops.markovkit.mjp_ctmc_grid(Q, x0, torch.ones(6), grid, 1, 4, 0),
         r"x0, p0: expected exactly one"),
        (lambda: torch.ops.markovkit.mjp_ctmc_grid(Q, None, torch.ones(6), grid, 1, 2**32, 0), r"paths: expected"),
        (lambda: simulate_reactions(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([-1.0]),
                                    ones, grid, seed=0), r"rates: expected rate constants >= 0"),
        # A -> 2A at 1e307: the propensity passes float64's largest value after ~18 firings, within the first grid
        # interval: the path has no next event time (the clock would stop; the kernel flags it)
        (lambda: simulate_reactions(torch.tensor([[1]]), torch.tensor([[2]]),
                                    torch.tensor([1e307], dtype=torch.float64), ones, grid, seed=0),
         r"rates: expected finite propensities, got a path whose total propensity overflowed to inf"),
        (lambda: simulate_reactions(torch.tensor([[-1]]), torch.tensor([[0]]), torch.tensor([1.0]),
                                    ones, grid, seed=0), r"reactants: expected stoichiometric"),
        (lambda: simulate_reactions(torch.tensor([[1]]), torch.tensor([[0, 1]]), torch.tensor([1.0]),
                                    ones, grid, seed=0), r"products: expected shape \[1, 1\]"),
        (lambda: simulate_reactions(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([1.0, 2.0]),
                                    ones, grid, seed=0), r"rates: expected shape \(1,\)"),
        (lambda: simulate_reactions(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([1.0]),
                                    -ones, grid, seed=0), r"x0: expected counts >= 0"),
        (lambda: simulate_reactions(torch.ones(1, 33, dtype=torch.long), torch.ones(1, 33, dtype=torch.long),
                                    torch.tensor([1.0]), torch.ones(1, 2, 33, dtype=torch.long), grid, seed=0),
         r"x0: expected shape \(processes, paths, species\) with 1 <= species <= 32"),
        (lambda: simulate_reactions(torch.ones(129, 1, dtype=torch.long), torch.ones(129, 1, dtype=torch.long),
                                    torch.ones(129), torch.ones(1, 2, 1, dtype=torch.long), grid, seed=0),
         r"reactants: expected shape \(reactions, species\) with at most 128 reactions"),
        (lambda: simulate_reactions(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([1.0]), ones, grid,
                                    seed=2**64), r"simulate_reactions: seed: expected an int in \[-2\*\*63, 2\*\*63\)"),
    ]


def test_bad_input_errors():
    for fn, message in bad_input_cases():
        with pytest.raises((RuntimeError, ValueError), match=message):
            fn()


def test_seed_range_ends_and_a_tensor_horizon_are_accepted():
    """Seeds -2**63 and 2**63 - 1 (the int64 ends) run and give different paths; record='events' takes a
    one-element tensor as its horizon, the same as the float."""
    Q, x0, grid = systems.flashing_ratchet(1.0), torch.zeros(1, 50, dtype=torch.long), torch.linspace(0, 5, 6)
    low, high = (simulate_ctmc(Q, x0, grid, seed=s) for s in (-2**63, 2**63 - 1))
    assert not torch.equal(low, high)
    counts = simulate_reactions(*one_hot_network(Q[None]), torch.nn.functional.one_hot(x0, 6), grid, seed=-2**63)
    assert torch.equal(counts.argmax(-1), low.long())
    events = simulate_ctmc(Q, x0, torch.tensor([2.0]), seed=3, record="events", max_events=20)
    for got, want in zip(events, simulate_ctmc(Q, x0, 2.0, seed=3, record="events", max_events=20)):
        assert torch.equal(got, want)


def test_reference_reaction_direct_method_is_poisson():
    """The eager reaction reference (the benchmarks' peer): birth-death A(1) ~ Poisson(10 (1 - e^-1))."""
    x0 = torch.zeros(1, 4000, 1, dtype=torch.long)
    counts = mjp_reactions_direct(torch.tensor([[0], [1]]), torch.tensor([[1], [0]]), torch.tensor([10.0, 1.0]), x0,
                                  torch.tensor([1.0]), torch.Generator().manual_seed(0))[0, :, 0, 0].numpy()
    mu = 10 * (1 - math.exp(-1))
    support = np.arange(counts.max() + 2)
    probs = scipy.stats.poisson.pmf(support, mu)
    probs[-1] = scipy.stats.poisson.sf(support[-2], mu)
    assert chi2_pvalue(np.bincount(counts, minlength=len(support)), probs) > ALPHA


def test_first_passage_times(device):
    """Ion channel: pi and MFPTs of the notes; simulated first-passage times 2 -> 0 and 0 -> 2 (event-count mode)
    have the analytic means."""
    Q = systems.ion_channel()
    pi = torch.tensor([0.181, 0.147, 0.672], dtype=torch.float64)
    torch.testing.assert_close(systems.stationary_distribution(Q), pi, atol=6e-4, rtol=0)
    kohs = torch.tensor([[0, 0.068, 0.054], [0.133, 0, 0.033], [0.181, 0.092, 0]], dtype=torch.float64)
    tau = systems.mean_first_passage_times(Q)
    torch.testing.assert_close(tau, kohs, atol=6e-4, rtol=0)
    x0 = torch.tensor([[2] * 5000, [0] * 5000], device=device)
    events = simulate_ctmc(Q.to(device), x0, math.inf, seed=17, record="events", max_events=100)
    target = torch.tensor([0, 2], device=device).view(2, 1, 1)
    hit = events.states.long() == target
    assert bool(hit.any(-1).all())
    first = events.times.gather(-1, hit.int().argmax(-1, keepdim=True))[..., 0].cpu()
    assert_all_pass({"2 -> 0": z_pvalue(first[0], tau[2, 0].item()), "0 -> 2": z_pvalue(first[1], tau[0, 2].item())})

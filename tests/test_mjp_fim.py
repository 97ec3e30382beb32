"""The FIM-MJP data generator: layout, priors' invariants, noise rate, chunking invariance, CLI, config checks."""
import math

import pytest
import scipy.stats
import torch

import markovkit
from conftest import HAS_CUDA
from markovkit.mjp import fim, systems


@pytest.fixture(scope="module")
def data():
    return fim.generate(60, fim.FimConfig(paths=200), seed=3, chunk=60)


def test_layout_and_invariants(data):
    N, P, L, S = 60, 200, 100, 6
    expected = {"rates": ((N, S, S), torch.float32), "num_states": ((N,), torch.int64),
                "initial_distribution": ((N, S), torch.float32), "times": ((L,), torch.float32),
                "states": ((N, P, L), torch.uint8), "observations": ((N, P, L), torch.int16),
                "mask": ((N, P, L), torch.bool)}
    for name, (shape, dtype) in expected.items():
        assert data[name].shape == shape and data[name].dtype == dtype, name
    n = data["num_states"]
    assert set(n.tolist()) <= {2, 3, 4, 5, 6}
    padded = torch.arange(S) >= n.unsqueeze(1)  # (N, S)
    Q, p0 = data["rates"], data["initial_distribution"]
    assert bool((p0[padded] == 0).all()) and torch.allclose(p0.sum(-1), torch.ones(N))
    assert bool((Q.abs().sum(-1)[padded] == 0).all()) and torch.allclose(Q.sum(-1), torch.zeros(N, S), atol=1e-6)
    off = Q.masked_fill(torch.eye(S, dtype=torch.bool), 0.5)
    assert bool((off >= 0).all() & (off < 1).all())
    assert bool((data["states"].long() < n.view(N, 1, 1)).all())
    assert bool((data["observations"].long() < n.view(N, 1, 1)).all())
    assert data["times"][0] == 0 and data["times"][-1] == 1 and data["time_scale"] == 10.0


def test_states_are_the_processes_paths_on_the_time_grid(data):
    """The clean states are simulate_ctmc's paths of each process's rates from its p0 on [0, t_max] (seed and
    process index as generate documents): ties the paths to the rates, the initial law and the time scale."""
    config = fim.FimConfig(paths=200)
    params = fim.sample_parameters(60, config, seed=3)
    t = torch.linspace(0, config.t_max, config.grid_points, dtype=torch.float64)
    again = markovkit.simulate_ctmc(params["rates"], None, t, p0=params["p0"], paths=200, seed=3)
    assert torch.equal(again, data["states"])


def test_noise_rate_and_masks(data):
    flips = int((data["observations"].long() != data["states"].long()).sum())
    total = data["states"].numel()
    assert scipy.stats.binomtest(flips, total, 0.01).pvalue > 1e-4
    # each process's mask as its parameters say: every stride-th point on every path, or each point kept with its
    # keep probability (20000 points a process: 0.02 is 6.5 standard deviations at 0.25)
    params, mask, grid = fim.sample_parameters(60, fim.FimConfig(paths=200), seed=3), data["mask"], torch.arange(100)
    assert bool(params["is_rand"].any()) and not bool(params["is_rand"].all())
    for b in range(60):
        if params["is_rand"][b]:
            assert abs(float(mask[b].float().mean()) - float(params["keep_prob"][b])) < 0.02
        else:
            assert torch.equal(mask[b], (grid % int(params["stride"][b]) == 0).expand(200, 100))


def test_initial_states_follow_p0():
    data = fim.generate(1, fim.FimConfig(paths=20000, states=(6,), state_weights=(1,)), seed=5)
    counts = torch.bincount(data["states"][0, :, 0].long(), minlength=6).double()
    expected = data["initial_distribution"][0].double() * 20000
    keep = expected > 5
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert scipy.stats.chi2.sf(stat, int(keep.sum()) - 1) > 1e-4


@pytest.mark.parametrize("a,b", [(0.4, 1.0), (1.2, 2.2)])
def test_beta_draws_follow_the_beta_law(a, b):
    """The Philox Beta sampler (Marsaglia-Tsang Gammas with the U^(1/a) boost) at the prior's corners: KS."""
    n = 20000
    x = fim._beta(fim._Draws(7, "cpu"), 100, torch.full((n,), a, dtype=torch.float64),
                  torch.full((n,), b, dtype=torch.float64))
    assert scipy.stats.kstest(x.numpy(), scipy.stats.beta(a, b).cdf).pvalue > 1e-4


def test_parameter_choices_follow_their_weights():
    """num_states ~ state_weights, stride and keep_prob uniform, p0 Dirichlet(1) mean; a process's draws do not
    depend on how many processes are drawn."""
    N, config = 20000, fim.FimConfig()
    params = fim.sample_parameters(N, config, seed=4)
    for key, values, weights in [("num_states", config.states, config.state_weights),
                                 ("stride", config.strides, (1,) * 4), ("keep_prob", config.keep_probs, (1, 1))]:
        counts = [int((params[key] == v).sum()) for v in values]
        assert sum(counts) == N
        expected = [N * w / sum(weights) for w in weights]
        assert scipy.stats.chisquare(counts, expected).pvalue > 1e-4, key
    p0 = params["p0"][(params["num_states"] == 6) & ~params["stationary"]]
    z = (p0[:, 0].mean() - 1 / 6) / (p0[:, 0].std() / len(p0) ** 0.5)
    assert abs(float(z)) < 4.5
    head = fim.sample_parameters(10, config, seed=4)
    for key in head:
        assert torch.equal(head[key], params[key][:10]), key


def test_stationary_start_is_the_stationary_distribution():
    """The exact solve, also for a slowly mixing chain (relaxation time 3e4, which expm(1e3 Q) did not reach)."""
    Q = torch.zeros(3, 6, 6, dtype=torch.float64)
    Q[0] = systems.flashing_ratchet(1.0)
    Q[1, :4, :4] = systems.generator(torch.ones(4, 4, dtype=torch.float64)) * 0.1  # 4 states padded to 6
    Q[2, :2, :2] = systems.generator(torch.tensor([[0, 1e-5], [2e-5, 0]], dtype=torch.float64))
    pi = fim._stationary_distribution(Q, torch.arange(6) < torch.tensor([[6], [4], [2]]))
    torch.testing.assert_close(pi[0], systems.stationary_distribution(Q[0]), rtol=0, atol=1e-12)
    torch.testing.assert_close(pi[1], torch.tensor([0.25] * 4 + [0.0] * 2, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(pi[2], torch.tensor([2 / 3, 1 / 3] + [0.0] * 4, dtype=torch.float64), rtol=0,
                               atol=1e-15)


def test_no_absorbing_state_and_exact_stationary_starts():
    """No state of a process is absorbing (so no Q == 0); p0 sums to 1 and is positive on the process's states
    (never one-hot); the stationary starts are exactly stationary, given w.p. stationary_start to the irreducible
    processes and to no other."""
    N, config = 6000, fim.FimConfig()
    params = fim.sample_parameters(N, config, seed=8)
    Q, n, p0, stationary = params["rates"], params["num_states"], params["p0"], params["stationary"]
    inside = torch.arange(6) < n.unsqueeze(1)  # (N, 6)
    exit_rate = -Q.diagonal(dim1=-2, dim2=-1)  # (N, 6)
    assert bool((exit_rate[inside] > 0).all()) and bool((exit_rate[~inside] == 0).all())
    assert torch.allclose(p0.sum(-1), torch.ones(N, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((p0[inside] > 0).all()) and bool((p0[~inside] == 0).all())
    residual = (p0.unsqueeze(1) @ Q).squeeze(1).abs().amax(-1) / Q.abs().flatten(1).amax(-1)  # (N,)
    assert float(residual[stationary].max()) < 1e-12
    assert float(residual[~stationary].min()) > 1e-6  # the Dirichlet starts are not stationary
    irreducible = torch.tensor([_reaches_all(Q[i] != 0, int(n[i])) for i in range(N)])
    assert not bool((stationary & ~irreducible).any())
    share = scipy.stats.binomtest(int(stationary.sum()), int(irreducible.sum()), config.stationary_start)
    assert share.pvalue > 1e-4


def test_a_stranded_state_keeps_a_link_to_a_uniform_other_state():
    """With no link surviving, each state has exactly one, to the state `shift` (1 .. n - 1) further, uniformly."""
    config = fim.FimConfig(states=(2, 5), state_weights=(1, 1), fully_connected=0.0, p_survival=0.0)
    params = fim.sample_parameters(4000, config, seed=6)
    n = params["num_states"]
    links = (params["rates"] != 0) & ~torch.eye(6, dtype=torch.bool)  # (N, 6, 6)
    inside = torch.arange(6) < n.unsqueeze(1)
    assert bool((links.sum(-1) == inside.long()).all())
    five = n == 5
    shift = (links[five].int().argmax(-1) - torch.arange(6)) % 5  # (N5, 6)
    counts = torch.bincount(shift[:, :5].flatten(), minlength=5)
    assert counts[0] == 0 and scipy.stats.chisquare(counts[1:].numpy()).pvalue > 1e-4


def _reaches_all(links: torch.Tensor, k: int) -> bool:
    """Brute force: depth-first search from every state of the first k over the links (S, S) bool."""
    for start in range(k):
        seen, todo = {start}, [start]
        while todo:
            i = todo.pop()
            for j in range(k):
                if bool(links[i, j]) and j not in seen:
                    seen.add(j)
                    todo.append(j)
        if len(seen) < k:
            return False
    return True


@pytest.mark.parametrize("S", [2, 6, 9])
def test_irreducibility_check_matches_brute_force(S):
    """Random links of random density, and (second half) a directed cycle through the states in random order
    (distances up to n - 1) plus or minus one random link."""
    g = torch.Generator().manual_seed(S)
    N = 600
    n = torch.randint(1, S + 1, (N,), generator=g)
    links = torch.rand(N, S, S, generator=g) < torch.rand(N, 1, 1, generator=g)
    for i in range(N // 2, N):
        order = torch.randperm(int(n[i]), generator=g)
        links[i] = False
        links[i, order, order.roll(-1)] = True
        links[i].view(-1)[torch.randint(0, S * S, (1,), generator=g)] ^= True
    inside = torch.arange(S) < n.unsqueeze(1)
    links &= inside.unsqueeze(2) & inside.unsqueeze(1)
    expected = torch.tensor([_reaches_all(links[i], int(n[i])) for i in range(N)])
    assert 0.1 < expected.float().mean() < 0.9
    assert torch.equal(fim._irreducible(links, inside), expected)


def test_chunking_does_not_change_the_data(data):
    other = fim.generate(60, fim.FimConfig(paths=200), seed=3, chunk=17)
    for name in ("rates", "states", "observations", "mask"):
        assert torch.equal(other[name], data[name]), name


def test_no_processes_give_empty_tensors(data):
    empty = fim.generate(0, fim.FimConfig(paths=200), seed=3)
    for name, value in data.items():
        if isinstance(value, torch.Tensor):
            shape = value.shape if name == "times" else (0,) + value.shape[1:]
            assert empty[name].shape == shape and empty[name].dtype == value.dtype, name


@pytest.mark.parametrize("field,value,message", [
    ("states", (2, 3, 4, 5, 6, 7), r"states: expected a non-empty tuple of integers in \[2, max_states=6\]"),
    ("states", (1, 3), r"states: expected"),
    ("states", (), r"states: expected"),
    ("states", (2.5,), r"states: expected"),
    ("max_states", 4, r"states: expected a non-empty tuple of integers in \[2, max_states=4\], got \(2, 3, 4, 5, 6\)"),
    ("state_weights", (1, 1), r"state_weights: expected 5 weights >= 0"),
    ("state_weights", (1, 1, -1, 1, 1), r"state_weights: expected"),
    ("state_weights", (0,) * 5, r"state_weights: expected"),
    ("paths", 0, r"paths: expected an integer >= 1, got 0"),
    ("max_states", 6.5, r"max_states: expected an integer >= 2, got 6.5"),
    ("grid_points", 0, r"grid_points: expected an integer >= 1"),
    ("t_max", 0.0, r"t_max: expected a finite time > 0, got 0.0"),
    ("t_max", math.inf, r"t_max: expected"),
    ("fully_connected", 1.5, r"fully_connected: expected a probability in \[0, 1\], got 1.5"),
    ("p_survival", -0.1, r"p_survival: expected a probability"),
    ("stationary_start", math.nan, r"stationary_start: expected a probability"),
    ("noise", 2.0, r"noise: expected a probability"),
    ("beta_a", (0.0, 1.0), r"beta_a: expected a range \(low, high\) with 0 < low <= high < inf, got \(0.0, 1.0\)"),
    ("beta_b", (2.0, 1.0), r"beta_b: expected a range"),
    ("beta_b", (1.0,), r"beta_b: expected a range"),
    ("grid", "regular", r"grid: expected 'reg', 'rand' or 'mixed', got 'regular'"),
    ("strides", (0, 2), r"strides: expected a non-empty tuple of integers >= 1, got \(0, 2\)"),
    ("strides", (), r"strides: expected"),
    ("keep_probs", (0.0, 0.5), r"keep_probs: expected a non-empty tuple of probabilities in \(0, 1\]"),
    ("keep_probs", (1.5,), r"keep_probs: expected"),
])
def test_config_is_checked(field, value, message):
    with pytest.raises(ValueError, match=f"FimConfig: {message}"):
        fim.FimConfig(**{field: value})


@pytest.mark.parametrize("call,message", [
    (lambda: fim.generate(1, seed=2**63), r"generate: seed: expected an int in \[-2\*\*63, 2\*\*63\)"),
    (lambda: fim.generate(1, seed=-2**63 - 1), r"generate: seed: expected"),
    (lambda: fim.generate(-1), r"sample_parameters: processes: expected >= 0, got -1"),
    (lambda: fim.generate(1, chunk=0), r"generate: chunk: expected >= 1"),
    (lambda: fim.sample_parameters(1, fim.FimConfig(), seed=2**64 + 5), r"sample_parameters: seed: expected"),
])
def test_generate_arguments_are_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_seeds_apart_in_the_sign_bit_draw_other_parameters():
    """The parameters' key was masked to 63 bits: seeds 1 and 1 - 2**63 drew the same rates and p0."""
    config = fim.FimConfig()
    a, b = (fim.sample_parameters(20, config, seed=s) for s in (1, 1 - 2**63))
    assert not torch.equal(a["rates"], b["rates"])


def test_cli_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "fim.pt"
    fim.main(["--processes", "5", "--out", str(out), "--paths", "7", "--grid", "rand", "--device", "cpu"])
    data = torch.load(out)
    assert data["states"].shape == (5, 7, 100)
    assert "5/5" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cpu_and_cuda_datasets_are_identical():
    config = fim.FimConfig(paths=64)
    cpu = fim.generate(40, config, seed=2, device="cpu", chunk=15)
    cuda = fim.generate(40, config, seed=2, device="cuda", chunk=40)
    assert all(v.is_cuda for v in cuda.values() if isinstance(v, torch.Tensor))  # generated on the device
    for name in ("rates", "initial_distribution"):  # the same Philox draws, libm / matrix_exp to the last bits
        torch.testing.assert_close(cuda[name].cpu(), cpu[name], rtol=1e-6, atol=1e-7)
    for name in ("num_states", "states", "observations", "mask"):
        assert torch.equal(cpu[name], cuda[name].cpu()), name

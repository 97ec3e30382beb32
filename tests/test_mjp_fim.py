"""The FIM-MJP data generator: layout, priors' invariants, noise rate, chunking invariance, CLI."""
import pytest
import scipy.stats
import torch

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


def test_noise_rate_and_masks(data):
    flips = int((data["observations"].long() != data["states"].long()).sum())
    total = data["states"].numel()
    assert scipy.stats.binomtest(flips, total, 0.01).pvalue > 1e-4
    mask = data["mask"]
    kept = mask.float().mean((1, 2))
    regular = (mask == mask[:, :1]).all((1, 2))  # the same mask on every path
    for b in torch.nonzero(regular).flatten().tolist():
        stride = int(torch.nonzero(mask[b, 0]).flatten()[1])
        assert stride in (1, 2, 3, 4) and bool((mask[b, 0] == (torch.arange(100) % stride == 0)).all())
    assert bool(((kept[~regular] > 0.15) & (kept[~regular] < 0.6)).all())


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
    p0 = params["p0"][(params["num_states"] == 6) & ~_is_stationary_start(params)]
    z = (p0[:, 0].mean() - 1 / 6) / (p0[:, 0].std() / len(p0) ** 0.5)
    assert abs(float(z)) < 4.5
    head = fim.sample_parameters(10, config, seed=4)
    for key in head:
        assert torch.equal(head[key], params[key][:10]), key


def _is_stationary_start(params):
    """p0 equals the limit distribution of Q (the stationary-start branch)."""
    limit = fim._limit_distribution(params["rates"], params["num_states"])
    return (params["p0"] - limit).abs().amax(-1) < 1e-12


def test_stationary_start_is_the_stationary_distribution():
    Q = torch.stack([systems.flashing_ratchet(1.0), systems.generator(torch.ones(6, 6)) * 0.1])
    Q[1, 4:] = Q[1, :, 4:] = 0  # a 4-state process padded to 6
    Q[1] = systems.generator(Q[1])
    limit = fim._limit_distribution(Q, torch.tensor([6, 4]))
    torch.testing.assert_close(limit[0], systems.stationary_distribution(Q[0]), rtol=0, atol=1e-9)
    torch.testing.assert_close(limit[1], torch.tensor([0.25] * 4 + [0.0] * 2, dtype=torch.float64), rtol=0, atol=1e-9)


def test_chunking_does_not_change_the_data(data):
    other = fim.generate(60, fim.FimConfig(paths=200), seed=3, chunk=17)
    for name in ("rates", "states", "observations", "mask"):
        assert torch.equal(other[name], data[name]), name


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

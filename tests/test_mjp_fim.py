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
    for name in ("states", "observations", "mask"):
        assert torch.equal(cpu[name], cuda[name]), name

"""markovkit.nn.FractionalSDE: shapes, the prior's law, the ELBO's gradients (H included)."""
import math
import re

import pytest
import torch

from markovkit import fbm
from markovkit.nn import FractionalSDE


def test_prior_samples_have_the_mafbm_variance():
    """No drift, σ = 1, type II: the prior is X = B̂ exactly (exact scheme): Var X(t) = mafbm_cov(t, t)."""
    torch.manual_seed(0)
    model = FractionalSDE(2, K=4, gamma_max=10.0, kind="II", hurst=0.3, drift=False)
    paths = model.sample(2**14, 10, 0.1, seed=3)
    assert paths.shape == (2**14, 11, 2)
    var = paths[:, 1:].double().var(0).mean(-1)
    t = torch.arange(1, 11, dtype=torch.float64) * 0.1
    ref = torch.diagonal(fbm.mafbm_cov(t, t, model.omega().detach(), model.gamma, "II"))
    assert ((var / ref - 1).abs() < 6 * math.sqrt(2 / 2**15)).all()


@pytest.mark.parametrize("kind", ["I", "II"])
def test_elbo_gradients_reach_every_parameter(device, kind):
    torch.manual_seed(0)
    model = FractionalSDE(2, K=3, gamma_max=10.0, kind=kind, hurst=None, hidden=16, context_dims=1).to(device)
    obs = torch.randn(3, 4, 2, device=device)
    times = torch.tensor([0.1, 0.2, 0.3, 0.4])
    elbo = model.elbo(obs, times, dt=0.05, obs_std=0.5, seed=0, samples=2, context_fn=lambda n, x: x[:, :1] * 0)
    assert elbo.dim() == 0 and torch.isfinite(elbo)
    elbo.backward()
    assert model.hurst_raw.grad is not None and model.hurst_raw.grad != 0
    assert model.drift[0].weight.grad.abs().sum() > 0
    assert model.control[-1].weight.grad.abs().sum() > 0  # zero-initialised layer, non-zero gradient
    assert abs(model.hurst().item() - 0.5) < 1e-12


def test_elbo_is_the_log_likelihood_of_the_posterior_paths_minus_the_control_cost():
    """A constant control c (the last layer's bias; its weight starts at zero): KL = ½ c² dims T exactly, and the
    log-likelihood is that of the posterior paths `sample` gives for the same seed, sequence-major (the samples of
    sequence b are paths b·samples ..), at the observation times' grid steps."""
    torch.manual_seed(0)
    model = FractionalSDE(2, K=3, hurst=0.3, hidden=8).double()
    c, dt, std, samples = 0.7, 0.05, 0.5, 2
    torch.nn.init.constant_(model.control[-1].bias, c)
    obs = torch.randn(3, 4, 2, dtype=torch.float64)
    times = torch.tensor([0.1, 0.25, 0.3, 0.45])
    elbo = model.elbo(obs, times, dt=dt, obs_std=std, seed=7, samples=samples)
    paths = model.sample(3 * samples, 9, dt, seed=7, posterior=True)  # (6, 10, 2)
    x = paths[:, [2, 5, 6, 9]].view(3, samples, 4, 2)
    loglik = torch.distributions.Normal(x, std).log_prob(obs[:, None]).sum((-1, -2))  # (3, samples)
    torch.testing.assert_close(elbo, (loglik - 0.5 * c**2 * 2 * 9 * dt).mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["I", "II"])
def test_samples_in_chunks_are_the_samples_of_one_call(kind):
    """path_offset: 70 paths sampled as 30 + 40 (the second chunk's offset 30) equal one call's, Y(0) (type I's
    stationary start) included, prior and posterior; the same paths at another offset differ."""
    torch.manual_seed(0)
    model = FractionalSDE(2, K=3, hurst=0.3, hidden=8, kind=kind).double()
    torch.nn.init.normal_(model.control[-1].weight)
    for posterior in (False, True):
        sample = lambda paths, offset=0: model.sample(paths, 6, 0.05, seed=-5, posterior=posterior,  # noqa: E731
                                                      path_offset=offset)
        whole = sample(70)
        # not bit for bit: the networks' matmuls round by batch size
        torch.testing.assert_close(torch.cat([sample(30), sample(40, 30)]), whole, rtol=1e-12, atol=1e-12)
        assert not torch.isclose(sample(40)[:, 1:], whole[30:, 1:]).any()


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(path_offset=-1), ValueError, "FractionalSDE: path_offset: expected an int in [0, 2**63), got -1"),
    (dict(path_offset=1.5), TypeError, "FractionalSDE: path_offset: expected an int in [0, 2**63), got float 1.5"),
    (dict(seed=2**63), ValueError, "FractionalSDE: seed: expected an int in [-2**63, 2**63)"),
])
def test_sample_checks_seed_and_path_offset(kwargs, error, message):
    """Checked up front, also where no op would see them (type II, no steps): they reached philox_normal scaled
    or xor'ed, named as its offset / seed."""
    model = FractionalSDE(2, K=3, hurst=0.3, hidden=8, kind="II")
    with pytest.raises(error, match=re.escape(message)):
        model.sample(4, 0, 0.1, **{"seed": 1, **kwargs})


def test_elbo_checks_times():
    model = FractionalSDE(1, K=2, hurst=0.4)
    elbo = lambda obs, times, dt: model.elbo(obs, times, dt=dt, obs_std=1.0, seed=0)  # noqa: E731
    with pytest.raises(ValueError, match="times: expected multiples of dt"):
        elbo(torch.zeros(1, 1, 1), torch.tensor([0.105]), 0.01)
    with pytest.raises(ValueError, match="times: expected multiples of dt"):  # far out, 0.4 of a step off
        elbo(torch.zeros(1, 1, 1), torch.tensor([500.004]), 0.01)
    with pytest.raises(ValueError, match=r"times: expected multiples of dt = 0.1, >= 0, got tensor\(\[ 0.3000, -0.1"):
        elbo(torch.zeros(1, 2, 1), torch.tensor([0.3, -0.1]), 0.1)
    # one time per observation: a size-1 side was broadcast before (a wrong ELBO, no error)
    with pytest.raises(ValueError, match=r"times: expected shape \(4,\) = \(n_obs,\) of obs, got \(1,\)"):
        elbo(torch.zeros(3, 4, 1), torch.tensor([0.1]), 0.1)
    with pytest.raises(ValueError, match=r"times: expected shape \(1,\) = \(n_obs,\) of obs, got \(4,\)"):
        elbo(torch.zeros(3, 1, 1), torch.tensor([0.1, 0.2, 0.3, 0.4]), 0.1)
    assert torch.isfinite(elbo(torch.zeros(1, 1, 1), torch.tensor([0.3], dtype=torch.float64), 0.1))  # 2.99999...
    # float32 times: 0.3 is 30.0000012 steps of 0.01
    assert torch.isfinite(elbo(torch.zeros(1, 10, 1), torch.arange(1, 11) * 0.1, 0.01))


def test_configuration_errors_come_at_construction():
    for kwargs, message in [(dict(hurst=1.5), r"hurst: expected a float in \(0, 1\), or None to learn it, got 1.5"),
                            (dict(hurst=0.0), "hurst: expected a float in"),
                            (dict(kind="III"), "kind: expected 'I' or 'II', got 'III'"),
                            (dict(scheme="milstein"), "scheme: expected 'euler' or 'exact', got 'milstein'"),
                            (dict(K=17), r"K: expected 1 <= K <= 16 \(the step kernels' limit\), got 17")]:
        with pytest.raises(ValueError, match=message):
            FractionalSDE(1, **{"K": 2, **kwargs})


def test_elbo_and_sample_check_their_arguments():
    """dt and obs_std > 0, samples >= 1, a context_fn exactly where the model has context features (before: an
    IndexError, a math domain error, a silent NaN, a matmul shape error)."""
    model, obs, times = FractionalSDE(1, K=2, hurst=0.4), torch.zeros(1, 2, 1), torch.tensor([0.1, 0.2])
    for kwargs, message in [(dict(dt=-0.1), "dt: expected a positive float, got -0.1"),
                            (dict(obs_std=0.0), "obs_std: expected a positive float, got 0.0"),
                            (dict(samples=0), "samples: expected a positive int, got 0"),
                            (dict(context_fn=lambda n, x: x), "context_fn: expected a function giving \\(paths, 0\\)")]:
        with pytest.raises(ValueError, match=message):
            model.elbo(obs, times, **{"dt": 0.1, "obs_std": 1.0, "seed": 0, **kwargs})
    with pytest.raises(ValueError, match=r"context_fn: expected .* else None; got None with 3"):
        FractionalSDE(1, K=2, context_dims=3).sample(4, 2, 0.1, seed=0, posterior=True)


def test_gamma_is_a_float64_constant_that_dtype_moves_leave_alone():
    """.float() / .to(dtype) rounded the rates when they were a buffer: omega and the paths changed."""
    model = FractionalSDE(1, K=3, hurst=0.3, hidden=4)
    before = model.sample(4, 3, 0.1, seed=2)
    omega = model.omega()
    model.float().to(torch.float32)
    assert model.gamma.dtype == torch.float64
    torch.testing.assert_close(model.omega(), omega, rtol=0, atol=0)
    torch.testing.assert_close(model.sample(4, 3, 0.1, seed=2), before, rtol=0, atol=0)


def test_autocast_runs_the_networks_in_bfloat16_and_the_sde_in_float32():
    """Under torch.autocast the drift / diffusion / control networks give bfloat16; the state stays float32 (the
    step refused the mix). Paths as without autocast, to bfloat16's rounding of the coefficients."""
    torch.manual_seed(0)
    model = FractionalSDE(2, K=3, hurst=None, hidden=8)
    obs, times = torch.randn(2, 3, 2), torch.tensor([0.1, 0.2, 0.3])
    plain = model.sample(4, 5, 0.1, seed=1, posterior=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        paths = model.sample(4, 5, 0.1, seed=1, posterior=True)
        elbo = model.elbo(obs, times, dt=0.1, obs_std=0.5, seed=0, samples=2)
    assert paths.dtype == torch.float32 and elbo.dtype == torch.float32
    torch.testing.assert_close(paths, plain, rtol=0, atol=3e-2)
    assert 0 < (paths - plain).abs().max()  # the networks did run in bfloat16
    elbo.backward()
    assert model.hurst_raw.grad is not None and model.drift[0].weight.grad.abs().sum() > 0


def test_float64_module_samples_from_default_x0():
    model = FractionalSDE(2, K=3, hurst=0.3, hidden=8).double()
    paths = model.sample(4, 3, 0.1, seed=0)
    assert paths.dtype == torch.float64 and paths.shape == (4, 4, 2)
    torch.testing.assert_close(paths, model.sample(4, 3, 0.1, seed=0, x0=torch.zeros(4, 2, dtype=torch.float64)),
                               rtol=0, atol=0)


def test_elbo_and_sample_check_x0_and_obs():
    model = FractionalSDE(1, K=3, hidden=4, hurst=0.4)
    obs, times = torch.randn(4, 2, 1), torch.tensor([0.1, 0.2])
    elbo = lambda x0: model.elbo(obs, times, dt=0.05, obs_std=0.5, seed=0, samples=8, x0=x0)  # noqa: E731
    with pytest.raises(ValueError, match=r"x0: expected shape \(32, 1\) = \(batch\*samples, dims\), got \(1, 1\)"):
        elbo(torch.zeros(1, 1))
    assert elbo(torch.zeros(32, 1)).item() == elbo(None).item()
    with pytest.raises(ValueError, match=r"x0: expected shape \(5, 1\) = \(paths, dims\), got \(1, 1\)"):
        model.sample(5, 2, 0.05, seed=0, x0=torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"obs: expected shape \(batch, n_obs, 1\), got \(4, 2, 2\)"):
        model.elbo(torch.zeros(4, 2, 2), times, dt=0.05, obs_std=0.5, seed=0)


def test_type_one_start_is_the_full_stationary_law():
    """Y(0) of kind I: its root gives Σ∞_ij = 1/(γ_i + γ_j) itself, so ωᵀΣ∞ω holds for the ω(H) of any H (a rank
    chosen for ω = 1 was 2% short in Var X for K = 16, γ_max = 10, H = 0.9)."""
    model = FractionalSDE(1, K=16, gamma_max=10.0, hurst=0.9)
    g = model.gamma
    cov = 1 / (g[:, None] + g[None, :])
    L = model._start_factor
    torch.testing.assert_close(L @ L.T, cov, rtol=1e-9, atol=1e-12)
    w = model.omega()
    torch.testing.assert_close(w @ L @ L.T @ w, w @ cov @ w, rtol=1e-9, atol=0)


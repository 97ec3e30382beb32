"""The bridge experiment of Daems et al. (ICLR 2024): a type-I MA-fBM prior (K = 5, γ_max = 20, ω fit on
[0, 6]) on [0, 2], conditioned on a noisy endpoint x(2) = 0 (σ_obs = 0.1). A control network is trained by
the ELBO; its marginal means and variances are compared with the exact Gaussian conditional of the same
prior (closed form from markovkit.fbm.mafbm_cov), and with that of exact fBM for reference.

Usage: python examples/fbm_bridge.py [--hurst 0.3] [--iters 600] [--png bridge.png]
"""
import argparse
import time

import torch

from markovkit import fbm
from markovkit.nn import FractionalSDE

T_END, N_STEPS, OBS_STD, HORIZON = 2.0, 200, 0.1, 6.0


def exact_conditional(cov: torch.Tensor):
    """Mean and variance of X(t) given X(T) + ε = 0, ε ~ N(0, σ_obs²), for X with covariance `cov` on the grid
    (the last grid point is T). Mean is 0 (x(0) = 0 and a zero observation)."""
    c_t_end = cov[:, -1]
    var = torch.diagonal(cov) - c_t_end**2 / (cov[-1, -1] + OBS_STD**2)
    return torch.zeros_like(var), var


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hurst", type=float, default=0.3)
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-paths", type=int, default=4096)
    parser.add_argument("--png", default="fbm_bridge.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    dt = T_END / N_STEPS
    model = FractionalSDE(1, K=5, gamma_max=20.0, kind="I", hurst=args.hurst, horizon=HORIZON, hidden=64,
                          drift=False)
    model.diffusion.requires_grad_(False)  # σ = 1: the prior is fixed, only the control learns
    opt = torch.optim.Adam(model.control.parameters(), lr=1e-2)
    obs, times = torch.zeros(1, 1, 1), torch.tensor([T_END])
    start = time.time()
    for it in range(args.iters):
        opt.zero_grad()
        loss = -model.elbo(obs, times, dt=dt, obs_std=OBS_STD, samples=args.batch, seed=it)
        loss.backward()
        opt.step()
        if it % 100 == 0 or it == args.iters - 1:
            print(f"iter {it:4d}  -elbo {loss.item():9.3f}  ({time.time() - start:.0f} s)")

    paths = model.sample(args.eval_paths, N_STEPS, dt, seed=10**6, posterior=True)[..., 0].double()
    t = torch.arange(N_STEPS + 1, dtype=torch.float64) * dt
    grid = t[1:]
    omega = model.omega().detach()
    _, var_ma = exact_conditional(fbm.mafbm_cov(grid, grid, omega, model.gamma, "I"))
    _, var_fbm = exact_conditional(fbm.fbm_cov(grid, grid, args.hurst))
    mean_l, var_l = paths[:, 1:].mean(0), paths[:, 1:].var(0)
    inner = (grid >= 0.1) & (grid <= T_END - 0.1)
    rel_var = ((var_l - var_ma).abs() / var_ma)[inner]
    mean_err = (mean_l.abs() / var_ma.sqrt())[inner]
    print(f"H = {args.hurst}: learned vs exact MA-fBM conditional on t in [0.1, 1.9]: variance relative error "
          f"mean {rel_var.mean():.3f}, max {rel_var.max():.3f}; |mean|/sd mean {mean_err.mean():.3f}")
    print(f"  variance at t = 1: learned {var_l[N_STEPS // 2 - 1]:.4f}, exact MA-fBM {var_ma[N_STEPS // 2 - 1]:.4f}, "
          f"exact fBM {var_fbm[N_STEPS // 2 - 1]:.4f}")
    print(f"  endpoint: learned mean {mean_l[-1]:.4f}, sd {var_l[-1].sqrt():.4f}; exact sd {var_ma[-1].sqrt():.4f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot written")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(t, paths[:30].T, lw=0.6)
    a.set(title=f"posterior sample paths, H = {args.hurst}", xlabel="t")
    b.plot(grid, var_l, label="learned posterior")
    b.plot(grid, var_ma, "--", label="exact conditional, MA-fBM prior")
    b.plot(grid, var_fbm, ":", label="exact conditional, fBM prior")
    b.set(title="marginal variance", xlabel="t")
    b.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"plot written to {args.png}")


if __name__ == "__main__":
    main()

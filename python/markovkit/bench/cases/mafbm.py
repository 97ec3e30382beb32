"""MA-fBM SDEs: the fused fractional OU simulator and the step op in a Python loop (forward + backward),
against the same computations written as eager torch ops (and torchsde, when importable)."""
import torch

import markovkit
from markovkit import fbm
from markovkit import reference as ref
from markovkit.bench.case import Case, cases

K, GAMMA_MAX, HURST, THETA = 5, 20.0, 0.3, 1.0


def _sizes(device: torch.device, quick: bool):
    """(paths, steps) of the simulator case; the issue's 65536 x 1000 on CUDA."""
    if quick:
        return 1024, 100
    return (65536, 1000) if device.type == "cuda" else (4096, 1000)


def _torchsde_peer(x0, n_steps, dt, omega, gamma):
    """torchsde Euler on the augmented (X, Y_1..Y_K) state with its rank-1 noise, or None if not importable."""
    try:
        import torchsde
    except ImportError:
        return None

    class AugmentedSDE(torch.nn.Module):
        noise_type, sde_type = "general", "ito"

        def __init__(self):
            super().__init__()
            self.omega, self.gamma = omega, gamma

        def f(self, t, state):  # state: (paths, 1 + K)
            x, y = state[:, :1], state[:, 1:]
            dx = THETA * (0 - x) - (y * self.gamma * self.omega).sum(1, keepdim=True)
            return torch.cat([dx, -self.gamma * y], 1)

        def g(self, t, state):  # (paths, 1 + K, 1): the one Brownian motion drives every component
            col = torch.cat([self.omega.sum().reshape(1), torch.ones_like(self.gamma)])
            return col.expand(state.shape[0], -1).unsqueeze(-1)

    sde = AugmentedSDE()
    state0 = torch.cat([x0[:, None], x0.new_zeros(x0.shape[0], len(gamma))], 1)
    ts = torch.linspace(0, n_steps * dt, n_steps + 1, device=x0.device)
    return lambda: torchsde.sdeint(sde, state0, ts, method="euler", dt=dt)


@cases("mafbm")
def simulate_cases(device: torch.device, quick: bool):
    paths, n_steps = _sizes(device, quick)
    dt, save_every, dtype = 1.0 / n_steps, 10, torch.float32
    gamma = fbm.gamma_grid(K, GAMMA_MAX)
    omega = fbm.omega(HURST, gamma, 1.0, "II")
    x0 = torch.zeros(paths, dtype=dtype, device=device)
    n_saved = n_steps // save_every + 1
    for scheme in ("euler", "exact"):
        drop, _, factor = fbm.ou_transition(gamma, dt, scheme, omega=omega)
        args = [t.to(device, dtype) for t in (omega, drop, factor)]
        peers = {"eager loop": lambda a=args: ref.mafbm_simulate(x0, n_steps, dt, *a, None, theta=THETA,
                                                                  save_every=save_every)}
        if not quick:  # the whole 1000-step loop is too long to trace; compile its step instead
            step_fn = torch.compile(lambda x, y, o=args: _eager_sim_step(x, y, dt, *o))
            peers["eager loop, compiled step"] = lambda f=step_fn: _loop(f, x0, len(gamma), n_steps, save_every)
        if scheme == "euler":
            sde = _torchsde_peer(x0, n_steps, dt, args[0], gamma.to(device, dtype))
            if sde is not None:
                peers["torchsde euler"] = sde
        yield Case(
            family="mafbm", name=f"simulate {scheme}", shape=f"paths={paths} steps={n_steps} K={K} save/{save_every}",
            dtype=dtype,
            ours=lambda s=scheme: markovkit.mafbm_simulate(x0, n_steps, dt, omega, gamma, theta=THETA,
                                                          save_every=save_every, seed=1, scheme=s, kind="II"),
            peers=peers, bytes=paths * (n_saved + 1) * 4, rate=(paths * n_steps, "path-steps"),
        )


def _eager_sim_step(x, y, dt, omega, drop, factor):
    """One fOU step of the reference loop (x: (paths,), y: (paths, K))."""
    z = torch.randn(x.shape[0], factor.shape[1], dtype=x.dtype, device=x.device)
    dy = z @ factor.T - drop * y
    return x + THETA * (0 - x) * dt + dy @ omega, y + dy


def _loop(step_fn, x0, k, n_steps, save_every):
    x, y, saved = x0, x0.new_zeros(x0.shape[0], k), [x0]
    for n in range(n_steps):
        x, y = step_fn(x, y)
        if (n + 1) % save_every == 0:
            saved.append(x)
    return torch.stack(saved, 1)


@cases("mafbm")
def step_cases(device: torch.device, quick: bool):
    """n steps of the posterior SDE (drift −x, σ = 1, control given) in a Python loop, then backward of the
    final x and the KL into x0, omega and the control."""
    paths = 1024 if quick else (65536 if device.type == "cuda" else 4096)
    dims, n_steps, dt, dtype = 4, 10, 0.01, torch.float32
    gamma = fbm.gamma_grid(K, GAMMA_MAX)
    omega0 = fbm.omega(HURST, gamma, 1.0, "II").to(device, dtype)
    x0 = torch.randn(paths, dims, dtype=dtype, device=device)
    control0 = 0.1 * torch.randn(paths, dims, dtype=dtype, device=device)
    diffusion = torch.ones(paths, dims, dtype=dtype, device=device)
    for scheme in ("euler", "exact"):
        drop, phi, factor = markovkit.step_coefficients(gamma, dt, scheme, dtype=dtype, device=device)

        def ours(s=scheme):
            x, omega, u = (t.clone().requires_grad_() for t in (x0, omega0, control0))
            y, kl = x.new_zeros(paths, dims, K), 0
            for n in range(n_steps):
                x, y, k = markovkit.mafbm_step(x, y, -x, diffusion, omega, gamma, dt, control=u, seed=3, step=n,
                                               scheme=s)
                kl = kl + k
            (x.sum() + kl.sum()).backward()
            return omega.grad, u.grad

        def reference(d=drop, p=phi, f=factor):
            x, omega, u = (t.clone().requires_grad_() for t in (x0, omega0, control0))
            y, kl = x.new_zeros(paths, dims, K), 0
            for _ in range(n_steps):
                noise = torch.randn(paths, dims, f.shape[1], dtype=dtype, device=device)
                x, y, k = ref.mafbm_step(x, y, -x, diffusion, omega, d, p, f, dt, u, noise)
                kl = kl + k
            (x.sum() + kl.sum()).backward()
            return omega.grad, u.grad

        yield Case(
            family="mafbm", name=f"step fwd+bwd {scheme}", shape=f"paths={paths} dims={dims} K={K} steps={n_steps}",
            dtype=dtype, ours=ours, reference=reference, rate=(paths * dims * n_steps, "elem-steps"),
        )

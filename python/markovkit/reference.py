"""Pure-PyTorch references of every markovkit op: the oracles the tests compare against (run them in
float64) and the eager / compiled peers of the benchmarks. Written for clarity, not speed."""
import torch

# --- philox --------------------------------------------------------------------------------------------
# (the stream is checked bit by bit against markovkit._C.philox4x32_10 in tests/test_philox.py)

# --- scan ----------------------------------------------------------------------------------------------

# --- attention -----------------------------------------------------------------------------------------

# --- mafbm ---------------------------------------------------------------------------------------------

def mafbm_step(x, y, drift, diffusion, omega, drop, phi, factor, dt, control=None, noise=None):
    """One augmented MA-fBM step with given noise (paths, dims, R): the oracle of markovkit::mafbm_step.

    dy = −drop·y + phi·u + factor @ z; y' = y + dy; x' = x + b dt + σ ω·dy; kl = ½ dt Σ_dims u².
    """
    u = torch.zeros_like(x) if control is None else control
    dy = -drop * y + phi * u[..., None] + noise @ factor.T
    x_next = x + drift * dt + diffusion * (dy @ omega)
    return x_next, y + dy, 0.5 * dt * (u * u).sum(-1)


def mafbm_simulate(x0, n_steps, dt, omega, drop, factor, y0, theta=0.0, mu=0.0, sigma=1.0, save_every=1,
                   generator=None):
    """Fractional OU paths by an eager loop of torch ops (the benchmark's reference), noise from torch.randn.

    x0: (paths,), y0: (paths, K) or None (zeros); omega, drop: (K,), factor: (K, R). -> (paths, n_saved).
    """
    y = x0.new_zeros(x0.shape[0], len(omega)) if y0 is None else y0
    x, saved = x0, [x0]
    for n in range(n_steps):
        z = torch.randn(x0.shape[0], factor.shape[1], dtype=x0.dtype, device=x0.device, generator=generator)
        dy = z @ factor.T - drop * y
        y = y + dy
        x = x + theta * (mu - x) * dt + sigma * (dy @ omega)
        if (n + 1) % save_every == 0:
            saved.append(x)
    return torch.stack(saved, 1)


# --- mjp -----------------------------------------------------------------------------------------------

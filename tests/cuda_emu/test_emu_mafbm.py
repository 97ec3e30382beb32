"""The MA-fBM CUDA kernels (csrc/mafbm/mafbm_kernel.cu) run by the emulator against the CPU kernels.

Both kernels draw the same Philox normals (csrc/mafbm/mafbm_step.h). float64 runs the same per-path code on
both sides: agreement to 1e-12. float32 draws on the CPU through the lane generator (common/philox_lanes.h, a
polynomial Box-Muller within 4e-7 of float64) and on CUDA through box_muller (libm here, __logf/__sinf on a
GPU): agreement to the float error of the normal transform, carried through the steps (FP32 below).
Shapes: 130 paths = one full block of 128 threads and a partial one; 3 latent dimensions.
"""
import pytest
import torch

import markovkit
from conftest import TOL
from markovkit import fbm
from markovkit import reference as ref

F32, F64 = torch.float32, torch.float64
PATHS, DIMS, DT = 130, 3, 0.01
# float32 CUDA vs CPU kernel with Philox noise: a few ulp of the normals times |factor|, |ω| ≲ 40, ≤ 13 steps
FP32 = dict(rtol=2e-5, atol=2e-5)
FP64 = dict(rtol=1e-12, atol=1e-12)
OPS = torch.ops.markovkit


def _tol(dtype):
    return FP32 if dtype == F32 else FP64


def _rand(*shape, gen, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen, dtype=F64) * scale + shift).to(dtype)


def _gamma(K):
    return torch.ones(1, dtype=F64) if K == 1 else fbm.gamma_grid(K, 20.0)


# --- mafbm_step: forward and backward -------------------------------------------------------------------

def _step_grads(dtype, K, scheme, with_control, given_noise):
    """(x_next, y_next, kl) and the gradients for x, y, drift, diffusion, control, omega of a random linear
    form of them, for 130 paths x 3 dims."""
    gen = torch.Generator().manual_seed(K * 101 + with_control)
    R = 1 if scheme == "euler" else K
    x, drift, control = (_rand(PATHS, DIMS, gen=gen, dtype=dtype) for _ in range(3))
    y = _rand(PATHS, DIMS, K, gen=gen, dtype=dtype)
    diffusion = _rand(PATHS, DIMS, gen=gen, dtype=dtype, scale=0.2, shift=1.0)
    omega = _rand(K, gen=gen, dtype=dtype, scale=3.0)
    noise = _rand(PATHS, DIMS, R, gen=gen, dtype=dtype) if given_noise else None
    weights = [_rand(PATHS, DIMS, gen=gen, dtype=dtype), _rand(PATHS, DIMS, K, gen=gen, dtype=dtype),
               _rand(PATHS, gen=gen, dtype=dtype)]
    leaves = [t.requires_grad_() for t in (x, y, drift, diffusion, control, omega)]
    out = markovkit.mafbm_step(x, y, drift, diffusion, omega, _gamma(K), DT, control=control if with_control else None,
                               noise=noise, seed=None if given_noise else 2**35 + 7, step=3, scheme=scheme)
    loss = sum((w * o).sum() for w, o in zip(weights, out))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    expected = None
    if given_noise:
        f64 = [None if t is None else t.detach().double() for t in (x, y, drift, diffusion, omega, noise)]
        drop, phi, factor = markovkit.step_coefficients(_gamma(K), DT, scheme, dtype=F64)
        expected = ref.mafbm_step(*f64[:4], f64[4], drop, phi, factor, DT,
                                  control.detach().double() if with_control else None, f64[5])
    return [o.detach() for o in out], grads, expected


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("K", [1, 5, 16])
@pytest.mark.parametrize("scheme", ["euler", "exact"])
@pytest.mark.parametrize("with_control", [False, True])
@pytest.mark.parametrize("given_noise", [False, True])
def test_step_forward_and_backward_equal_the_cpu_kernel(emulated, dtype, K, scheme, with_control, given_noise):
    cpu_out, cpu_grads, expected = _step_grads(dtype, K, scheme, with_control, given_noise)
    with emulated():
        cuda_out, cuda_grads, _ = _step_grads(dtype, K, scheme, with_control, given_noise)
    tol = _tol(dtype) if not given_noise else FP64 if dtype == F64 else dict(rtol=1e-6, atol=1e-6)
    for name, c, g in zip(["x_next", "y_next", "kl"], cpu_out, cuda_out):
        torch.testing.assert_close(g, c, **tol, msg=lambda m: f"{name}: {m}")
    # grad omega sums 390 terms in another order (CUDA: per thread, then warp shuffles; CPU: along each row)
    omega_tol = dict(rtol=1e-5, atol=1e-5) if dtype == F32 and given_noise else tol
    for name, c, g in zip(["x", "y", "drift", "diffusion", "control", "omega"], cpu_grads, cuda_grads):
        if name == "control" and not with_control:
            assert c is None and g is None
            continue
        torch.testing.assert_close(g, c, **(omega_tol if name == "omega" else tol), msg=lambda m: f"grad {name}: {m}")
    if given_noise:
        for c, e in zip(cuda_out, expected):
            torch.testing.assert_close(c.double(), e, **TOL[dtype])


def _backward_grads(dtype, grad_kl):
    """mafbm_step_backward of 33 gω rows of 128 paths and a partial one (1 dim, exact, K = 5) for the given
    grad_kl (paths,) -> grad_y, grad_drift, grad_diffusion, grad_control, grad_omega."""
    paths = grad_kl.shape[0]
    gen = torch.Generator().manual_seed(5)
    gx, diffusion, control = (_rand(paths, 1, gen=gen, dtype=dtype) for _ in range(3))
    gy, y = (_rand(paths, 1, 5, gen=gen, dtype=dtype) for _ in range(2))
    drop, phi, factor = markovkit.step_coefficients(_gamma(5), DT, "exact", dtype=dtype)
    return OPS.mafbm_step_backward(gx, gy, grad_kl.to(dtype), y, diffusion, _rand(5, gen=gen, dtype=dtype), drop,
                                   phi, factor, DT, control, None, 9, 2)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_step_backward_reads_strided_grad_kl_and_sums_every_row(emulated, dtype):
    """grad_kl expanded from a scalar (stride 0) or a strided slice is read in place, as its contiguous copy;
    gω sums all 34 rows (CUDA: lanes over rows r, r + 32, then shuffles; CPU: in row order)."""
    paths = 33 * 128 + 5
    strided = _rand(2 * paths, gen=torch.Generator().manual_seed(1), dtype=F64)[::2]
    expanded = torch.tensor(0.7, dtype=F64).expand(paths)
    for grad_kl in (strided, expanded):
        cpu = _backward_grads(dtype, grad_kl)
        with emulated():
            cuda = _backward_grads(dtype, grad_kl)
            cuda_copy = _backward_grads(dtype, grad_kl.contiguous())
        for c, g, g_copy in zip(cpu, cuda, cuda_copy):
            torch.testing.assert_close(g, g_copy, rtol=0, atol=0)
            torch.testing.assert_close(g, c, **(_tol(dtype) if dtype == F64 else dict(rtol=1e-4, atol=1e-4)))
        assert torch.equal(cpu[3], _backward_grads(dtype, grad_kl.contiguous())[3])


# --- mafbm_simulate: every (kK, kR) instance of mafbm_sim_dispatch, forward and backward ----------------

# (K, R, R0): kK = 5, 8, 16 (the smallest compiled kK >= K) x kR = 1, 2, 3, 4 and 0 (R > 4, read at run time);
# R0 = 0 is type II (Y(0) = 0), R0 > 0 a type-I start of rank R0.
INSTANCES = [(1, 1, 1), (3, 2, 3), (3, 3, 0), (4, 4, 2), (5, 5, 5),
             (6, 1, 0), (8, 2, 5), (7, 3, 1), (8, 4, 8), (6, 6, 0),
             (9, 1, 9), (16, 2, 0), (12, 3, 4), (16, 4, 16), (16, 16, 16), (11, 5, 0)]
# (n_steps, save_every): n_steps not a multiple of the 4 (fp32) / 2 (fp64) steps of a Philox group, nor of
# save_every; save_every 1; save_every > n_steps; no steps.
SCHEDULES = [(13, 3), (7, 1), (5, 6), (0, 2)]


def _simulate_args(K, R, R0, dtype, schedule):
    gen = torch.Generator().manual_seed(K * 17 + R)
    x0 = _rand(PATHS, gen=gen, dtype=dtype)
    omega = _rand(K, gen=gen, dtype=F64, scale=3.0)
    drop = torch.rand(K, generator=gen, dtype=F64) * 0.5
    factor = _rand(K, R, gen=gen, dtype=F64, scale=0.1)
    factor0 = _rand(K, R0, gen=gen, dtype=F64, scale=0.5) if R0 > 0 else None
    n_steps, save_every = schedule
    grad_out = _rand(PATHS, n_steps // save_every + 1, gen=gen, dtype=dtype)
    scalars = (n_steps, 0.05, 0.7, 0.3, 1.3, save_every, 2**33 + K)  # n_steps, dt, θ, μ, σ, save_every, seed
    return x0, (omega, drop, factor, factor0), scalars, grad_out


def _simulate_both(args):
    x0, coeffs, scalars, grad_out = args
    out = OPS.mafbm_simulate(x0, *coeffs, *scalars)
    partials = OPS.mafbm_simulate_backward(grad_out, x0, *coeffs, *scalars)
    return out, partials


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("K,R,R0", INSTANCES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_simulate_instances_equal_the_cpu_kernel(emulated, dtype, K, R, R0, schedule):
    args = _simulate_args(K, R, R0, dtype, schedule)
    cpu_out, cpu_partials = _simulate_both(args)
    with emulated():
        cuda_out, cuda_partials = _simulate_both(args)
    assert cuda_out.shape == (PATHS, schedule[0] // schedule[1] + 1)
    torch.testing.assert_close(cuda_out, cpu_out, **_tol(dtype))
    torch.testing.assert_close(cuda_out[:, 0], args[0], rtol=0, atol=0)
    torch.testing.assert_close(cuda_partials, cpu_partials, **_tol(dtype))


def _wrapper_paths(dtype, scheme, kind):
    """markovkit.mafbm_simulate (coefficients by fbm, autograd through the backward op) -> out, grads."""
    gen = torch.Generator().manual_seed(3)
    x0 = _rand(PATHS, gen=gen, dtype=dtype).requires_grad_()
    params = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.9, -0.4, 1.2)]
    w = fbm.omega(0.3, fbm.gamma_grid(5, 20.0), 1.0, kind)
    out = markovkit.mafbm_simulate(x0, 10, 0.02, w, fbm.gamma_grid(5, 20.0), theta=params[0], mu=params[1],
                                   sigma=params[2], save_every=4, seed=11, scheme=scheme, kind=kind)
    weights = _rand(*out.shape, gen=gen, dtype=dtype)
    grads = torch.autograd.grad((weights * out).sum(), [x0, *params])
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("scheme,kind", [("euler", "II"), ("exact", "I")])
def test_simulate_wrapper_and_its_gradients_equal_the_cpu_kernel(emulated, dtype, scheme, kind):
    cpu_out, cpu_grads = _wrapper_paths(dtype, scheme, kind)
    with emulated():
        cuda_out, cuda_grads = _wrapper_paths(dtype, scheme, kind)
    torch.testing.assert_close(cuda_out, cpu_out, **_tol(dtype))
    for name, c, g in zip(["x0", "theta", "mu", "sigma"], cpu_grads, cuda_grads):
        # θ, μ, σ are sums over 130 paths of terms of size ~10: float32 sums agree to a few 1e-5 relative
        tol = _tol(dtype) if name == "x0" or dtype == F64 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g, c, **tol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_path_offset_draws_the_streams_of_those_paths(emulated, dtype):
    """A CUDA call on paths 70.. with path_offset 70 draws what a CPU call on all paths draws for them: the step
    (3 dims, exact, K = 5; forward and the gradients that see the noise) and the simulator (type I)."""
    gen = torch.Generator().manual_seed(8)
    x, drift = (_rand(PATHS, DIMS, gen=gen, dtype=dtype) for _ in range(2))
    y, weight = (_rand(PATHS, DIMS, 5, gen=gen, dtype=dtype) for _ in range(2))
    diffusion = _rand(PATHS, DIMS, gen=gen, dtype=dtype, scale=0.2, shift=1.0)
    omega, x0 = _rand(5, gen=gen, dtype=dtype), _rand(PATHS, gen=gen, dtype=dtype)

    def run(first):
        leaves = [t[first:].clone().requires_grad_() for t in (x, y, drift, diffusion)]
        out = markovkit.mafbm_step(*leaves, omega, _gamma(5), DT, seed=5, step=2, scheme="exact", path_offset=first)
        grads = torch.autograd.grad((out[1] * weight[first:]).sum() + out[0].sum(), leaves)
        sim = markovkit.mafbm_simulate(x0[first:], 9, DT, fbm.omega(0.3, _gamma(5), 1.0, "I"), _gamma(5), seed=6,
                                       path_offset=first)
        return [o.detach() for o in out] + list(grads[1:]) + [sim]

    cpu = run(0)
    with emulated():
        cuda = run(70)
    for name, c, g in zip(["x_next", "y_next", "kl", "grad y", "grad drift", "grad diffusion", "simulate"], cpu, cuda):
        torch.testing.assert_close(g, c[70:], **_tol(dtype), msg=lambda m: f"{name}: {m}")


# --- no paths; the glue's checks on the CUDA branch ------------------------------------------------------

def test_no_paths(emulated):
    with emulated():
        x, y = torch.zeros(0, 2), torch.zeros(0, 2, 5)
        omega = torch.ones(5, requires_grad=True)
        out = markovkit.mafbm_step(x, y, x, x, omega, _gamma(5), DT, seed=0)
        (grad_omega,) = torch.autograd.grad(out[0].sum() + out[2].sum(), omega)
        sim = markovkit.mafbm_simulate(torch.zeros(0), 9, DT, torch.ones(5), _gamma(5), seed=0, save_every=2)
    assert [t.shape for t in out] == [(0, 2), (0, 2, 5), (0,)] and sim.shape == (0, 5)
    assert torch.equal(grad_omega, torch.zeros(5))


def test_bad_input_errors_on_the_cuda_branch(emulated):
    x, y = torch.zeros(4, 2), torch.zeros(4, 2, 5)
    with emulated():
        with pytest.raises(RuntimeError, match=r"y: expected shape \[4, 2, 5\], got \[4, 2, 4\]"):
            markovkit.mafbm_step(x, y[..., :4], x, x, torch.ones(5), _gamma(5), DT, seed=0)
        with pytest.raises(RuntimeError, match="x: expected dtype Float or Double, got Half"):
            markovkit.mafbm_step(x.half(), y.half(), x.half(), x.half(), torch.ones(5), _gamma(5), DT, seed=0)
        with pytest.raises(RuntimeError, match=r"grad_out: expected shape \[4, 6\], got \[4, 5\]"):
            OPS.mafbm_simulate_backward(torch.zeros(4, 5), torch.zeros(4), torch.ones(5), torch.zeros(5),
                                        torch.ones(5, 1), None, 10, DT, 0.0, 0.0, 1.0, 2, 0)
        with pytest.raises(RuntimeError, match=r"factor0: expected shape \(K=5, R0\)"):
            OPS.mafbm_simulate(torch.zeros(4), torch.ones(5), torch.zeros(5), torch.ones(5, 1), torch.ones(4, 4),
                               10, DT, 0.0, 0.0, 1.0, 2, 0)

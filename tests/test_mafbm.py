"""mafbm_step / mafbm_simulate: float64 references, the Philox layout, gradients, op contract, statistics."""
import functools
import itertools
import math
import re
import warnings

import pytest
import torch

import markovkit
from conftest import HAS_CUDA, TOL, on_1_and_3_threads
from markovkit import fbm
from markovkit import reference as ref

F64 = torch.float64
GAMMA = fbm.gamma_grid(5, 20)
OMEGA_II = fbm.omega(0.3, GAMMA, 1.0, "II")


def _inputs(paths, dims, K, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, drift, control = (torch.randn(paths, dims, generator=g, dtype=F64) for _ in range(3))
    y = torch.randn(paths, dims, K, generator=g, dtype=F64)
    diffusion = torch.rand(paths, dims, generator=g, dtype=F64) + 0.5
    return [t.to(dtype=dtype, device=device) for t in (x, y, drift, diffusion, control)]


def _philox_normals_f64(seed, step, stream, R):
    """The R float64 normals of (stream, step): normals [step·R, step·R + R) of the stream, normal i from
    Box-Muller on the 52-bit uniforms of philox_block(seed, lo = i // 2, hi = stream), slot i % 2 (the layout
    documented in csrc/mafbm/mafbm_step.h)."""
    z = []
    for i in range(step * R, step * R + R):
        b = i // 2
        w = markovkit._C.philox4x32_10([b & 0xFFFFFFFF, b >> 32, stream & 0xFFFFFFFF, stream >> 32],
                                       [seed & 0xFFFFFFFF, seed >> 32])
        u0 = ((((w[0] << 32) | w[1]) >> 12) + 0.5) * 2.0**-52
        u1 = ((((w[2] << 32) | w[3]) >> 12) + 0.5) * 2.0**-52
        r = math.sqrt(-2 * math.log(u0))
        z.append(r * (math.cos if i % 2 == 0 else math.sin)(2 * math.pi * u1))
    return z


# --- the step against the float64 reference ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", ["euler", "exact"])
@pytest.mark.parametrize("with_control", [False, True])
def test_step_matches_reference(device, dtype, scheme, with_control):
    x, y, drift, diffusion, control = _inputs(37, 3, 5, F64, "cpu")
    control = control if with_control else None
    drop, phi, factor = markovkit.step_coefficients(GAMMA, 0.01, scheme, dtype=F64)
    noise = torch.randn(37, 3, factor.shape[1], dtype=F64)
    expected = ref.mafbm_step(x, y, drift, diffusion, OMEGA_II, drop, phi, factor, 0.01, control, noise)
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    got = markovkit.mafbm_step(cast(x), cast(y), cast(drift), cast(diffusion), cast(OMEGA_II), GAMMA, 0.01,
                               control=cast(control), noise=cast(noise), scheme=scheme)
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.device.type == device.type
        torch.testing.assert_close(g.cpu().double(), e, **TOL[dtype])


@pytest.mark.parametrize("dt", [0.01, 0.3])
def test_step_coefficients_are_the_ou_transition(dt):
    """The coefficients against their formulas (the step tests take them from step_coefficients), γ = 0 included.
    exact: drop = 1 - e^(-γ dt), phi = drop / γ (dt at γ = 0), factor factorᵀ = Σ(dt) with
    Σ_ij = (1 - e^(-(γ_i + γ_j) dt)) / (γ_i + γ_j); euler (γ_max dt < 2): γ dt, dt, √dt for every factor."""
    g = torch.cat([torch.zeros(1, dtype=F64), GAMMA])
    drop, phi, factor = markovkit.step_coefficients(g, dt, "exact", dtype=F64)
    gs = g[:, None] + g[None, :]
    cov = torch.where(gs == 0, torch.full_like(gs, dt), -torch.expm1(-gs * dt) / gs.clamp_min(1e-300))
    torch.testing.assert_close(drop, -torch.expm1(-g * dt), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(phi, torch.where(g == 0, dt, -torch.expm1(-g * dt) / g.clamp_min(1e-300)), rtol=1e-13,
                               atol=1e-15)
    torch.testing.assert_close(factor @ factor.T, cov, rtol=1e-10, atol=1e-13)
    if dt * float(g.max()) < 2:  # Euler refuses larger steps
        drop, phi, factor = markovkit.step_coefficients(g, dt, "euler", dtype=F64)
        torch.testing.assert_close(drop, g * dt, rtol=1e-15, atol=0)
        torch.testing.assert_close(phi, torch.full_like(g, dt), rtol=1e-15, atol=0)
        torch.testing.assert_close(factor, torch.full((len(g), 1), math.sqrt(dt), dtype=F64), rtol=1e-15, atol=0)


def _philox_normals_f32(seed, step, stream, R):
    """The float32 layout: normal i is slot i % 4 of philox_block(seed, lo = i // 4, hi = stream), Box-Muller
    pair (i % 4) // 2 of its 23-bit uniforms, here in float64 (the kernel's is within 4e-7 relative)."""
    z = []
    for i in range(step * R, step * R + R):
        b, pair = i // 4, (i % 4) // 2
        w = markovkit._C.philox4x32_10([b & 0xFFFFFFFF, b >> 32, stream & 0xFFFFFFFF, stream >> 32],
                                       [seed & 0xFFFFFFFF, seed >> 32])
        u0, u1 = (((w[2 * pair + j] >> 9) + 0.5) * 2.0**-23 for j in (0, 1))
        r = math.sqrt(-2 * math.log(u0))
        z.append(r * (math.cos if i % 2 == 0 else math.sin)(2 * math.pi * u1))
    return z


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_philox_noise_layout(dtype):
    """The in-kernel draw equals given noise built from the documented counters: bit for bit in float64, to the
    float32 Box-Muller's error in float32. Steps 0-3 meet every slot of a block; 90 elements fill one lane group
    of the float32 CPU kernel and part of a second."""
    paths, dims = 30, 3
    x, y, drift, diffusion, control = _inputs(paths, dims, 5, dtype, "cpu")
    normals, tol = ((_philox_normals_f64, dict(rtol=1e-14, atol=1e-14)) if dtype == F64
                    else (_philox_normals_f32, dict(rtol=1e-5, atol=1e-5)))
    seed = 2**33 + 17
    for scheme, step in itertools.product(["euler", "exact"], range(4)):
        R = markovkit.step_coefficients(GAMMA, 0.01, scheme, dtype=F64)[2].shape[1]
        noise = torch.tensor([[normals(seed, step, p * dims + d, R) for d in range(dims)] for p in range(paths)],
                             dtype=dtype)
        drawn = markovkit.mafbm_step(x, y, drift, diffusion, OMEGA_II.to(dtype), GAMMA, 0.01, control=control,
                                     seed=seed, step=step, scheme=scheme)
        given = markovkit.mafbm_step(x, y, drift, diffusion, OMEGA_II.to(dtype), GAMMA, 0.01, control=control,
                                     noise=noise, scheme=scheme)
        for a, b in zip(drawn, given):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_step_does_not_depend_on_the_thread_count(dtype):
    """Forward and backward on 1 and 3 threads give the same bits (the gradient of omega: fixed rows of 128 paths
    summed in row order; 6000 elements make several lane groups and rows per thread)."""
    x, y, drift, diffusion, control = _inputs(2000, 3, 5, dtype, "cpu")

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, y, control, OMEGA_II.to(dtype))]
        out = markovkit.mafbm_step(leaves[0], leaves[1], drift, diffusion, leaves[3], GAMMA, 0.01, control=leaves[2],
                                   seed=5, step=7, scheme="exact")
        loss = sum((torch.linspace(-1, 1, t.numel(), dtype=dtype).view(t.shape) * t).sum() for t in out)
        return [t.detach() for t in out] + list(torch.autograd.grad(loss, leaves))

    single, multi = on_1_and_3_threads(run)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


def test_steps_and_seeds_give_fresh_noise():
    x, y, drift, diffusion, _ = _inputs(64, 2, 5, torch.float32, "cpu")
    run = lambda seed, step: markovkit.mafbm_step(x, y, drift, diffusion, OMEGA_II, GAMMA, 0.01, seed=seed,  # noqa: E731
                                                  step=step)[0]
    assert torch.equal(run(1, 0), run(1, 0))
    assert not torch.isclose(run(1, 0), run(1, 1)).any()
    assert not torch.isclose(run(1, 0), run(2, 0)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paths_split_over_calls_draw_what_one_call_draws(device, dtype):
    """path_offset = the global index of a call's first path: 150 paths x 3 dims split at path 37 (not a multiple
    of the CPU's 64 lanes) in two calls give one call's step (forward, and the gradients that see the noise) and
    simulated paths (both kinds), bit for bit; the same paths at another offset draw other noise."""
    leaves = [t.requires_grad_() for t in _inputs(150, 3, 5, dtype, device)]
    weights = [torch.randn(150, 3, dtype=dtype, device=device), torch.randn(150, 3, 5, dtype=dtype, device=device)]

    def step(rows, offset):
        x, y, drift, diffusion, control = (t[rows] for t in leaves)
        out = markovkit.mafbm_step(x, y, drift, diffusion, OMEGA_II.to(device), GAMMA, 0.05, control=control,
                                   seed=11, step=4, scheme="exact", path_offset=offset)
        grads = torch.autograd.grad(sum((w[rows] * o).sum() for w, o in zip(weights, out)), leaves)
        return [o.detach() for o in out] + [g[rows] for g in grads[1:]]  # y, drift, diffusion, control

    whole, first, second = step(slice(None), 0), step(slice(0, 37), 0), step(slice(37, None), 37)
    for w, a, b in zip(whole, first, second):
        assert torch.equal(w, torch.cat([a, b]))
    assert not torch.isclose(step(slice(37, None), 0)[0], second[0]).any()
    x0 = torch.randn(150, dtype=dtype, device=device)
    for kind in ("I", "II"):
        sim = functools.partial(markovkit.mafbm_simulate, n_steps=9, dt=0.05, omega=OMEGA_II, gamma=GAMMA, seed=3,
                                kind=kind)
        assert torch.equal(sim(x0), torch.cat([sim(x0[:37]), sim(x0[37:], path_offset=37)]))
    with pytest.raises(ValueError, match=re.escape("mafbm_step: path_offset: expected an int in [0, 2**63), got -1")):
        step(slice(None), -1)
    with pytest.raises(RuntimeError, match=re.escape("path_offset: expected an index >= 0 with (path_offset + paths) "
                                                     "* 3 < 2^63 (the streams' range), got 3074457345618258602")):
        step(slice(None), 2**63 // 3)


def test_half_is_brownian_motion(device):
    """γ = [0], ω = [1] (H = ½): x' − x = b dt + σ √dt z exactly, for both schemes."""
    x, y, drift, diffusion, _ = _inputs(16, 2, 1, F64, device)
    z = torch.randn(16, 2, 1, dtype=F64, device=device)
    for scheme in ["euler", "exact"]:
        x1, y1, _ = markovkit.mafbm_step(x, y, drift, diffusion, torch.ones(1, dtype=F64, device=device),
                                         torch.zeros(1), 0.04, noise=z, scheme=scheme)
        torch.testing.assert_close(x1, x + 0.04 * drift + diffusion * 0.2 * z[..., 0])
        torch.testing.assert_close(y1, y + 0.2 * z)


def test_constant_control_kl(device):
    """u = c on [0, T]: Σ_n kl_n = ½ c² T per latent dimension."""
    paths, dims, n, dt, c = 8, 3, 50, 0.02, 1.7
    x, y, drift, diffusion, _ = _inputs(paths, dims, 5, F64, device)
    control = torch.full((paths, dims), c, dtype=F64, device=device)
    total = torch.zeros(paths, dtype=F64, device=device)
    for step in range(n):
        x, y, kl = markovkit.mafbm_step(x, y, drift, diffusion, OMEGA_II.to(device), GAMMA, dt, control=control,
                                        seed=3, step=step, scheme="exact")
        total += kl
    torch.testing.assert_close(total, torch.full_like(total, 0.5 * c * c * n * dt * dims))


# --- autograd, op contract -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["euler", "exact"])
@pytest.mark.parametrize("given_noise", [False, True])
def test_step_gradcheck(device, scheme, given_noise):
    x, y, drift, diffusion, control = (t.requires_grad_() for t in _inputs(5, 2, 5, F64, device))
    omega = OMEGA_II.to(device).requires_grad_()
    R = markovkit.step_coefficients(GAMMA, 0.05, scheme, dtype=F64)[2].shape[1]
    noise = torch.randn(5, 2, R, dtype=F64, device=device) if given_noise else None

    def f(x, y, drift, diffusion, omega, control):
        return markovkit.mafbm_step(x, y, drift, diffusion, omega, GAMMA, 0.05, control=control, noise=noise,
                                    seed=None if given_noise else 11, step=4, scheme=scheme)

    torch.autograd.gradcheck(f, (x, y, drift, diffusion, omega, control))
    # outputs left unused (None gradients) and no control
    out = markovkit.mafbm_step(x, y, drift, diffusion, omega, GAMMA, 0.05, seed=1, scheme=scheme)
    gx, gw = torch.autograd.grad(out[0].sum(), (x, omega))
    torch.testing.assert_close(gx, torch.ones_like(gx))
    # x' = x + b dt + σ ω·dy with dy = y' − y: d Σ x' / dω = Σ_{paths, dims} σ dy
    dy = (out[1] - y).detach()
    torch.testing.assert_close(gw, (diffusion.detach()[..., None] * dy).sum((0, 1)), **TOL[F64])


def _op_args(device, dtype, with_control, R):
    x, y, drift, diffusion, control = _inputs(6, 2, 5, dtype, device)
    drop, phi, factor = markovkit.step_coefficients(GAMMA, 0.05, "exact" if R > 1 else "euler", dtype=dtype,
                                                    device=device)
    noise = torch.randn(6, 2, R, dtype=dtype, device=device) if R == 1 else None
    return (x.requires_grad_(), y.requires_grad_(), drift, diffusion, OMEGA_II.to(device, dtype).requires_grad_(),
            drop, phi, factor, 0.05, control if with_control else None, noise, 7, 3)


@pytest.mark.parametrize("with_control,R", [(True, 1), (False, 5)])
def test_opcheck(device, with_control, R):
    args = _op_args(device, F64, with_control, R)
    torch.library.opcheck(torch.ops.markovkit.mafbm_step, (*args, 11))  # path_offset 11
    x, y, drift, diffusion, omega, drop, phi, factor, dt, control, noise, seed, step = args
    grads = (torch.randn_like(x), torch.randn_like(y), torch.randn(6, dtype=F64, device=device))
    torch.library.opcheck(torch.ops.markovkit.mafbm_step_backward,
                          (*grads, y.detach(), diffusion, omega.detach(), drop, phi, factor, dt, control, noise, seed,
                           step, 11))
    x0 = torch.randn(9, dtype=F64, device=device)
    d, _, f = fbm.ou_transition(GAMMA, 0.05, "exact", OMEGA_II)
    sim_args = (OMEGA_II, d, f, fbm.stationary_factor(GAMMA), 7, 0.05, 1.0, 0.5, 1.0, 3, 5, 13)  # path_offset 13
    torch.library.opcheck(torch.ops.markovkit.mafbm_simulate, (x0, *sim_args),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.markovkit.mafbm_simulate_backward,
                          (torch.randn(9, 3, dtype=F64, device=device), x0, *sim_args),
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_non_contiguous_inputs(device):
    """Transposed x, y and gradients: the fake kernels give the real (contiguous) output strides."""
    x, y, drift, diffusion, omega, drop, phi, factor, dt, control, noise, seed, step = _op_args(device, F64, True, 1)
    x_t = x.detach().t().contiguous().t()
    y_t = y.detach().transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_t.is_contiguous() and not y_t.is_contiguous()
    torch.library.opcheck(torch.ops.markovkit.mafbm_step,
                          (x_t, y_t, drift, diffusion, omega.detach(), drop, phi, factor, dt, control, noise, seed,
                           step), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.markovkit.mafbm_step_backward,
                          (x_t, y_t, torch.ones(6, dtype=F64, device=device), y_t, diffusion, omega.detach(), drop,
                           phi, factor, dt, control, noise, seed, step), test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph(device):
    x, y, drift, diffusion, control = _inputs(6, 2, 5, torch.float32, device)
    omega = OMEGA_II.to(device, torch.float32)

    def f(x, y):
        for step in range(2):
            x, y, kl = markovkit.mafbm_step(x, y, drift, diffusion, omega, GAMMA, 0.01, control=control, seed=5,
                                            step=step, scheme="exact")
        return x, y, kl

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    # no on-disk caches: their keys miss the op's registrations, so a graph cached by an older build (another
    # backward schema) would be reused
    with torch._inductor.config.patch(force_disable_caches=True):
        for a, b in zip(compiled(x, y), f(x, y)):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
        xg = x.clone().requires_grad_()
        compiled(xg, y)[0].sum().backward()
    torch.testing.assert_close(xg.grad, torch.ones_like(xg))


def test_compile_checks_constant_gamma_and_dt():
    """torch.compile(fullgraph=True): a list gamma works (bit for bit the eager step) and the eager checks run
    while tracing; the bias warning names the line that calls the compiled function."""
    x, y, drift, diffusion, _ = _inputs(4, 2, 3, F64, "cpu")
    gamma, w = fbm.gamma_grid(3, 20).tolist(), torch.ones(3, dtype=F64)

    def f(x, y, gamma, dt, scheme):
        return markovkit.mafbm_step(x, y, drift, diffusion, w, gamma, dt, seed=3, scheme=scheme)

    def compiled(*args):
        torch._dynamo.reset()
        return torch.compile(f, backend="eager", fullgraph=True)(x, y, *args)

    for a, b in zip(compiled(gamma, 0.05, "exact"), f(x, y, gamma, 0.05, "exact")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.warns(UserWarning) as record:
        compiled(gamma, 0.0311, "euler")
    bias = [r for r in record if "gamma_max*dt = 0.622 > 0.5" in str(r.message)]
    assert len(bias) == 1 and bias[0].filename == __file__
    # a ValueError raised while tracing reaches the caller as dynamo's Unsupported, with the message
    for args, message in [((gamma, 0.5, "euler"), r"Euler-Maruyama is unstable for gamma_max\*dt >= 2"),
                          (([-g for g in gamma], 0.05, "exact"), "gamma: expected non-negative finite rates"),
                          ((gamma, -0.05, "exact"), "dt: expected a positive finite time step, got -0.05")]:
        with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match=message):
            compiled(*args)


def test_compiled_step_treats_a_gamma_that_requires_grad_as_a_constant():
    """gamma gets no gradient (its values are read eagerly); traced, its coefficients were differentiable and the
    backward raised 'the derivative for drop is not implemented'."""
    x, y, drift, diffusion, _ = _inputs(3, 2, 4, F64, "cpu")
    x.requires_grad_()
    gamma = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=F64, requires_grad=True)

    def f(x, gamma):
        x_next, y_next, _ = markovkit.mafbm_step(x, y, drift, diffusion, OMEGA_II[:4], gamma, 0.01, seed=5, step=3)
        return x_next.sum() + y_next.sum()

    torch._dynamo.reset()
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        grad_x, grad_gamma = torch.autograd.grad(fn(x, gamma), (x, gamma), allow_unused=True)
        torch.testing.assert_close(grad_x, torch.ones_like(x))
        assert grad_gamma is None


def test_step_coefficients_cannot_change_the_steps_cache():
    """In-place edits of what step_coefficients returns leave later steps alone (y' = e^{−γ dt} y at z = 0)."""
    x, y, drift, diffusion, _ = _inputs(3, 2, 5, F64, "cpu")
    z = torch.zeros(3, 2, 5, dtype=F64)
    run = lambda: markovkit.mafbm_step(x, y, drift, diffusion, OMEGA_II, GAMMA, 0.0123, noise=z,  # noqa: E731
                                       scheme="exact")[1]
    before = run()
    torch.testing.assert_close(before, y * torch.exp(-GAMMA * 0.0123), **TOL[F64])
    for c in markovkit.step_coefficients(GAMMA, 0.0123, "exact", dtype=F64):
        c.mul_(0)
    torch.testing.assert_close(run(), before, rtol=0, atol=0)


def test_euler_bias_warning_points_at_the_callers_line():
    """The warning names this file. Each call has its own dt: the step warns once per memoised (gamma, dt)."""
    x, y, drift, diffusion, _ = _inputs(2, 1, 5, F64, "cpu")
    calls = [lambda: markovkit.mafbm_step(x, y, drift, diffusion, OMEGA_II, GAMMA, 0.0321, seed=0),
             lambda: markovkit.step_coefficients(GAMMA, 0.0322, dtype=F64),
             lambda: markovkit.mafbm_simulate(torch.zeros(2), 2, 0.0323, OMEGA_II, GAMMA, seed=0, scheme="euler")]
    for call, gamma_dt in zip(calls, ["0.642", "0.644", "0.646"]):
        with pytest.warns(UserWarning, match=rf"gamma_max\*dt = {gamma_dt} > 0.5") as record:
            call()
        assert [r.filename for r in record] == [__file__]


# --- the simulator -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simulate_equals_a_loop_of_steps(device, dtype):
    """Same seed, same counters: the fused path is the step op with dims = 1 (type II, θ ≠ 0)."""
    paths, n, dt, theta, mu, sigma = 33, 24, 0.05, 0.8, 0.3, 1.4
    x0 = torch.randn(paths, dtype=F64).to(device, dtype)
    w = fbm.omega(0.3, GAMMA, 1.0, "II")
    drop, phi, factor = fbm.ou_transition(GAMMA, dt, "exact", omega=w)
    out = markovkit.mafbm_simulate(x0, n, dt, w, GAMMA, theta=theta, mu=mu, sigma=sigma, save_every=4, seed=9,
                                   kind="II")
    assert out.shape == (paths, n // 4 + 1)
    args = [t.to(device, dtype) for t in (w, drop, phi, factor)]
    x, y = x0[:, None], torch.zeros(paths, 1, 5, dtype=dtype, device=device)
    saved = [x0]
    for step in range(n):
        b = theta * (mu - x)
        x, y, _ = torch.ops.markovkit.mafbm_step(x, y, b, torch.full_like(x, sigma), *args, dt, None, None, 9, step)
        if (step + 1) % 4 == 0:
            saved.append(x[:, 0])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, torch.stack(saved, 1), **tol)


@pytest.mark.parametrize("kind", ["I", "II"])
def test_simulate_gradcheck(device, kind):
    """x0, θ, μ, σ (fp64): the tangent re-run against finite differences of the same draws."""
    w = fbm.omega(0.3, GAMMA, 1.0, kind)
    x0 = torch.randn(6, dtype=F64, device=device, requires_grad=True)
    params = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.7, 0.2, 1.3)]

    def f(x0, theta, mu, sigma):
        return markovkit.mafbm_simulate(x0, 13, 0.05, w, GAMMA, theta=theta, mu=mu, sigma=sigma, save_every=3,
                                        seed=5, kind=kind)

    torch.autograd.gradcheck(f, (x0, *params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simulate_backward_closed_forms(device, dtype):
    """L = Σ out: dL/dx0 = Σ_j ρ^{j·s}, dL/dμ = Σ_j (1 − ρ^{j·s}) (x0 = μ = 0 start), ρ = 1 − θh."""
    n, dt, theta, se = 40, 0.05, 0.8, 4
    x0 = torch.zeros(100, dtype=dtype, device=device, requires_grad=True)
    mu = torch.tensor(0.0, dtype=F64, requires_grad=True)
    out = markovkit.mafbm_simulate(x0, n, dt, OMEGA_II, GAMMA, theta=theta, mu=mu, seed=1, save_every=se,
                                   kind="II")
    out.sum().backward()
    rho = (1 - theta * dt) ** (torch.arange(0, n // se + 1, dtype=F64) * se)
    torch.testing.assert_close(x0.grad.double().cpu(), torch.full((100,), float(rho.sum()), dtype=F64),
                               **TOL[dtype])
    assert math.isclose(mu.grad, 100 * float((1 - rho).sum()), rel_tol=1e-4)


def _moments(paths):
    """Var at the saved times, Cov(first saved, last), the last one-step increment's variance."""
    c = paths - paths.mean(0)
    var = (c * c).mean(0)
    return var, (c[:, 0] * c[:, -1]).mean(), ((c[:, -1] - c[:, -2]) ** 2).mean()


def _analytic(w, kind, times):
    cov = fbm.mafbm_cov(times, times, w, GAMMA, kind)
    inc = cov[-1, -1] + cov[-2, -2] - 2 * cov[-1, -2]
    return torch.diagonal(cov), cov[0, -1], inc


@pytest.mark.parametrize("kind,dt", [("II", 0.1), ("I", 0.1), ("II", 0.5)])
def test_simulate_exact_matches_the_mafbm_law(kind, dt):
    """2^18 paths; the exact-OU scheme has the analytic MA-fBM law at any dt (γ_max·dt = 2 and 10 here)."""
    paths, n = 2**18, round(1.0 / dt)
    w = fbm.omega(0.3, GAMMA, 1.0, kind)
    out = markovkit.mafbm_simulate(torch.zeros(paths), n, dt, w, GAMMA, seed=21, kind=kind).double()
    times = torch.arange(1, n + 1, dtype=F64) * dt
    var, cov, inc = _moments(out[:, 1:])
    var_a, cov_a, inc_a = _analytic(w, kind, times)
    tol = 4 * math.sqrt(2 / paths)  # 4 standard errors of a variance estimate
    assert ((var / var_a - 1).abs() < tol).all(), (var / var_a)
    assert abs(cov - cov_a) < tol * math.sqrt(var_a[0] * var_a[-1])
    assert abs(inc / inc_a - 1) < tol


def test_reference_simulator_has_the_mafbm_law_and_the_euler_drift():
    """reference.mafbm_simulate (the bench's eager loop): from rest with θ = 0, σ = 1 and the exact factor, the
    moments of the MA-fBM law (type II); with σ = 0, the Euler decay x_n = μ + (x0 - μ)(1 - θ dt)^n."""
    paths, dt = 2**16, 0.1
    drop, _, factor = markovkit.step_coefficients(GAMMA, dt, "exact", dtype=F64)
    g = torch.Generator().manual_seed(4)
    out = ref.mafbm_simulate(torch.zeros(paths, dtype=F64), 10, dt, OMEGA_II, drop, factor, None, generator=g)
    var, cov, inc = _moments(out[:, 1:])
    var_a, cov_a, inc_a = _analytic(OMEGA_II, "II", torch.arange(1, 11, dtype=F64) * dt)
    tol = 4 * math.sqrt(2 / paths)
    assert ((var / var_a - 1).abs() < tol).all() and abs(inc / inc_a - 1) < tol
    assert abs(cov - cov_a) < tol * math.sqrt(var_a[0] * var_a[-1])
    x = ref.mafbm_simulate(torch.full((2,), 3.0, dtype=F64), 10, dt, OMEGA_II, drop, factor, None, theta=0.7, mu=1.0,
                           sigma=0.0, save_every=5, generator=g)
    decay = (1 - 0.7 * dt) ** torch.tensor([0.0, 5.0, 10.0], dtype=F64)
    torch.testing.assert_close(x, (1 + 2 * decay).expand(2, 3), rtol=1e-14, atol=0)


def test_simulate_first_step_from_the_documented_counters():
    """Type I, float64, path_offset 5: X(dt) = x0 + Σ_k ω_k (−drop_k Y_k(0) + (factor z)_k), written out in float64
    from the counters of csrc/mafbm/mafbm_step.h: Y(0) = factor0 · z0 with z0 = normals [0, R0) of the start stream
    (5 + p) | 2^63, z = normals [0, R) of stream 5 + p (the statistical tests miss a few % in Y(0)'s amplitude)."""
    seed, dt, paths = 2**40 + 9, 0.05, 3
    w = fbm.omega(0.3, GAMMA, 1.0, "I")
    drop, _, factor = fbm.ou_transition(GAMMA, dt, "exact", omega=w)
    factor0 = fbm.stationary_factor(GAMMA, w)
    x0 = torch.randn(paths, dtype=F64)
    got = markovkit.mafbm_simulate(x0, 1, dt, w, GAMMA, seed=seed, kind="I", path_offset=5)[:, 1]
    for p in range(paths):
        z0 = torch.tensor(_philox_normals_f64(seed, 0, (5 + p) | 2**63, factor0.shape[1]), dtype=F64)
        z = torch.tensor(_philox_normals_f64(seed, 0, 5 + p, factor.shape[1]), dtype=F64)
        dy = -drop * (factor0 @ z0) + factor @ z
        torch.testing.assert_close(got[p], x0[p] + w @ dy, rtol=1e-12, atol=1e-12)


def test_simulate_small_lags_follow_mafbm_not_fbm():
    """Type I has stationary increments: at lag 1e-3 ≪ 1/γ_max the simulated increment variance is the
    MA-fBM one (locally Brownian), far from the fBM value lag^{2H}."""
    paths, dt = 2**18, 1e-3
    w = fbm.omega(0.3, GAMMA, 1.0, "I")
    out = markovkit.mafbm_simulate(torch.zeros(paths), 2, dt, w, GAMMA, seed=5, kind="I").double()
    inc = out.diff(dim=1)
    cov = fbm.mafbm_cov([dt], [dt], w, GAMMA, "I")[0, 0]
    tol = 4 * math.sqrt(2 / paths)
    assert ((inc.var(0) / cov - 1).abs() < tol).all()
    assert abs(cov / dt**0.6 - 1) > 0.5


def test_simulate_euler_shows_its_bias():
    """Euler at γ_max·dt = 1: final variance ×1.025 and last increment ×2 (spec §7); the exact scheme has none."""
    paths, n, dt = 2**18, 20, 0.05
    w = OMEGA_II
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = markovkit.mafbm_simulate(torch.zeros(paths), n, dt, w, GAMMA, seed=4, kind="II", scheme="euler")
    var, _, inc = _moments(out.double())
    var_a, _, inc_a = _analytic(w, "II", torch.arange(0, n + 1, dtype=F64) * dt)
    assert abs(var[-1] / var_a[-1] - 1.025) < 0.012
    assert abs(inc / inc_a - 2.012) < 0.05


def test_simulate_brownian_limit_and_ou_mean():
    """γ = [0], ω = [1]: Brownian paths (Var t, independent increments); θ > 0: E X_n = (1 − θh)^n x0."""
    paths, n, dt = 2**16, 10, 0.1
    out = markovkit.mafbm_simulate(torch.zeros(paths, dtype=F64), n, dt, torch.ones(1), torch.zeros(1), seed=8,
                                   kind="II").double()
    t = torch.arange(0, n + 1, dtype=F64) * dt
    tol = 5 * math.sqrt(2 / paths)
    assert ((out[:, 1:].var(0) / t[1:] - 1).abs() < tol).all()
    inc = out.diff(dim=1)
    assert abs(torch.corrcoef(inc[:, :2].T)[0, 1]) < 5 / math.sqrt(paths)
    ou = markovkit.mafbm_simulate(torch.ones(paths, dtype=F64), n, dt, OMEGA_II, GAMMA, theta=2.0, seed=8, kind="II")
    mean = (1 - 2.0 * dt) ** torch.arange(0, n + 1, dtype=F64)
    se = ou.std(0) / math.sqrt(paths)
    assert ((ou.mean(0) - mean).abs() < 5 * se + 1e-12).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_and_cuda_streams_agree(dtype):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    x0 = torch.randn(1000, dtype=dtype)
    for kind, scheme in [("I", "exact"), ("II", "euler")]:
        w = fbm.omega(0.3, GAMMA, 1.0, kind)
        args = dict(theta=0.5, seed=2**40 + 3, kind=kind, scheme=scheme, save_every=7)
        cpu = markovkit.mafbm_simulate(x0, 50, 0.02, w, GAMMA, **args)
        cuda = markovkit.mafbm_simulate(x0.cuda(), 50, 0.02, w, GAMMA, **args)
        torch.testing.assert_close(cuda.cpu(), cpu, **tol)
    x, y, drift, diffusion, control = _inputs(300, 3, 5, dtype, "cpu")
    for scheme in ["euler", "exact"]:
        step = lambda dev: markovkit.mafbm_step(*(t.to(dev) for t in (x, y, drift, diffusion)), OMEGA_II.to(dev),  # noqa: E731
                                                GAMMA, 0.01, control=control.to(dev), seed=77, step=12, scheme=scheme)
        for a, b in zip(step("cpu"), step("cuda")):
            torch.testing.assert_close(b.cpu(), a, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_simulate_refuses_device_coefficients():
    """The simulator's coefficients are kernel arguments: a device tensor would cost a sync per call."""
    drop, _, factor = fbm.ou_transition(GAMMA, 0.01, "euler")
    with pytest.raises(RuntimeError, match="omega: expected a CPU tensor .* got a tensor on cuda"):
        torch.ops.markovkit.mafbm_simulate(torch.zeros(4, device="cuda"), OMEGA_II.cuda(), drop, factor, None, 10,
                                           0.01, 0.0, 0.0, 1.0, 1, 0)


# --- errors ---------------------------------------------------------------------------------------------

def test_bad_input_errors():
    x, y, drift, diffusion, control = _inputs(4, 2, 5, torch.float32, "cpu")
    w = OMEGA_II.float()
    step = markovkit.mafbm_step
    with pytest.raises(RuntimeError, match=r"y: expected shape \[4, 2, 5\], got \[4, 2, 4\]"):
        step(x, y[..., :4], drift, diffusion, w, GAMMA, 0.01, seed=0)
    with pytest.raises(RuntimeError, match=r"drift: expected shape \[4, 2\], got \[4, 1\]"):
        step(x, y, drift[:, :1], diffusion, w, GAMMA, 0.01, seed=0)
    with pytest.raises(RuntimeError, match=r"control: expected shape \[4, 2\], got \[4\]"):
        step(x, y, drift, diffusion, w, GAMMA, 0.01, control=control[:, 0], seed=0)
    with pytest.raises(RuntimeError, match=r"noise: expected shape \[4, 2, 1\], got \[4, 2, 5\]"):
        step(x, y, drift, diffusion, w, GAMMA, 0.01, noise=torch.randn(4, 2, 5))
    with pytest.raises(RuntimeError, match="y: expected dtype Float .the dtype of x., got Double"):
        step(x, y.double(), drift, diffusion, w, GAMMA, 0.01, seed=0)
    with pytest.raises(RuntimeError, match="x: expected dtype Float or Double, got Half"):
        step(x.half(), y, drift, diffusion, w, GAMMA, 0.01, seed=0)
    with pytest.raises(RuntimeError, match=r"omega: expected shape \(K,\) with 1 <= K <= 16"):
        step(x, torch.zeros(4, 2, 17), drift, diffusion, torch.ones(17), torch.ones(17), 0.01, seed=0)
    with pytest.raises(ValueError, match="dt: expected a positive finite time step, got 0.0"):
        step(x, y, drift, diffusion, w, GAMMA, 0.0, seed=0)
    with pytest.raises(ValueError, match="gamma: expected non-negative finite rates"):
        step(x, y, drift, diffusion, w, -GAMMA, 0.01, seed=0)
    with pytest.raises(ValueError, match="seed: expected an int seed when noise is not given"):
        step(x, y, drift, diffusion, w, GAMMA, 0.01)
    with pytest.raises(ValueError, match=r"seed: expected None when noise is given \(.*\), got 3"):
        step(x, y, drift, diffusion, w, GAMMA, 0.01, noise=torch.zeros(4, 2, 1), seed=3)
    with pytest.raises(ValueError, match="scheme: expected 'euler' or 'exact'"):
        step(x, y, drift, diffusion, w, GAMMA, 0.01, seed=0, scheme="heun")
    with pytest.raises(ValueError, match=r"Euler-Maruyama is unstable for gamma_max\*dt >= 2"):
        step(x, y, drift, diffusion, w, GAMMA, 0.2, seed=0)
    with pytest.warns(UserWarning, match=r"gamma_max\*dt = 0.6 > 0.5"):
        step(x, y, drift, diffusion, w, GAMMA, 0.03, seed=0)
    x0 = torch.zeros(4)
    with pytest.raises(RuntimeError, match="save_every: expected a positive stride, got 0"):
        markovkit.mafbm_simulate(x0, 10, 0.01, OMEGA_II, GAMMA, save_every=0, seed=0)
    with pytest.raises(RuntimeError, match=r"x0: expected shape \(paths,\), got \[4, 1\]"):
        markovkit.mafbm_simulate(x0[:, None], 10, 0.01, OMEGA_II, GAMMA, seed=0)
    with pytest.raises(ValueError, match="kind: expected 'I' or 'II'"):
        markovkit.mafbm_simulate(x0, 10, 0.01, OMEGA_II, GAMMA, seed=0, kind="mvn")
    with pytest.raises(ValueError, match="gamma: expected positive finite rates"):
        markovkit.mafbm_simulate(x0, 10, 0.01, torch.ones(1), torch.zeros(1), seed=0, kind="I")
    # infinite dt or rates gave NaN paths; a (1,) theta failed in the backward; 10.7 steps ran 10
    with pytest.raises(ValueError, match="dt: expected a positive finite time step, got inf"):
        step(x, y, drift, diffusion, w, GAMMA, math.inf, seed=0, scheme="exact")
    with pytest.raises(ValueError, match="dt: expected a positive finite time step, got inf"):
        markovkit.mafbm_simulate(x0, 10, math.inf, OMEGA_II, GAMMA, seed=0)
    with pytest.raises(ValueError, match="gamma: expected non-negative finite rates"):
        markovkit.mafbm_simulate(x0, 10, 0.01, torch.ones(2), torch.tensor([1.0, math.inf]), seed=0, kind="II")
    with pytest.raises(ValueError, match=r"theta: expected a number or a 0-dim tensor, got a tensor of shape \(1,\)"):
        markovkit.mafbm_simulate(x0, 10, 0.01, OMEGA_II, GAMMA, theta=torch.ones(1, requires_grad=True), seed=0)
    with pytest.raises(TypeError, match="n_steps: expected an int, got 10.7"):
        markovkit.mafbm_simulate(x0, 10.7, 0.01, OMEGA_II, GAMMA, seed=0)


def test_omega_and_seed_errors_name_the_argument():
    x, y, drift, diffusion, _ = _inputs(4, 2, 5, F64, "cpu")
    step = lambda omega, seed: markovkit.mafbm_step(x, y, drift, diffusion, omega, GAMMA, 0.01, seed=seed)  # noqa: E731
    simulate = lambda omega, seed: markovkit.mafbm_simulate(torch.zeros(4), 3, 0.01, omega, GAMMA,  # noqa: E731
                                                            seed=seed)
    for run in [step, simulate]:
        with pytest.raises(ValueError, match=r"omega: expected shape \(5,\), one weight per rate of gamma "
                                             r"\(len\(gamma\) = 5\), got shape \(4,\)"):
            run(OMEGA_II[:4], 0)
        for seed in [2**63, -(2**63) - 1]:
            with pytest.raises(ValueError, match=rf"seed: expected an int in \[-2\*\*63, 2\*\*63\) \(the 64-bit "
                                                 rf"Philox key\), got {seed}"):
                run(OMEGA_II, seed)
        with pytest.raises(TypeError, match=r"seed: expected an int in \[-2\*\*63, 2\*\*63\) \(the 64-bit Philox "
                                            r"key\), got float 1.5"):
            run(OMEGA_II, 1.5)
        # the ends of the range are seeds like any other: different streams
        assert not torch.equal(run(OMEGA_II, 2**63 - 1)[0], run(OMEGA_II, -(2**63))[0])
    for bad in [-1, 2**63]:  # 2**63 failed in the dispatcher's int check, naming no argument
        with pytest.raises(ValueError, match=re.escape(f"mafbm_step: step: expected an int in [0, 2**63), got {bad}")):
            markovkit.mafbm_step(x, y, drift, diffusion, OMEGA_II, GAMMA, 0.01, seed=0, step=bad)

"""Ops without a derivative (the backward ops, the decode step, mafbm_step in its given noise; forward mode of the
scan and attention): a backward (or a tangent) that reaches them raises, instead of PyTorch's fallback warning and
zero or missing gradients; the in-place decode step bumps its state's version."""
import pytest
import torch

import markovkit

F64 = torch.float64


def _leaves(*shapes, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(*s, generator=g, dtype=F64)).requires_grad_() for s in shapes]


def _scan(u, delta, B, C):
    # u, delta: (batch, dim, seqlen); A: (dim, dstate); B, C: (batch, dstate, seqlen)
    A = -torch.linspace(0.5, 1.5, 3 * 4, dtype=F64).view(3, 4)
    return markovkit.selective_scan(u, delta.abs(), A, B, C)


def _attention(q, k, v):
    # q, k, v: (batch, seqlen, heads, headdim)
    return markovkit.sliding_window_attention(q, k, v, 3)


def _mafbm(x, drift, diffusion, y):
    # x, drift, diffusion: (paths, dims); y: (paths, dims, K)
    omega = torch.tensor([0.5, 1.0], dtype=F64)
    noise = torch.ones(*x.shape, 1, dtype=F64)
    x_next, y_next, _ = markovkit.mafbm_step(x, y, drift, diffusion ** 2, omega, [1.0, 3.0], 0.1, noise=noise)
    return x_next * y_next.sum(-1)


CASES = {
    "selective_scan_bwd": (_scan, [(2, 3, 9), (2, 3, 9), (2, 4, 9), (2, 4, 9)]),
    "sliding_window_attention_bwd": (_attention, [(1, 7, 2, 32)] * 3),
    "mafbm_step_backward": (_mafbm, [(4, 2), (4, 2), (4, 2), (4, 2, 2)]),
}


@pytest.mark.parametrize("backward_op", CASES)
def test_double_backward_raises(backward_op):
    """First derivatives with create_graph=True are those without it; the second derivative through the backward op
    raises (it has no derivative) rather than coming out as zero."""
    fn, shapes = CASES[backward_op]
    inputs = _leaves(*shapes)
    out = fn(*inputs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=F64).view(out.shape)
    first = torch.autograd.grad((out * weights).sum(), inputs, create_graph=True)
    plain = torch.autograd.grad((fn(*inputs) * weights).sum(), inputs)
    for a, b in zip(first, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    penalty = sum((g ** 2).sum() for g in first)
    with pytest.raises(RuntimeError, match=f"derivative for markovkit::{backward_op} is not implemented"):
        penalty.backward()


@pytest.mark.parametrize("with_control", [False, True])
def test_mafbm_step_backward_to_given_noise_raises(with_control):
    """The step has no derivative in `noise` (used as given): a backward that needs one raises, not None."""
    x, drift, diffusion, control, noise = _leaves((4, 2), (4, 2), (4, 2), (4, 2), (4, 2, 1))
    inputs = (x, drift, diffusion, control) if with_control else (x, drift, diffusion)
    y = torch.zeros(4, 2, 2, dtype=F64)
    x_next, _, _ = markovkit.mafbm_step(x, y, drift, diffusion, torch.tensor([0.5, 1.0], dtype=F64), [1.0, 3.0], 0.1,
                                        control=control if with_control else None, noise=noise)
    with pytest.raises(RuntimeError, match="mafbm_step: the derivative for 'noise' is not implemented"):
        x_next.sum().backward()
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(x_next.sum(), inputs))  # those it has


def _decode_step(batch=2, dim=3, dstate=4):
    # x, dt, z: (batch, dim); A: (dim, dstate); B, C: (batch, dstate)
    x, dt, B, C = _leaves((batch, dim), (batch, dim), (batch, dstate), (batch, dstate), seed=1)
    A = -torch.ones(dim, dstate, dtype=F64)
    return x, dt, A, B, C


def test_decode_step_backward_raises():
    state = torch.zeros(2, 3, 4, dtype=F64)
    out = markovkit.selective_state_update(state, *_decode_step())
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="derivative for markovkit::selective_state_update is not implemented"):
        out.sum().backward()


def test_decode_step_bumps_the_state_version():
    """A backward through a value the decode step has since overwritten fails (as for torch's in-place ops)."""
    base = torch.ones(2, 3, 4, dtype=F64, requires_grad=True)
    state = base * 2  # state: (batch, dim, dstate)
    saved = (state ** 2).sum()  # pow saves state
    version = state._version
    with torch.no_grad():
        markovkit.selective_state_update(state, *[t.detach() for t in _decode_step()])
    assert state._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@pytest.mark.parametrize("leaf", [True, False])
def test_decode_step_refuses_a_state_that_requires_grad(leaf):
    """Autograd could not follow the in-place update: a state it tracks is refused (leaf or not), not under no_grad."""
    base = torch.zeros(2, 3, 4, dtype=F64, requires_grad=True)
    state = base if leaf else base * 1
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad" if leaf else "state: expected a tensor "
                                                                                          "that does not require grad"):
        markovkit.selective_state_update(state, *_decode_step())
    with torch.no_grad():
        markovkit.selective_state_update(state, *_decode_step())


_B, _C = [t.detach() for t in _leaves((2, 4, 9), (2, 4, 9))]
_Q = torch.ones(1, 7, 2, 32, dtype=F64)
FORWARD_AD = {
    "selective_scan": (lambda u: _scan(u, u.abs(), _B, _C), (2, 3, 9)),
    "sliding_window_attention": (lambda q: _attention(q, q, q), (1, 7, 2, 32)),
    "bmojo_f_attention": (lambda kf: markovkit.bmojo_f_attention(_Q, _Q, _Q, kf, _Q, 3), (1, 7, 2, 32)),  # kf alone
}


@pytest.mark.parametrize("fn", FORWARD_AD)
def test_forward_mode_ad_raises(fn):
    """No forward-mode derivative: a tangent is refused (torch.library.register_autograd's ops dropped it: the
    output's tangent came out zero), in torch.func.jvp and in a forward_ad dual level."""
    call, shape = FORWARD_AD[fn]
    primal = torch.randn(*shape, dtype=F64)
    message = f"{fn}: forward-mode AD is not implemented"
    with pytest.raises(RuntimeError, match=message):
        torch.func.jvp(call, (primal,), (torch.ones_like(primal),))
    with torch.autograd.forward_ad.dual_level(), pytest.raises(RuntimeError, match=message):
        call(torch.autograd.forward_ad.make_dual(primal, torch.ones_like(primal)))
    with torch.autograd.forward_ad.dual_level():
        call(primal)  # no tangent: runs

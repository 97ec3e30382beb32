"""A call with one argument left on the meta device (a module built on meta and not fully loaded) runs the op's
fake kernel, meta having no kernel of its own: every op refuses it as its kernels refuse a device mismatch, where it
returned uninitialised tensors on the other arguments' device. Calls entirely on meta still give shapes."""
import re

import pytest
import torch

import markovkit

F64 = torch.float64


def _meta(t):
    return t.to("meta")


def _scan_inputs():
    # u, delta: (batch, dim, seqlen); A: (dim, dstate); B, C: (batch, dstate, seqlen); D: (dim,)
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 2, 6, generator=g), torch.rand(1, 2, 6, generator=g), -torch.rand(2, 3, generator=g),
            torch.randn(1, 3, 6, generator=g), torch.randn(1, 3, 6, generator=g), torch.ones(2))


def _scan_fwd():
    u, delta, A, B, C, D = _scan_inputs()
    markovkit.selective_scan(u, delta, A, B, C, D=_meta(D))


def _scan_bwd():
    u, delta, A, B, C, D = _scan_inputs()
    args = (u, delta, A, B[:, None], C[:, None], D, None, None, False, None, None)  # B, C: (batch, groups, ...)
    out, _, chunk_states = torch.ops.markovkit.selective_scan_fwd(*args)
    torch.ops.markovkit.selective_scan_bwd(*args, chunk_states, _meta(out), None)


def _state_update():
    # state: (batch, dim, dstate); x, dt: (batch, dim); B, C: (batch, dstate)
    u, _, A, B, C, _ = _scan_inputs()
    markovkit.selective_state_update(torch.zeros(1, 2, 3), u[..., 0], u[..., 1].abs(), _meta(A), B[..., 0], C[..., 0])


def _attention_bwd():
    q = torch.randn(1, 8, 2, 32, dtype=F64)
    out, lse = torch.ops.markovkit.sliding_window_attention_fwd(q, q, q, 3, 0, 0.2)
    torch.ops.markovkit.sliding_window_attention_bwd(out, None, q, q, q, out, _meta(lse), 3, 0, 0.2)


def _mafbm_step():
    # x, drift, diffusion: (paths, dims); y: (paths, dims, K)
    x = torch.randn(4, 2, dtype=F64)
    markovkit.mafbm_step(x, torch.zeros(4, 2, 3, dtype=F64), _meta(x), x.abs(), torch.rand(3, dtype=F64),
                         [0.5, 2.0, 8.0], 0.01, seed=1)


def _mafbm_step_backward():
    x, K = torch.randn(4, 2, dtype=F64), torch.ones(3, dtype=F64)
    torch.ops.markovkit.mafbm_step_backward(x, torch.zeros(4, 2, 3, dtype=F64), torch.zeros(4, dtype=F64),
                                            _meta(torch.zeros(4, 2, 3, dtype=F64)), x, K, K, K,
                                            torch.ones(3, 1, dtype=F64), 0.01, None, None, 1, 0)


def _mafbm_simulate():
    K = torch.ones(3, dtype=F64)
    torch.ops.markovkit.mafbm_simulate(torch.zeros(4), _meta(K), K, torch.ones(3, 3, dtype=F64), None, 5, 0.01,
                                       0.0, 0.0, 1.0, 1, 1)


def _ctmc():
    markovkit.simulate_ctmc(torch.rand(1, 4, 4, dtype=F64), torch.zeros(1, 3, dtype=torch.long),
                            _meta(torch.linspace(0, 1, 4, dtype=F64)), seed=1)


def _reactions():
    # one species, A -> 2A: reactants, products: (reactions, species); rates: (processes, reactions)
    markovkit.simulate_reactions(torch.tensor([[1]]), torch.tensor([[2]]), _meta(torch.ones(1, 1, dtype=F64)),
                                 torch.ones(1, 2, 1, dtype=torch.long), torch.linspace(0, 1, 3, dtype=F64), seed=1)


CASES = {
    "selective_scan_fwd": (_scan_fwd, "D: expected a tensor on cpu (the device of u), got one on meta"),
    "selective_scan_bwd": (_scan_bwd, "dout: expected a tensor on cpu (the device of u), got one on meta"),
    "selective_state_update": (_state_update, "A: expected a tensor on cpu (the device of x), got one on meta"),
    "sliding_window_attention_bwd": (_attention_bwd, "lse: expected a tensor on cpu (the device of q), got one on meta"),
    "mafbm_step": (_mafbm_step, "drift: expected a tensor on cpu (the device of x), got one on meta"),
    "mafbm_step_backward": (_mafbm_step_backward,
                            "y: expected a tensor on cpu (the device of grad_x_next), got one on meta"),
    "mafbm_simulate": (_mafbm_simulate, "omega: expected a CPU tensor (the simulator's coefficients are kernel "
                                        "arguments), got a tensor on meta"),
    "mjp_ctmc_grid": (_ctmc, "t_grid: expected a tensor on cpu (the device of Q), got one on meta"),
    "mjp_reactions_grid": (_reactions, "rates: expected a tensor on cpu (the device of x0), got one on meta"),
}


@pytest.mark.parametrize("op", CASES)
def test_one_argument_on_meta_is_refused(op):
    call, message = CASES[op]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call()


def test_all_on_meta_gives_shapes():
    u, delta, A, B, C, D = [_meta(t) for t in _scan_inputs()]
    out = markovkit.selective_scan(u, delta, A, B, C, D=D)
    assert out.device.type == "meta" and out.shape == (1, 2, 6)
    x = torch.zeros(4, 2, dtype=F64, device="meta")
    x_next, y_next, kl = markovkit.mafbm_step(x, torch.zeros(4, 2, 3, dtype=F64, device="meta"), x, x,
                                              torch.ones(3, dtype=F64, device="meta"), [0.5, 2.0, 8.0], 0.01, seed=1)
    assert (x_next.shape, y_next.shape, kl.shape) == ((4, 2), (4, 2, 3), (4,)) and x_next.device.type == "meta"

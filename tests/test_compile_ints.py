"""Seeds, stream offsets, step indices, process and path offsets are SymInt in the op schemas: a torch.compile'd
function called with new values compiles three graphs at most (a static one, then one per int turned dynamic), where
every new value recompiled (a time loop of a compiled step hit the recompile limit after 8 steps). Results equal
eager ones."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import markovkit

F64 = torch.float64
VALUES = [(seed, n) for seed in (1, 2, 3) for n in (0, 5, 7)]  # 9 calls: over the recompile limit of 8


def _philox(seed, offset):
    return markovkit.philox_normal((3, 5), seed, offset)


_x, _y = torch.randn(4, 2, dtype=F64), torch.randn(4, 2, 3, dtype=F64)  # x: (paths, dims), y: (paths, dims, K)


def _mafbm_step(seed, step):
    return markovkit.mafbm_step(_x, _y, _x.cos(), _x.sin().abs(), torch.ones(3, dtype=F64), [0.5, 2.0, 8.0], 0.01,
                                seed=seed, step=step)


def _mafbm_paths(seed, path_offset):
    return markovkit.mafbm_step(_x, _y, _x.cos(), _x.sin().abs(), torch.ones(3, dtype=F64), [0.5, 2.0, 8.0], 0.01,
                                seed=seed, path_offset=path_offset)


_Q = torch.rand(2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))  # (processes, states, states)
_grid = torch.linspace(0, 1, 5, dtype=F64)


def _ctmc_grid(seed, process_offset):
    return markovkit.simulate_ctmc(_Q, torch.zeros(2, 4, dtype=torch.long), _grid, seed=seed,
                                   process_offset=process_offset)


def _ctmc_paths(seed, path_offset):
    return markovkit.simulate_ctmc(_Q, torch.zeros(2, 4, dtype=torch.long), _grid, seed=seed, path_offset=path_offset)


def _ctmc_events(seed, process_offset):
    return markovkit.simulate_ctmc(_Q, torch.zeros(2, 4, dtype=torch.long), 1.0, seed=seed, record="events",
                                   max_events=5, process_offset=process_offset)


def _reactions(seed, process_offset):  # A -> 2A at rate 0.3, 2 processes of 3 paths
    return markovkit.simulate_reactions(torch.tensor([[1]]), torch.tensor([[2]]), torch.full((2, 1), 0.3, dtype=F64),
                                        torch.ones(2, 3, 1, dtype=torch.long), _grid, seed=seed,
                                        process_offset=process_offset)


@pytest.mark.parametrize("fn", [_philox, _mafbm_step, _mafbm_paths, _ctmc_grid, _ctmc_paths, _ctmc_events, _reactions],
                         ids=lambda fn: fn.__name__[1:])
def test_new_int_values_do_not_recompile(fn):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # traced with fake tensors, as inductor traces
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for values in VALUES:
        got, want = compiled(*values), fn(*values)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(a, b), values
    assert counter.frame_count <= 3  # static, then the seed and the other int turn dynamic one after the other


@pytest.mark.parametrize("int_name", ["step", "path_offset"])
def test_compiled_mafbm_step_gradients_over_steps(int_name):
    """Forward and backward of a compiled step at 9 (seed, step or path_offset) pairs: one graph after the static
    one, gradients equal eager ones (the C++ autograd function passes the symbolic ints to the backward, whose
    redrawn noise the diffusion's gradient depends on)."""
    torch._dynamo.reset()
    diffusion = _x.sin().abs().requires_grad_()

    def loss(seed, n):
        x_next, _, kl = markovkit.mafbm_step(_x, _y, _x.cos(), diffusion, torch.ones(3, dtype=F64), [0.5, 2.0, 8.0],
                                             0.01, seed=seed, **{int_name: n})
        return x_next.square().sum() + kl.sum()

    counter = CompileCounterWithBackend("aot_eager")  # traced with fake tensors, as inductor traces
    compiled = torch.compile(loss, fullgraph=True, backend=counter)
    for values in VALUES:
        got = torch.autograd.grad(compiled(*values), diffusion)[0]
        want = torch.autograd.grad(loss(*values), diffusion)[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert counter.frame_count <= 3

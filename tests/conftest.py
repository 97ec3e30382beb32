"""Shared test fixtures: the devices to run on, per-dtype tolerances, the `gpu` marker, CUDA emulation.

Every device-parametrized test runs on the CPU and, where a CUDA device is visible, on CUDA; without one
the CUDA cases are collected and skipped, so the same file runs on both machines. Tests that take the
`emulated` fixture run the CUDA kernels on the CPU inside `with emulated():` (builds with
MARKOVKIT_CUDA=EMULATE, tests/cuda_emu), once with the threads of a block scheduled in forward and once in
reverse order; in other builds they are skipped.
"""
import pytest
import torch

from markovkit import cuda_emulation

HAS_CUDA = torch.cuda.is_available()
HAS_EMULATION = cuda_emulation.available()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# Tolerances for comparing an op in `dtype` against a float64 reference (rtol, atol).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def on_1_and_3_threads(fn):
    """(fn() on 1 CPU thread, fn() on 3), for tests that results do not depend on the thread count."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fn()
        torch.set_num_threads(3)
        return single, fn()
    finally:
        torch.set_num_threads(threads)


def assert_compiles_and_exports(module, dim, lengths, min_seqlen=2, tol=TOL[torch.float64]):
    """A float64 sequence module (batch, seqlen, dim) -> (batch, seqlen, dim) under torch.compile(fullgraph=True,
    dynamic=True) and torch.export with a symbolic seqlen >= min_seqlen, forward and backward: each traced once (at
    lengths[0]) and equal to eager at every length."""
    seqlen = torch.export.Dim("seqlen", min=min_seqlen, max=4096)
    example = torch.randn(2, lengths[0], dim, dtype=torch.float64)
    exported = torch.export.export(module, (example,), dynamic_shapes=({1: seqlen},)).module()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    for n in lengths:
        x = torch.randn(2, n, dim, dtype=torch.float64, requires_grad=True)
        expected = module(x)
        (grad,) = torch.autograd.grad(expected.square().sum(), x)
        for traced in (exported, compiled):
            out = traced(x)
            torch.testing.assert_close(out, expected, **tol)
            torch.testing.assert_close(torch.autograd.grad(out.square().sum(), x)[0], grad, **tol)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=["forward", "reverse"])
def emulated(request, monkeypatch):
    """A context manager inside which markovkit ops given CPU tensors run their CUDA kernels on the host."""
    if not HAS_EMULATION:
        pytest.skip("needs the MARKOVKIT_CUDA=EMULATE build")
    monkeypatch.setenv("MK_EMU_ORDER", request.param)
    return cuda_emulation.cuda_emulation

"""Runs markovkit's CUDA kernels on the CPU, in builds made with MARKOVKIT_CUDA=EMULATE (tests/cuda_emu).

Inside ``with cuda_emulation():`` every markovkit op given CPU tensors runs its CUDA kernel, compiled as host
C++, instead of its CPU kernel: the tests of the CUDA kernels' logic on machines without a GPU.
"""

import contextlib

from . import _C

active = False  # read by wrappers that choose by device (a plain global, so torch.compile can guard on it)


def available() -> bool:
    return bool(_C.build_info()["cuda_emulation"])


@contextlib.contextmanager
def cuda_emulation():
    global active
    if not available():
        raise RuntimeError("markovkit was not built with MARKOVKIT_CUDA=EMULATE: no emulated CUDA kernels")
    _C.set_cuda_emulation(True)
    active = True
    try:
        yield
    finally:
        _C.set_cuda_emulation(False)
        active = False


def launched() -> list:
    """The kernels launched since the last call, in order, as (name, blocks): the name as the launch spells it
    (template arguments unexpanded), blocks the grid's size."""
    return _C.take_emulated_launches()


def runs_cpu_kernel(t) -> bool:
    """Whether an op given tensor t runs its CPU kernel (the glue's runs_cpu_kernel)."""
    return t.device.type == "cpu" and not active

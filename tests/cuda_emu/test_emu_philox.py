"""The CUDA Philox fill (csrc/random/philox_kernel.cu) run by the emulator: the CPU kernel's stream."""
import pytest
import torch

import markovkit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,offset", [(1, 0), (4099, 0), (4099, 3), (1027, 2**33 + 1)])
def test_uniforms_equal_the_cpu_kernel_bit_for_bit(emulated, dtype, n, offset):
    cpu = markovkit.philox_uniform((n,), 2**40 + 5, offset, dtype=dtype)
    with emulated():
        cuda = markovkit.philox_uniform((n,), 2**40 + 5, offset, dtype=dtype)
    assert torch.equal(cpu, cuda)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("n,offset", [(4099, 0), (1027, 7)])
def test_normals_agree_with_the_cpu_kernel(emulated, dtype, tol, n, offset):
    cpu = markovkit.philox_normal((n,), 12, offset, dtype=dtype)
    with emulated():
        cuda = markovkit.philox_normal((n,), 12, offset, dtype=dtype)
    torch.testing.assert_close(cuda, cpu, rtol=tol, atol=tol)

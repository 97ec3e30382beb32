"""The device check of every CUDA launch (csrc/common/cuda_device.h): a build without code for the device (emulated:
MK_EMU_NO_KERNEL_IMAGE, as a build for sm_90a on an A100) fails at the first launch, naming the device's compute
capability and the MARKOVKIT_CUDA_ARCHS that fixes it. Each case runs in a fresh process: the check remembers a
device that passed it."""
import os
import subprocess
import sys

import pytest

from markovkit import cuda_emulation

LAUNCH = """
import torch, markovkit
from markovkit.cuda_emulation import cuda_emulation
with cuda_emulation():
    print(markovkit.philox_uniform((3,), 1, dtype=torch.float32).tolist())
"""


def launch(**env):
    if not cuda_emulation.available():
        pytest.skip("needs the MARKOVKIT_CUDA=EMULATE build")
    return subprocess.run([sys.executable, "-c", LAUNCH], env={**os.environ, **env}, capture_output=True, text=True)


@pytest.mark.parametrize("cc,fix", [("80", "80"), ("86", "86"), ("90", "90a"), ("100", "100")])
def test_error_of_a_device_without_code_names_the_rebuild(cc, fix):
    r = launch(MK_EMU_NO_KERNEL_IMAGE="1", MK_EMU_CC=cc)
    assert r.returncode != 0
    assert f"without code for cuda:0 (compute capability {int(cc) // 10}.{int(cc) % 10})" in r.stderr
    assert "architectures are 'emulated'" in r.stderr
    assert "no kernel image is available" in r.stderr
    assert f"MARKOVKIT_CUDA_ARCHS='{fix}' pip install" in r.stderr


def test_error_of_a_device_below_8_0_names_it():
    r = launch(MK_EMU_NO_KERNEL_IMAGE="1", MK_EMU_CC="75")
    assert r.returncode != 0
    assert "need compute capability 8.0 or newer; cuda:0 has 7.5" in r.stderr


def test_a_device_with_code_launches():
    r = launch(MK_EMU_CC="80")
    assert r.returncode == 0, r.stderr
    assert len(eval(r.stdout)) == 3

"""The Philox4x32-10 stream: known answers, conversions, stream arithmetic, distributions, op contract."""
import math
import re

import pytest
import scipy.stats
import torch

import markovkit
from conftest import HAS_CUDA

# Random123's known-answer vectors for Philox4x32-10: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answers(ctr, key, expected):
    assert tuple(markovkit._C.philox4x32_10(list(ctr), list(key))) == expected


def _words(seed, block):
    """The 4 words of stream block `block` under `seed`: counter (block lo, block hi, 0, 0), key = seed."""
    ctr = [block & 0xFFFFFFFF, block >> 32, 0, 0]
    return markovkit._C.philox4x32_10(ctr, [seed & 0xFFFFFFFF, seed >> 32])


def test_float32_uniform_is_top_23_bits_of_each_word():
    seed = 0x1234_5678_9ABC
    u = markovkit.philox_uniform((10,), seed, offset=5)
    assert markovkit.philox_uniform((1,), 0).item() == ((0x6627E8D5 >> 9) + 0.5) * 2.0**-23
    for i in range(10):
        g = 5 + i
        word = _words(seed, g // 4)[g % 4]
        assert u[i].item() == ((word >> 9) + 0.5) * 2.0**-23


@pytest.mark.parametrize("offset", [0, 5, 2**33 + 3])
def test_float32_uniforms_equal_the_words_over_whole_lane_groups(offset):
    """1030 values span whole groups of 64 blocks of the CPU lane fill, and its edges, bit for bit."""
    seed = 2**40 + 9
    u = markovkit.philox_uniform((1030,), seed, offset)
    first = offset // 4
    words = [w for b in range(first, (offset + 1030 + 3) // 4) for w in _words(seed, b)]
    k = torch.tensor(words[offset - 4 * first:][:1030], dtype=torch.int64) >> 9
    assert torch.equal(u.double(), (k.double() + 0.5) * 2.0**-23)


@pytest.mark.parametrize("offset", [0, 3, 2**33 + 1])
def test_float32_normals_are_float64_box_muller_of_the_uniforms(offset):
    """CPU float32 normals (the lane log / sqrt / sincos of csrc/common/philox_lanes.h) equal Box-Muller in
    float64 of the float32 uniforms of the same words to 1e-6 relative: element g is r cos θ (g even) or
    r sin θ (g odd), r = √(−2 ln u_{g − g%2}), θ = 2π u_{g − g%2 + 1}."""
    seed, n = 2**40 + 21, 50_000
    start = offset - offset % 2
    u = markovkit.philox_uniform((n + 2,), seed, start).double()
    r, theta = torch.sqrt(-2 * torch.log(u[0::2])), 2 * math.pi * u[1::2]
    expected = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1).flatten()[offset - start:][:n]
    z = markovkit.philox_normal((n,), seed, offset)
    torch.testing.assert_close(z.double(), expected, rtol=1e-6, atol=0)


_COPIES_SCRIPT = """
import sys, torch, markovkit
from markovkit import fbm
randn = lambda *shape, seed: markovkit.philox_normal(shape, seed, dtype=torch.float64).float()  # noqa: E731
out = {"isa": markovkit._C.cpu_isa()}
for dtype in (torch.float32, torch.float64):
    out[f"uniform {dtype}"] = markovkit.philox_uniform((1030,), 5, 3, dtype=dtype)
    out[f"normal {dtype}"] = markovkit.philox_normal((1030,), 5, 3, dtype=dtype)
# inputs from the scalar float64 generator; the step's coefficients given (torch's exp, which the exact scheme's
# coefficients use, differs in the last bit between its own CPU copies)
x, drift, control = (randn(300, 3, seed=i) for i in range(3))
y, omega = randn(300, 3, 5, seed=3), randn(5, seed=4).requires_grad_()
drop, phi = 0.1 * randn(5, seed=5).abs(), 0.01 * randn(5, seed=6)
for R, given in ((1, False), (3, False), (3, True)):  # 900 elements: 14 lane groups and a part, 3 rows of gω
    factor, noise = 0.1 * randn(5, R, seed=7), randn(300, 3, R, seed=12) if given else None
    leaves = [t.clone().requires_grad_() for t in (x, y, drift, control)]
    step = torch.ops.markovkit.mafbm_step(leaves[0], leaves[1], leaves[2], drift.abs() + 0.5, omega, drop, phi,
                                          factor, 0.01, leaves[3], noise, 9, 2)
    weights = [randn(*t.shape, seed=8 + i) for i, t in enumerate(step)]
    grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, step)), leaves + [omega])
    out[f"step R={R} given noise {given}"] = [t.detach() for t in step] + list(grads)
x0 = randn(200, seed=11).requires_grad_()
path = markovkit.mafbm_simulate(x0, 30, 0.01, omega.detach(), fbm.gamma_grid(5, 20.0), theta=0.5, save_every=3,
                                seed=4, scheme="euler", kind="II")
out["simulate"] = [path.detach(), torch.autograd.grad(path.sum(), x0)[0]]
torch.save(out, sys.argv[1])
"""


def test_cpu_lane_copies_are_bitwise_equal(tmp_path):
    """The baseline, AVX2 and AVX-512 copies of the CPU lane kernels (Philox fill, float32 MA-fBM step forward
    and backward, simulator; picked once per process, lowered by ATEN_CPU_CAPABILITY) give the same bits: each
    copy runs in a fresh process. The copies this CPU lacks run as the widest it has."""
    import os
    import subprocess
    import sys

    runs = []
    for capability in ("default", "avx2", None):  # None: the widest this CPU has
        env = dict(os.environ)
        env.pop("ATEN_CPU_CAPABILITY", None)
        if capability is not None:
            env["ATEN_CPU_CAPABILITY"] = capability
        path = tmp_path / f"{capability}.pt"
        run = subprocess.run([sys.executable, "-c", _COPIES_SCRIPT, str(path)], env=env, capture_output=True,
                             text=True)
        assert run.returncode == 0, run.stderr
        runs.append(torch.load(path))
    assert runs[0]["isa"] == "default" and runs[1]["isa"] in ("default", "avx2")
    for other in runs[1:]:
        for key, value in runs[0].items():
            if key == "isa":
                continue
            for a, b in zip(value if isinstance(value, list) else [value], other[key] if isinstance(value, list)
                            else [other[key]]):
                assert torch.equal(a, b), f"{key}: the {runs[0]['isa']} and {other['isa']} copies differ"


def test_float64_uniform_is_52_bits_of_two_words():
    seed = 7
    u = markovkit.philox_uniform((6,), seed, offset=3, dtype=torch.float64)
    for i in range(6):
        g = 3 + i
        w = _words(seed, g // 2)
        x = ((w[2 * (g % 2)] << 32) | w[2 * (g % 2) + 1]) >> 12
        assert u[i].item() == (x + 0.5) * 2.0**-52


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", [markovkit.philox_uniform, markovkit.philox_normal])
def test_offset_continues_the_stream(device, dtype, op):
    whole = op((1000,), 99, dtype=dtype, device=device)
    for cut in [1, 3, 4, 517]:
        head = op((cut,), 99, dtype=dtype, device=device)
        tail = op((1000 - cut,), 99, offset=cut, dtype=dtype, device=device)
        assert torch.equal(torch.cat([head, tail]), whole)


def test_shape_does_not_change_values(device):
    flat = markovkit.philox_uniform((24,), 3, device=device)
    assert torch.equal(markovkit.philox_uniform((2, 3, 4), 3, device=device).flatten(), flat)


def test_seeds_give_different_streams():
    a, b = markovkit.philox_uniform((1000,), 1), markovkit.philox_uniform((1000,), 2)
    assert (a == b).sum() < 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_distribution(device, dtype):
    u = markovkit.philox_uniform((200_000,), 11, dtype=dtype, device=device).double().cpu()
    assert 0 < u.min() and u.max() < 1
    assert scipy.stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    assert abs(u.mean() - 0.5) < 5 * (1 / 12 / len(u)) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_distribution(device, dtype):
    n = 400_000
    z = markovkit.philox_normal((n,), 12, dtype=dtype, device=device).double().cpu()
    assert abs(z.mean()) < 5 / n**0.5
    assert abs(z.var() - 1) < 5 * (2 / n) ** 0.5
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # Box-Muller pairs are independent: the lag-1 correlation vanishes.
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1]) < 5 / n**0.5


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_and_cuda_uniforms_are_bitwise_equal(dtype):
    for offset in [0, 1, 2**33 + 3]:
        cpu = markovkit.philox_uniform((100_003,), 2**40 + 5, offset, dtype=dtype)
        cuda = markovkit.philox_uniform((100_003,), 2**40 + 5, offset, dtype=dtype, device="cuda")
        assert torch.equal(cpu, cuda.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cpu_and_cuda_normals_agree():
    cpu = markovkit.philox_normal((100_000,), 5, dtype=torch.float64)
    cuda = markovkit.philox_normal((100_000,), 5, dtype=torch.float64, device="cuda")
    torch.testing.assert_close(cpu, cuda.cpu(), rtol=1e-12, atol=1e-12)


def test_bad_input_errors():
    for dtype in (torch.int32, torch.float16):  # the op itself names its `like` argument
        with pytest.raises(TypeError, match=f"philox_uniform: dtype: expected torch.float32 or torch.float64, got "
                                            f"{dtype}"):
            markovkit.philox_uniform((3,), 0, dtype=dtype)
    with pytest.raises(RuntimeError, match="like: expected dtype Float or Double, got Half"):
        torch.ops.markovkit.philox_uniform(torch.empty(3, dtype=torch.float16), 0, 0)
    with pytest.raises(ValueError, match=re.escape("philox_normal: offset: expected an int in [0, 2**63), got -1")):
        markovkit.philox_normal((3,), 0, -1)
    with pytest.raises(ValueError, match=re.escape("philox_normal: offset: expected an int in [0, 2**63), got "
                                                   "9223372036854775808")):  # failed in the dispatcher's int check
        markovkit.philox_normal((3,), 0, 2**63)
    with pytest.raises(TypeError, match=re.escape("philox_uniform: seed: expected an int in [-2**63, 2**63) (the "
                                                  "64-bit Philox key), got bool True")):
        markovkit.philox_uniform((3,), True)
    with pytest.raises(ValueError, match=r"philox_uniform: seed: expected an int in \[-2\*\*63, 2\*\*63\) \(the "
                                         r"64-bit Philox key\), got 18446744073709551616"):
        markovkit.philox_uniform((3,), 2**64)
    with pytest.raises(TypeError, match=r"philox_normal: seed: expected an int .*, got float 0.5"):
        markovkit.philox_normal((3,), 0.5)


@pytest.mark.parametrize("name", ["philox_uniform", "philox_normal"])
def test_opcheck(device, name):
    op = getattr(torch.ops.markovkit, name)
    for like, seed, offset in [(torch.empty(7, device=device), 1, 0), (torch.empty(2, 5, device=device, dtype=torch.float64), 3, 9)]:
        torch.library.opcheck(op, (like, seed, offset))


def test_compile_fullgraph(device):
    def f(x):
        return x + markovkit.philox_normal(x.shape, 4, 10, device=x.device)

    x = torch.randn(33, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def test_build_info():
    info = markovkit.build_info()
    assert info["version"] == markovkit.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    if HAS_CUDA:
        assert info["cuda"]

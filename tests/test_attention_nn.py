"""markovkit.nn.SlidingWindowAttention against the same computation on the float64 dense reference; its checks of
the configuration at construction."""
import re

import pytest
import torch

import markovkit.nn
from conftest import TOL, assert_compiles_and_exports
from markovkit import reference


def test_rotary_scores_depend_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 64, generator=g, dtype=torch.float64).expand(1, 20, 1, 64)
    k = torch.randn(1, 1, 1, 64, generator=g, dtype=torch.float64).expand(1, 20, 1, 64)
    qr, kr = markovkit.nn.rotary_embedding(q), markovkit.nn.rotary_embedding(k)
    scores = (qr[0, :, 0] @ kr[0, :, 0].T)  # (20, 20)
    for shift in (1, 7):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(scores[5, 0], scores[5, 4])
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))


def test_rotary_turns_channel_pairs_c_and_c_plus_half_by_position_times_frequency():
    """The convention itself (the tests above hold for any base or pairing): a unit vector in channel c = 1 at
    positions offset .. offset + 3 turns into (cos θ, sin θ) in channels (1, 1 + headdim/2), zeros elsewhere,
    θ = pos·base^(-2/headdim)."""
    headdim, base, offset = 32, 500.0, 3
    x = torch.zeros(1, 4, 1, headdim, dtype=torch.float64)
    x[..., 1] = 1.0
    y = markovkit.nn.rotary_embedding(x, base, offset=offset)[0, :, 0]  # (4, headdim)
    theta = torch.arange(offset, offset + 4, dtype=torch.float64) * base ** (-2 / headdim)
    expected = torch.zeros(4, headdim, dtype=torch.float64)
    expected[:, 1], expected[:, 1 + headdim // 2] = theta.cos(), theta.sin()
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("offset", [3, 2**24 + 1])
def test_rotary_offset_int_or_tensor_is_the_position_rounded_once(offset):
    """In float32 the angle's position is offset + i rounded once (2^24 + 1 is not a float32: rounding the offset first
    and then the sum lands on another float), and a 0-dim tensor offset (BMojoF's decoding cache) gives the same."""
    x = torch.zeros(1, 3, 1, 8)
    x[..., 0] = 1.0
    expected = torch.arange(offset, offset + 3, dtype=torch.float64).float().cos()  # channel 0 turns by pos · base^0
    for given in (offset, torch.tensor(offset)):
        y = markovkit.nn.rotary_embedding(x, offset=given)[0, :, 0, 0]
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


# (dim, heads, kv_heads, headdim): headdim from dim // heads, or given with dim not a multiple of heads
CONFIGS = [(128, 4, 2, None), (100, 3, 1, 32)]


@pytest.mark.parametrize("config", CONFIGS)
def test_module_matches_reference(device, config):
    dim, heads, kv_heads, given_headdim = config
    headdim = given_headdim or dim // heads
    torch.manual_seed(0)
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    layer = markovkit.nn.SlidingWindowAttention(dim, heads, 9, kv_heads=kv_heads, headdim=given_headdim, sink=2,
                                                device=device, dtype=dtype)
    x = torch.randn(2, 75, dim, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)

    def expected(x):
        x, w = x.double(), {n: p.double() for n, p in layer.named_parameters()}
        q = (x @ w["q_proj.weight"].T).view(2, 75, heads, headdim)
        k = (x @ w["k_proj.weight"].T).view(2, 75, kv_heads, headdim)
        v = (x @ w["v_proj.weight"].T).view(2, 75, kv_heads, headdim)
        q, k = markovkit.nn.rotary_embedding(q), markovkit.nn.rotary_embedding(k)
        out = reference.sliding_window_attention(q, k, v, 9, 2)[0]
        return out.reshape(2, 75, heads * headdim) @ w["out_proj.weight"].T

    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), expected(x), rtol=tol["rtol"], atol=tol["atol"])
    y.sum().backward()
    xd = x.detach().double().requires_grad_()
    expected(xd).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=tol["rtol"], atol=10 * tol["atol"])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize("args,kwargs,message", [
    ((100, 3, 8), {}, "dim: expected a multiple of heads = 3 (headdim = dim // heads), got 100"),
    ((96, 2, 8), {}, "headdim: expected one of (32, 64, 96, 128, 256), got 48 (dim // heads = 96 // 2)"),
    ((64, 2, 8), dict(headdim=40), "headdim: expected one of (32, 64, 96, 128, 256), got 40"),
    ((64, 0, 8), {}, "heads: expected >= 1, got 0"),
    ((64, 2, 8), dict(kv_heads=0), "kv_heads: expected a positive divisor of heads = 2, got 0"),
    ((64, 2, 8), dict(kv_heads=-1), "kv_heads: expected a positive divisor of heads = 2, got -1"),
    ((64, 2, 8), dict(kv_heads=3), "kv_heads: expected a positive divisor of heads = 2, got 3"),
    ((64, 2, 0), {}, "window: expected >= 1 (positions seen including self), got 0"),
    ((64, 2, 8), dict(sink=-1), "sink: expected >= 0, got -1"),
])
def test_bad_configuration_fails_at_construction(args, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        markovkit.nn.SlidingWindowAttention(*args, **kwargs)


def test_module_compiles_and_exports_with_a_dynamic_seqlen():
    torch.manual_seed(0)
    module = markovkit.nn.SlidingWindowAttention(64, 2, 8, kv_heads=1, sink=2, dtype=torch.float64)
    assert_compiles_and_exports(module, 64, (17, 40))

"""markovkit.nn.SlidingWindowAttention against the same computation on the float64 dense reference."""
import torch

import markovkit.nn
from conftest import TOL
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


def test_module_matches_reference(device):
    torch.manual_seed(0)
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    layer = markovkit.nn.SlidingWindowAttention(128, 4, 9, kv_heads=2, sink=2, device=device, dtype=dtype)
    x = torch.randn(2, 75, 128, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)

    def expected(x):
        x, w = x.double(), {n: p.double() for n, p in layer.named_parameters()}
        q = (x @ w["q_proj.weight"].T).view(2, 75, 4, 32)
        k = (x @ w["k_proj.weight"].T).view(2, 75, 2, 32)
        v = (x @ w["v_proj.weight"].T).view(2, 75, 2, 32)
        q, k = markovkit.nn.rotary_embedding(q), markovkit.nn.rotary_embedding(k)
        out = reference.sliding_window_attention(q, k, v, 9, 2)[0]
        return out.reshape(2, 75, 128) @ w["out_proj.weight"].T

    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), expected(x), rtol=tol["rtol"], atol=tol["atol"])
    y.sum().backward()
    xd = x.detach().double().requires_grad_()
    expected(xd).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=tol["rtol"], atol=10 * tol["atol"])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())

"""Sliding-window attention: values, lse and gradients against a float64 dense masked reference; merge of
attention results; op contract (opcheck, fake kernels, torch.compile); errors on bad input."""
import re

import pytest
import torch
import torch.nn.functional as F

import markovkit
from conftest import TOL, on_1_and_3_threads
from markovkit import reference

# (batch, seqlen, heads, kv_heads, headdim, window, sink): windows 1, small, large, >= seqlen; seqlens that
# are not multiples of any tile; GQA 2 and 4, MQA; sink tokens.
SHAPES = [
    (1, 70, 2, 2, 32, 1, 0),
    (2, 100, 2, 1, 64, 5, 0),
    (1, 200, 4, 1, 32, 67, 0),
    (1, 130, 4, 2, 64, 130, 0),
    (1, 97, 2, 2, 32, 500, 0),
    (2, 150, 4, 4, 32, 20, 3),
    (1, 300, 4, 1, 64, 64, 70),
]


def _inputs(shape, dtype, device, seed=0):
    batch, seqlen, heads, kv_heads, headdim, _, _ = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, heads, headdim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seqlen, kv_heads, headdim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seqlen, kv_heads, headdim, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _grads(fn, q, k, v, dout, dlse):
    """Gradients of <out, dout> + <lse, dlse> with respect to q, k, v."""
    q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fn(q, k, v)
    loss = (out.double() * dout.double()).sum() + (lse.double() * dlse.double()).sum()
    return torch.autograd.grad(loss, (q, k, v))


def _close(actual, expected, dtype, scale=1.0, low_precision_ref=None):
    """actual vs the float64 `expected` within TOL[dtype]; for float16/bfloat16 alternatively within twice
    the error of a PyTorch computation in that dtype (FlashAttention's rule), `low_precision_ref`."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if low_precision_ref is not None:
        err = (actual - expected).abs().max().item()
        ref_err = (low_precision_ref.double().cpu() - expected).abs().max().item()
        if err <= 2 * ref_err + TOL[dtype]["atol"]:
            return
    tol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _skip_unsupported(device, dtype):
    if device.type == "cuda" and dtype in (torch.float32, torch.float64):
        pytest.skip("CUDA kernels take float16 and bfloat16")


LOW = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_forward_matches_reference(device, shape, dtype):
    _skip_unsupported(device, dtype)
    window, sink = shape[5], shape[6]
    q, k, v = _inputs(shape, dtype, device)
    out, lse = markovkit.sliding_window_attention(q, k, v, window, sink=sink, return_lse=True)
    ref_out, ref_lse = reference.sliding_window_attention(q.double(), k.double(), v.double(), window, sink)
    low_out = reference.sliding_window_attention(q, k, v, window, sink)[0] if dtype in LOW else None
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (shape[0], shape[2], shape[1])
    _close(out, ref_out, dtype, low_precision_ref=low_out)
    _close(lse, ref_lse, torch.float64 if dtype == torch.float64 else torch.float32, scale=10)  # float32 sums


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_gradients_match_reference(device, shape, dtype):
    _skip_unsupported(device, dtype)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and shape != SHAPES[2]:
        pytest.skip("the CPU upcasts half dtypes to float32: one shape suffices")
    _check_gradients(device, shape, dtype)


def _check_gradients(device, shape, dtype):
    """Gradients for q, k, v (through out and lse) against float64 (FlashAttention's rule for half dtypes)."""
    window, sink = shape[5], shape[6]
    q, k, v = _inputs(shape, dtype, device)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(device)
    dlse = torch.randn(shape[0], shape[2], shape[1], generator=g, dtype=torch.float64).to(device)

    def ours(q, k, v):
        return markovkit.sliding_window_attention(q, k, v, window, sink=sink, return_lse=True)

    def ref(q, k, v):
        return reference.sliding_window_attention(q, k, v, window, sink)

    got = _grads(ours, q, k, v, dout, dlse)
    expected = _grads(ref, q.double(), k.double(), v.double(), dout, dlse)
    low = _grads(ref, q, k, v, dout.to(dtype), dlse) if dtype in LOW else [None] * 3
    for a, e, lo in zip(got, expected, low):
        assert a.dtype == dtype
        _close(a, e, dtype, scale=10 if dtype in LOW else 1, low_precision_ref=lo)


@pytest.mark.parametrize("headdim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_over_many_tiles(device, headdim, dtype):
    """Ten 128-row query tiles, each over ~7 key tiles of 64 (the CUDA forward's staged loads go round their ring
    many times; on an sm_90 device these headdims take the wgmma kernels), GQA, sink; and the gradients: the
    backward's CTAs walk ~14 query or ~7 key tiles each, through a ring of three stages and the tiles held from one
    step to the next."""
    shape = (2, 1250, 4, 2, headdim, 333, 3)
    q, k, v = _inputs(shape, dtype, device)
    out, lse = markovkit.sliding_window_attention(q, k, v, 333, sink=3, return_lse=True)
    ref_out, ref_lse = reference.sliding_window_attention(q.double(), k.double(), v.double(), 333, 3)
    low_out = reference.sliding_window_attention(q, k, v, 333, 3)[0]
    _close(out, ref_out, dtype, low_precision_ref=low_out)
    _close(lse, ref_lse, torch.float32)
    _check_gradients(device, shape, dtype)


@pytest.mark.parametrize("headdim", [96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_headdims(device, headdim, dtype):
    """Forward and gradients at the larger head dims (each is its own CUDA kernel instantiation)."""
    if device.type == "cpu" and dtype != torch.float32:
        pytest.skip("the CPU upcasts half dtypes to float32")
    _skip_unsupported(device, dtype)
    shape = (1, 140, 4, 2, headdim, 50, 2)
    q, k, v = _inputs(shape, dtype, device)
    dout = torch.randn(q.shape, dtype=torch.float64).to(device)
    dlse = torch.zeros(1, 4, 140, dtype=torch.float64, device=device)

    def ours(q, k, v):
        return markovkit.sliding_window_attention(q, k, v, 50, sink=2, return_lse=True)

    def ref(q, k, v):
        return reference.sliding_window_attention(q, k, v, 50, 2)

    _close(ours(q, k, v)[0], ref(q.double(), k.double(), v.double())[0], dtype,
           low_precision_ref=ref(q, k, v)[0] if dtype in LOW else None)
    expected = _grads(ref, q.double(), k.double(), v.double(), dout, dlse)
    low = _grads(ref, q, k, v, dout.to(dtype), dlse) if dtype in LOW else [None] * 3
    for a, e, lo in zip(_grads(ours, q, k, v, dout, dlse), expected, low):
        _close(a, e, dtype, scale=10 if dtype in LOW else 1, low_precision_ref=lo)


def _kernel_dtype(device):
    """The most precise dtype the device's kernel takes: float64 on the CPU, bfloat16 on CUDA."""
    return torch.float64 if device.type == "cpu" else torch.bfloat16


def test_window_one_returns_v_and_self_score(device):
    dtype = _kernel_dtype(device)
    q, k, v = _inputs((2, 50, 4, 2, 32, 1, 0), dtype, device)
    out, lse = markovkit.sliding_window_attention(q, k, v, 1, return_lse=True)
    v_rep = v.repeat_interleave(2, dim=2)
    k_rep = k.repeat_interleave(2, dim=2)
    torch.testing.assert_close(out, v_rep, rtol=0, atol=0)  # one visible key: its weight is exactly 1
    score = (q.double() * k_rep.double()).sum(-1).transpose(1, 2) * 32**-0.5
    tol = 1e-13 if dtype == torch.float64 else 1e-5  # CUDA: float32 scores of exact bfloat16 products
    torch.testing.assert_close(lse.double(), score, rtol=tol, atol=tol)


def test_large_window_is_causal_sdpa(device):
    dtype = _kernel_dtype(device)
    q, k, v = _inputs((2, 90, 4, 4, 64, 0, 0), dtype, device)
    out = markovkit.sliding_window_attention(q, k, v, 90, softmax_scale=0.3)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, scale=0.3).transpose(1, 2)

    _close(out, sdpa(q.double(), k.double(), v.double()), dtype,
           low_precision_ref=sdpa(q, k, v) if dtype in LOW else None)


def test_int64_max_window_is_causal_with_gradients(device):
    """A window of INT64_MAX (an "unbounded" window) must not overflow the backward's tile ranges."""
    import sys

    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    q, k, v = _inputs((1, 150, 2, 1, 32, 0, 0), dtype, device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    zero = torch.zeros(1, 2, 150, dtype=torch.float64, device=device)

    def ours(window):
        return lambda q, k, v: markovkit.sliding_window_attention(q, k, v, window, return_lse=True)

    for a, e in zip(_grads(ours(sys.maxsize), q, k, v, dout, zero), _grads(ours(150), q, k, v, dout, zero)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    # past int64 (the op's int): every earlier key too, not the dispatcher's "expected 'int', found 'int'"
    out = markovkit.sliding_window_attention(q, k, v, 2**70, sink=2**64)
    torch.testing.assert_close(out, markovkit.sliding_window_attention(q, k, v, 150), rtol=0, atol=0)


def test_sink_equals_merge_of_window_and_sink_keys():
    """Sink keys are the window result merged with attention over the sink keys outside the window."""
    shape = (1, 120, 2, 1, 32, 10, 4)
    q, k, v = _inputs(shape, torch.float64, "cpu")
    both, both_lse = markovkit.sliding_window_attention(q, k, v, 10, sink=4, return_lse=True)
    win, win_lse = markovkit.sliding_window_attention(q, k, v, 10, return_lse=True)
    rest, rest_lse = _masked_attention(q, k, v, lambda i, j: (j < 4) & (j <= i - 10))
    out, lse = markovkit.merge_attention(win, win_lse, rest, rest_lse)
    torch.testing.assert_close(out, both, **TOL[torch.float64])
    torch.testing.assert_close(lse, both_lse, **TOL[torch.float64])


def _masked_attention(q, k, v, rule):
    """Dense attention over the keys j with rule(i, j); rows without keys give out = 0, lse = -inf."""
    seqlen, group = q.shape[1], q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    i = torch.arange(seqlen, device=q.device)[:, None]
    j = torch.arange(seqlen, device=q.device)[None, :]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~rule(i, j), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    p = torch.exp(scores - torch.where(torch.isneginf(lse), 0, lse)[..., None])
    return torch.einsum("bhij,bjhd->bihd", p, v), lse


def test_merge_window_and_rest_is_causal_attention_with_gradients(device):
    """Window result (markovkit, differentiable lse) merged with the disjoint older keys equals causal
    attention, values and gradients (this exercises the backward through lse)."""
    shape = (2, 110, 4, 2, 32, 16, 0)
    dtype = _kernel_dtype(device)  # the window part's; the rest, the merge and the reference run in float64
    q, k, v = [t.double() for t in _inputs(shape, dtype, device)]
    dout = torch.randn_like(q)
    dlse = torch.randn(2, 4, 110, dtype=torch.float64, device=device)

    def merged(q, k, v):
        win, win_lse = markovkit.sliding_window_attention(q.to(dtype), k.to(dtype), v.to(dtype), 16,
                                                          return_lse=True)
        rest, rest_lse = _masked_attention(q, k, v, lambda i, j: j <= i - 16)
        return markovkit.merge_attention(win.double(), win_lse.double(), rest, rest_lse)

    def causal(q, k, v):
        return reference.sliding_window_attention(q, k, v, 110)

    out, lse = merged(q, k, v)
    ref_out, ref_lse = causal(q, k, v)
    _close(out, ref_out, dtype)
    _close(lse, ref_lse, torch.float64 if dtype == torch.float64 else torch.float32)  # float32 sums
    for a, e in zip(_grads(merged, q, k, v, dout, dlse), _grads(causal, q, k, v, dout, dlse)):
        _close(a, e, dtype, scale=1 if dtype == torch.float64 else 10)


def test_merge_is_associative_and_commutative():
    g = torch.Generator().manual_seed(3)
    outs = [torch.randn(2, 9, 3, 32, generator=g) for _ in range(3)]
    lses = [4 * torch.randn(2, 3, 9, generator=g) for _ in range(3)]
    (o0, o1, o2), (l0, l1, l2) = outs, lses
    first = markovkit.merge_attention(*markovkit.merge_attention(o0, l0, o1, l1), o2, l2)
    second = markovkit.merge_attention(o2, l2, *markovkit.merge_attention(o1, l1, o0, l0))
    third = markovkit.merge_attention(o1, l1, *markovkit.merge_attention(o2, l2, o0, l0))
    for other in (second, third):
        torch.testing.assert_close(other[0], first[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(other[1], first[1], rtol=1e-6, atol=1e-6)
    expected_lse = torch.logsumexp(torch.stack(lses), 0)
    torch.testing.assert_close(first[1], expected_lse, rtol=1e-6, atol=1e-6)
    # out = Σ_i e^(lse_i − lse) out_i
    weights = [torch.exp(l.double() - expected_lse.double()).transpose(1, 2).unsqueeze(-1) for l in lses]
    expected_out = sum(w * o.double() for w, o in zip(weights, outs))
    torch.testing.assert_close(first[0].double(), expected_out, rtol=1e-5, atol=1e-6)


def test_merge_with_empty_sources():
    g = torch.Generator().manual_seed(4)
    o, lse = torch.randn(1, 5, 2, 32, generator=g), torch.randn(1, 2, 5, generator=g)
    empty_o, empty_lse = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    out, out_lse = markovkit.merge_attention(o, lse, empty_o, empty_lse)
    assert torch.equal(out, o) and torch.equal(out_lse, lse)
    out, out_lse = markovkit.merge_attention(empty_o, empty_lse, empty_o, empty_lse)
    assert torch.equal(out, empty_o) and torch.equal(out_lse, empty_lse)


def test_merge_of_float64_outputs_is_float64_with_float32_lse():
    """float64 outputs with float32 lse (a float32 kernel's beside a float64 reference's) merge in float64: an empty
    source gives the other back bit for bit (they were summed in float32, 1e-7 off)."""
    g = torch.Generator().manual_seed(6)
    o, lse = torch.randn(1, 5, 2, 32, generator=g, dtype=torch.float64), torch.randn(1, 2, 5, generator=g)
    out, _ = markovkit.merge_attention(o, lse, torch.zeros_like(o), torch.full_like(lse, float("-inf")))
    assert out.dtype == torch.float64 and torch.equal(out, o)


def test_merge_refuses_integer_tensors():
    """An integer out would come back truncated (the merge casts to the outs' dtype)."""
    o, lse = torch.ones(1, 2, 1, 32), torch.zeros(1, 1, 2)
    with pytest.raises(RuntimeError, match="out_b: expected a floating-point tensor, got torch.int32"):
        markovkit.merge_attention(o, lse, 2 * o.int(), lse)
    with pytest.raises(RuntimeError, match="lse_a: expected a floating-point tensor, got torch.int64"):
        markovkit.merge_attention(o, lse.long(), o, lse)


def _merge_reference(outs, lses):
    """Attention over the union of the sources, in float64 from the definition: lse = log Σ_s e^lse_s,
    out = Σ_s e^(lse_s - lse) out_s, leaving out empty sources (lse = -inf), of the gradients too. Every row
    needs a non-empty source."""
    lse_s = torch.stack(lses)  # (sources, batch, heads, seqlen)
    present = ~torch.isneginf(lse_s)
    e = torch.where(present, torch.exp(torch.where(present, lse_s, 0)), 0)
    w = (e / e.sum(0)).transpose(2, 3).unsqueeze(-1)  # (sources, batch, seqlen, heads, 1)
    return (w * torch.stack(outs)).sum(0), torch.log(e.sum(0))


def _merge3_sources():
    """Three float64 sources (out, lse), out: (2, 7, 3, 8), lse: (2, 3, 7): a and b empty on some rows each
    and both on others, c never empty."""
    g = torch.Generator().manual_seed(6)
    sources = []
    for empty_rows in ([0, 1, 2, 3], [2, 3, 4], []):  # positions; a and b are both empty at 2 and 3
        out = torch.randn(2, 7, 3, 8, generator=g, dtype=torch.float64)
        lse = 3 * torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
        out[:, empty_rows], lse[:, :, empty_rows] = 0, float("-inf")
        sources.append((out, lse))
    return sources


MERGE_ORDERS = {
    "(a, b), c": lambda a, b, c: markovkit.merge_attention(*markovkit.merge_attention(*a, *b), *c),
    "c, (b, a)": lambda a, b, c: markovkit.merge_attention(*c, *markovkit.merge_attention(*b, *a)),
    "(a, c), b": lambda a, b, c: markovkit.merge_attention(*markovkit.merge_attention(*a, *c), *b),
}


@pytest.mark.parametrize("order", MERGE_ORDERS)
def test_merge_gradients_with_empty_sources(order):
    """Chained merges where a row is empty in both inner sources (an inner lse of -inf, log(0)): values and
    gradients of <out, dout> + <lse, dlse> as the float64 reference's, finite, zero for the empty sources."""
    sources = _merge3_sources()
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(2, 7, 3, 8, generator=g, dtype=torch.float64)
    dlse = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    results = []
    for fn in (MERGE_ORDERS[order], lambda *s: _merge_reference(*zip(*s))):
        inputs = [tuple(t.clone().requires_grad_() for t in source) for source in sources]
        out, lse = fn(*inputs)
        grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), [t for s in inputs for t in s])
        results.append((out, lse, *grads))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **TOL[torch.float64])
    grads = results[0][2:]  # d out_a, d lse_a, d out_b, d lse_b, ...
    assert all(torch.isfinite(d).all() for d in grads)
    assert torch.equal(grads[1][:, :, :4], torch.zeros(2, 3, 4, dtype=torch.float64))
    assert torch.equal(grads[3][:, :, 2:5], torch.zeros(2, 3, 3, dtype=torch.float64))


def test_merge_of_two_empty_sources_has_zero_gradients():
    o, lse = torch.zeros(1, 5, 2, 32, requires_grad=True), torch.full((1, 2, 5), float("-inf"), requires_grad=True)
    o2, lse2 = [t.detach().clone().requires_grad_() for t in (o, lse)]
    out, out_lse = markovkit.merge_attention(o, lse, o2, lse2)
    g = torch.Generator().manual_seed(8)
    loss = (out * torch.randn(out.shape, generator=g)).sum() + (out_lse * torch.randn(lse.shape, generator=g)).sum()
    for grad, t in zip(torch.autograd.grad(loss, (o, lse, o2, lse2)), (o, lse, o2, lse2)):
        assert torch.equal(grad, torch.zeros_like(t))


def _merge_args(**changes):
    """Valid merge arguments out_a (2, 5, 3, 8), lse_a (2, 3, 5), out_b, lse_b, with some replaced by a
    function of the valid tensor."""
    g = torch.Generator().manual_seed(9)
    args = dict(out_a=torch.randn(2, 5, 3, 8, generator=g), lse_a=torch.randn(2, 3, 5, generator=g),
                out_b=torch.randn(2, 5, 3, 8, generator=g), lse_b=torch.randn(2, 3, 5, generator=g))
    return [changes[name](t) if name in changes else t for name, t in args.items()]


@pytest.mark.parametrize("changes,message", [
    (dict(lse_b=lambda t: t[:, :, :1]),
     "lse_b: expected shape [2, 3, 5] (batch, heads, seqlen of out_a), got [2, 3, 1]"),
    (dict(out_b=lambda t: t[:, :1]), "out_b: expected shape [2, 5, 3, 8] (the shape of out_a), got [2, 1, 3, 8]"),
    (dict(out_a=lambda t: t[:, :1], lse_a=lambda t: t[:, :, :1]),
     "out_b: expected shape [2, 1, 3, 8] (the shape of out_a), got [2, 5, 3, 8]"),
    (dict(lse_a=lambda t: t.transpose(1, 2)), "lse_a: expected shape [2, 3, 5] (batch, heads, seqlen of out_a), "
                                              "got [2, 5, 3]"),
    (dict(out_a=lambda t: t[0], out_b=lambda t: t[0]), "out_a: expected 4 dims (batch, seqlen, heads, headdim), "
                                                        "got shape [5, 3, 8]"),
    (dict(lse_b=lambda t: t.to("meta")), "lse_b: expected a tensor on cpu (the device of out_a), got one on meta"),
    (dict(out_a=lambda t: t.to("meta")), "lse_a: expected a tensor on meta (the device of out_a), got one on cpu"),
])
def test_merge_rejects_mismatched_inputs(changes, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        markovkit.merge_attention(*_merge_args(**changes))


@pytest.mark.parametrize("batch,seqlen", [(2, 0), (0, 9)])
def test_empty_inputs(device, batch, seqlen):
    """No queries: out, lse and the gradients are empty tensors of their shapes (no kernel launch of zero blocks)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = [t.requires_grad_() for t in _inputs((batch, seqlen, 4, 2, 64, 16, 0), dtype, device)]
    out, lse = markovkit.sliding_window_attention(q, k, v, 16, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (batch, 4, seqlen)
    (out.sum() + lse.sum()).backward()
    assert [t.grad.shape for t in (q, k, v)] == [q.shape, k.shape, v.shape]


def test_gradcheck_float64():
    q, k, v = [t.requires_grad_() for t in _inputs((1, 11, 2, 1, 32, 0, 0), torch.float64, "cpu")]

    def f(q, k, v):
        return markovkit.sliding_window_attention(q, k, v, 4, sink=2, return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_opcheck(device):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v = _inputs((2, 70, 4, 2, 32, 0, 0), dtype, device)
    for args in [(q, k, v, 9, 0, 0.2), (q, k, v, 100, 3, 0.1)]:
        torch.library.opcheck(torch.ops.markovkit.sliding_window_attention_fwd, args)
    out, lse = torch.ops.markovkit.sliding_window_attention_fwd(q, k, v, 9, 2, 0.2)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    for dl in (dlse, None):
        torch.library.opcheck(torch.ops.markovkit.sliding_window_attention_bwd,
                              (dout, dl, q, k, v, out, lse, 9, 2, 0.2))


def test_compiled_window_and_sink_are_no_graph_per_value(device):
    """window and sink are SymInt in the schema: five windows compile at most two graphs (the first value, then a
    dynamic one; an int made one graph per value, dynamic=True too), each the eager result."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v = _inputs((1, 80, 4, 2, 64, 0, 0), dtype, device)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v, window, sink):
        return markovkit.sliding_window_attention(q, k, v, window, sink=sink)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    for window, sink in [(5, 2), (17, 3), (33, 4), (64, 5), (80, 6)]:  # not 0 or 1: torch.compile's constants
        torch.testing.assert_close(compiled(q, k, v, window, sink), f(q, k, v, window, sink), rtol=0, atol=0)
    assert len(graphs) <= 2


@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_fullgraph(device, dynamic):
    """Forward and backward under torch.compile, with static and with symbolic sizes (the fake kernel's
    shape checks on SymInts)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v = [t.requires_grad_() for t in _inputs((1, 80, 4, 2, 64, 0, 0), dtype, device)]

    def f(q, k, v):
        out, lse = markovkit.sliding_window_attention(q, k, v, 17, sink=1, return_lse=True)
        return (out.float() ** 2).sum() + lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected_loss = f(q, k, v)
    expected = torch.autograd.grad(expected_loss, (q, k, v))
    torch.testing.assert_close(loss, expected_loss)
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e)


def test_non_contiguous_inputs():
    q, k, v = _inputs((2, 40, 2, 2, 32, 0, 0), torch.float64, "cpu")
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not qt.is_contiguous()
    out = markovkit.sliding_window_attention(qt, k, v, 7)
    torch.testing.assert_close(out, reference.sliding_window_attention(q, k, v, 7)[0], **TOL[torch.float64])


def test_bad_input_errors():
    q, k, v = _inputs((1, 10, 4, 2, 32, 0, 0), torch.float32, "cpu")
    swa = markovkit.sliding_window_attention
    with pytest.raises(RuntimeError, match="window: expected >= 1"):
        swa(q, k, v, 0)
    with pytest.raises(RuntimeError, match="sink: expected >= 0"):
        swa(q, k, v, 3, sink=-1)
    with pytest.raises(TypeError, match="'float' object cannot be interpreted as an integer"):
        swa(q, k, v, 2.7)
    with pytest.raises(RuntimeError, match="q: expected headdim 32, 64, 96, 128 or 256, got 16"):
        swa(q[..., :16], k[..., :16], v[..., :16], 3)
    with pytest.raises(RuntimeError, match="q: expected dtype Float or Double, got Int"):
        swa(q.int(), k.int(), v.int(), 3)
    with pytest.raises(RuntimeError, match="softmax_scale: expected a finite positive number"):
        swa(q, k, v, 3, softmax_scale=-1.0)
    out, lse = torch.ops.markovkit.sliding_window_attention_fwd(q, k, v, 3, 0, 1.0)
    with pytest.raises(RuntimeError, match="dlse: expected dtype Float, got Half"):
        torch.ops.markovkit.sliding_window_attention_bwd(out, lse.half(), q, k, v, out, lse, 3, 0, 1.0)


# (q, k, v) -> arguments; the error, the same from the CPU kernel and the meta device's fake kernel
SHAPE_ERRORS = [
    (lambda q, k, v: (q, k[:, :, :1].expand(1, 10, 3, 32), v[:, :, :1].expand(1, 10, 3, 32)),
     "k: expected kv_heads dividing heads = 4, got 3"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "k: expected kv_heads dividing heads = 4, got 0"),
    (lambda q, k, v: (q, k[:, :9], v[:, :9]), "k: expected shape [1, 10, 2, 32], got [1, 9, 2, 32]"),
    (lambda q, k, v: (q, k[..., :16], v[..., :16]), "k: expected shape [1, 10, 2, 32], got [1, 10, 2, 16]"),
    (lambda q, k, v: (q, k, v[:, :, :1]), "v: expected shape [1, 10, 2, 32], got [1, 10, 1, 32]"),
    (lambda q, k, v: (q, k, v[0]), "v: expected shape [1, 10, 2, 32], got [10, 2, 32]"),
    (lambda q, k, v: (q[0], k[0], v[0]), "q: expected 4 dims (batch, seqlen, heads, headdim), got shape [10, 4, 32]"),
    (lambda q, k, v: (q, k[0], v[0]), "k: expected 4 dims (batch, seqlen, kv_heads, headdim), got shape [10, 2, 32]"),
]


@pytest.mark.parametrize("case", range(len(SHAPE_ERRORS)))
@pytest.mark.parametrize("device_type", ["cpu", "meta"])
def test_shape_errors(device_type, case):
    make_args, message = SHAPE_ERRORS[case]
    q, k, v = _inputs((1, 10, 4, 2, 32, 0, 0), torch.float32, device_type)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        markovkit.sliding_window_attention(*make_args(q, k, v), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_meta_tensors_give_shapes_and_dtypes(dtype):
    q, k, v = _inputs((2, 10, 4, 2, 64, 0, 0), dtype, "meta")
    out, lse = markovkit.sliding_window_attention(q, k, v, 3, return_lse=True)
    assert out.device.type == lse.device.type == "meta"
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, 4, 10) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtypes,message", [
    ((torch.float16, torch.float32, torch.float32),
     "k: expected dtype torch.float16 (the dtype of q), got torch.float32"),
    ((torch.bfloat16, torch.float16, torch.float16),
     "k: expected dtype torch.bfloat16 (the dtype of q), got torch.float16"),
    ((torch.float16, torch.float16, torch.bfloat16),
     "v: expected dtype torch.float16 (the dtype of q), got torch.bfloat16"),
    ((torch.float32, torch.float64, torch.float32),
     "k: expected dtype torch.float32 (the dtype of q), got torch.float64"),
])
def test_mixed_dtypes_rejected(device, dtypes, message):
    """One error on every device, before the CPU's upcast of half dtypes to float32 could hide the mismatch."""
    q, k, v = [t.to(dt) for t, dt in zip(_inputs((1, 10, 4, 2, 32, 0, 0), torch.float64, device), dtypes)]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        markovkit.sliding_window_attention(q, k, v, 3)


@pytest.mark.parametrize("devices,message", [
    (("cpu", "meta", "meta"), "k: expected a tensor on cpu (the device of q), got one on meta"),
    (("meta", "meta", "cpu"), "v: expected a tensor on meta (the device of q), got one on cpu"),
])
def test_mixed_devices_rejected(devices, message):
    q, k, v = [t.to(d) for t, d in zip(_inputs((1, 10, 4, 2, 32, 0, 0), torch.float32, "cpu"), devices)]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        markovkit.sliding_window_attention(q, k, v, 3)


def test_batch_split_gives_the_same_bits(device):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v = _inputs((3, 130, 4, 2, 64, 0, 0), dtype, device)
    out, lse = markovkit.sliding_window_attention(q, k, v, 40, sink=1, return_lse=True)
    for b in range(3):
        ob, lb = markovkit.sliding_window_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], 40, sink=1, return_lse=True)
        assert torch.equal(ob[0], out[b]) and torch.equal(lb[0], lse[b])


def test_mqa_many_tiles_gradients(device):
    """One (batch, kv head) pair and many key / query tiles: the backward's split over key tiles (dK, dV)
    and query tiles (dQ) must cover every tile pair exactly once, sink tiles included."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shape, window, sink = (1, 1000, 3, 1, 32, 150, 70), 150, 70
    q, k, v = _inputs(shape, dtype, device, seed=2)
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(device)
    dlse = torch.randn(1, 3, 1000, generator=g, dtype=torch.float64).to(device)

    def ours(q, k, v):
        return markovkit.sliding_window_attention(q, k, v, window, sink=sink, return_lse=True)

    def ref(q, k, v):
        return reference.sliding_window_attention(q, k, v, window, sink)

    expected = _grads(ref, q.double(), k.double(), v.double(), dout, dlse)
    low = _grads(ref, q, k, v, dout.to(dtype), dlse) if dtype in LOW else [None] * 3
    for a, e, lo in zip(_grads(ours, q, k, v, dout, dlse), expected, low):
        _close(a, e, dtype, scale=10 if dtype in LOW else 1, low_precision_ref=lo)


def test_backward_bits_independent_of_thread_count():
    shape = (1, 400, 4, 1, 64, 100, 5)
    q, k, v = _inputs(shape, torch.float32, "cpu")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))

    def grads():
        qq, kk, vv = [t.detach().requires_grad_() for t in (q, k, v)]
        out = markovkit.sliding_window_attention(qq, kk, vv, 100, sink=5)
        return torch.autograd.grad(out, (qq, kk, vv), dout)

    single, multi = on_1_and_3_threads(grads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


_ISA_SCRIPT = """
import torch, markovkit
from markovkit import reference
g = torch.Generator().manual_seed(0)
for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
    q, k, v = [torch.randn(1, 150, 4, 96, generator=g, dtype=torch.float64) for _ in range(3)]
    k, v = k[:, :, :2].contiguous(), v[:, :, :2].contiguous()
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    grads = []
    for fn, t in ((markovkit.sliding_window_attention, dtype), (reference.sliding_window_attention, torch.float64)):
        x = [a.to(t).requires_grad_() for a in (q, k, v)]
        out = fn(x[0], x[1], x[2], 40, sink=3) if fn is markovkit.sliding_window_attention else fn(*x, 40, 3)[0]
        grads.append([out] + list(torch.autograd.grad(out, x, dout.to(t))))
    for a, e in zip(*grads):
        torch.testing.assert_close(a.double(), e.double(), rtol=tol, atol=tol)
print("ok")
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_instruction_set_copies(capability):
    """The baseline and AVX2 copies of the CPU kernels (picked once per process, lowered as ATen's by
    ATEN_CPU_CAPABILITY) against the float64 reference, in a fresh process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    run = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rejects_float32():
    q = torch.randn(1, 8, 2, 32, device="cuda")
    with pytest.raises(RuntimeError, match="q: expected dtype Half or BFloat16, got Float"):
        markovkit.sliding_window_attention(q, q, q, 3)

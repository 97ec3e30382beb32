"""B'MOJO-F: markovkit.bmojo_f_attention against one dense float64 softmax over the in-context and the fading
keys (values, lse, gradients of all five inputs), its edge cases and torch.compile; markovkit.nn.BMojoF against
the same computation written out, and against SlidingWindowAttention where no fading key is in reach."""
import re

import pytest
import torch

import markovkit
import markovkit.nn
from conftest import TOL, assert_compiles_and_exports
from markovkit import reference

# (batch, seqlen, heads, kv_heads, headdim, window): seqlen not a multiple of window, GQA and batch 2; window 1;
# seqlen = 2 window; a window of 64 keys over 129 positions (tile edges); seqlen = window and window > seqlen
# (no fading key in reach: sliding-window attention).
SHAPES = [
    (2, 75, 4, 2, 32, 9),
    (1, 40, 2, 2, 64, 1),
    (1, 64, 2, 1, 32, 32),
    (1, 129, 2, 1, 64, 64),
    (1, 30, 2, 2, 32, 30),
    (1, 20, 2, 2, 32, 64),
]


def _inputs(shape, dtype, device, seed=0):
    """q: (batch, seqlen, heads, headdim); k, v, kf, vf: (batch, seqlen, kv_heads, headdim)."""
    batch, seqlen, heads, kv_heads, headdim, _ = shape
    g = torch.Generator().manual_seed(seed)
    sizes = [(batch, seqlen, heads, headdim)] + 4 * [(batch, seqlen, kv_heads, headdim)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in sizes]


def _kernel_dtype(device):
    return torch.float64 if device.type == "cpu" else torch.bfloat16


def _grads(fn, inputs, dout, dlse):
    """Gradients of <out, dout> + <lse, dlse> with respect to the five inputs (zeros for unused ones)."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out, lse = fn(*inputs)
    loss = (out.double() * dout).sum() + (lse.double() * dlse).sum()
    return torch.autograd.grad(loss, inputs, materialize_grads=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cpu_dtype", [torch.float64, torch.float32])
def test_matches_dense_softmax_over_both_key_sets(device, shape, cpu_dtype):
    dtype = cpu_dtype if device.type == "cpu" else torch.bfloat16
    if device.type == "cuda" and cpu_dtype == torch.float32:
        pytest.skip("one CUDA dtype case is enough")
    window = shape[-1]
    inputs = _inputs(shape, dtype, device)
    out, lse = markovkit.bmojo_f_attention(*inputs, window, return_lse=True)
    ref_out, ref_lse = reference.bmojo_f_attention(*[t.double() for t in inputs], window)
    # float32: 1e-5 absolute; bfloat16: 2e-2, as the hybrid notes ask
    tol = dict(rtol=0, atol={torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype])
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, **tol)

    g = torch.Generator().manual_seed(1)
    dout = torch.randn(ref_out.shape, generator=g, dtype=torch.float64).to(device)
    dlse = torch.randn(ref_lse.shape, generator=g, dtype=torch.float64).to(device)

    def ours(*ts):
        return markovkit.bmojo_f_attention(*ts, window, return_lse=True)

    def dense(*ts):
        return reference.bmojo_f_attention(*[t.double() for t in ts], window)

    grad_tol = dict(TOL[dtype], atol=10 * TOL[dtype]["atol"]) if dtype != torch.float64 else TOL[dtype]
    for name, a, e in zip(("q", "k", "v", "kf", "vf"), _grads(ours, inputs, dout, dlse),
                          _grads(dense, inputs, dout, dlse)):
        torch.testing.assert_close(a.double(), e.double(), **grad_tol, msg=lambda m: f"d{name}: {m}")


def test_without_fading_keys_in_reach_is_sliding_window_attention():
    """seqlen <= window: no query reaches a fading key; the result is the window op's, bit for bit."""
    q, k, v, kf, vf = _inputs((2, 30, 4, 2, 32, 30), torch.float64, torch.device("cpu"))
    for window in (30, 31):
        out, lse = markovkit.bmojo_f_attention(q, k, v, kf, vf, window, return_lse=True)
        swa_out, swa_lse = markovkit.sliding_window_attention(q, k, v, window, return_lse=True)
        assert torch.equal(out, swa_out) and torch.equal(lse, swa_lse)


def test_fading_keys_are_the_window_before_the_window():
    """One query, values one-hot by position: the attention weights land on in-context positions i - w < j <= i
    and on fading positions i - 2w < j <= i - w, nowhere else."""
    seqlen, window = 23, 5
    q = torch.zeros(1, seqlen, 1, 32, dtype=torch.float64)  # equal scores: uniform over the visible keys
    k = kf = torch.zeros(1, seqlen, 1, 32, dtype=torch.float64)
    v = torch.zeros(1, seqlen, 1, 32, dtype=torch.float64)
    vf = torch.zeros(1, seqlen, 1, 32, dtype=torch.float64)
    v[0, :, 0, 0] = 1  # channel 0 counts in-context keys, channel 1 fading keys, channel 2 + j marks position j
    vf[0, :, 0, 1] = 1
    v[0, torch.arange(seqlen), 0, 2 + torch.arange(seqlen)] = 1
    vf[0, torch.arange(seqlen), 0, 2 + torch.arange(seqlen)] = 1
    out = markovkit.bmojo_f_attention(q, k, v, kf, vf, window)[0, :, 0]  # (seqlen, 32)
    for i in range(seqlen):
        in_context = range(max(0, i - window + 1), i + 1)
        fading = range(max(0, i - 2 * window + 1), max(0, i - window + 1))
        n = len(in_context) + len(fading)
        expected = torch.zeros(32, dtype=torch.float64)
        expected[0], expected[1] = len(in_context) / n, len(fading) / n
        for j in [*in_context, *fading]:
            expected[2 + j] += 1 / n
        torch.testing.assert_close(out[i], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    torch._dynamo.reset()
    inputs = [t.requires_grad_() for t in _inputs((2, 40, 2, 1, 32, 8), torch.float32, torch.device("cpu"))]

    def f(q, k, v, kf, vf):
        out, lse = markovkit.bmojo_f_attention(q, k, v, kf, vf, 8, return_lse=True)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    eager_loss = f(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    torch.testing.assert_close(loss, eager_loss)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e)


def test_vmap_over_a_leading_dimension_equals_a_loop():
    """torch.func.vmap over an extra leading dimension (the autograd.Function's generated vmap rule)."""
    inputs = [torch.stack(ts) for ts in zip(*[_inputs((2, 20, 2, 1, 32, 6), torch.float64, torch.device("cpu"),
                                                      seed) for seed in range(3)])]
    out, lse = torch.func.vmap(lambda *ts: markovkit.bmojo_f_attention(*ts, 6, return_lse=True))(*inputs)
    for i in range(3):
        out_i, lse_i = markovkit.bmojo_f_attention(*[t[i] for t in inputs], 6, return_lse=True)
        assert torch.equal(out[i], out_i) and torch.equal(lse[i], lse_i)


@pytest.mark.parametrize("which,change,message", [
    ("kf", lambda t: t[:, :-1], "kf: expected shape [1, 12, 1, 32] (the shape of k), got [1, 11, 1, 32]"),
    ("vf", lambda t: t[..., :16], "vf: expected shape [1, 12, 1, 32] (the shape of k), got [1, 12, 1, 16]"),
    ("kf", lambda t: t.float(), "kf: expected dtype torch.float64 (the dtype of k), got torch.float32"),
    ("vf", lambda t: t.to("meta"), "vf: expected a tensor on cpu (the device of k), got one on meta"),
])
def test_bad_fading_inputs(which, change, message):
    q, k, v, kf, vf = _inputs((1, 12, 2, 1, 32, 4), torch.float64, torch.device("cpu"))
    kf, vf = (change(kf), vf) if which == "kf" else (kf, change(vf))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        markovkit.bmojo_f_attention(q, k, v, kf, vf, 4)


def _layer_reference(layer, x):
    """layer(x) written out in float64 on the dense reference: fading tokens from layer.mixer, tied k / v
    projections, rotary embeddings at absolute positions, one softmax over both key sets."""
    batch, seqlen, _ = x.shape
    w = {n: p.double() for n, p in layer.named_parameters() if not n.startswith("mixer.")}
    f = layer.mixer(x).double()
    x = x.double()
    heads, kv_heads, headdim = layer.heads, layer.kv_heads, layer.headdim

    def project(t, name, n):
        return (t @ w[name].T).view(batch, seqlen, n, headdim)

    q = markovkit.nn.rotary_embedding(project(x, "q_proj.weight", heads))
    k, kf = [markovkit.nn.rotary_embedding(project(t, "k_proj.weight", kv_heads)) for t in (x, f)]
    v, vf = [project(t, "v_proj.weight", kv_heads) for t in (x, f)]
    out = reference.bmojo_f_attention(q, k, v, kf, vf, layer.window)[0]
    return out.reshape(batch, seqlen, heads * headdim) @ w["out_proj.weight"].T


def test_layer_matches_reference(device):
    torch.manual_seed(0)
    dtype = _kernel_dtype(device)
    layer = markovkit.nn.BMojoF(64, 2, 7, kv_heads=1, device=device, dtype=dtype)
    x = torch.randn(2, 33, 64, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), _layer_reference(layer, x), rtol=tol["rtol"], atol=tol["atol"])
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())  # the mixer's too
    grad, x.grad = x.grad, None
    _layer_reference(layer, x).sum().backward()
    torch.testing.assert_close(grad.double(), x.grad.double(), rtol=tol["rtol"], atol=10 * tol["atol"])


def test_layer_compiles_and_exports_with_a_dynamic_seqlen():
    """On the CPU, Inductor's channels-last pass (a convolution turns it on there) failed on the symbolic strides of
    q, k, v: the mixer's causal convolution is written out when compiled. Exported from seqlen window + 2: shorter
    sequences take the branch without fading keys, and torch specialises a fading length of 1."""
    torch.manual_seed(0)
    layer = markovkit.nn.BMojoF(64, 2, 8, dtype=torch.float64)
    assert_compiles_and_exports(layer, 64, (17, 40), min_seqlen=10)


def test_layer_without_fading_keys_in_reach_is_sliding_window_attention():
    torch.manual_seed(0)
    layer = markovkit.nn.BMojoF(64, 2, 40, dtype=torch.float64)
    swa = markovkit.nn.SlidingWindowAttention(64, 2, 40, dtype=torch.float64)
    swa.load_state_dict({n: p for n, p in layer.state_dict().items() if not n.startswith("mixer.")})
    x = torch.randn(2, 40, 64, dtype=torch.float64)
    assert torch.equal(layer(x), swa(x))


@pytest.mark.parametrize("kv_heads,rotary", [(2, True), (1, False)])
def test_layer_decoding_token_by_token_equals_forward(kv_heads, rotary):
    """3 windows and 2 tokens decoded one at a time give the forward's outputs; the cache does not grow."""
    torch.manual_seed(0)
    window, seqlen = 5, 17
    layer = markovkit.nn.BMojoF(64, 2, window, kv_heads=kv_heads, rotary=rotary, dtype=torch.float64)
    x = torch.randn(3, seqlen, 64, dtype=torch.float64)
    expected = layer(x)
    cache = layer.allocate_inference_cache(3)
    sizes = [t.shape for t in (cache.k, cache.v, cache.kf, cache.vf)]
    steps = torch.cat([layer.step(x[:, i:i + 1], cache) for i in range(seqlen)], dim=1)
    torch.testing.assert_close(steps, expected, rtol=1e-10, atol=1e-12)
    assert cache.position == seqlen and [t.shape for t in (cache.k, cache.v, cache.kf, cache.vf)] == sizes
    assert sizes == 2 * [(3, window, kv_heads, 32)] + 2 * [(3, 2 * window, kv_heads, 32)]


def test_compiled_step_is_one_graph_for_every_position():
    """step under torch.compile(fullgraph=True): one graph for 12 positions (past the recompile limit of 8; with the
    position a Python int, one graph per position) and the eager steps' outputs."""
    torch.manual_seed(0)
    layer = markovkit.nn.BMojoF(64, 2, 3, dtype=torch.float64)
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    eager_cache, cache = layer.allocate_inference_cache(2), layer.allocate_inference_cache(2)
    expected = [layer.step(x[:, i:i + 1], eager_cache) for i in range(12)]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(layer.step, backend=backend, fullgraph=True)
    for i in range(12):
        torch.testing.assert_close(step(x[:, i:i + 1], cache), expected[i], rtol=1e-12, atol=1e-12)
    assert len(graphs) == 1 and cache.position.item() == 12


def test_layer_step_takes_one_token_of_the_caches_batch():
    layer = markovkit.nn.BMojoF(64, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape("x: expected shape (batch, 1, dim), one token, got (1, 2, 64)")):
        layer.step(torch.zeros(1, 2, 64, dtype=torch.float64), layer.allocate_inference_cache(1))
    cache = layer.allocate_inference_cache(3, 128, dtype=torch.float32)  # Mamba's (batch_size, max_seqlen, dtype)
    assert cache.k.shape == (3, 4, 2, 32) and cache.k.dtype == torch.float32
    with pytest.raises(ValueError, match=re.escape("x: expected the cache's batch size 3, got 1")):
        layer.step(torch.zeros(1, 1, 64, dtype=torch.float64), cache)
    assert cache.position == 0
    out = layer.step(torch.randn(3, 1, 64, dtype=torch.float64), cache)  # a float32 cache for a float64 layer
    assert out.dtype == torch.float64 and cache.position == 1


@pytest.mark.parametrize("args,kwargs,message", [
    ((64, 2, 0), {}, "window: expected >= 1 (positions seen including self), got 0"),
    ((96, 2, 8), {}, "headdim: expected one of (32, 64, 96, 128, 256), got 48 (dim // heads = 96 // 2)"),
    ((64, 2, 8), dict(kv_heads=3), "kv_heads: expected a positive divisor of heads = 2, got 3"),
])
def test_layer_bad_configuration_fails_at_construction(args, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        markovkit.nn.BMojoF(*args, **kwargs)

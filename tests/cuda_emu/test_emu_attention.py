"""The CUDA sliding-window attention kernels (csrc/attention/swa_kernel.cu, and swa_fwd_sm90_kernel.cu,
swa_bwd_sm90_kernel.cu: the wgmma kernels that headdims 64 and 128 take on an sm_90 device, as the emulator reports
by default) run by the emulator: forward (out, lse) and backward (dq, dk, dv, also through lse) against the float64
dense masked reference, for both dtypes, every headdim, windows and sinks that hit each tile case (full, partial,
sink range, window range), GQA / MQA, partial and multiple tiles; the mma.sync kernels at headdims 64 and 128 on an
emulated pre-Hopper device; bitwise determinism of the backward; the CUDA branch of the glue's checks."""
import math

import pytest
import torch

import markovkit
from markovkit import cuda_emulation, reference

# Max |error| / max(1, max |reference|) allowed per dtype, about 2.5x the largest seen over CASES (fp16: out
# 3.5e-4, grads 6.2e-4; bf16: out 2.5e-3, grads 4.4e-3; lse 1.2e-7). The kernels round P (and dS) to the input
# dtype before the second products, as FlashAttention does; lse is a float32 reduction of exact products, so
# its bound leaves room for the GPU's approximate exp2 / log2 only.
OUT_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
GRAD_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
LSE_TOL = 1e-5

# (dtype, batch, seqlen, heads, kv_heads, headdim, window, sink)
CASES = [
    # 3 tiles (last partial), window not a multiple of 64, GQA 2, batch 2
    (torch.float16, 2, 130, 4, 2, 64, 70, 0),
    # MQA, window 1 (out = v), partial single tile
    (torch.bfloat16, 1, 67, 2, 1, 128, 1, 0),
    # seqlen 1
    (torch.float16, 1, 1, 2, 1, 32, 5, 0),
    # window >= seqlen (causal), sink inside the window, headdim 96
    (torch.bfloat16, 1, 100, 2, 2, 96, 500, 3),
    # largest headdim (shared memory over 100 KB), small window, one sink token, 2 tiles
    (torch.float16, 1, 65, 1, 1, 256, 10, 1),
    # several sink tiles (sink 70 > one tile) with a window that overlaps them, MQA 4, odd seqlen
    (torch.bfloat16, 1, 201, 4, 1, 32, 20, 70),
    # window smaller than the sink, both cut inside a tile; full interior tiles (window 150 > 2 tiles)
    (torch.float16, 2, 259, 2, 1, 64, 150, 5),
    (torch.bfloat16, 1, 130, 2, 2, 64, 3, 9),
    # headdim 128 over 3 forward query tiles of 128 rows (the last holds 44: two warps without rows, one half
    # full); window 100: warps skip left-edge and diagonal tiles the CTA needs, full tiles per warp; sink tile
    # of 2 keys
    (torch.float16, 1, 300, 2, 1, 128, 100, 2),
    # 6 query tiles over ~6 key tiles each: the double-buffered forward's stages alternate (sm_90 kernel)
    (torch.bfloat16, 1, 700, 2, 2, 128, 250, 0),
    # window 400: tiles more than 256 apart and windows reaching more than 256 past a tile, where the masks clamp
    # their 64-bit bounds to 32 bits; sink 3 (sink tile, then the window range)
    (torch.float16, 1, 520, 1, 1, 64, 400, 3),
    # headdim 128, whose sm_90 forward takes 128 keys per tile: sink 150 over two such tiles (the second partial,
    # 22 keys), window 200 cutting tiles of 128 on both sides, partial last tiles of 66 keys (450 = 3 * 128 + 66);
    # sink 100: one partial sink tile of more than 64 keys, which the query tiles past it see whole (no mask, its
    # rows past 100 zeros)
    (torch.bfloat16, 1, 450, 2, 1, 128, 200, 150),
    (torch.float16, 1, 300, 1, 1, 128, 60, 100),
]


def _inputs(batch, seqlen, heads, kv_heads, headdim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, heads, headdim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seqlen, kv_heads, headdim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seqlen, kv_heads, headdim, generator=g, dtype=torch.float64)
    dout = torch.randn(batch, seqlen, heads, headdim, generator=g, dtype=torch.float64)
    dlse = torch.randn(batch, heads, seqlen, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, dout)] + [dlse.float()]


def _run(fn, q, k, v, dout, dlse):
    """out, lse and the gradients of <out, dout> + <lse, dlse> with respect to q, k, v."""
    q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fn(q, k, v)
    loss = (out.double() * dout.double()).sum() + (lse.double() * dlse.double()).sum()
    return [out.detach(), lse.detach()] + list(torch.autograd.grad(loss, (q, k, v)))


def _assert_within(actual, expected, tol, what):
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    bound = tol * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _check_case(emulated, case):
    dtype, batch, seqlen, heads, kv_heads, headdim, window, sink = case
    q, k, v, dout, dlse = _inputs(batch, seqlen, heads, kv_heads, headdim, dtype)
    with emulated():
        got = _run(lambda q, k, v: markovkit.sliding_window_attention(q, k, v, window, sink=sink, return_lse=True),
                   q, k, v, dout, dlse)
    want = _run(lambda q, k, v: reference.sliding_window_attention(q, k, v, window, sink),
                q.double(), k.double(), v.double(), dout, dlse)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert [g.dtype for g in got[2:]] == [dtype] * 3
    _assert_within(got[0], want[0], OUT_TOL[dtype], "out")
    _assert_within(got[1], want[1], LSE_TOL, "lse")
    for name, g, w in zip(("dq", "dk", "dv"), got[2:], want[2:]):
        _assert_within(g, w, GRAD_TOL[dtype], name)


def _case_id(case):
    return "-".join(str(x).replace("torch.", "") for x in case)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_backward_match_float64_reference(emulated, case):
    _check_case(emulated, case)


@pytest.mark.parametrize("case", [c for c in CASES if c[5] in (64, 128)], ids=_case_id)
def test_before_hopper_matches_float64_reference(emulated, monkeypatch, case):
    """Compute capability 8.0: headdims 64 and 128 take swa_kernel.cu's kernels, not the sm_90a ones."""
    monkeypatch.setenv("MK_EMU_CC", "80")
    _check_case(emulated, case)


@pytest.mark.parametrize("cc", ["90", "80"])
@pytest.mark.parametrize("headdim", [64, 128])
def test_scores_rising_along_the_keys(emulated, monkeypatch, cc, headdim):
    """Keys scaled up along the sequence: a row's scores rise by many times kSlack (swa_device.cuh) from tile to
    tile, so the softmax's reference maxima move up again and again, between steps that keep them (P up to
    2^kSlack); and they fall back, past the window's end. Forward and backward against float64, on both kernels."""
    monkeypatch.setenv("MK_EMU_CC", cc)
    dtype, seqlen, window = torch.float16, 300, 200
    q, k, v, dout, dlse = _inputs(1, seqlen, 2, 1, headdim, dtype, seed=5)
    ramp = 1.0 + torch.arange(seqlen, dtype=torch.float64) / 10.0  # scores up to 31x a random key's
    k = (k.double() * ramp.view(1, seqlen, 1, 1)).to(dtype)
    with emulated():
        got = _run(lambda q, k, v: markovkit.sliding_window_attention(q, k, v, window, return_lse=True),
                   q, k, v, dout, dlse)
    want = _run(lambda q, k, v: reference.sliding_window_attention(q, k, v, window, 0),
                q.double(), k.double(), v.double(), dout, dlse)
    assert (want[1].max() - want[1].min()) / math.log(2.0) > 8 * 8  # the lse span: 8 kSlack in log2 units
    _assert_within(got[0], want[0], OUT_TOL[dtype], "out")
    _assert_within(got[1], want[1], LSE_TOL, "lse")
    for name, g, w in zip(("dq", "dk", "dv"), got[2:], want[2:]):
        _assert_within(g, w, GRAD_TOL[dtype], name)


@pytest.mark.parametrize("cc", ["90", "80"])
@pytest.mark.parametrize("headdim,seqlen,window,sink", [(64, 200, 8, 2), (128, 145, 100, 0), (64, 145, 100, 0)])
def test_negative_scores(emulated, monkeypatch, cc, headdim, seqlen, window, sink):
    """Every score about -32 (q near -2, k near +2 in each component): lse about -30, where e^-lse overflows
    float16. Tiles of fewer keys than the kernel's tile (a sink of 2, the sequence's last keys) hold zero rows of K,
    whose P must be masked to 0, not e^-lse (dS inf, then inf times 0 = NaN in dq). Against float64."""
    monkeypatch.setenv("MK_EMU_CC", cc)
    dtype = torch.float16
    q, k, v, dout, dlse = _inputs(1, seqlen, 2, 1, headdim, dtype, seed=6)
    scale = math.sqrt(32.0 / math.sqrt(headdim))  # q.k / sqrt(headdim) about -32 at every headdim
    q = (-scale + 0.05 * q.double()).to(dtype)
    k = (scale + 0.05 * k.double()).to(dtype)
    with emulated():
        got = _run(lambda q, k, v: markovkit.sliding_window_attention(q, k, v, window, sink=sink, return_lse=True),
                   q, k, v, dout, dlse)
    want = _run(lambda q, k, v: reference.sliding_window_attention(q, k, v, window, sink),
                q.double(), k.double(), v.double(), dout, dlse)
    assert want[1].max() < -25
    _assert_within(got[0], want[0], OUT_TOL[dtype], "out")
    _assert_within(got[1], want[1], LSE_TOL, "lse")
    for name, g, w in zip(("dq", "dk", "dv"), got[2:], want[2:]):
        _assert_within(g, w, GRAD_TOL[dtype], name)


def test_backward_without_lse_gradient(emulated):
    """Only out reaches the loss: the backward gets no dlse (delta = rowsum(dout * out) alone)."""
    q, k, v, dout, _ = _inputs(1, 100, 2, 1, 64, torch.float16, seed=4)

    def grads(fn, q, k, v):
        q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad((fn(q, k, v).double() * dout.double()).sum(), (q, k, v))

    with emulated():
        got = grads(lambda q, k, v: markovkit.sliding_window_attention(q, k, v, 30, sink=2), q, k, v)
    want = grads(lambda q, k, v: reference.sliding_window_attention(q, k, v, 30, 2)[0], q.double(), k.double(),
                 v.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        _assert_within(g, w, GRAD_TOL[torch.float16], name)


def test_window_one_gives_v_exactly(emulated):
    q, k, v, _, _ = _inputs(1, 70, 4, 2, 64, torch.bfloat16, seed=1)
    with emulated():
        out = markovkit.sliding_window_attention(q, k, v, 1)
    assert torch.equal(out, v.repeat_interleave(2, dim=2))


@pytest.mark.parametrize("headdim", [32, 64])
def test_backward_is_bitwise_deterministic(monkeypatch, headdim):
    """Two runs in each thread order (the emulator's forward and reverse schedules) give the same bits (headdim 64:
    the sm_90a kernels)."""
    if not cuda_emulation.available():
        pytest.skip("needs the MARKOVKIT_CUDA=EMULATE build")
    q, k, v, dout, dlse = _inputs(1, 150, 4, 2, headdim, torch.float16, seed=2)
    fn = lambda q, k, v: markovkit.sliding_window_attention(q, k, v, 70, sink=2, return_lse=True)  # noqa: E731
    results = []
    for order in ("forward", "forward", "reverse", "reverse"):
        monkeypatch.setenv("MK_EMU_ORDER", order)
        with cuda_emulation.cuda_emulation():
            results.append(_run(fn, q, k, v, dout, dlse))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cc", ["90", "80"])
@pytest.mark.parametrize("headdim", [64, 128])
def test_unbounded_window_and_sink_are_seqlen(emulated, monkeypatch, cc, headdim):
    """A window and a sink of INT64_MAX give the bits of window = sink = seqlen (every earlier key), forward and
    backward: the glue takes them to seqlen, so the kernels' 32-bit positions hold them."""
    monkeypatch.setenv("MK_EMU_CC", cc)
    q, k, v, dout, dlse = _inputs(1, 150, 2, 1, headdim, torch.bfloat16, seed=4)
    results = []
    for bound in (150, 2**63 - 1):
        with emulated():
            fn = lambda q, k, v: markovkit.sliding_window_attention(  # noqa: E731
                q, k, v, bound, sink=bound, return_lse=True)
            results.append(_run(fn, q, k, v, dout, dlse))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cc", ["90", "80"])
@pytest.mark.parametrize("batch,seqlen", [(2, 0), (0, 9)])
def test_empty_inputs(emulated, monkeypatch, cc, batch, seqlen):
    """No queries: empty out, lse and gradients, and no launch (a grid of zero blocks is a launch error)."""
    monkeypatch.setenv("MK_EMU_CC", cc)
    q, k, v = [torch.randn(batch, seqlen, h, 64).to(torch.bfloat16).requires_grad_() for h in (4, 2, 2)]
    with emulated():
        out, lse = markovkit.sliding_window_attention(q, k, v, 16, return_lse=True)
        (out.float().sum() + lse.sum()).backward()
    assert out.shape == q.shape and lse.shape == (batch, 4, seqlen)
    assert [t.grad.shape for t in (q, k, v)] == [q.shape, k.shape, v.shape]


def test_misaligned_inputs_are_copied(emulated):
    """The glue clones inputs whose data is not 16-byte aligned (the kernels load 16-byte vectors)."""
    q, k, v, _, _ = _inputs(1, 40, 2, 1, 32, torch.float16, seed=3)
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)
    shifted.copy_(q)
    assert shifted.data_ptr() % 16 != 0
    with emulated():
        expected = markovkit.sliding_window_attention(q, k, v, 9)
        out = markovkit.sliding_window_attention(shifted, k, v, 9)
    assert torch.equal(out, expected)


def test_cuda_glue_errors(emulated):
    q, k, v, dout, _ = _inputs(1, 8, 2, 1, 32, torch.float16)
    with emulated():
        with pytest.raises(RuntimeError, match="q: expected dtype Half or BFloat16, got Float"):
            torch.ops.markovkit.sliding_window_attention_fwd(q.float(), k.float(), v.float(), 3, 0, 1.0)
        with pytest.raises(RuntimeError, match=r"k: expected dtype Half \(the dtype of q\), got BFloat16"):
            torch.ops.markovkit.sliding_window_attention_fwd(q, k.bfloat16(), v, 3, 0, 1.0)
        many = torch.zeros(1, 1, 65536, 32, dtype=torch.float16)
        one = torch.zeros(1, 1, 1, 32, dtype=torch.float16)
        with pytest.raises(RuntimeError, match="q: expected batch \\* heads <= 65535 on CUDA"):
            torch.ops.markovkit.sliding_window_attention_fwd(many, one, one, 3, 0, 1.0)
        lse = torch.zeros(1, 65536, 1)
        with pytest.raises(RuntimeError, match="q: expected batch \\* heads <= 65535 on CUDA"):
            torch.ops.markovkit.sliding_window_attention_bwd(many, None, many, one, one, many, lse, 3, 0, 1.0)
        long = one.expand(1, 2**31, 1, 32)  # no memory behind it: the check comes first
        with pytest.raises(RuntimeError, match="q: expected seqlen < 2\\^31 - 256 on CUDA"):
            torch.ops.markovkit.sliding_window_attention_fwd(long, long, long, 3, 0, 1.0)

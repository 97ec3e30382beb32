"""Sliding-window causal attention (FlashAttention-style kernels with LSE, GQA and sink tokens) and the
exact merge of attention results over disjoint key sets.

Window convention: ``window = W`` counts the keys a query sees including itself, so query ``i`` sees keys
``max(0, i - W + 1) .. i`` plus the first ``sink`` keys. FlashAttention's equivalent is
``flash_attn_func(q, k, v, causal=True, window_size=(W - 1, 0))``; FlexAttention's mask_mod is
``(q_idx >= kv_idx) & (q_idx - kv_idx < W)`` (i.e. ``q_idx - kv_idx <= W - 1``); HF's ``sliding_window = W``.
``window >= seqlen`` is plain causal attention, ``window = 1`` gives ``out = v`` (per kv head).
"""

import operator

import torch

from . import cuda_emulation
from ._checks import check_devices, refuse_forward_ad

_STAT_DTYPES = {torch.float64: torch.float64}
HEADDIMS = (32, 64, 96, 128, 256)  # the head dims the kernels take


def sliding_window_attention(q, k, v, window: int, *, sink: int = 0, softmax_scale=None, return_lse: bool = False):
    """Causal attention of each query over its last `window` keys (including itself) and the first `sink` keys.

    q: (batch, seqlen, heads, headdim); k, v: (batch, seqlen, kv_heads, headdim), heads % kv_heads == 0
    (query head h reads kv head h // (heads // kv_heads)). headdim in {32, 64, 96, 128, 256} (the backward on CUDA
    devices with 99 KB of shared memory per block: up to 128); window >= 1, sink >= 0; on CUDA batch·heads <= 65535.
    softmax_scale defaults to headdim ** -0.5. q, k, v share one device and one dtype: float32/float64 on CPU
    (bfloat16/float16 are computed in float32 there), float16/bfloat16 on CUDA with float32 accumulation.

    Returns out: like q, and if `return_lse`, lse: (batch, heads, seqlen) = log Σ_j exp(scale q_i·k_j) over the
    visible keys (natural log; float32, float64 for float64 inputs). Both are differentiable; with the lse,
    results over disjoint key sets combine exactly with :func:`merge_attention`.
    """
    refuse_forward_ad("sliding_window_attention", q=q, k=k, v=v)
    dtype = q.dtype
    scale, (q, k, v) = _kernel_inputs(q, k, v, softmax_scale=softmax_scale)
    out, lse = torch.ops.markovkit.sliding_window_attention_fwd(q, k, v, _position(window), _position(sink), scale)
    out = out.to(dtype)
    return (out, lse) if return_lse else out


def _position(n):
    """A window or sink as the op takes it: an int (operator.index for other types: not for ints, which under
    torch.compile it would make constants of the graph), past 2^63 - 1 (every earlier key, as any value >= seqlen)
    that."""
    n = n if isinstance(n, int) else operator.index(n)
    return 2**63 - 1 if n >= 2**63 else n


def _kernel_inputs(q, k, v, *more, softmax_scale):
    """q, k, v checked as the kernels take them (one device, one dtype); returns the softmax scale and q, k, v and
    `more` (checked by the caller) in the kernels' dtype: float32 for half dtypes on the CPU."""
    check_devices("q", q=q, k=k, v=v)
    for t, name in ((k, "k"), (v, "v")):  # before the CPU's upcast of half dtypes hides a mismatch
        _check_dtype(t, name, q, "q")
    scale = float(q.shape[-1]) ** -0.5 if softmax_scale is None else float(softmax_scale)
    tensors = (q, k, v, *more)
    if cuda_emulation.runs_cpu_kernel(q) and q.dtype in (torch.bfloat16, torch.float16):
        tensors = tuple(t.float() for t in tensors)
    return scale, tensors


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Exact attention over the union of two disjoint key sets from the results over each.

    out_*: (batch, seqlen, heads, headdim), lse_*: (batch, heads, seqlen), all on one device. Returns (out, lse)
    with lse = logaddexp(lse_a, lse_b) and out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b; the weights are
    computed in float32 (float64 for float64 lse), the sum in float32 or the outputs' dtype if wider. An empty
    source (lse = -inf, out = 0) has weight 0, in the gradients too; two empty sources give lse = -inf, out = 0.
    Associative and commutative; differentiable.
    """
    _check_merge_inputs(out_a, lse_a, out_b, lse_b)
    lse, w_a, w_b = _merge_weights(lse_a, lse_b)
    dtype = torch.promote_types(out_a.dtype, out_b.dtype)
    work = torch.promote_types(w_a.dtype, dtype)  # float64 outputs merge in float64, whatever the lse's dtype
    out = w_a.to(work) * out_a.to(work) + w_b.to(work) * out_b.to(work)
    return out.to(dtype), lse


def _merge_weights(lse_a, lse_b):
    """lse_a, lse_b: (batch, heads, seqlen) -> the merged lse and the sources' weights (batch, seqlen, heads, 1),
    in float32 or float64 (for float64 lse); an empty source (lse = -inf) has weight 0, two give lse = -inf."""
    wdtype = torch.promote_types(torch.promote_types(lse_a.dtype, lse_b.dtype), torch.float32)
    lse_a, lse_b = lse_a.to(wdtype), lse_b.to(wdtype)
    m = torch.maximum(lse_a, lse_b)
    empty = torch.isneginf(m)  # both sources empty
    m = torch.where(empty, 0, m)  # no -inf - -inf
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)  # weights relative to the larger source, 1 for it
    total = torch.where(empty, 1, w_a + w_b)  # no log(0) (its backward is 0 * inf) and no 0 / 0
    lse = torch.where(empty, float("-inf"), m + torch.log(total))
    return lse, (w_a / total).transpose(1, 2).unsqueeze(-1), (w_b / total).transpose(1, 2).unsqueeze(-1)


def bmojo_f_attention(q, k, v, kf, vf, window: int, *, softmax_scale=None, return_lse: bool = False):
    """B'MOJO-F attention (Zancato et al. 2024, the fading-memory variant): one softmax over the last `window`
    in-context keys and, before those, `window` fading keys (keys and values computed from an SSM's output).

    Query i sees (k_j, v_j) for i - window < j <= i and (kf_j, vf_j) for i - 2 window < j <= i - window: the
    window result and a window of the same size over (kf, vf) shifted by `window` positions, merged exactly by
    their lse (as :func:`merge_attention` does); seqlen <= window is sliding-window attention.
    q: (batch, seqlen, heads, headdim); k, v, kf, vf: (batch, seqlen, kv_heads, headdim); one device and dtype,
    as :func:`sliding_window_attention` takes them. Rotary embeddings go in before the call, at absolute positions
    (so fading keys sit at distances window .. 2 window - 1). Returns out like q and, if `return_lse`,
    lse: (batch, heads, seqlen) over both key sets; differentiable in q, k, v, kf and vf.
    """
    window = _position(window)
    refuse_forward_ad("bmojo_f_attention", q=q, k=k, v=v, kf=kf, vf=vf)
    for t, name in ((kf, "kf"), (vf, "vf")):
        _check_shape(t, name, list(k.shape), "the shape of k")
    check_devices("k", k=k, kf=kf, vf=vf)
    for t, name in ((kf, "kf"), (vf, "vf")):
        _check_dtype(t, name, k, "k")
    dtype = q.dtype
    scale, inputs = _kernel_inputs(q, k, v, kf, vf, softmax_scale=softmax_scale)
    out, lse = _BMojoF.apply(*inputs, window, scale)
    out = out.to(dtype)
    return (out, lse) if return_lse else out


class _BMojoF(torch.autograd.Function):
    """The two window ops and their merge, differentiated as one softmax (the hybrid notes' step 6): each window's
    backward takes the merged out and lse, whose probabilities are the joint softmax's, so its dq / dk / dv are the
    exact gradients, and nothing is differentiated through the merge. Autograd through merge_attention's eager ops
    cost 3.0-3.4 ms of an 8.8-11.2 ms forward+backward on an H200 (bench/RESULTS.md, run 4); counted on meta at
    those shapes, the eager ops here move 1.6-1.8 GB where those moved 9.6-10.2 GB. The merge is out of place:
    torch.export inlines this forward and differentiates the window ops' own autograd, whose saved out and lse an
    in-place merge would change. q: (batch, seqlen, heads, headdim); k, v, kf, vf: (batch, seqlen, kv_heads,
    headdim)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, kf, vf, window: int, scale: float):
        out, lse = torch.ops.markovkit.sliding_window_attention_fwd(q, k, v, window, 0, scale)
        fading = q.shape[1] - window  # queries window .. seqlen-1 also see fading keys 0 .. fading-1
        if fading <= 0:
            return out, lse
        out_f, lse_f = torch.ops.markovkit.sliding_window_attention_fwd(
            q[:, window:], kf[:, :fading], vf[:, :fading], window, 0, scale)
        lse_m, _, w_f = _merge_weights(lse[:, :, window:], lse_f)
        # out + w_f (out_f - out) in one pass, w_f in out's dtype (for half types a rounding, as out's own)
        out_m = torch.lerp(out[:, window:], out_f, w_f.to(out.dtype))
        return torch.cat([out[:, :window], out_m], dim=1), torch.cat([lse[:, :, :window], lse_m], dim=2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, kf, vf, window, scale = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, kf, vf, *output)
        ctx.window, ctx.scale = window, scale

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, kf, vf, out, lse = ctx.saved_tensors
        window, scale, fading = ctx.window, ctx.scale, q.shape[1] - ctx.window
        if dout is None:
            dout = torch.zeros_like(out)
        bwd = torch.ops.markovkit.sliding_window_attention_bwd
        dq, dk, dv = bwd(dout, dlse, q, k, v, out, lse, window, 0, scale)
        if fading <= 0:
            return dq, dk, dv, torch.zeros_like(kf), torch.zeros_like(vf), None, None
        dq_f, dkf, dvf = bwd(dout[:, window:], None if dlse is None else dlse[:, :, window:], q[:, window:],
                             kf[:, :fading], vf[:, :fading], out[:, window:], lse[:, :, window:], window, 0, scale)
        dq[:, window:].add_(dq_f)
        pad = (0, 0, 0, 0, 0, window)  # the last window keys of kf, vf reach no query
        return dq, dk, dv, torch.nn.functional.pad(dkf, pad), torch.nn.functional.pad(dvf, pad), None, None


def _check_merge_inputs(out_a, lse_a, out_b, lse_b):
    """out_a, out_b: (batch, seqlen, heads, headdim); lse_a, lse_b: (batch, heads, seqlen); one device."""
    if out_a.dim() != 4:
        raise RuntimeError(f"out_a: expected 4 dims (batch, seqlen, heads, headdim), got shape {list(out_a.shape)}")
    batch, seqlen, heads, _ = out_a.shape
    _check_shape(out_b, "out_b", list(out_a.shape), "the shape of out_a")
    for t, name in ((lse_a, "lse_a"), (lse_b, "lse_b")):
        _check_shape(t, name, [batch, heads, seqlen], "batch, heads, seqlen of out_a")
    check_devices("out_a", out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    for t, name in ((out_a, "out_a"), (lse_a, "lse_a"), (out_b, "out_b"), (lse_b, "lse_b")):
        if not t.dtype.is_floating_point:
            raise RuntimeError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def _check_shape(t, name, expected, what):
    if list(t.shape) != expected:
        raise RuntimeError(f"{name}: expected shape {expected} ({what}), got {list(t.shape)}")


def _check_dtype(t, name, ref, ref_name):
    if t.dtype != ref.dtype:
        raise RuntimeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")


def _check_fake_shapes(q, k, v):
    """The kernels' shape checks, in their order and words, as torch._check (sizes may be symbolic under
    torch.compile): q: (batch, seqlen, heads, headdim); k, v: (batch, seqlen, kv_heads, headdim), kv_heads | heads."""
    for t, name, dims in ((q, "q", "heads"), (k, "k", "kv_heads")):
        torch._check(t.dim() == 4,
                     lambda: f"{name}: expected 4 dims (batch, seqlen, {dims}, headdim), got shape {list(t.shape)}")
    batch, seqlen, heads, headdim = q.shape
    kv_heads = k.shape[2]
    for t, name, expected in ((v, "v", k.shape), (k, "k", (batch, seqlen, kv_heads, headdim))):
        torch._check(t.dim() == 4, lambda: f"{name}: expected shape {list(expected)}, got {list(t.shape)}")
        for size, want in zip(t.shape, expected):
            torch._check(size == want, lambda: f"{name}: expected shape {list(expected)}, got {list(t.shape)}")
    torch._check(kv_heads >= 1 and heads % kv_heads == 0,
                 lambda: f"k: expected kv_heads dividing heads = {heads}, got {kv_heads}")


@torch.library.register_fake("markovkit::sliding_window_attention_fwd")
def _(q, k, v, window, sink, softmax_scale):
    check_devices("q", q=q, k=k, v=v)
    _check_fake_shapes(q, k, v)
    batch, seqlen, heads, _ = q.shape
    lse = q.new_empty((batch, heads, seqlen), dtype=_STAT_DTYPES.get(q.dtype, torch.float32))
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.register_fake("markovkit::sliding_window_attention_bwd")
def _(dout, dlse, q, k, v, out, lse, window, sink, softmax_scale):
    check_devices("q", dout=dout, dlse=dlse, q=q, k=k, v=v, out=out, lse=lse)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, window, sink, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.window, ctx.sink, ctx.softmax_scale = window, sink, softmax_scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.markovkit.sliding_window_attention_bwd(
        dout, dlse, q, k, v, out, lse, ctx.window, ctx.sink, ctx.softmax_scale
    )
    return dq, dk, dv, None, None, None


torch.library.register_autograd(
    "markovkit::sliding_window_attention_fwd", _backward, setup_context=_setup_context
)

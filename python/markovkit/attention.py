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

_STAT_DTYPES = {torch.float64: torch.float64}


def sliding_window_attention(q, k, v, window: int, *, sink: int = 0, softmax_scale=None, return_lse: bool = False):
    """Causal attention of each query over its last `window` keys (including itself) and the first `sink` keys.

    q: (batch, seqlen, heads, headdim); k, v: (batch, seqlen, kv_heads, headdim), heads % kv_heads == 0
    (query head h reads kv head h // (heads // kv_heads)). headdim in {32, 64, 96, 128, 256}.
    softmax_scale defaults to headdim ** -0.5. dtypes: float32/float64 on CPU (bfloat16/float16 are computed
    in float32 there), float16/bfloat16 on CUDA with float32 accumulation.

    Returns out: like q, and if `return_lse`, lse: (batch, heads, seqlen) = log Σ_j exp(scale q_i·k_j) over the
    visible keys (natural log; float32, float64 for float64 inputs). Both are differentiable; with the lse,
    results over disjoint key sets combine exactly with :func:`merge_attention`.
    """
    scale = float(q.shape[-1]) ** -0.5 if softmax_scale is None else float(softmax_scale)
    dtype = q.dtype
    if cuda_emulation.runs_cpu_kernel(q) and dtype in (torch.bfloat16, torch.float16):
        q, k, v = q.float(), k.float(), v.float()
    out, lse = torch.ops.markovkit.sliding_window_attention_fwd(q, k, v, operator.index(window), operator.index(sink), scale)
    out = out.to(dtype)
    return (out, lse) if return_lse else out


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Exact attention over the union of two disjoint key sets from the results over each.

    out_*: (batch, seqlen, heads, headdim), lse_*: (batch, heads, seqlen). Returns (out, lse) with
    lse = logaddexp(lse_a, lse_b) and out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b; the weights are
    computed in float32 (float64 for float64 lse). An empty source (lse = -inf, out = 0) has weight 0;
    two empty sources give lse = -inf, out = 0. Associative and commutative; differentiable.
    """
    wdtype = torch.promote_types(torch.promote_types(lse_a.dtype, lse_b.dtype), torch.float32)
    lse_a, lse_b = lse_a.to(wdtype), lse_b.to(wdtype)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # both empty: no -inf - -inf
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    lse = m + torch.log(total)
    total = torch.where(total == 0, torch.ones_like(total), total)
    w_a, w_b = (w_a / total).transpose(1, 2).unsqueeze(-1), (w_b / total).transpose(1, 2).unsqueeze(-1)
    out = w_a * out_a.to(wdtype) + w_b * out_b.to(wdtype)
    return out.to(torch.promote_types(out_a.dtype, out_b.dtype)), lse


@torch.library.register_fake("markovkit::sliding_window_attention_fwd")
def _(q, k, v, window, sink, softmax_scale):
    batch, seqlen, heads, _ = q.shape
    lse = q.new_empty((batch, heads, seqlen), dtype=_STAT_DTYPES.get(q.dtype, torch.float32))
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.register_fake("markovkit::sliding_window_attention_bwd")
def _(dout, dlse, q, k, v, out, lse, window, sink, softmax_scale):
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

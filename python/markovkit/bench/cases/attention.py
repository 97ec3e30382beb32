"""Sliding-window attention against FlexAttention (sliding mask_mod, block mask built once: its build time is
in the case name), SDPA over full causal attention (the cost of ignoring the window), SDPA with a boolean
window mask, and the dense masked reference. FLOPs count only the in-window (query, key) pairs: forward
4·headdim·pairs, backward 2.5x that."""
import time

import torch
import torch.nn.functional as F

import markovkit
from markovkit import reference
from markovkit.bench.case import Case, cases

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention
    flex_attention = None


def _pairs(seqlen: int, window: int) -> int:
    """Σ_i min(i + 1, window): visible (query, key) pairs per (batch, head)."""
    if seqlen <= window:
        return seqlen * (seqlen + 1) // 2
    return window * seqlen - window * (window - 1) // 2


def _shapes(device: torch.device, quick: bool):
    """(batch, seqlen, heads, headdim, window, dtype)"""
    if device.type == "cpu":
        return [(1, 512, 4, 64, 128, torch.float32)] if quick else [(1, 2048, 8, 64, 256, torch.float32)]
    if quick:
        return [(1, 2048, 4, 64, 256, torch.bfloat16)]
    return [(2, 16384, 16, 128, 4096, torch.bfloat16), (2, 16384, 16, 128, 1024, torch.bfloat16),
            (2, 16384, 32, 64, 256, torch.bfloat16)]


def _backward_of(forward, inputs, seed_grads):
    """A callable running only the backward of forward(*inputs) (graph kept; gradients reset each call)."""
    outs = forward(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)

    def run():
        for t in inputs:
            t.grad = None
        torch.autograd.backward(outs, seed_grads, retain_graph=True)

    return run


def _flex_peers(q, k, v, window, device):
    """name -> (forward callable on (B, H, L, D) tensors), and the block-mask build time in ms."""
    if flex_attention is None or device.type != "cuda":
        return None, None

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    seqlen = q.shape[2]
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    block_mask = create_block_mask(sliding, None, None, seqlen, seqlen, device=device)
    torch.cuda.synchronize(device)
    build_ms = 1e3 * (time.perf_counter() - start)
    # the backward is timed by re-running autograd.backward on one retained graph, which buffers donated to
    # the compiled backward do not allow
    torch._functorch.config.donated_buffer = False
    flex = torch.compile(flex_attention)
    return (lambda q, k, v: flex(q, k, v, block_mask=block_mask)), build_ms


@cases("attention")
def attention_cases(device: torch.device, quick: bool):
    for shape in _shapes(device, quick):
        yield from _shape_cases(device, *shape)


def _shape_cases(device, batch, seqlen, heads, headdim, window, dtype):
    """The cases of one shape (a function per shape: the callables close over this shape's tensors)."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = [torch.randn(batch, seqlen, heads, headdim, generator=g, device=device, dtype=dtype)
               .requires_grad_() for _ in range(3)]
    dout = torch.randn_like(q)
    # (B, H, L, D) copies for the peers
    qt, kt, vt = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    doutt = dout.transpose(1, 2).contiguous()
    shape = f"b={batch} L={seqlen} h={heads} d={headdim} w={window}"
    fwd_flops = 4 * headdim * _pairs(seqlen, window) * batch * heads
    io_bytes = 4 * q.numel() * q.element_size()

    def ours(q, k, v):
        return markovkit.sliding_window_attention(q, k, v, window)

    def ref(q, k, v):
        return reference.sliding_window_attention(q, k, v, window)[0]

    mask = reference.sliding_window_mask(seqlen, window, device=device)
    peers_fwd, peers_bwd = {}, {}
    flex, build_ms = _flex_peers(qt, kt, vt, window, device)
    if flex is not None:
        peers_fwd["flex_attention"] = lambda: flex(qt, kt, vt)
        peers_bwd["flex_attention"] = _backward_of(flex, (qt, kt, vt), (doutt,))
    if device.type == "cuda":
        def causal(q, k, v):
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def masked(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        peers_fwd["sdpa_causal_flash"] = lambda: causal(qt, kt, vt)
        peers_fwd["sdpa_window_mask"] = lambda: masked(qt, kt, vt)
        peers_bwd["sdpa_causal_flash"] = _backward_of(causal, (qt, kt, vt), (doutt,))
        peers_bwd["sdpa_window_mask"] = _backward_of(masked, (qt, kt, vt), (doutt,))
    dense_ok = seqlen <= 4096  # the reference materializes (batch, heads, seqlen, seqlen) scores
    fwd_name = "forward" if build_ms is None else f"forward (flex block mask build {build_ms:.1f} ms)"
    yield Case(
        family="attention", name=fwd_name, shape=shape, dtype=dtype,
        ours=lambda: ours(q.detach(), k.detach(), v.detach()),
        reference=(lambda: ref(q.detach(), k.detach(), v.detach())) if dense_ok else None,
        peers=peers_fwd, bytes=io_bytes, flops=fwd_flops, rate=(fwd_flops, "FLOP"),
    )
    yield Case(
        family="attention", name="backward", shape=shape, dtype=dtype,
        ours=_backward_of(ours, (q, k, v), (dout,)),
        reference=_backward_of(ref, (q, k, v), (dout,)) if dense_ok else None,
        peers=peers_bwd, bytes=2 * io_bytes, flops=2.5 * fwd_flops, rate=(2.5 * fwd_flops, "FLOP"),
    )
    if device.type == "cpu":
        def ours_fwd_bwd():
            torch.autograd.grad(ours(q, k, v), (q, k, v), dout)

        def ref_fwd_bwd():
            torch.autograd.grad(ref(q, k, v), (q, k, v), dout)

        yield Case(
            family="attention", name="forward+backward", shape=shape, dtype=dtype, ours=ours_fwd_bwd,
            reference=ref_fwd_bwd, bytes=3 * io_bytes, flops=3.5 * fwd_flops,
            rate=(3.5 * fwd_flops, "FLOP"),
        )

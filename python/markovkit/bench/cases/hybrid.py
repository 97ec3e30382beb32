"""B'MOJO-F attention (forward + backward) against its floor, the two sliding-window calls it is made of without
the lse merge (the hybrid notes ask for at most 1.15x that plus the scan, which both sides share), and the dense
reference over both key sets. FLOPs count the visible (query, key) pairs of both key sets: 3.5 * 4·headdim·pairs."""
import torch

import markovkit
from markovkit import reference
from markovkit.bench.case import Case, cases
from markovkit.bench.cases.attention import _pairs


def _shapes(device: torch.device, quick: bool):
    """(batch, seqlen, heads, headdim, window, dtype)"""
    if device.type == "cpu":
        return [(1, 512, 4, 64, 128, torch.float32)] if quick else [(1, 2048, 8, 64, 256, torch.float32)]
    if quick:
        return [(1, 2048, 4, 64, 256, torch.bfloat16)]
    return [(2, 16384, 16, 128, 1024, torch.bfloat16), (2, 16384, 32, 64, 256, torch.bfloat16)]


@cases("hybrid")
def hybrid_cases(device: torch.device, quick: bool):
    for shape in _shapes(device, quick):
        yield _case(device, *shape)


def _case(device, batch, seqlen, heads, headdim, window, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, kf, vf = [torch.randn(batch, seqlen, heads, headdim, generator=g, device=device, dtype=dtype)
                       .requires_grad_() for _ in range(5)]
    dout = torch.randn_like(q)
    inputs, fading = (q, k, v, kf, vf), seqlen - window

    def fwd_bwd(forward, grad=dout):
        def run():
            torch.autograd.grad(forward(*inputs), inputs, grad, allow_unused=True)
        return run

    def two_windows(q, k, v, kf, vf):  # the merge left out: its outputs summed
        out = markovkit.sliding_window_attention(q, k, v, window)
        return out[:, window:] + markovkit.sliding_window_attention(q[:, window:], kf[:, :fading], vf[:, :fading],
                                                                    window)

    flops = 4 * headdim * (_pairs(seqlen, window) + _pairs(fading, window)) * batch * heads
    io_bytes = 6 * q.numel() * q.element_size()
    return Case(
        family="hybrid", name="bmojo_f forward+backward", shape=f"b={batch} L={seqlen} h={heads} d={headdim} "
        f"w={window}", dtype=dtype,
        ours=fwd_bwd(lambda *ts: markovkit.bmojo_f_attention(*ts, window)),
        reference=fwd_bwd(lambda *ts: reference.bmojo_f_attention(*ts, window)[0]) if seqlen <= 4096 else None,
        peers={"2 windows, no merge": fwd_bwd(two_windows, dout[:, window:])},
        bytes=3 * io_bytes, flops=3.5 * flops, rate=(3.5 * flops, "FLOP"),
    )

"""Selective scan, forward and forward + backward, against the classic Mamba reference algorithm (exp(ΔA) and
ΔBu materialised at (batch, dim, seqlen, dstate), Python loop over time, autograd through it) and (when
importable) mamba_ssm's CUDA kernel. Mamba-block settings: z present, per-step B/C with one group,
delta_softplus.

Floors. `bytes` is the traffic the op cannot avoid: u, delta, z in and out out (forward); u, delta, z, dout in
and du, ddelta, dz out (backward); per-step B, C in (and dB, dC out) once; the float32 checkpoints the forward
writes for the backward every 64 steps (batch·dim·ceil(seqlen/64)·dstate), read back by the backward; the
small weights are left out. The harness's `roof` column is that time at the measured copy bandwidth. The
second floor is the exp count, the `rate` column: one exp(Δ·A) per (batch, dim, step, state) and two per
(batch, dim, step) (softplus, sigmoid) in the forward, as many again in the backward (it must recompute the
states). On an H100 SXM the exps run on 132 SMs × 16 SFU lanes at ~1.755 GHz ≈ 3.7e12 exp/s: `rate` over
that is the time as a fraction of the exp floor (at dstate 16 the two floors are about equal, above it the exps
dominate). HBM on an H100 SXM: ~3.35e12 B/s.

The reference loops over time (seconds per call at the CUDA shapes, and its torch.compile unrolls the loop): it
runs on the CPU shape and the quick shapes only; on CUDA the peer is the comparison."""
import torch

import markovkit
from markovkit.bench.case import Case, cases
from markovkit.reference import selective_scan_materialized_ref
from markovkit.scan import CHUNK

# (batch, dim, seqlen, dstate, dtype)
CUDA_SHAPES = [(8, 4096, 2048, 16, torch.bfloat16), (8, 4096, 2048, 16, torch.float32),
               (2, 4096, 8192, 16, torch.bfloat16), (8, 4096, 2048, 64, torch.bfloat16)]
CPU_SHAPES = [(2, 256, 1024, 16, torch.float32)]
QUICK_SHAPES = [(1, 32, 128, 16, torch.float32)]


def traffic(batch, dim, seqlen, dstate, size):
    """(forward, forward + backward) bytes: activations, per-step B/C (and their gradients), checkpoints."""
    act = batch * dim * seqlen * size
    bc = 2 * batch * dstate * seqlen * size
    ckpt = batch * dim * -(-seqlen // CHUNK) * dstate * 4
    fwd = 4 * act + bc + ckpt
    return fwd, fwd + 7 * act + 2 * bc + ckpt


def exps(batch, dim, seqlen, dstate):
    """(forward, forward + backward) exp count."""
    fwd = batch * dim * seqlen * (dstate + 2)
    return fwd, 2 * fwd


def _peer():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def _inputs(batch, dim, seqlen, dstate, dtype, device, grad):
    g = torch.Generator(device=device).manual_seed(0)
    act = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype).requires_grad_(grad)  # noqa: E731
    weight = lambda t: t.requires_grad_(grad)  # noqa: E731
    return dict(
        u=act(batch, dim, seqlen),
        delta=(0.5 * torch.rand(batch, dim, seqlen, generator=g, device=device)).to(dtype).requires_grad_(grad),
        A=weight(-torch.rand(dim, dstate, generator=g, device=device)),
        B=act(batch, 1, dstate, seqlen), C=act(batch, 1, dstate, seqlen),
        D=weight(torch.randn(dim, generator=g, device=device)), z=act(batch, dim, seqlen),
        delta_bias=weight(0.5 * torch.rand(dim, generator=g, device=device)))


def _fwd(fn, x):
    return lambda: fn(**x, delta_softplus=True)


def _fwd_bwd(fn, x, dout):
    leaves = [v for v in x.values()]

    def run():
        out = fn(**x, delta_softplus=True)
        return torch.autograd.grad(out, leaves, dout)

    return run


@cases("scan")
def scan_cases(device: torch.device, quick: bool):
    shapes = QUICK_SHAPES if quick else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    peer = _peer() if device.type == "cuda" else None
    with_reference = quick or device.type == "cpu"
    for batch, dim, seqlen, dstate, dtype in shapes:
        size = torch.tensor([], dtype=dtype).element_size()
        shape = f"({batch},{dim},{seqlen},{dstate})"
        fwd_bytes, all_bytes = traffic(batch, dim, seqlen, dstate, size)
        fwd_exps, all_exps = exps(batch, dim, seqlen, dstate)
        x = _inputs(batch, dim, seqlen, dstate, dtype, device, grad=False)
        yield Case(family="scan", name="forward", shape=shape, dtype=dtype, ours=_fwd(markovkit.selective_scan, x),
                   reference=_fwd(selective_scan_materialized_ref, x) if with_reference else None,
                   peers={"mamba_ssm": _fwd(peer, x)} if peer else {}, bytes=fwd_bytes, rate=(fwd_exps, "exp"))
        xg = _inputs(batch, dim, seqlen, dstate, dtype, device, grad=True)
        dout = torch.randn(batch, dim, seqlen, device=device).to(dtype)
        yield Case(family="scan", name="forward+backward", shape=shape, dtype=dtype,
                   ours=_fwd_bwd(markovkit.selective_scan, xg, dout), reference=_fwd_bwd(selective_scan_materialized_ref, xg, dout) if with_reference else None,
                   peers={"mamba_ssm": _fwd_bwd(peer, xg, dout)} if peer else {},
                   bytes=all_bytes, rate=(all_exps, "exp"))

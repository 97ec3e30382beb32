"""Sliding-window attention alone, forward and backward, at the bench's GPU shapes, for whichever markovkit
imports: the A/B of attention kernels across builds (gpu_check.sh's AB_SCRIPT, run once per build with
PYTHONPATH set to it). No peers; the timing is this checkout's python/markovkit/bench/timing.py, loaded from its
file (an older build's markovkit.bench may time otherwise): one line per shape, the median ms of each pass (CUDA
events, L2 flushed, calls queued) and the backward's time per kernel (torch.profiler).
Usage: python bench/ab_attention.py LABEL"""
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path

import torch

import markovkit

SHAPES = [(2, 16384, 16, 128, 4096), (2, 16384, 16, 128, 1024), (2, 16384, 32, 64, 256)]  # (b, L, h, d, w)


def _load_timing():
    path = Path(__file__).resolve().parents[1] / "python" / "markovkit" / "bench" / "timing.py"
    spec = importlib.util.spec_from_file_location("checkout_timing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TIMING = _load_timing()


def median_ms(fn) -> float:
    return _TIMING.median_ms(fn, torch.device("cuda"), min_time=0.5, max_reps=40)


def kernel_ms(fn, reps: int = 10) -> dict:
    """kernel name -> mean device ms per call of fn (markovkit's kernels by name, the rest as 'other')."""
    totals = defaultdict(float)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name.split("<")[0].split("::")[-1].split("(")[0].strip()
            totals[name if name.startswith("swa_") else "other"] += event.time_range.elapsed_us() / 1e3 / reps
    return dict(totals)


def main(label: str) -> None:
    for batch, seqlen, heads, headdim, window in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = [torch.randn(batch, seqlen, heads, headdim, generator=g, device="cuda", dtype=torch.bfloat16)
                   .requires_grad_() for _ in range(3)]
        dout = torch.randn_like(q)
        out = markovkit.sliding_window_attention(q, k, v, window)

        def backward():
            q.grad = k.grad = v.grad = None
            torch.autograd.backward(out, dout, retain_graph=True)

        fwd = median_ms(lambda: markovkit.sliding_window_attention(q.detach(), k.detach(), v.detach(), window))
        bwd = median_ms(backward)
        try:
            kernels = " ".join(f"{name}={ms:.3f}" for name, ms in sorted(kernel_ms(backward).items()))
        except RuntimeError as e:  # no CUPTI: the medians still stand
            kernels = f"profiler: {e}"
        print(f"{label:10s} h={heads} d={headdim} w={window:<5d} fwd {fwd:.3f} bwd {bwd:.3f}  {kernels}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ours")

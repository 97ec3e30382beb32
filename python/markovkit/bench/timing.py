"""Timing of zero-argument callables and the device's roofline (copy bandwidth, matmul rate)."""
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, min_time: float, max_reps: int = 100) -> float:
    """Median wall time of fn() in ms after one warm-up call, over as many repeats as fit in about
    `min_time` seconds (at most max_reps; a CPU call slower than min_time is timed once). On CUDA: CUDA
    events, L2 flushed before each repeat, the device's time (_median_ms_cuda)."""
    fn()  # warm-up (and compilation, for compiled peers)
    _sync(device)
    t1 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t1, 1e-6)
    if once >= min_time and device.type == "cpu":
        return 1e3 * once  # a slow peer: one timed call is the measurement
    reps = int(min(max_reps, max(1, min_time / once)))
    if device.type == "cuda":
        return _median_ms_cuda(fn, device, reps)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _median_ms_cuda(fn, device: torch.device, reps: int) -> float:
    """Events around each call, none waited for until the last: the host queues call after call (as a training loop
    does), so its latency per call (the autograd engine, Python; 0.2-0.5 ms per attention backward on an H200)
    hides behind the device's work instead of idling the device between the start event and the first kernel."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # larger than any L2
    events = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def roofline(device: torch.device, quick: bool) -> dict:
    """Measured copy bandwidth (bytes/s, read + write) and matmul rate (FLOP/s) on `device`.

    Matmul: bf16 on CUDA (tensor cores), fp32 on the CPU. A roof is an upper bound: each is the best of three
    medians (one median on a shared machine can be several times low), the copy over 64 MiB buffers (past the
    CPU's last-level cache; 256 MiB on a GPU)."""
    n = 2**26 if device.type == "cpu" else 2**28
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = min(median_ms(lambda: dst.copy_(src), device, min_time=0.2) for _ in range(3))
    bandwidth = 2 * n / (ms * 1e-3)
    m = (512 if quick else 1024) if device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    ms = min(median_ms(lambda: a @ b, device, min_time=0.2) for _ in range(3))
    return {"copy_bytes_per_s": bandwidth, "matmul_flops_per_s": 2 * m**3 / (ms * 1e-3), "matmul_dtype": str(dtype)}

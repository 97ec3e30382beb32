"""One forward + backward of the selective scan and of sliding-window attention at an issue shape, for
Nsight Compute (bench/gpu_check.sh profiles their main kernels: speed of light, occupancy, warp stalls).
Usage: python bench/gpu_profile.py"""
import torch

import markovkit


def _leaf(*shape, dtype=torch.bfloat16, scale=1.0):
    return (scale * torch.randn(*shape, device="cuda")).to(dtype).requires_grad_()


def scan():
    # (batch, dim, seqlen, dstate) = (8, 4096, 2048, 16) bf16, z, per-step B/C with one group, softplus
    b, d, l, n = 8, 4096, 2048, 16
    u, delta, z = _leaf(b, d, l), _leaf(b, d, l, scale=0.5), _leaf(b, d, l)
    A = (-torch.rand(d, n, device="cuda")).requires_grad_()
    B, C, D = _leaf(b, 1, n, l), _leaf(b, 1, n, l), _leaf(d, dtype=torch.float32)
    markovkit.selective_scan(u, delta, A, B, C, D, z, None, True).float().sum().backward()


def attention():
    # (batch, seqlen, heads, headdim) = (1, 8192, 16, 128) bf16, window 1024
    q, k, v = (_leaf(1, 8192, 16, 128) for _ in range(3))
    markovkit.sliding_window_attention(q, k, v, 1024).float().sum().backward()


if __name__ == "__main__":
    torch.manual_seed(0)
    scan()
    attention()
    torch.cuda.synchronize()
    print("profiled: ok")

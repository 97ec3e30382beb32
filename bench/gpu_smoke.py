"""Every CUDA kernel of markovkit once, forward and backward, at small shapes: the program that
compute-sanitizer (memcheck, racecheck) runs in bench/gpu_check.sh. Usage: python bench/gpu_smoke.py"""
import torch

import markovkit
from markovkit import fbm

DEV = "cuda"


def _leaf(*shape, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, device=DEV)).to(dtype).requires_grad_()


def _backward(*outs):
    sum(o.float().sum() for o in outs).backward()


def philox():
    for dtype in (torch.float32, torch.float64):
        markovkit.philox_uniform((10007,), 1, 3, dtype=dtype, device=DEV)
        markovkit.philox_normal((10007,), 1, 3, dtype=dtype, device=DEV)


def scan():
    # (batch, dim, seqlen, dstate) with per-step B/C (groups 2), every option, at 16 and 64 states; the staged
    # forward; varlen
    for dtype, (b, d, l, n) in [(torch.bfloat16, (2, 8, 300, 16)), (torch.float32, (1, 4, 70, 64))]:
        u, delta, z = _leaf(b, d, l, dtype=dtype), _leaf(b, d, l, dtype=dtype, scale=0.5), _leaf(b, d, l, dtype=dtype)
        A = (-torch.rand(d, n, device=DEV)).requires_grad_()
        B, C = _leaf(b, 2, n, l, dtype=dtype), _leaf(b, 2, n, l, dtype=dtype)
        D, bias, h0 = _leaf(d), _leaf(d), _leaf(b, d, n)
        out, last = markovkit.selective_scan(u, delta, A, B, C, D, z, bias, True, True, initial_state=h0)
        _backward(out, last)
    # the staged plans, a block for every SM and a last chunk of two whole tiles and a partial one: forward 128
    # channels of one thread of 16 states, then 8 channels of 16 threads of 4 states, then 32 of 4 of 4; backward 64
    # channels of 2 threads of 8 states, then 16 of 8 of 8, then 4 threads of 4 states at 16 states, 8 at 32, 16 at 64
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    for d, n in [(128 * sms, 16), (16 * sms, 64), (32 * sms, 16), (16 * sms, 32), (8 * sms, 64)]:
        u, delta, z = (_leaf(1, d, 40, dtype=torch.bfloat16) for _ in range(3))
        B, C = (_leaf(1, 1, n, 40, dtype=torch.bfloat16) for _ in range(2))
        A = (-torch.rand(d, n, device=DEV)).requires_grad_()
        _backward(*markovkit.selective_scan(u, delta, A, B, C, _leaf(d), z, _leaf(d), True, True,
                                            initial_state=_leaf(1, d, n)))
    u, delta = _leaf(1, 4, 90), _leaf(1, 4, 90, scale=0.5)
    A, B, C = (-torch.rand(4, 16, device=DEV)).requires_grad_(), _leaf(1, 1, 16, 90), _leaf(1, 1, 16, 90)
    cu = torch.tensor([0, 17, 17, 90], device=DEV, dtype=torch.int32)
    _backward(markovkit.selective_scan(u, delta, A, B, C, delta_softplus=True, cu_seqlens=cu))
    state = torch.zeros(2, 4, 16, device=DEV)
    markovkit.selective_state_update(state, torch.randn(2, 4, device=DEV), torch.rand(2, 4, device=DEV),
                                     -torch.rand(4, 16, device=DEV), torch.randn(2, 16, device=DEV),
                                     torch.randn(2, 16, device=DEV), dt_softplus=True)


def attention():
    # headdims 64 and 128 (the wgmma kernels on sm_90), 96 (64-row tiles), 256 (split dK/dV); GQA, sink, lse with
    # its gradient
    for dtype, hd in [(torch.float16, 64), (torch.bfloat16, 128), (torch.bfloat16, 96), (torch.float16, 256)]:
        q, k, v = _leaf(2, 150, 4, hd, dtype=dtype), _leaf(2, 150, 2, hd, dtype=dtype), _leaf(2, 150, 2, hd, dtype=dtype)
        out, lse = markovkit.sliding_window_attention(q, k, v, 70, sink=2, return_lse=True)
        _backward(out, lse)


def mafbm():
    gamma = fbm.gamma_grid(5, 20.0)
    omega = fbm.omega(0.3, gamma, 1.0).to(DEV)
    for scheme in ("euler", "exact"):
        x, drift, diffusion, control = _leaf(130, 3), _leaf(130, 3), _leaf(130, 3), _leaf(130, 3)
        y, w = _leaf(130, 3, 5), omega.float().clone().requires_grad_()
        _backward(*markovkit.mafbm_step(x, y, drift, diffusion, w, gamma, 0.01, control=control, seed=7, step=2,
                                        scheme=scheme))
        x0 = _leaf(300, dtype=torch.float64)
        theta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        _backward(markovkit.mafbm_simulate(x0, 50, 0.01, omega.cpu(), gamma, theta=theta, save_every=7, seed=3,
                                           scheme=scheme))


def mjp():
    Q = torch.rand(5, 6, 6, dtype=torch.float64, device=DEV)
    x0 = torch.randint(0, 6, (5, 300), device=DEV)
    grid = torch.linspace(0, 5, 40, dtype=torch.float64, device=DEV)
    markovkit.simulate_ctmc(Q, x0, grid, seed=1)
    markovkit.simulate_ctmc(Q, x0, 5.0, seed=1, record="events", max_events=64)
    reactants = torch.tensor([[1, 0], [0, 1], [1, 1]], device=DEV)
    products = torch.tensor([[2, 0], [0, 0], [0, 2]], device=DEV)
    rates = torch.tensor([0.5, 0.3, 0.01], dtype=torch.float64, device=DEV)
    markovkit.simulate_reactions(reactants, products, rates, torch.full((3, 50, 2), 5, device=DEV), grid, seed=2)


if __name__ == "__main__":
    torch.manual_seed(0)
    for family in (philox, scan, mafbm, mjp, attention):  # attention last: its sm_90a kernels are new
        family()
        torch.cuda.synchronize()
        print(f"{family.__name__}: ok", flush=True)

"""Philox stream fills against torch's own generators (which are not counter-addressable)."""
import torch

import markovkit
from markovkit.bench.case import Case, cases


@cases("philox")
def philox_cases(device: torch.device, quick: bool):
    n = 2**20 if quick else (2**24 if device.type == "cpu" else 2**28)
    for dtype in (torch.float32, torch.float64):
        size = torch.tensor([], dtype=dtype).element_size()
        for kind, ours, peer in [
            ("uniform", markovkit.philox_uniform, lambda dt=dtype: torch.rand(n, dtype=dt, device=device)),
            ("normal", markovkit.philox_normal, lambda dt=dtype: torch.randn(n, dtype=dt, device=device)),
        ]:
            yield Case(
                family="philox", name=kind, shape=f"n=2^{n.bit_length() - 1}", dtype=dtype,
                ours=lambda op=ours, dt=dtype: op((n,), 1234, 0, dtype=dt, device=device),
                peers={f"torch.{'rand' if kind == 'uniform' else 'randn'}": peer},
                bytes=n * size, rate=(n, "samples"),
            )

"""B'MOJO-F on the emulated CUDA attention kernels (half dtypes, as on a GPU): out, lse and the gradients of all
five inputs, through out and lse, against the float64 dense reference over both key sets. On CUDA the merge is
one lerp in the output's dtype and each window's backward takes the merged out and lse (markovkit/attention.py)."""
import pytest
import torch

import markovkit
from markovkit import reference
# the window op's bounds; the largest errors seen here: out 2.2e-3, grads 5.4e-3 (bf16); 2.8e-4, 6.3e-4 (fp16)
from test_emu_attention import GRAD_TOL, LSE_TOL, OUT_TOL
from test_emu_attention import _assert_within as _within


def _outputs_and_grads(fn, inputs, dout, dlse):
    """out, lse and the gradients of <out, dout> + <lse, dlse> (dlse None: out alone) with respect to the inputs."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out, lse = fn(*inputs)
    loss = (out.double() * dout).sum() + (0 if dlse is None else (lse.double() * dlse).sum())
    return [out.detach(), lse.detach()] + list(torch.autograd.grad(loss, inputs))


# (dtype, batch, seqlen, heads, kv_heads, headdim, window, with dlse)
CASES = [(torch.bfloat16, 2, 150, 4, 2, 64, 40, True), (torch.float16, 1, 200, 2, 1, 128, 64, True),
         (torch.bfloat16, 1, 131, 2, 2, 128, 100, False)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_bmojo_f_matches_float64_reference(emulated, case):
    dtype, batch, seqlen, heads, kv_heads, headdim, window, with_dlse = case
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, seqlen, heads, headdim, generator=g, dtype=torch.float64)
    k, v, kf, vf = (torch.randn(batch, seqlen, kv_heads, headdim, generator=g, dtype=torch.float64) for _ in range(4))
    dout = torch.randn(batch, seqlen, heads, headdim, generator=g, dtype=torch.float64)
    dlse = torch.randn(batch, heads, seqlen, generator=g, dtype=torch.float64) if with_dlse else None
    inputs = [t.to(dtype) for t in (q, k, v, kf, vf)]
    with emulated():
        got = _outputs_and_grads(lambda *ts: markovkit.bmojo_f_attention(*ts, window, return_lse=True), inputs,
                                 dout, dlse)
    want = _outputs_and_grads(lambda *ts: reference.bmojo_f_attention(*ts, window),
                              [t.double() for t in inputs], dout, dlse)
    assert got[0].dtype == dtype and [t.dtype for t in got[2:]] == [dtype] * 5
    _within(got[0], want[0], OUT_TOL[dtype], "out")
    _within(got[1], want[1], LSE_TOL, "lse")
    for name, a, e in zip(("dq", "dk", "dv", "dkf", "dvf"), got[2:], want[2:]):
        _within(a, e, GRAD_TOL[dtype], name)

"""Selective scan: outputs and every gradient against the float64 Python-loop reference, gradcheck, opcheck,
torch.compile, varlen, state chaining, decode step, determinism, errors."""
import itertools

import re
import types

import pytest
import torch

import markovkit
import markovkit.nn  # noqa: F401  (markovkit.nn.Mamba)
from conftest import HAS_CUDA, assert_compiles_and_exports
from markovkit.reference import selective_scan_materialized_ref, selective_scan_ref, selective_state_update_ref

F64 = torch.float64
# float64 op vs float64 reference: only summation order differs
TOL64 = dict(rtol=1e-9, atol=1e-10)
# low precision (inputs rounded to dtype, reference in float64 on the rounded inputs; math is float32 in the
# op): (rtol, atol as a fraction of the largest reference magnitude), for outputs and gradients alike
TOL_LOW = {torch.float32: (2e-4, 2e-5), torch.float16: (5e-3, 3e-3), torch.bfloat16: (3e-2, 2e-2)}

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def make_inputs(batch=2, dim=4, seqlen=77, dstate=8, B_mode="var3", C_mode="var3", groups=1, has_D=True,
                has_z=True, has_bias=True, has_h0=True, nseq=None, device="cpu", seed=0):
    """float64 inputs with the peer's test distributions; B/C mode: const (dim, N), var3 (batch, N, L),
    var4 (batch, groups, N, L)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    bc = {"const": (dim, dstate), "var3": (batch, dstate, seqlen), "var4": (batch, groups, dstate, seqlen)}
    x = dict(u=randn(batch, dim, seqlen), delta=0.5 * rand(batch, dim, seqlen), A=-0.5 * rand(dim, dstate),
             B=randn(*bc[B_mode]), C=randn(*bc[C_mode]),
             D=randn(dim) if has_D else None, z=randn(batch, dim, seqlen) if has_z else None,
             delta_bias=0.5 * rand(dim) if has_bias else None,
             initial_state=randn(nseq or batch, dim, dstate) if has_h0 else None)
    return {k: (v.to(device) if v is not None else None) for k, v in x.items()}


def run(fn, x, softplus, g, g_last, **kw):
    """(out, last_state, {name: grad}) of fn on leaf copies of x, with upstream gradients g, g_last."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in x.items()}
    out, last = fn(**leaves, delta_softplus=softplus, return_last_state=True, **kw)
    loss = (out.to(F64) * g.to(out.device)).sum()
    if g_last is not None:
        loss = loss + (last.to(F64) * g_last.to(last.device)).sum()
    loss.backward()
    return out, last, {k: v.grad for k, v in leaves.items() if v is not None}


def upstream(x, seed=1, with_last=True, nseq=None):
    g = torch.Generator().manual_seed(seed)
    batch, dim, seqlen = x["u"].shape
    dstate = x["A"].shape[1]
    gl = torch.randn(nseq or batch, dim, dstate, generator=g, dtype=F64) if with_last else None
    return torch.randn(batch, dim, seqlen, generator=g, dtype=F64), gl


def assert_all_close(got, want, rtol, atol_frac=None, atol=None):
    out, last, grads = got
    rout, rlast, rgrads = want
    pairs = [("out", out, rout), ("last_state", last, rlast)] + [(k, grads[k], rgrads[k]) for k in rgrads]
    for name, a, b in pairs:
        a, b = a.detach().cpu().to(F64), b.detach().cpu().to(F64)
        tol = atol if atol is not None else atol_frac * max(b.abs().max().item(), 1e-30)
        torch.testing.assert_close(a, b, rtol=rtol, atol=tol, msg=lambda m: f"{name}: {m}")


FLAGS = list(itertools.product([False, True], repeat=4))  # has_z, has_D, softplus+bias, has_h0
BC_MODES = [("const", "const"), ("var3", "var3"), ("var4", "const"), ("const", "var4"), ("var4", "var4")]


@pytest.mark.parametrize("B_mode,C_mode", BC_MODES)
@pytest.mark.parametrize("has_z,has_D,softplus,has_h0", FLAGS)
def test_float64_matches_reference_every_option(device, B_mode, C_mode, has_z, has_D, softplus, has_h0):
    x = make_inputs(B_mode=B_mode, C_mode=C_mode, groups=2, has_z=has_z, has_D=has_D, has_bias=softplus,
                    has_h0=has_h0, seqlen=77, device=device)
    g, gl = upstream(x, with_last=has_h0)
    got = run(markovkit.selective_scan, x, softplus, g, gl)
    want = run(selective_scan_ref, {k: v.cpu() if v is not None else None for k, v in x.items()}, softplus, g, gl)
    assert_all_close(got, want, TOL64["rtol"], atol=TOL64["atol"])


@pytest.mark.parametrize("seqlen", [1, 7, 63, 64, 65, 127, 128, 372])
def test_float64_lengths_and_groups(device, seqlen):
    groups = {1: 1, 7: 2, 372: 4}.get(seqlen, 2)
    x = make_inputs(batch=2, dim=4, seqlen=seqlen, dstate=5, B_mode="var4", C_mode="var4", groups=groups,
                    device=device)
    g, gl = upstream(x)
    got = run(markovkit.selective_scan, x, True, g, gl)
    want = run(selective_scan_ref, {k: v.cpu() if v is not None else None for k, v in x.items()}, True, g, gl)
    assert_all_close(got, want, TOL64["rtol"], atol=TOL64["atol"])


@pytest.mark.parametrize("batch,seqlen,B_mode", [(2, 0, "var4"), (2, 0, "const"), (0, 7, "var4")])
def test_empty_inputs(device, batch, seqlen, B_mode):
    """No steps or no rows: out is (batch, dim, seqlen), the last state is the initial state and its gradient the
    last state's; no other input reaches a step, so their gradients are zeros."""
    x = make_inputs(batch=batch, dim=4, seqlen=seqlen, dstate=5, B_mode=B_mode, C_mode="var4", groups=2,
                    device=device)
    g, gl = upstream(x)
    out, last, grads = run(markovkit.selective_scan, x, True, g, gl)
    assert out.shape == (batch, 4, seqlen)
    torch.testing.assert_close(last, x["initial_state"], rtol=0, atol=0)
    for k, v in grads.items():
        want = gl if k == "initial_state" else torch.zeros_like(x[k])
        torch.testing.assert_close(v.cpu(), want.cpu(), rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


def test_float64_long_multichunk():
    """19 chunks of 64 with an uneven tail, dstate 16, constant B and per-step C."""
    x = make_inputs(batch=1, dim=3, seqlen=1134, dstate=16, B_mode="const", C_mode="var3")
    g, gl = upstream(x)
    assert_all_close(run(markovkit.selective_scan, x, True, g, gl), run(selective_scan_ref, x, True, g, gl),
                     TOL64["rtol"], atol=TOL64["atol"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B_mode,C_mode", [("var4", "var4"), ("const", "const")])
def test_low_precision_against_float64(device, dtype, B_mode, C_mode):
    if device.type == "cpu" and dtype != torch.float32:
        pytest.skip("half types: one CPU case below keeps the CPU test time down")
    _low_precision_case(device, dtype, B_mode, C_mode)


@pytest.mark.parametrize("B_mode,C_mode", BC_MODES)
def test_materialized_reference_matches_reference(B_mode, C_mode):
    # the benchmarks' eager peer (float32 math) against the float64 reference, outputs and gradients
    x = make_inputs(seqlen=37, B_mode=B_mode, C_mode=C_mode, groups=2, has_h0=False)
    g, _ = upstream(x, with_last=False)
    got = run(selective_scan_materialized_ref, {k: v.float() for k, v in x.items() if v is not None}, True, g, None)
    want = run(selective_scan_ref, x, True, g, None)
    assert_all_close(got, want, rtol=1e-4, atol_frac=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cpu(dtype):
    _low_precision_case(torch.device("cpu"), dtype, "var4", "const")


def _low_precision_case(device, dtype, B_mode, C_mode):
    x = make_inputs(batch=2, dim=8, seqlen=150, dstate=16, B_mode=B_mode, C_mode=C_mode, groups=2)
    # activations rounded to dtype; weights stay float32 (mixed precision: fp32 params, low-precision acts)
    acts = {"u", "delta", "z"} | {k for k in ("B", "C") if x[k].dim() >= 3}
    xd = {k: (v.to(dtype if k in acts else torch.float32).to(device) if v is not None else None)
          for k, v in x.items()}
    x64 = {k: (v.cpu().to(F64) if v is not None else None) for k, v in xd.items()}
    g, gl = upstream(x)
    g = g.to(dtype).to(F64)
    out, last, grads = run(markovkit.selective_scan, xd, True, g, gl)
    assert out.dtype == dtype and last.dtype == torch.float32
    assert all(grads[k].dtype == xd[k].dtype for k in grads)
    rtol, atol_frac = TOL_LOW[dtype]
    assert_all_close((out, last, grads), run(selective_scan_ref, x64, True, g, gl), rtol, atol_frac=atol_frac)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_results_are_the_float32_results_rounded(dtype):
    """The CPU kernel's 16-bit types (csrc/scan/scan_half.h): a float16 / bfloat16 call computes in float32 on
    the exactly widened inputs, so its outputs and gradients are the float32 call's rounded by torch, bit for
    bit: rounding to nearest even, subnormals (u down to 1e-9) and overflow to inf (u up to 3e4, float16)."""
    x = make_inputs(batch=2, dim=8, seqlen=40, dstate=4, B_mode="var4", C_mode="var4", groups=2, has_h0=False)
    x["u"] = x["u"] * torch.logspace(-9, 4.5, 8, dtype=F64)[:, None]
    xd = {k: v.to(dtype if k in ("u", "delta", "z", "B", "C") else torch.float32) for k, v in x.items()
          if v is not None}
    g = upstream(x, with_last=False)[0].to(dtype)
    results = []
    for xi, gi in ((xd, g), ({k: v.float() for k, v in xd.items()}, g.float())):
        leaves = {k: v.clone().requires_grad_() for k, v in xi.items()}
        out = markovkit.selective_scan(**leaves, delta_softplus=True)
        grads = torch.autograd.grad(out, [leaves[k] for k in ("u", "delta", "z", "B", "C")], gi)
        results.append([out, *grads])
    for name, a, b in zip(["out", "u", "delta", "z", "B", "C"], *results):
        assert a.dtype == dtype
        assert torch.equal(a.view(torch.int16), b.to(dtype).view(torch.int16)), name
    if dtype == torch.float16:
        assert results[0][0].isinf().any() and (results[0][0].abs() < 2**-14).logical_and(results[0][0] != 0).any()


def _tiny(seqlen, **kw):
    x = make_inputs(batch=2, dim=2, seqlen=seqlen, dstate=3, groups=2, **kw)
    return {k: v for k, v in x.items() if v is not None}


@pytest.mark.parametrize("B_mode,C_mode,seqlen", [("var4", "const", 6), ("const", "var3", 66)])
def test_gradcheck_every_input(B_mode, C_mode, seqlen):
    x = _tiny(seqlen, B_mode=B_mode, C_mode=C_mode)
    names = list(x)

    def f(*args):
        out, last = markovkit.selective_scan(**dict(zip(names, args)), delta_softplus=True, return_last_state=True)
        return out, last

    args = [v.requires_grad_() for v in x.values()]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_varlen():
    x = make_inputs(batch=1, dim=2, seqlen=70, dstate=2, B_mode="var3", C_mode="var3", nseq=4, seed=3)
    cu = torch.tensor([0, 3, 3, 64, 70], dtype=torch.int32)  # an empty sequence, a boundary at the chunk edge
    names = [k for k, v in x.items() if v is not None]

    def f(*args):
        return markovkit.selective_scan(**dict(zip(names, args)), delta_softplus=True, return_last_state=True,
                                        cu_seqlens=cu)

    args = [x[k].requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_args(device, dtype=torch.float32, seqlen=70, varlen=False):
    x = make_inputs(batch=1 if varlen else 2, dim=4, seqlen=seqlen, dstate=4, B_mode="var4", C_mode="const",
                    groups=2, nseq=3 if varlen else None, device=device)
    w = torch.float64 if dtype == torch.float64 else torch.float32
    cu = torch.tensor([0, 10, 64, seqlen], dtype=torch.int32, device=device) if varlen else None
    return [x["u"].to(dtype), x["delta"].to(dtype), x["A"].to(w), x["B"].to(dtype), x["C"].to(w), x["D"].to(w),
            x["z"].to(dtype), x["delta_bias"].to(w), True, x["initial_state"].to(w), cu]


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype, varlen):
    args = _op_args(device, dtype, varlen=varlen)
    torch.library.opcheck(torch.ops.markovkit.selective_scan_fwd, args)
    out, last, chunks = torch.ops.markovkit.selective_scan_fwd(*args)
    bwd_args = args + [chunks, torch.randn_like(out), torch.randn_like(last)]
    torch.library.opcheck(torch.ops.markovkit.selective_scan_bwd, bwd_args)
    no_opt = args[:5] + [None, None, None, False, None, cu := args[10]]
    torch.library.opcheck(torch.ops.markovkit.selective_scan_fwd, no_opt)
    out, _, chunks = torch.ops.markovkit.selective_scan_fwd(*no_opt)
    torch.library.opcheck(torch.ops.markovkit.selective_scan_bwd,
                          no_opt[:10] + [cu, chunks, torch.randn_like(out), None])


def test_opcheck_state_update(device):
    state, step = _step_inputs(device)
    torch.library.opcheck(torch.ops.markovkit.selective_state_update, (state, *step))
    rows = torch.tensor([2, -1, 0], device=device)
    torch.library.opcheck(torch.ops.markovkit.selective_state_update, (state, *step, rows))


def test_compile_fullgraph(device):
    x = make_inputs(batch=2, dim=4, seqlen=70, dstate=4, B_mode="var3", C_mode="var3", device=device)
    g, gl = upstream(x)
    g, gl = g.to(device), gl.to(device)

    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last = markovkit.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True, True,
                                                initial_state=initial_state)
        return (out * g).sum() + (last * gl).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    results = []
    for fn in (f, compiled):
        leaves = [v.detach().clone().requires_grad_() for v in x.values()]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [v.grad for v in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B_mode", ["const", "var3"])
def test_varlen_equals_each_sequence_alone(device, B_mode):
    cu_list = [0, 5, 5, 64, 150, 151, 300]
    nseq = len(cu_list) - 1
    x = make_inputs(batch=1, dim=3, seqlen=300, dstate=4, B_mode=B_mode, C_mode="var3", nseq=nseq, device=device)
    g, gl = upstream(x, nseq=nseq)
    cu = torch.tensor(cu_list, dtype=torch.int32, device=device)
    out, last, grads = run(markovkit.selective_scan, x, True, g, gl, cu_seqlens=cu)
    for s in range(nseq):
        sl = slice(cu_list[s], cu_list[s + 1])
        xs = {k: v for k, v in x.items()}
        for k in ("u", "delta", "z", "C") + (("B",) if B_mode != "const" else ()):
            xs[k] = x[k][..., sl]
        xs["initial_state"] = x["initial_state"][s:s + 1]
        o, l, gr = run(markovkit.selective_scan, xs, True, g[..., sl], gl[s:s + 1])
        torch.testing.assert_close(out[..., sl], o, **TOL64)
        torch.testing.assert_close(last[s:s + 1], l, **TOL64)
        for k in ("u", "delta", "z", "C") + (("B",) if B_mode != "const" else ()):
            torch.testing.assert_close(grads[k][..., sl], gr[k], **TOL64)
        torch.testing.assert_close(grads["initial_state"][s:s + 1], gr["initial_state"], **TOL64)
    # per-channel gradients sum over the sequences; compared with the float64 reference
    want = run(selective_scan_ref, {k: v.cpu() if v is not None else None for k, v in x.items()}, True, g, gl,
               cu_seqlens=cu.cpu())
    assert_all_close((out, last, grads), want, TOL64["rtol"], atol=TOL64["atol"])


def test_chaining_through_the_last_state(device):
    """scan([x1; x2]) = scan(x1) -> last_state -> scan(x2, initial_state=last), outputs and gradients (fp32)."""
    x = make_inputs(batch=2, dim=4, seqlen=200, dstate=8, B_mode="var3", C_mode="var3", device=device)
    x = {k: v.float() for k, v in x.items()}
    g = upstream(x, with_last=False)[0].float().to(device)
    cut = 90

    def split(**kw):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        if kw.get("whole"):
            out = markovkit.selective_scan(**leaves, delta_softplus=True)
        else:
            part = lambda v, sl: v[..., sl] if v.dim() == 3 else v  # noqa: E731
            first = {k: part(v, slice(0, cut)) for k, v in leaves.items() if k != "initial_state"}
            second = {k: part(v, slice(cut, None)) for k, v in leaves.items() if k != "initial_state"}
            o1, h = markovkit.selective_scan(**first, initial_state=leaves["initial_state"], delta_softplus=True,
                                             return_last_state=True)
            o2 = markovkit.selective_scan(**second, initial_state=h, delta_softplus=True)
            out = torch.cat([o1, o2], dim=-1)
        (out * g).sum().backward()
        return [out] + [leaves[k].grad for k in NAMES]

    for a, b in zip(split(whole=True), split()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _step_inputs(device, batch=3, dim=8, dstate=16, groups=2, dtype=torch.float32, seed=5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state = r(batch, dim, dstate).to(device)
    step = [r(batch, dim).to(dtype).to(device), (0.5 * r(batch, dim)).to(dtype).to(device),
            (-torch.rand(dim, dstate, generator=g)).to(device), r(batch, groups, dstate).to(dtype).to(device),
            r(batch, groups, dstate).to(dtype).to(device), r(dim).to(device), r(batch, dim).to(dtype).to(device),
            r(dim).to(device), True]
    return state, step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_state_update_matches_reference(device, dtype):
    state, step = _step_inputs(device, dtype=dtype)
    ref_state = state.clone()
    out = markovkit.selective_state_update(state, *step)
    ref = selective_state_update_ref(ref_state, *step)
    rtol, atol_frac = TOL_LOW[dtype]
    torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol_frac * ref.abs().max().item())


def test_state_update_huge_dt_matches_reference():
    """dt = 100 with softplus: the thresholded softplus passes it through (no exp overflow), as in float64."""
    state, step = _step_inputs("cpu")
    step[1] = torch.full_like(step[1], 100.0)
    ref_state = state.double()
    ref = selective_state_update_ref(ref_state, *[t.double() if isinstance(t, torch.Tensor) else t for t in step])
    out = markovkit.selective_state_update(state, *step)
    assert torch.isfinite(out).all()
    rtol, atol_frac = TOL_LOW[torch.float32]
    for a, b in ((state, ref_state), (out, ref)):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol_frac * b.abs().max().item())


def test_state_update_heads_form_is_the_channel_form(device):
    """mamba_ssm's heads form (state (rows, nheads, headdim, dstate), A (nheads, headdim, dstate), ...; head h reads
    group h // (nheads / groups)) steps in place and gives the channel form's out and state bitwise, with
    state_batch_indices too."""
    state, step = _step_inputs(device)  # dim 8 = 4 heads x 2, groups 2
    heads_of = lambda t, at: t.unflatten(at, (4, 2))  # noqa: E731
    x, dt, A, B, C, D, z, dt_bias, softplus = step
    heads_step = [heads_of(x, 1), heads_of(dt, 1), heads_of(A, 0), B, C, heads_of(D, 0), heads_of(z, 1),
                  heads_of(dt_bias, 0), softplus]
    for rows in (None, torch.tensor([2, -1, 0], device=device)):
        heads_state, channel_state = heads_of(state.clone(), 1), state.clone()
        out = markovkit.selective_state_update(heads_state, *heads_step, state_batch_indices=rows)
        expected = markovkit.selective_state_update(channel_state, *step, state_batch_indices=rows)
        assert out.shape == (3, 4, 2) and torch.equal(out.flatten(1), expected)
        assert torch.equal(heads_state.flatten(1, 2), channel_state)
    with pytest.raises(RuntimeError, match=re.escape("A: expected (nheads, headdim) = (4, 2) at axes 0, 1 (x: (batch, "
                                                     "nheads, headdim)), got shape [8, 16]")):
        markovkit.selective_state_update(heads_of(state, 1), heads_step[0], heads_step[1], A, *heads_step[3:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_state_update_half_or_strided_state_steps_a_float32_copy(device, dtype):
    """A state in the model's half dtype (mamba_ssm's decode cache) or of other strides (a slice of a larger cache)
    is stepped in float32 and written back in place: rounded to its dtype, it equals the float32 step of its
    values."""
    state, step = _step_inputs(device)
    half, reference = state.to(dtype), state.to(dtype).float()
    out = markovkit.selective_state_update(half, *step)
    expected = markovkit.selective_state_update(reference, *step)
    assert half.dtype == dtype and torch.equal(out, expected) and torch.equal(half, reference.to(dtype))
    wide = torch.randn(3, 8, 20, device=device)
    strided, reference = wide[..., 2:18], wide[..., 2:18].clone()
    before = wide.clone()
    out = markovkit.selective_state_update(strided, *step)
    assert torch.equal(out, markovkit.selective_state_update(reference, *step))
    assert torch.equal(wide[..., 2:18], reference) and torch.equal(wide[..., :2], before[..., :2])


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_state_update_with_batch_indices(device, index_dtype):
    """Continuous batching: batch element b steps row rows[b] of a cache of 6 rows, -1 is a padding slot (out 0).
    The stepped rows equal a plain step of those rows bitwise (and the float64 reference); the others are
    untouched."""
    state, step = _step_inputs(device)  # batch 3
    cache = torch.randn(6, *state.shape[1:], generator=torch.Generator().manual_seed(9)).to(device)
    rows = torch.tensor([4, -1, 0], dtype=index_dtype, device=device)
    before = cache.clone()
    out = markovkit.selective_state_update(cache, *step, state_batch_indices=rows)
    live = [0, 2]
    plain_state = before[[4, 0]]
    plain = markovkit.selective_state_update(plain_state, *[t[live] if t.dim() > 1 and t.shape[0] == 3 else t
                                                            for t in step[:-1]], step[-1])
    assert torch.equal(out[live], plain) and torch.equal(cache[[4, 0]], plain_state)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(cache[[1, 2, 3, 5]], before[[1, 2, 3, 5]])
    ref_cache = before.double()
    ref = selective_state_update_ref(ref_cache, *[t.double() for t in step[:-1]], step[-1], state_batch_indices=rows)
    torch.testing.assert_close(cache.double(), ref_cache, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_state_update_keeps_nan(sign):
    """A NaN in A (either sign bit: x86's default NaN has it set) comes out as NaN in that state and the outs it
    reaches, as in the float64 reference, not as a finite value or inf."""
    state, step = _step_inputs("cpu")
    step[2][1, 3] = sign * float("nan")  # A: (dim, dstate)
    ref_state = state.double()
    ref = selective_state_update_ref(ref_state, *[t.double() if isinstance(t, torch.Tensor) else t for t in step])
    out = markovkit.selective_state_update(state, *step)
    assert state.isnan().sum() == state.shape[0] and out.isnan().sum() == out.shape[0]
    rtol, atol_frac = TOL_LOW[torch.float32]
    for a, b in ((state, ref_state), (out, ref)):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol_frac * b.nan_to_num().abs().max().item(),
                                   equal_nan=True)


def test_decode_steps_equal_the_scan(device):
    x = make_inputs(batch=2, dim=6, seqlen=20, dstate=8, B_mode="var4", C_mode="var4", groups=3, device=device)
    out, last = markovkit.selective_scan(**x, delta_softplus=True, return_last_state=True)
    state = x["initial_state"].clone()
    for t in range(20):
        y = markovkit.selective_state_update(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t],
                                             x["C"][..., t], x["D"], x["z"][..., t], x["delta_bias"], True)
        torch.testing.assert_close(y, out[..., t], **TOL64)
    torch.testing.assert_close(state, last, **TOL64)


def test_backward_is_deterministic(device):
    x = make_inputs(batch=2, dim=64, seqlen=300, dstate=16, B_mode="var4", C_mode="var4", groups=1, device=device)
    x = {k: v.float() for k, v in x.items()}
    g, gl = upstream(x)
    first = run(markovkit.selective_scan, x, True, g.float(), gl.float())
    for _ in range(2):
        again = run(markovkit.selective_scan, x, True, g.float(), gl.float())
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        for k in first[2]:
            assert torch.equal(first[2][k], again[2][k]), k


def test_dim_above_65535(device):
    x = make_inputs(batch=1, dim=65_537, seqlen=3, dstate=2, B_mode="var3", C_mode="const", device=device)
    g, gl = upstream(x)
    got = run(markovkit.selective_scan, x, True, g, gl)
    assert_all_close(got, run(selective_scan_ref, {k: v.cpu() for k, v in x.items()}, True, g, gl),
                     TOL64["rtol"], atol=TOL64["atol"])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_64bit_offsets():
    """Forward with dim = 65540 (> 65535) and batch·dim·n_chunks·dstate = 65540·129·256 > 2^31 chunk-state
    elements: the channels at the far end match the CPU op on the same channels."""
    batch, dim, seqlen, dstate = 1, 65_540, 129 * 64, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(batch, dim, seqlen, device="cuda", dtype=torch.float16, generator=g)
    delta = (0.1 * torch.rand(batch, dim, seqlen, device="cuda", generator=g)).half()
    A = -torch.rand(dim, dstate, device="cuda", generator=g)
    B = torch.randn(batch, 1, dstate, seqlen, device="cuda", generator=g).half()
    C = torch.randn(batch, 1, dstate, seqlen, device="cuda", generator=g).half()
    out, last = markovkit.selective_scan(u, delta, A, B, C, return_last_state=True)
    sl = slice(dim - 2, dim)
    ref_out, ref_last = markovkit.selective_scan(u[:, sl].cpu(), delta[:, sl].cpu(), A[sl].cpu(), B.cpu(), C.cpu(),
                                                 return_last_state=True)
    torch.testing.assert_close(out[:, sl].cpu(), ref_out, rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(last[:, sl].cpu(), ref_last, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("batch,dstate,seqlen", [(2, 16, 128), (8, 16, 128), (8, 64, 128), (8, 32, 136),
                                                  (1, 32, 128), (2, 16, 127), (4, 16, 127), (8, 32, 127)])
def test_cuda_team_plans_match_the_cpu(batch, dstate, seqlen):
    """dim 4096, bfloat16, as the bench's shapes, on a device of 100 to 140 SMs. Rows of 16-byte multiples: the
    forward's staged plan (staged_plan), at batch 2 with threads of 4 states, at 8 of 16 (one, two or four per
    channel at 16, 32 or 64 states); the backward's staged plan at batch 8 (2, 4 or 8 threads of 8 states per
    channel), at batch 2 with 4 threads of 4 states and at batch 1 (32 states) with 8 (on a device of more than
    128 SMs: threads of 8 leave 128 blocks; on fewer SMs those). Rows off them: the forward's
    team plans, at 16 states batch 2 the few-channel one (the backward's too), 4 one channel per team, at 32 states
    batch 8 two per team (scan_fwd_cuda, scan_bwd_cuda). Out, last state and every gradient against the CPU op on
    the same inputs."""
    x = make_inputs(batch=batch, dim=4096, seqlen=seqlen, dstate=dstate, B_mode="var4", C_mode="var4", seed=batch)
    acts = {"u", "delta", "z", "B", "C"}
    x = {k: v.to(torch.bfloat16 if k in acts else torch.float32) for k, v in x.items()}
    g, gl = upstream(x)
    got = run(markovkit.selective_scan, {k: v.cuda() for k, v in x.items()}, True, g, gl)
    assert_all_close(got, run(markovkit.selective_scan, x, True, g, gl), *TOL_LOW[torch.bfloat16])


_BAD_CU_SCRIPT = """
import torch, markovkit
u = torch.randn(1, 4, 10, device="cuda")
B = torch.randn(1, 1, 4, 10, device="cuda")
out = markovkit.selective_scan(u, torch.rand_like(u), -torch.rand(4, 4, device="cuda"), B, B,
                               cu_seqlens=torch.tensor([0, 12, 10], dtype=torch.int32, device="cuda"))
torch.cuda.synchronize()
print("no error")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_checks_cu_seqlens_on_the_device():
    # offsets past seqlen fail as a device-side assert that prints the bad entry (scan_check_kernel.cu); the
    # assert ends the process's CUDA context, so it runs in a fresh process
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _BAD_CU_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "no error" not in run.stdout
    assert "cu_seqlens: expected non-decreasing offsets, got 12 then 10 at index 2" in run.stdout + run.stderr
    assert "device-side assert" in run.stderr


_BAD_ROWS_SCRIPT = """
import torch, markovkit
x = torch.randn(3, 4, device="cuda")
B = torch.randn(3, 2, device="cuda")
rows = torch.tensor({rows}, device="cuda")
markovkit.selective_state_update(torch.zeros(5, 4, 2, device="cuda"), x, x, -torch.ones(4, 2, device="cuda"), B, B,
                                 state_batch_indices=rows)
torch.cuda.synchronize()
print("no error")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("rows,message", [([4, 5, -1], "state_batch_indices: expected rows < 5 (state.size(0)), got 5"),
                                          ([2, -1, 2], "state_batch_indices: expected distinct rows, got 2 at indices "
                                                       "0 and 2")])
def test_cuda_checks_state_batch_indices_on_the_device(rows, message):
    # as cu_seqlens: a device-side assert that prints the bad row (scan_kernel.cu), in a fresh process
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _BAD_ROWS_SCRIPT.format(rows=rows)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0 and "no error" not in run.stdout
    assert message in run.stdout + run.stderr
    assert "device-side assert" in run.stderr


def test_bad_input_errors():
    x = make_inputs(batch=2, dim=4, seqlen=10, dstate=3, B_mode="var4", C_mode="var4", groups=2)
    args = _op_args("cpu", torch.float32, seqlen=10)
    op = torch.ops.markovkit.selective_scan_fwd

    def bad(i, value, match):
        a = list(args)
        a[i] = value
        with pytest.raises(RuntimeError, match=match):
            op(*a)

    bad(0, args[0][..., None], r"u: expected shape \(batch, dim, seqlen\), got \[2, 4, 10, 1\]")
    bad(1, args[1][:, :, :9].contiguous(), r"delta: expected shape \[2, 4, 10\], got \[2, 4, 9\]")
    bad(1, args[1].double(), "delta: expected dtype Float, got Double")
    bad(2, torch.zeros(4, 300), r"A: expected dstate in \[1, 256\], got 300")
    bad(2, args[2].half(), "A: expected dtype Float, got Half")
    bad(3, torch.zeros(2, 3, 4, 10), "B: expected a number of groups dividing dim = 4, got 3")
    bad(4, torch.zeros(5, 4), r"C: expected shape \[4, 4\], got \[5, 4\]")
    bad(0, args[0].transpose(1, 2).contiguous().transpose(1, 2), "u: expected a contiguous tensor")
    bad(6, args[6].half(), "z: expected dtype Float, got Half")
    bad(9, torch.zeros(3, 4, 4), r"initial_state: expected shape \[2, 4, 4\], got \[3, 4, 4\]")
    bad(10, torch.tensor([0, 10], dtype=torch.int32), "u: expected batch 1 with cu_seqlens")
    a = [v[:1] if isinstance(v, torch.Tensor) and k in (0, 1, 3, 6, 9) else v for k, v in enumerate(args)]
    for cu, match in [([0, 4, 9], "cu_seqlens: expected to start at 0 and end at seqlen = 10"),
                      ([0, 6, 4, 10], "cu_seqlens: expected non-decreasing offsets"),
                      (torch.tensor([0, 10], dtype=torch.int64), "cu_seqlens: expected dtype Int, got Long")]:
        b = list(a)
        b[10] = cu if isinstance(cu, torch.Tensor) else torch.tensor(cu, dtype=torch.int32)
        b[9] = None
        with pytest.raises(RuntimeError, match=match):
            op(*b)
    with pytest.raises(RuntimeError, match="state: expected dtype Float, got Double"):
        state, step = _step_inputs("cpu")
        markovkit.selective_state_update(state.double(), *step)
    for rows, match in [([3, 0, 1], r"state_batch_indices: expected rows < 3 \(state.size\(0\)\), got 3"),
                        ([1, -1, 1], "state_batch_indices: expected distinct rows, got 1 at indices 0 and 2"),
                        ([0.0, 1.0, 2.0], "state_batch_indices: expected dtype Int or Long, got Float"),
                        ([0, 1], r"state_batch_indices: expected shape \[3\], got \[2\]")]:
        with pytest.raises(RuntimeError, match=match):
            markovkit.selective_state_update(state, *step, state_batch_indices=torch.tensor(rows))
    with pytest.raises(RuntimeError, match=r"state: expected shape \(rows, dim, dstate\) = \(rows, 8, 16\)"):
        rows = torch.tensor([0, 1, 2])
        markovkit.selective_state_update(state[..., :4].contiguous(), *step, state_batch_indices=rows)
    with pytest.raises(TypeError, match="A: expected a real floating tensor"):
        markovkit.selective_scan(x["u"], x["delta"], x["A"].to(torch.complex64), x["B"], x["C"])
    # with a complex A, mamba_ssm's per-step B holds 2 seqlen reals (batch, dstate, 2 seqlen): refused for A's
    # dtype, not for B's shape
    B2 = torch.randn(x["u"].shape[0], x["A"].shape[1], 2 * x["u"].shape[2])
    with pytest.raises(TypeError, match="A: expected a real floating tensor .* got torch.complex64"):
        markovkit.selective_scan(x["u"], x["delta"], x["A"].to(torch.complex64), B2, B2)
    # the Python wrapper promotes mixed activations instead of failing (fp32 params with bf16 activations)
    out = markovkit.selective_scan(x["u"].bfloat16(), x["delta"].float(), x["A"], x["B"].bfloat16(),
                                   x["C"].bfloat16())
    assert out.dtype == torch.float32


def test_cu_seqlens_refuses_more_packed_positions_than_int32_offsets_address():
    """seqlen 2^31 with cu_seqlens: refused before any kernel (u, delta untouched: 4 GB of address space each, no
    memory); the offsets' check alone said 'expected to end at seqlen = 2147483648, got 2147483647'."""
    seqlen = 1 << 31
    u = torch.empty(1, 1, seqlen, dtype=torch.bfloat16)
    A, B = -torch.ones(1, 1), torch.ones(1, 1)
    cu = torch.tensor([0, seqlen - 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=re.escape("cu_seqlens: its int32 offsets address at most 2^31 - 1 packed "
                                                     "positions, got seqlen = 2147483648")):
        markovkit.selective_scan(u, u, A, B, B, cu_seqlens=cu)


def test_wrappers_report_ungrouped_B_and_C_as_passed():
    """A (batch, dstate, seqlen) B / C (the decode step's (batch, dstate)) with a wrong shape is reported in that
    shape, not in the (batch, 1, dstate, seqlen) the op sees."""
    u, A = torch.randn(2, 4, 10), -torch.rand(4, 3)
    good = torch.randn(2, 3, 10)
    with pytest.raises(RuntimeError, match=re.escape("B: expected shape [2, 3, 10] = (batch, dstate, seqlen), "
                                                     "got [2, 3, 9]")):
        markovkit.selective_scan(u, u, A, good[..., :9], good)
    with pytest.raises(RuntimeError, match=re.escape("C: expected shape [2, 3, 10] = (batch, dstate, seqlen), "
                                                     "got [1, 3, 10]")):
        markovkit.selective_scan(u, u, A, good, good[:1])
    state, x = torch.zeros(2, 4, 3), torch.randn(2, 4)
    with pytest.raises(RuntimeError, match=re.escape("C: expected shape [2, 3] = (batch, dstate), got [2, 4]")):
        markovkit.selective_state_update(state, x, x, A, torch.randn(2, 3), torch.randn(2, 4))


def test_mamba_block_step_equals_forward(device):
    torch.manual_seed(0)
    block = markovkit.nn.Mamba(d_model=16, d_state=8, d_conv=4, device=device, dtype=torch.float64)
    hidden = torch.randn(2, 11, 16, device=device, dtype=F64)
    full = block(hidden)
    conv_state, ssm_state = block.allocate_inference_cache(2)
    steps = torch.cat([block.step(hidden[:, t:t + 1], conv_state, ssm_state)[0] for t in range(11)], dim=1)
    torch.testing.assert_close(steps, full, **TOL64)
    full.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("prefill", [2, 6])
def test_mamba_block_prefill_then_decode_equals_forward(device, prefill):
    """mamba_ssm's inference_params: forward at seqlen_offset 0 runs the prompt (2 tokens: fewer than d_conv) and
    leaves this block's states in key_value_memory_dict[layer_idx]; past it, forward steps one token. Together they
    give forward on the whole sequence."""
    torch.manual_seed(0)
    block = markovkit.nn.Mamba(16, 8, 4, layer_idx=3, device=device, dtype=F64)
    hidden = torch.randn(2, 11, 16, device=device, dtype=F64)
    params = types.SimpleNamespace(key_value_memory_dict={}, seqlen_offset=0)
    outs = [block(hidden[:, :prefill], params)]
    assert list(params.key_value_memory_dict) == [3]
    for t in range(prefill, 11):
        params.seqlen_offset = t
        outs.append(block(hidden[:, t:t + 1], params))
    torch.testing.assert_close(torch.cat(outs, dim=1), block(hidden), **TOL64)
    # a prefill with autograd on (parameters require grad): the caches keep values, not the graph
    assert not any(t.requires_grad for t in params.key_value_memory_dict[3])
    with pytest.raises(ValueError, match=re.escape("inference_params: this block needs a layer_idx")):
        markovkit.nn.Mamba(16, device=device)(hidden, params)


def test_mamba_block_takes_mamba_ssms_arguments_in_order():
    """(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init, dt_scale, dt_init_floor, conv_bias, bias,
    use_fast_path, layer_idx, device, dtype), as mamba_ssm's create_block passes them; kwargs to
    allocate_inference_cache are taken (mamba_ssm's Block forwards some)."""
    block = markovkit.nn.Mamba(16, 8, 3, 1.5, 4, 0.01, 0.2, "constant", 2.0, 1e-3, False, True, False, 7, "cpu",
                               F64)
    assert (block.d_state, block.d_conv, block.expand, block.dt_rank, block.layer_idx) == (8, 3, 1.5, 4, 7)
    assert not block.use_fast_path and block.conv1d.bias is None and block.in_proj.bias is not None
    assert block.in_proj.weight.dtype == F64 and block.d_inner == 24
    torch.testing.assert_close(block.dt_proj.weight, torch.full((24, 4), 2.0 * 4 ** -0.5, dtype=F64))
    conv_state, ssm_state = block.allocate_inference_cache(2, 64, dtype=None, seqlen_offset=0)
    assert conv_state.shape == (2, 24, 3) and ssm_state.shape == (2, 24, 8)


def test_mamba_block_init_flags_and_step_checks():
    """mamba_ssm's constructor arguments and parameter flags: dt_init / dt_scale set dt_proj's weight, a fractional
    expand rounds down, A_log and D carry _no_weight_decay and the dt bias _no_reinit (optimizer grouping and
    re-initialisation code read them). step() takes one token, records no graph, and allocate_inference_cache has
    mamba_ssm's (batch_size, max_seqlen, dtype) signature."""
    torch.manual_seed(0)
    block = markovkit.nn.Mamba(d_model=32, d_state=4, expand=1.5, dt_init="constant", dt_scale=0.5)
    assert block.d_inner == 48 and block.dt_rank == 2
    torch.testing.assert_close(block.dt_proj.weight, torch.full((48, 2), 0.5 * 2 ** -0.5))
    assert block.A_log._no_weight_decay and block.D._no_weight_decay and block.dt_proj.bias._no_reinit
    with pytest.raises(ValueError, match="dt_init: expected 'random' or 'constant', got 'zeros'"):
        markovkit.nn.Mamba(d_model=32, dt_init="zeros")
    with pytest.raises(ValueError, match=r"d_state: expected 1 to 256 \(the scan's limit\), got 300"):
        markovkit.nn.Mamba(d_model=32, d_state=300)
    for kwargs, message in [(dict(dt_rank=0), r"dt_rank \(or 'auto'\): expected a positive int, got 0"),
                            (dict(dt_rank=2.5), r"dt_rank \(or 'auto'\): expected a positive int, got 2.5"),
                            (dict(d_state=2.0), "d_state: expected a positive int, got 2.0"),
                            (dict(d_conv=0), "d_conv: expected a positive int, got 0"),
                            (dict(expand=0.01), r"expand: expected a number with int\(expand \* d_model\) >= 1"),
                            (dict(dt_min=0), "dt_min, dt_max: expected 0 < dt_min <= dt_max, got 0, 0.1")]:
        with pytest.raises(ValueError, match=message):
            markovkit.nn.Mamba(d_model=32, **kwargs)
    conv_state, ssm_state = block.allocate_inference_cache(3, 128, dtype=torch.float64)
    assert conv_state.shape == (3, 48, 4) and conv_state.dtype == F64 and ssm_state.dtype == torch.float32
    with pytest.raises(ValueError, match=r"hidden: expected shape \(batch, 1, d_model\), one token, got \(3, 2, 32\)"):
        block.step(torch.randn(3, 2, 32), conv_state, ssm_state)
    # another batch size: refused before the cache changes (the conv state was rolled, then z was named)
    conv_state.normal_()
    before = conv_state.clone()
    with pytest.raises(ValueError, match=r"hidden: expected the cache's batch size 3 \(conv_state\) = 3 \(ssm_state\), "
                                         r"got 1"):
        block.step(torch.randn(1, 1, 32), conv_state, ssm_state)
    assert torch.equal(conv_state, before)
    out, conv_out, ssm_out = block.step(torch.randn(3, 1, 32), conv_state, ssm_state)  # float64 conv state
    assert out.dtype == torch.float32 and not out.requires_grad and not conv_state.requires_grad
    assert conv_out is conv_state and ssm_out is ssm_state  # (out, conv_state, ssm_state), as mamba_ssm's step


@pytest.mark.parametrize("dtype,cache_dtype,tol", [(torch.float32, F64, 1e-5), (torch.bfloat16, torch.float32, 3e-2)])
def test_mamba_block_steps_with_a_cache_of_another_dtype(dtype, cache_dtype, tol):
    """allocate_inference_cache(dtype=...) gives a conv state of another dtype: the convolution's result comes back
    in the block's dtype (x_proj refused the mix before)."""
    torch.manual_seed(0)
    block = markovkit.nn.Mamba(d_model=16, d_state=8, d_conv=4).to(dtype)
    hidden = torch.randn(2, 7, 16).to(dtype)
    full = block(hidden)
    conv_state, ssm_state = block.allocate_inference_cache(2, dtype=cache_dtype)
    steps = torch.cat([block.step(hidden[:, t:t + 1], conv_state, ssm_state)[0] for t in range(7)], dim=1)
    assert steps.dtype == dtype
    torch.testing.assert_close(steps.float(), full.float(), rtol=tol, atol=tol)


def test_mamba_block_float64_matches_the_reference_scan():
    """A float64 block (A_log, D and the dt bias in float64 too) computes in float64: output and parameter
    gradients equal the same block on the float64 reference scan."""
    torch.manual_seed(0)
    block = markovkit.nn.Mamba(d_model=16, d_state=8, d_conv=4).double()
    hidden = torch.randn(2, 11, 16, dtype=F64)

    def reference_block(hidden):
        x, z = block.in_proj(hidden).chunk(2, dim=-1)
        x = torch.nn.functional.silu(block.conv1d(x.transpose(1, 2))[..., :hidden.shape[1]])
        dt, B, C = block.x_proj(x.transpose(1, 2)).split([block.dt_rank, block.d_state, block.d_state], dim=-1)
        dt = dt @ block.dt_proj.weight.T
        y = selective_scan_ref(x, dt.transpose(1, 2), -torch.exp(block.A_log), B.transpose(1, 2), C.transpose(1, 2),
                               block.D, z.transpose(1, 2), delta_bias=block.dt_proj.bias, delta_softplus=True)
        return block.out_proj(y.transpose(1, 2))

    def run(fn):
        out = fn(hidden)
        return [out] + list(torch.autograd.grad((out * out).sum(), list(block.parameters())))

    for a, b in zip(run(block), run(reference_block)):
        torch.testing.assert_close(a, b, **TOL64)


def test_mamba_block_compiles_and_exports_with_a_dynamic_seqlen():
    """Across the scan's 64-step chunk: the checkpoints are a flat tensor (an axis of n_chunks = 1 made export
    specialise seqlen to <= 64)."""
    torch.manual_seed(0)
    assert_compiles_and_exports(markovkit.nn.Mamba(d_model=16, d_state=8).double(), 16, (17, 200), tol=TOL64)


def test_mamba_and_bmojo_f_blocks_take_an_empty_sequence():
    """seqlen 0 gives (batch, 0, d_model) and an empty gradient (conv1d refused an empty sequence), as the window
    layer and the ops do."""
    blocks = [(markovkit.nn.Mamba(d_model=16, d_state=8), 16), (markovkit.nn.BMojoF(64, heads=2, window=4), 64)]
    for block, dim in blocks:
        x = torch.randn(2, 0, dim, requires_grad=True)
        out = block(x)
        assert out.shape == (2, 0, dim)
        out.sum().backward()
        assert x.grad.shape == (2, 0, dim)


def test_float32_strong_decay_and_flush():
    """Δ·A down to about -150 (the CPU's vectorized exp flushes e^x below 2^-126 to 0) still matches float64."""
    x = make_inputs(batch=1, dim=4, seqlen=70, dstate=8, B_mode="var3", C_mode="var3")
    x["A"] = -30.0 * torch.rand(4, 8, dtype=F64)
    x["delta"] = 5.0 * x["delta"]
    x32 = {k: v.float() for k, v in x.items()}
    x64 = {k: v.double() for k, v in x32.items()}
    g, gl = upstream(x)
    rtol, atol_frac = TOL_LOW[torch.float32]
    assert_all_close(run(markovkit.selective_scan, x32, False, g, gl), run(selective_scan_ref, x64, False, g, gl),
                     rtol, atol_frac=atol_frac)


_BASELINE_SCRIPT = """
import torch, markovkit
from markovkit.reference import selective_scan_ref
g = torch.Generator().manual_seed(0)
for dtype, N, tol in [(torch.float64, 5, 1e-9), (torch.float32, 13, 2e-4)]:
    b, d, L = 2, 4, 150
    x = dict(u=torch.randn(b, d, L, generator=g, dtype=torch.float64),
             delta=0.5 * torch.rand(b, d, L, generator=g, dtype=torch.float64),
             A=-0.5 * torch.rand(d, N, generator=g, dtype=torch.float64),
             B=torch.randn(b, 2, N, L, generator=g, dtype=torch.float64),
             C=torch.randn(d, N, generator=g, dtype=torch.float64),
             D=torch.randn(d, generator=g, dtype=torch.float64),
             z=torch.randn(b, d, L, generator=g, dtype=torch.float64),
             delta_bias=0.5 * torch.rand(d, generator=g, dtype=torch.float64),
             initial_state=torch.randn(b, d, N, generator=g, dtype=torch.float64))
    dout = torch.randn(b, d, L, generator=g, dtype=torch.float64)
    res = []
    for fn, t in [(markovkit.selective_scan, dtype), (selective_scan_ref, torch.float64)]:
        leaves = {k: v.to(t).requires_grad_() for k, v in x.items()}
        out = fn(**leaves, delta_softplus=True)
        res.append([out] + list(torch.autograd.grad(out, list(leaves.values()), dout.to(t))))
    for a, e in zip(*res):
        scale = e.abs().max().item()
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * scale)
print("ok")
"""


def test_cpu_baseline_copy():
    # the baseline (non-AVX2) copy of the CPU loops, picked once per process: ATEN_CPU_CAPABILITY=default in a
    # fresh process, against the float64 reference (the in-process tests run the AVX2 copy where the CPU has it)
    import os
    import subprocess
    import sys

    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    run = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == "ok"

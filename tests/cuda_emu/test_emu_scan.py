"""The CUDA kernels of the selective scan (csrc/scan/scan_kernel.cu) run by the emulator: forward, backward
(with its fixed-order reduce kernel) and decode step against the float64 reference and the CPU kernel, for every
dtype, every (kLanes, kS) instance of dispatch_lanes (the forward's loading per-step B/C one step or several at a
time), each pass in each of its team plans, every backward block size of scan_bwd_cuda_blk, every B/C layout and
option, odd and multi-chunk lengths, packed sequences; determinism across runs and thread orders; the CUDA-only glue
errors.

Tolerances (rtol, atol as a fraction of the largest reference magnitude), outputs and gradients alike:
float64 1e-9 / 1e-10 absolute; float32 2e-4 / 2e-5; float16 5e-3 / 3e-3; bfloat16 3e-2 / 2e-2 (activations
rounded to the dtype, the reference in float64 on the rounded inputs; the kernels compute in float32).
"""
import re

import pytest
import torch

import markovkit
from conftest import HAS_EMULATION
from markovkit import cuda_emulation
from markovkit.reference import selective_scan_ref, selective_state_update_ref
from test_scan import TOL64, TOL_LOW, assert_all_close, make_inputs, run, upstream

F64 = torch.float64


def blk_of(dstate, dtype):
    """Channels per backward block on CUDA (scan_bwd_cuda_blk) for width = the power of two >= dstate (>= 4): 32 up
    to 16, 16 up to 64, 512 / width above; halved in float64."""
    width = 4
    while width < dstate:
        width *= 2
    blk = 32 if width <= 16 else 16 if width <= 64 else 512 // width
    return blk // (2 if dtype == F64 else 1)


def cast(x, dtype):
    """Activations (u, delta, z, per-step B/C) in dtype, weights in float32 (float64 with float64)."""
    w = F64 if dtype == F64 else torch.float32
    acts = {"u", "delta", "z"} | {k for k in ("B", "C") if x[k].dim() >= 3}
    return {k: (v.to(dtype if k in acts else w) if v is not None else None) for k, v in x.items()}


def tolerance(dtype):
    if dtype == F64:
        return dict(rtol=TOL64["rtol"], atol=TOL64["atol"])
    rtol, atol_frac = TOL_LOW[dtype]
    return dict(rtol=rtol, atol_frac=atol_frac)


def check_scan(emulated, x, dtype, softplus=True, with_last=True, cu_seqlens=None, nseq=None, vs_cpu=False):
    """The emulated CUDA op against the float64 reference (and the CPU kernel): out, last_state, all grads."""
    xd = cast(x, dtype)
    x64 = {k: (v.to(F64) if v is not None else None) for k, v in xd.items()}
    g, gl = upstream(x64, with_last=with_last, nseq=nseq)
    g = g.to(dtype).to(F64)
    kw = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)
    with emulated():
        got = run(markovkit.selective_scan, xd, softplus, g, gl, **kw)
    out, last, grads = got
    assert out.dtype == dtype and last.dtype == (F64 if dtype == F64 else torch.float32)
    assert all(grads[k].dtype == xd[k].dtype for k in grads)
    tol = tolerance(dtype)
    assert_all_close(got, run(selective_scan_ref, x64, softplus, g, gl, **kw), **tol)
    if vs_cpu:
        assert_all_close(got, run(markovkit.selective_scan, xd, softplus, g, gl, **kw), **tol)
    return got


# The team plans of both passes (scan_fwd_cuda, scan_bwd_cuda) follow the SM count the emulator reports. With 132
# these small shapes fill under half a round of resident blocks: twice dispatch_lanes' lanes with 2 states each
# ("wide"), in the forward where it has 4 states per lane, at most 16 lanes and float accumulators, in the backward at
# 9 to 16 states with float accumulators; elsewhere dispatch_lanes' plan, one channel per team. With 0 no launch fits
# a round: dispatch_lanes' plan ("plain"), in the forward one channel per team where dim / groups is odd (else two
# channels per team: test_forward_team_plans).
FWD_PLANS = {"wide": "132", "plain": "0"}


@pytest.fixture(params=sorted(FWD_PLANS))
def fwd_plan(request, monkeypatch):
    monkeypatch.setenv("MK_EMU_SMS", FWD_PLANS[request.param])
    return request.param


# (dtype, dstate): every (kLanes, kS) of dispatch_lanes (both passes) -- (1,4) N<=4, (2,4) N<=8, (4,4) N<=16,
# (8,4) N<=32, (16,4) N<=64, (32,4) N<=128, (32,8) N<=256 -- so every backward block size 32, 16, 4, 2
# (float32), with states beyond N in the last lane slots (N below kLanes·kS), in float32; each other dtype on two.
DSTATE_CASES = ([(torch.float32, n) for n in (1, 3, 8, 13, 17, 32, 40, 64, 100, 128, 200, 256)]
                + [(torch.float16, 16), (torch.float16, 64), (torch.bfloat16, 16), (torch.bfloat16, 256),
                   (F64, 5), (F64, 128)])


@pytest.mark.parametrize("dtype,dstate", DSTATE_CASES)
def test_every_dtype_and_lane_plan(emulated, fwd_plan, dtype, dstate):
    # blk + 1 channels (odd): two backward blocks, the second with one active channel; 77 steps: two chunks, the first
    # with 8 backward segments (the first with the sequence start, the others without boundaries), the second 13
    # steps: a whole segment and a partial one ending in a partial group of per-step dB/dC; one batch row (the
    # other tests cover several)
    x = make_inputs(batch=1, dim=blk_of(dstate, dtype) + 1, seqlen=77, dstate=dstate, B_mode="var4", C_mode="var3",
                    seed=dstate)
    check_scan(emulated, x, dtype, vs_cpu=dtype == torch.float32)


# The forward loads 16 bytes of each per-step B/C row at a time (8 steps in float16/bfloat16, 4 in float32, 2 in
# float64) where every such row is 16-byte aligned (seqlen and base pointers), else one step at a time (the cases
# above: 77 steps). Every (kLanes, kS) in float32, the other dtypes with fewer lanes than steps per load (each
# lane sums several steps of the team's group) and more (the group's sums spread over the lanes).
ALIGNED_CASES = ([(torch.float32, n) for n in (3, 8, 16, 32, 64, 100, 256)]
                 + [(torch.bfloat16, n) for n in (4, 8, 16, 64, 200)] + [(torch.float16, n) for n in (8, 32)]
                 + [(F64, n) for n in (2, 16, 128)])


@pytest.mark.parametrize("dtype,dstate", ALIGNED_CASES)
def test_aligned_rows_every_dtype_and_lane_plan(emulated, fwd_plan, dtype, dstate):
    # 136 steps (a multiple of 8): two whole chunks and 8 steps, the last tile of 32 steps partial; per-step B and C
    # in 2 groups of 3 channels; idle teams in the forward's block
    x = make_inputs(batch=2, dim=6, seqlen=136, dstate=dstate, B_mode="var4", C_mode="var4", groups=2, seed=dstate)
    check_scan(emulated, x, dtype, vs_cpu=dtype == torch.float32)


# The forward's three team plans on one shape each (dim / groups even): with 132 SMs the wide plan (one channel per
# team where it does not apply: float64, 128 states), with 0 two neighbouring channels of one group per team (float
# accumulators, 4 states per lane, 2 lanes or more; else one channel per team). Per-step B/C aligned (136 steps) and
# not (77), in 2 groups; every option. The states' arithmetic is the same in every plan (only the sums over the
# states of y differ in order): bitwise-equal last states.
PLAN_CASES = [(torch.float32, 16, 136), (torch.float32, 16, 77), (torch.bfloat16, 16, 136), (torch.bfloat16, 64, 77),
              (torch.float16, 8, 136), (torch.float32, 100, 136), (torch.float32, 3, 136), (F64, 16, 136)]


@pytest.mark.parametrize("dtype,dstate,seqlen", PLAN_CASES)
def test_forward_team_plans(emulated, monkeypatch, dtype, dstate, seqlen):
    x = make_inputs(batch=2, dim=8, seqlen=seqlen, dstate=dstate, B_mode="var4", C_mode="var4", groups=2,
                    seed=dstate + seqlen)
    last = {}
    for sms in ("132", "0"):
        monkeypatch.setenv("MK_EMU_SMS", sms)
        last[sms] = check_scan(emulated, x, dtype)[1]  # outputs, and the backward from the forward's checkpoints
    assert torch.equal(last["132"], last["0"])


# The forward's staged plan (scan_fwd_staged_kernel.cu: tiles of 16 steps staged in shared memory; threads of 16
# states, 1, 2 or 4 per channel, or, where that leaves fewer blocks than SMs, of 4 states, 4, 8 or 16 per channel)
# takes per-step B and C with 16-byte aligned rows, float accumulators, no cu_seqlens, 9 to 64 states, dim / groups a
# multiple of the block's 128 / lanes channels and at least a block per SM. Each case has two groups of 128 channels
# and two batch rows, run with as many SMs as the 16-state plan's blocks, one more (the 4-state plan) and one more
# than the 4-state plan's (the team plans). Lengths: chunks and tiles whole (128), a partial last tile (136, 40),
# shorter than a tile (8), one step per 16-byte piece beyond (4 in float32).
STAGED_CASES = [(torch.float32, 16, 136, True), (torch.bfloat16, 16, 128, True), (torch.bfloat16, 13, 40, False),
                (torch.float16, 9, 8, True), (torch.float32, 12, 4, False), (torch.bfloat16, 64, 136, True),
                (torch.float32, 50, 40, False), (torch.float16, 32, 72, True), (torch.float32, 17, 136, True)]


def staged_launch():
    """The blocks of the staged forward's launch since the last call, or None."""
    return next((n for k, n in cuda_emulation.launched() if k.startswith("scan_fwd_staged_kernel<")), None)


def staged_blocks(batch, dim, dstate, states):
    lanes = 1
    while lanes * states < dstate:
        lanes *= 2
    return batch * dim * lanes // 128


@pytest.mark.parametrize("dtype,dstate,seqlen,options", STAGED_CASES)
def test_forward_staged_plan(emulated, monkeypatch, dtype, dstate, seqlen, options):
    x = make_inputs(batch=2, dim=256, seqlen=seqlen, dstate=dstate, B_mode="var4", C_mode="var4", groups=2,
                    has_D=options, has_z=options, has_bias=options, has_h0=options, seed=dstate + seqlen)
    wide, narrow = staged_blocks(2, 256, dstate, 16), staged_blocks(2, 256, dstate, 4)
    last = []
    for sms, blocks in ((wide, wide), (wide + 1, narrow), (narrow + 1, None)):
        monkeypatch.setenv("MK_EMU_SMS", str(sms))
        cuda_emulation.launched()
        # outputs, and the backward from the forward's checkpoints
        last.append(check_scan(emulated, x, dtype, softplus=options)[1])
        assert staged_launch() == blocks
    # the states' arithmetic is the team plans' (the sums over the states of y differ in order)
    assert torch.equal(last[0], last[2]) and torch.equal(last[1], last[2])


@pytest.mark.skipif(not HAS_EMULATION, reason="needs the MARKOVKIT_CUDA=EMULATE build")
@pytest.mark.parametrize("dstate", [16, 64])
def test_forward_staged_plan_thread_orders(monkeypatch, dstate):
    # threads in reverse order and each cp.async done when issued: a tile copied over one still read, or read before
    # its barrier, would differ
    x = cast(make_inputs(batch=2, dim=256, seqlen=136, dstate=dstate, B_mode="var4", C_mode="var4", groups=2,
                         seed=8), torch.bfloat16)
    monkeypatch.setenv("MK_EMU_SMS", str(staged_blocks(2, 256, dstate, 16)))
    results = []
    for order in ("forward", "reverse"):
        monkeypatch.setenv("MK_EMU_ORDER", order)
        with cuda_emulation.cuda_emulation():
            results.append(markovkit.selective_scan(**x, delta_softplus=True, return_last_state=True))
            assert staged_launch() == staged_blocks(2, 256, dstate, 16)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# Where the staged plan does not fit, the team plans run (each case changes one thing of a fitting one).
STAGED_MISFITS = {
    "seqlen not a multiple of 8": dict(seqlen=140),
    "8 states": dict(dstate=8),
    "65 states": dict(dstate=65),
    "80 channels per group": dict(dim=160),
    "fewer blocks than SMs": dict(sms="17"),
    "constant C": dict(C_mode="const"),
    "float64": dict(dtype=F64),
    "packed sequences": dict(cu_seqlens=True),
    "u off a 16-byte boundary": dict(shift_u=True),
}


@pytest.mark.parametrize("case", sorted(STAGED_MISFITS))
def test_forward_staged_plan_misfits(emulated, monkeypatch, case):
    c = dict(dtype=torch.bfloat16, dim=256, seqlen=136, dstate=16, groups=2, sms="4", C_mode="var4",
             cu_seqlens=False, shift_u=False)
    c.update(STAGED_MISFITS[case])
    batch, nseq = (1, 3) if c["cu_seqlens"] else (2, None)
    x = cast(make_inputs(batch=batch, dim=c["dim"] * (2 // batch), seqlen=c["seqlen"], dstate=c["dstate"],
                         B_mode="var4", C_mode=c["C_mode"], groups=c["groups"], nseq=nseq, seed=6), c["dtype"])
    kw = dict(cu_seqlens=torch.tensor([0, 40, 41, c["seqlen"]], dtype=torch.int32)) if c["cu_seqlens"] else {}
    if c["shift_u"]:
        u = x["u"]
        x["u"] = torch.empty(u.numel() + 1, dtype=u.dtype)[1:].view(u.shape).copy_(u)
        assert x["u"].data_ptr() % 16 != 0
    monkeypatch.setenv("MK_EMU_SMS", c["sms"])
    with emulated():
        got = markovkit.selective_scan(**x, delta_softplus=True, return_last_state=True, **kw)
        assert staged_launch() is None
    want = selective_scan_ref(**{k: (v.to(F64) if v is not None else None) for k, v in x.items()},
                              delta_softplus=True, return_last_state=True, **kw)
    tol = tolerance(c["dtype"])
    for a, b in zip(got, want):
        atol = tol.get("atol", tol.get("atol_frac", 0) * b.abs().max().item())
        torch.testing.assert_close(a.to(F64), b, rtol=tol["rtol"], atol=atol)


# The backward's staged plan (scan_bwd_staged_kernel.cu: threads of 8 states, 2, 4 or 8 per channel, 64, 32 or 16
# channels per block, or, where that leaves fewer blocks than SMs, of 4 states, 4, 8 or 16 per channel; each chunk's
# tiles walked, then reversed in segments of 4 steps) takes what the forward's staged plan takes (dout and the
# gradients 16-byte aligned too). Each case runs with as many SMs as the 8-state plan's blocks, one more (the 4-state
# plan) and one more than the 4-state plan's (the team plans). Lengths: whole chunks (128); a last chunk of one
# partial tile (136), of three whole tiles and a partial one (184: three walks before the reverses), of two whole and
# a partial (40), one partial tile (8), 4 steps (float32); 80: a last chunk of one whole tile.
BWD_STAGED_CASES = [(torch.float32, 16, 136, True), (torch.bfloat16, 16, 184, True), (torch.bfloat16, 13, 40, False),
                    (torch.float16, 9, 8, True), (torch.float32, 12, 4, False), (torch.bfloat16, 64, 136, True),
                    (torch.float32, 50, 80, False), (torch.float16, 32, 184, True), (torch.float32, 17, 128, True)]


def bwd_staged_launch():
    """The blocks of the staged backward's launch since the last call, or None."""
    return next((n for k, n in cuda_emulation.launched() if k.startswith("scan_bwd_staged_kernel<")), None)


def bwd_staged_blocks(batch, dim, dstate, states=8):
    return staged_blocks(batch, dim, dstate, states)


@pytest.mark.parametrize("dtype,dstate,seqlen,options", BWD_STAGED_CASES)
def test_backward_staged_plan(emulated, monkeypatch, dtype, dstate, seqlen, options):
    x = make_inputs(batch=2, dim=256, seqlen=seqlen, dstate=dstate, B_mode="var4", C_mode="var4", groups=2,
                    has_D=options, has_z=options, has_bias=options, has_h0=options, seed=dstate + seqlen)
    wide, narrow = bwd_staged_blocks(2, 256, dstate), bwd_staged_blocks(2, 256, dstate, 4)
    for sms, want in ((wide, wide), (wide + 1, narrow), (narrow + 1, None)):
        monkeypatch.setenv("MK_EMU_SMS", str(sms))
        cuda_emulation.launched()
        check_scan(emulated, x, dtype, softplus=options, with_last=options)
        assert bwd_staged_launch() == want


@pytest.mark.skipif(not HAS_EMULATION, reason="needs the MARKOVKIT_CUDA=EMULATE build")
@pytest.mark.parametrize("dstate", [16, 32, 64])
@pytest.mark.parametrize("states", [8, 4])
def test_backward_staged_plan_thread_orders(monkeypatch, dstate, states):
    # threads in reverse order and each cp.async done when issued: a tile copied over one still read, parts or
    # warp sums read before their barrier, would differ
    x = cast(make_inputs(batch=2, dim=256, seqlen=184, dstate=dstate, B_mode="var4", C_mode="var4", groups=2,
                         seed=9), torch.bfloat16)
    g, gl = upstream(x)
    wide = bwd_staged_blocks(2, 256, dstate)
    monkeypatch.setenv("MK_EMU_SMS", str(wide if states == 8 else wide + 1))
    results = []
    for order in ("forward", "reverse"):
        monkeypatch.setenv("MK_EMU_ORDER", order)
        with cuda_emulation.cuda_emulation():
            cuda_emulation.launched()
            results.append(run(markovkit.selective_scan, x, True, g, gl)[2])
            assert bwd_staged_launch() == bwd_staged_blocks(2, 256, dstate, states)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_backward_staged_plan_of_4_states_where_8_do_not_tile_a_group(emulated, monkeypatch):
    """96 channels per group: blocks of 64 channels (8 states a thread at 16 states) do not tile it, blocks of 32
    (4 states) do: the 4-state plan runs, with enough SMs for either."""
    x = make_inputs(batch=2, dim=192, seqlen=40, dstate=16, B_mode="var4", C_mode="var4", groups=2, has_D=True,
                    has_z=True, seed=5)
    monkeypatch.setenv("MK_EMU_SMS", "4")
    cuda_emulation.launched()
    check_scan(emulated, x, torch.bfloat16, softplus=True, with_last=True)
    assert bwd_staged_launch() == 2 * 192 // 32


@pytest.mark.parametrize("dstate", [16, 64])
def test_empty_sequence_at_staged_shapes(emulated, monkeypatch, dstate):
    """seqlen 0 where the staged plans would take the shapes: no staged kernel runs (nothing to stage; the backward's
    first copy would read a tile before the rows), the last state is the initial state, d initial_state the last
    state's gradient, the other gradients zeros."""
    x = cast(make_inputs(batch=2, dim=256, seqlen=0, dstate=dstate, B_mode="var4", C_mode="var4", groups=2, seed=2),
             torch.bfloat16)
    g, gl = upstream(x)
    monkeypatch.setenv("MK_EMU_SMS", str(bwd_staged_blocks(2, 256, dstate)))
    cuda_emulation.launched()
    with emulated():
        out, last, grads = run(markovkit.selective_scan, x, True, g, gl)
    launched = [k for k, _ in cuda_emulation.launched()]
    assert launched and not any(k.startswith(("scan_fwd_staged_kernel<", "scan_bwd_staged_kernel<")) for k in launched)
    assert out.shape == (2, 256, 0)
    torch.testing.assert_close(last, x["initial_state"], rtol=0, atol=0)
    for k, v in grads.items():
        want = gl.float() if k == "initial_state" else torch.zeros_like(x[k])
        torch.testing.assert_close(v, want, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


def test_backward_staged_plan_misaligned_dout(emulated, monkeypatch):
    """dout off a 16-byte boundary: the team plans run, with the partials sized for them (the glue asks the plan)."""
    x = cast(make_inputs(batch=2, dim=256, seqlen=136, dstate=16, B_mode="var4", C_mode="var4", groups=2, seed=4),
             torch.bfloat16)
    args = [x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, None, None]
    monkeypatch.setenv("MK_EMU_SMS", str(bwd_staged_blocks(2, 256, 16)))
    dout = torch.randn(x["u"].shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    shifted = torch.empty(dout.numel() + 1, dtype=dout.dtype)[1:].view(dout.shape).copy_(dout)
    assert shifted.data_ptr() % 16 != 0
    grads = []
    with emulated():
        _, _, chunk_states = torch.ops.markovkit.selective_scan_fwd(*args)
        for g, want in ((dout, bwd_staged_blocks(2, 256, 16)), (shifted, None)):
            cuda_emulation.launched()
            grads.append(torch.ops.markovkit.selective_scan_bwd(*args, chunk_states, g, None))
            assert bwd_staged_launch() == want
    for a, b in zip(*grads):
        if a.numel():
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())


@pytest.mark.parametrize("dstate,dim,staged", [(12, 4, False), (200, 4, False), (13, 256, True)])
def test_infinite_delta_leaves_earlier_gradients_finite(emulated, monkeypatch, dstate, dim, staged):
    """One Δ = +inf (an overflowed float16 delta) at step 30 of channel 1: exp(Δ A) = 0 there, so the gradients of
    the earlier steps stay finite, as in the float64 reference. The states that pad dstate to the team / vector width
    (A = 0 before: exp(inf * 0) = NaN) made them NaN, on the CPU and on CUDA (team plans; staged with 256 channels
    on 4 SMs)."""
    monkeypatch.setenv("MK_EMU_SMS", "4")
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, dim, 40, generator=g)
    delta = torch.rand(1, dim, 40, generator=g) * 0.5
    delta[0, 1, 30] = float("inf")
    A = -0.5 * torch.rand(dim, dstate, generator=g) - 0.1
    B, C = torch.randn(1, 1, dstate, 40, generator=g), torch.randn(1, 1, dstate, 40, generator=g)
    dout = torch.randn(1, dim, 40, generator=g)

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (u, delta)]
        out = fn(*leaves, A.to(dtype), B.to(dtype), C.to(dtype), delta_softplus=True)
        return torch.autograd.grad((out.double() * dout.double()).sum(), leaves)

    want = grads(selective_scan_ref, F64)
    cpu = grads(markovkit.selective_scan, torch.float32)
    cuda_emulation.launched()
    with emulated():
        got = grads(markovkit.selective_scan, torch.float32)
    assert (bwd_staged_launch() is not None) == staged
    for ours in (cpu, got):
        for a, b in zip(ours, want):
            assert torch.isfinite(b[0, 1, :30]).all()
            torch.testing.assert_close(a[0, 1, :30].double(), b[0, 1, :30], rtol=1e-4, atol=1e-4)


def test_backward_on_a_99_kb_device(emulated, monkeypatch):
    """With the 99 KB of shared memory per block of sm_86 / sm_89 the staged backward runs where its blocks fit
    (bfloat16: 91 KB at 16 states), elsewhere the team plans (float32: 109 KB staged, 70 KB team); team plans of
    more (float32 at 33 to 128 states, float64 at 33 to 64) with fewer channels per block (the partials sized for
    them); where none fits (float32 at 256 states: the B / C rows of a chunk alone take 133 KB) q is refused with what
    the plan of the least shared memory (one channel per block) needs."""
    monkeypatch.setenv("MK_EMU_SMEM", "101376")
    monkeypatch.setenv("MK_EMU_SMS", "4")
    x = make_inputs(batch=2, dim=256, seqlen=136, dstate=16, B_mode="var4", C_mode="var4", groups=2, seed=5)
    for dtype, staged in ((torch.bfloat16, bwd_staged_blocks(2, 256, 16)), (torch.float32, None)):
        cuda_emulation.launched()
        check_scan(emulated, x, dtype)
        assert bwd_staged_launch() == staged
    for dtype, dstate, blocks in ((torch.float32, 64, 8), (torch.float32, 100, 24), (F64, 50, 24)):
        # 2 batch rows of 2 groups of 12 channels: bwd_blk's 16, 4 and 8 channels per block halved, halved and
        # quartered (2, 6 and 6 blocks per group, not 1, 3 and 2)
        x = make_inputs(batch=2, dim=24, seqlen=70, dstate=dstate, B_mode="var4", C_mode="var4", groups=2, seed=6)
        cuda_emulation.launched()
        check_scan(emulated, x, dtype)
        assert [n for k, n in cuda_emulation.launched() if k == "kernel"] == [blocks]
    x = cast(make_inputs(batch=1, dim=2, seqlen=10, dstate=256, B_mode="var4", C_mode="var4", seed=1), torch.float32)
    with emulated(), pytest.raises(RuntimeError, match="selective_scan backward on CUDA: dstate 256 with Float inputs "
                                                       "needs 157 KB of shared memory per block; this GPU allows 99 KB"):
        run(markovkit.selective_scan, x, True, *upstream(x))


def test_backward_refuses_more_blocks_than_cuda_launches(emulated):
    """batch 2^31 (one channel, one state): the team backward would launch 2^31 blocks, one over CUDA's grid limit
    (the emulator checks it as CUDA does); the glue refuses it with what to do. Tensors untouched: 4-8 GB of address
    space each, no memory."""
    n = 1 << 31
    u = torch.empty(n, 1, 1, dtype=torch.bfloat16)
    A, B = -torch.ones(1, 1), torch.ones(1, 1)
    with emulated(), pytest.raises(RuntimeError, match=re.escape(
            "selective_scan backward on CUDA: expected at most 2^31 - 1 thread blocks, got batch * groups * "
            "ceil(dim / groups / 32) = 2147483648 (batch 2147483648): split the batch")):
        torch.ops.markovkit.selective_scan_bwd(u, u, A, B, B, None, None, None, False, None, None,
                                               torch.empty(n), u, None)


@pytest.mark.parametrize("dtype,dstate", [(torch.float32, 256), (torch.bfloat16, 200), (F64, 128), (F64, 65)])
def test_backward_on_a_163_kb_device(emulated, monkeypatch, dtype, dstate):
    """The 163 KB per block of sm_80: the team plans of 129 to 256 states (float64: 65 to 128) need 184 / 185 KB with
    their 2 channels per block, so blocks of one channel (157 KB: 4 blocks per group of 4 channels, not 2)."""
    monkeypatch.setenv("MK_EMU_SMEM", "166912")
    monkeypatch.setenv("MK_EMU_SMS", "4")
    x = make_inputs(batch=1, dim=8, seqlen=70, dstate=dstate, B_mode="var4", C_mode="var4", groups=2, seed=7)
    cuda_emulation.launched()
    check_scan(emulated, x, dtype)
    assert [n for k, n in cuda_emulation.launched() if k == "kernel"] == [8]


@pytest.mark.parametrize("dtype,dstate", [(torch.float32, 4), (torch.float32, 32), (torch.bfloat16, 8),
                                          (torch.bfloat16, 64), (F64, 16)])
def test_varlen_aligned_rows(emulated, dtype, dstate):
    # 152 steps (a multiple of 8) with sequence bounds inside groups of loaded steps (partial groups at both ends,
    # tiles shared by two sequences), a sequence inside one group (81..83), a chunk start at a sequence start (64)
    # and inside a sequence (128), empty sequences
    cu_list = [0, 5, 5, 64, 81, 83, 150, 152, 152]
    nseq = len(cu_list) - 1
    x = make_inputs(batch=1, dim=3, seqlen=152, dstate=dstate, B_mode="var3", C_mode="var3", nseq=nseq, seed=12)
    check_scan(emulated, x, dtype, cu_seqlens=torch.tensor(cu_list, dtype=torch.int32), nseq=nseq,
               vs_cpu=dtype == torch.float32)


@pytest.mark.parametrize("dtype,dstate", [(torch.float32, 4), (torch.bfloat16, 16), (F64, 8)])
def test_varlen_aligned_rows_keep_sequences_apart(emulated, dtype, dstate):
    # an infinite B at the last step of sequence [0, 5) and inside [83, 150): the groups of loaded steps they share
    # with [5, 64) and [81, 83) must leave those sequences' states alone (steps before a sequence's start and past
    # its end are skipped, not run with zeros: 0·inf is NaN)
    cu_list = [0, 5, 64, 81, 83, 150, 152]
    nseq = len(cu_list) - 1
    x = cast(make_inputs(batch=1, dim=3, seqlen=152, dstate=dstate, B_mode="var3", C_mode="var3", nseq=nseq,
                         seed=13), dtype)
    x["B"][0, :, 4] = float("inf")
    x["B"][0, :, 84] = float("inf")
    cu = torch.tensor(cu_list, dtype=torch.int32)
    with emulated():
        out, last = markovkit.selective_scan(**x, delta_softplus=True, return_last_state=True, cu_seqlens=cu)
    ref_out, ref_last = selective_scan_ref(**{k: (v.to(F64) if v is not None else None) for k, v in x.items()},
                                           delta_softplus=True, return_last_state=True, cu_seqlens=cu)
    clean = [1, 2, 3, 5]  # the sequences without an infinite B
    steps = torch.cat([torch.arange(cu_list[s], cu_list[s + 1]) for s in clean])
    assert ref_out[..., steps].isfinite().all() and not ref_out[..., 4].isfinite().any()
    tol = tolerance(dtype)
    rtol, atol = tol["rtol"], tol.get("atol", tol.get("atol_frac", 0) * ref_out[..., steps].abs().max().item())
    torch.testing.assert_close(out[..., steps].to(F64), ref_out[..., steps], rtol=rtol, atol=atol)
    torch.testing.assert_close(last[clean].to(F64), ref_last[clean], rtol=rtol, atol=atol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shifted", ["B", "C"])
def test_misaligned_rows_forward(emulated, dtype, shifted):
    # seqlen a multiple of 8, but one per-step B/C starts one element past a 16-byte boundary: the forward loads one
    # step at a time
    x = cast(make_inputs(batch=2, dim=5, seqlen=136, dstate=16, B_mode="var3", C_mode="var3", seed=4), dtype)
    t = x[shifted]
    x[shifted] = torch.empty(t.numel() + 1, dtype=dtype)[1:].view(t.shape).copy_(t)
    assert x[shifted].is_contiguous() and x[shifted].data_ptr() % 16 != 0
    with emulated():
        got = markovkit.selective_scan(**x, delta_softplus=True, return_last_state=True)
    want = selective_scan_ref(**{k: (v.to(F64) if v is not None else None) for k, v in x.items()},
                              delta_softplus=True, return_last_state=True)
    rtol, atol_frac = TOL_LOW[dtype]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.to(F64), b, rtol=rtol, atol=atol_frac * b.abs().max().item())


# (dtype, B_mode, C_mode, groups, has_z, has_D, softplus and delta_bias, initial_state, gradient of the last state)
F32 = torch.float32
OPTION_CASES = [
    (F32, "const", "const", 1, False, False, False, False, False),
    (F64, "const", "const", 1, False, False, False, False, False),
    (F32, "const", "const", 1, True, True, True, True, True),
    (F32, "var3", "var3", 1, True, True, True, True, True),
    (F64, "var3", "var3", 1, False, False, False, False, True),
    (F32, "var4", "const", 3, True, False, True, False, False),
    (F64, "const", "var4", 3, False, True, False, True, True),
    (F32, "var4", "var4", 6, True, True, True, True, True),  # 3 channels per group: 61 idle channels per block
    (F64, "var4", "var4", 6, True, True, True, True, True),
    (F32, "var3", "const", 1, False, True, True, True, False),
]


@pytest.mark.parametrize("dtype,B_mode,C_mode,groups,has_z,has_D,softplus,has_h0,with_last", OPTION_CASES)
def test_options(emulated, dtype, B_mode, C_mode, groups, has_z, has_D, softplus, has_h0, with_last):
    x = make_inputs(batch=2, dim=18, seqlen=70, dstate=6, B_mode=B_mode, C_mode=C_mode, groups=groups,
                    has_D=has_D, has_z=has_z, has_bias=softplus, has_h0=has_h0, seed=3)
    check_scan(emulated, x, dtype, softplus=softplus, with_last=with_last)


@pytest.mark.parametrize("seqlen", [1, 7, 16, 63, 64, 65, 200])
def test_lengths(emulated, seqlen):
    # one step, seven (one partial backward segment of 8 steps: a whole and a partial sub-block of 4 steps),
    # two segments, chunk edges, four chunks with an 8-step tail (two sub-blocks)
    x = make_inputs(batch=2, dim=9, seqlen=seqlen, dstate=8, B_mode="var4", C_mode="var4", groups=1, seed=seqlen)
    check_scan(emulated, x, torch.float32, vs_cpu=True)


@pytest.mark.parametrize("B_mode,has_h0", [("var3", True), ("const", False)])
def test_varlen(emulated, B_mode, has_h0):
    # empty sequences, a one-step one, boundaries at a chunk edge, at a backward segment's start (80) and inside
    # a sub-block
    cu_list = [0, 5, 5, 64, 80, 81, 150, 150]
    nseq = len(cu_list) - 1
    x = make_inputs(batch=1, dim=5, seqlen=150, dstate=4, B_mode=B_mode, C_mode="var3", nseq=nseq, has_h0=has_h0,
                    seed=11)
    cu = torch.tensor(cu_list, dtype=torch.int32)
    check_scan(emulated, x, torch.float32, cu_seqlens=cu, nseq=nseq, vs_cpu=True)
    check_scan(emulated, x, F64, cu_seqlens=cu, nseq=nseq)


@pytest.mark.parametrize("cu_list,match", [
    ([0, 4, 12], "cu_seqlens: expected to start at 0 and end at seqlen = 10, got 0 and 12"),
    ([2, 4, 10], "cu_seqlens: expected to start at 0 and end at seqlen = 10, got 2 and 10"),
    ([0, 6, 4, 10], "cu_seqlens: expected non-decreasing offsets, got 6 then 4 at index 2"),
    ([0, 3, -1, 10], "cu_seqlens: expected non-decreasing offsets, got 3 then -1 at index 2"),
    ([0, 12, 10], "cu_seqlens: expected non-decreasing offsets, got 12 then 10 at index 2")])
def test_varlen_offsets_checked_on_the_device(emulated, cu_list, match):
    # the CUDA glue cannot read cu_seqlens without a host sync: the forward and the backward check it on the device
    # first (a device-side assert on a GPU; the emulator raises its message), before kernels that would index out of
    # bounds with it
    nseq = len(cu_list) - 1
    x = cast(make_inputs(batch=1, dim=2, seqlen=10, dstate=4, B_mode="var4", C_mode="var4", nseq=nseq, seed=3),
             torch.float32)
    good = torch.tensor([10 * s // nseq for s in range(nseq + 1)], dtype=torch.int32)
    bad = torch.tensor(cu_list, dtype=torch.int32)

    def args(cu):  # the ops' inputs up to cu_seqlens (delta_softplus on)
        return [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")] + [True, x["initial_state"], cu]

    with emulated():
        with pytest.raises(RuntimeError, match=match):
            torch.ops.markovkit.selective_scan_fwd(*args(bad))
        out, _, chunks = torch.ops.markovkit.selective_scan_fwd(*args(good))
        torch.ops.markovkit.selective_scan_bwd(*args(good), chunks, torch.ones_like(out), None)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.markovkit.selective_scan_bwd(*args(bad), chunks, torch.ones_like(out), None)


def _step_inputs(dtype, batch=2, dim=130, dstate=16, groups=2, has_D=True, has_z=True, has_bias=True, seed=5):
    # dim 130: the decode kernel's second block of 128 channels is partial
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    w = F64 if dtype == F64 else torch.float32
    state = r(batch, dim, dstate).to(w)
    x, dt = r(batch, dim).to(dtype), (0.5 * r(batch, dim)).to(dtype)
    A = (-torch.rand(dim, dstate, generator=g, dtype=F64)).to(w)
    B, C = r(batch, groups, dstate).to(dtype), r(batch, groups, dstate).to(dtype)
    D = r(dim).to(w) if has_D else None
    z = r(batch, dim).to(dtype) if has_z else None
    bias = r(dim).to(w) if has_bias else None
    return state, (x, dt, A, B, C, D, z, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, F64])
@pytest.mark.parametrize("has_D,has_z,has_bias,softplus", [(True, True, True, True), (False, False, False, False),
                                                           (True, False, True, False), (False, True, False, True)])
def test_state_update(emulated, dtype, has_D, has_z, has_bias, softplus):
    state, step = _step_inputs(dtype, has_D=has_D, has_z=has_z, has_bias=has_bias)
    cpu_state, emu_state = state.clone(), state.clone()
    cpu = markovkit.selective_state_update(cpu_state, *step, dt_softplus=softplus)
    with emulated():
        got = markovkit.selective_state_update(emu_state, *step, dt_softplus=softplus)
    ref_state = state.to(F64)
    ref = selective_state_update_ref(ref_state, *[t.to(F64) if t is not None else None for t in step],
                                     dt_softplus=softplus)
    assert got.dtype == dtype
    tol = tolerance(dtype)
    rtol = tol["rtol"]
    for a, b, c in ((emu_state, ref_state, cpu_state), (got, ref, cpu)):
        atol = tol.get("atol", tol.get("atol_frac", 0) * b.abs().max().item())
        torch.testing.assert_close(a.to(F64), b, rtol=rtol, atol=atol)
        torch.testing.assert_close(a.to(F64), c.to(F64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_state_update_with_batch_indices(emulated, index_dtype):
    """Rows of a cache of 5 (a padding slot -1 among them) against the CPU kernel; rows out of range and rows
    named twice fail the device-side checks (the emulator raises their messages)."""
    state, step = _step_inputs(torch.float32, has_D=True, has_z=True, has_bias=True)  # batch 2
    cache = torch.randn(5, *state.shape[1:], generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([3, -1], dtype=index_dtype)
    cpu_cache, emu_cache = cache.clone(), cache.clone()
    cpu = markovkit.selective_state_update(cpu_cache, *step, dt_softplus=True, state_batch_indices=rows)
    with emulated():
        got = markovkit.selective_state_update(emu_cache, *step, dt_softplus=True, state_batch_indices=rows)
        for bad, match in [([5, 0], r"state_batch_indices: expected rows < 5 \(state.size\(0\)\), got 5"),
                           ([2, 2], "state_batch_indices: expected distinct rows, got 2 at indices 0 and 1")]:
            with pytest.raises(RuntimeError, match=match):
                markovkit.selective_state_update(cache.clone(), *step, state_batch_indices=torch.tensor(bad))
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(emu_cache[[0, 1, 2, 4]], cache[[0, 1, 2, 4]])
    torch.testing.assert_close(emu_cache, cpu_cache, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_decode_steps_equal_the_scan(emulated, dtype):
    L = 20
    x = cast(make_inputs(batch=2, dim=6, seqlen=L, dstate=8, B_mode="var4", C_mode="var4", groups=3, seed=7), dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else TOL64
    with emulated():
        out, last = markovkit.selective_scan(**x, delta_softplus=True, return_last_state=True)
        state = x["initial_state"].clone()
        for t in range(L):
            y = markovkit.selective_state_update(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t],
                                                 x["C"][..., t], x["D"], x["z"][..., t], x["delta_bias"], True)
            torch.testing.assert_close(y, out[..., t], **tol)
    torch.testing.assert_close(state, last, **tol)


@pytest.mark.skipif(not HAS_EMULATION, reason="needs the MARKOVKIT_CUDA=EMULATE build")
def test_backward_bitwise_equal_across_runs_and_thread_orders(monkeypatch):
    """No atomics: two runs, and threads scheduled forward or in reverse, give bitwise-equal results."""
    x = make_inputs(batch=2, dim=17, seqlen=70, dstate=8, B_mode="var4", C_mode="var4", groups=1, seed=2)
    x = cast(x, torch.float32)
    g, gl = upstream(x)
    results = []
    for order in ("forward", "forward", "reverse"):
        monkeypatch.setenv("MK_EMU_ORDER", order)
        with cuda_emulation.cuda_emulation():
            results.append(run(markovkit.selective_scan, x, True, g, gl))
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])
        for k in results[0][2]:
            assert torch.equal(results[0][2][k], other[2][k]), k


def test_cuda_glue_errors(emulated):
    # the CUDA backward keeps a chunk of float64 states in shared memory: at most 128 states (the CPU takes 256)
    x = cast(make_inputs(batch=1, dim=2, seqlen=5, dstate=129, B_mode="var3", C_mode="const", seed=1), F64)
    markovkit.selective_scan(**x)
    with emulated(), pytest.raises(RuntimeError, match="A: expected dstate <= 128 for float64 inputs on CUDA, "
                                                       "got 129"):
        markovkit.selective_scan(**x)
    # float32 at 256 states is accepted on CUDA
    x32 = cast(make_inputs(batch=1, dim=1, seqlen=3, dstate=256, B_mode="var3", C_mode="const", seed=1),
               torch.float32)
    with emulated():
        out = markovkit.selective_scan(**x32)
    torch.testing.assert_close(out, selective_scan_ref(**x32), rtol=2e-4, atol=2e-4)

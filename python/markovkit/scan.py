"""Selective scan (Mamba-1 S6): a drop-in for mamba_ssm's ``selective_scan_fn`` with initial states, a
differentiable last state, packed variable-length batches and a deterministic backward; plus the decode step
``selective_state_update``.

Recurrence (per batch b, channel d, state n; see csrc/scan/scan_params.h):
    Δ_t = softplus(delta_t + delta_bias_d) (or without softplus);  h_t = exp(Δ_t A_dn) h_{t-1} + Δ_t B_nt u_t
    y_t = Σ_n C_nt h_t + D_d u_t;  out_t = y_t · silu(z_t) (or y_t)
Math is float32 (float64 for float64 inputs). The backward sums over batch and channels in a fixed order
(per-task partials, no atomics): two runs give bitwise-equal gradients, on CPU and on CUDA; this is the only
mode, it costs one extra small reduction pass. On CUDA the kernels' plan also depends on whether B, C and dout
rows are 16-byte aligned (the staged kernels need it), so the same values at differently aligned addresses
(e.g. a slice one element in) can differ in the last bits; the allocator's tensors are always aligned.
"""
import torch

from markovkit._checks import check_devices, refuse_forward_ad

__all__ = ["selective_scan", "selective_scan_fn", "selective_state_update"]

CHUNK = 64  # steps between the state checkpoints the forward saves for the backward (kScanChunk)


def _itype(*acts):
    """The activation dtype: the promotion of the given floating tensors."""
    dtype = None
    for t in acts:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def _wtype(itype):
    return torch.float64 if itype == torch.float64 else torch.float32


def _check_real(t, name):
    """Only real floating tensors are taken (mamba_ssm's complex A/B/C are not supported)."""
    if t is not None and not t.is_floating_point():
        raise TypeError(f"{name}: expected a real floating tensor (float32, float16, bfloat16, float64), got {t.dtype}")


def _as(t, dtype, name):
    """t in dtype, contiguous (a real floating tensor)."""
    if t is None:
        return None
    _check_real(t, name)
    return t.to(dtype).contiguous()


def _with_group_axis(X, name, expected, axes):
    """X without its groups axis (one group) -> with it, at dim 1; its shape is checked first against expected
    (when known), so that a wrong one is reported as it was passed."""
    if expected is not None and tuple(X.shape) != expected:
        raise RuntimeError(f"{name}: expected shape {list(expected)} = {axes}, got {list(X.shape)}")
    return X.unsqueeze(1)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, initial_state=None, cu_seqlens=None):
    """The selective scan; same arguments, shapes and results as mamba_ssm's ``selective_scan_fn``.

    u, delta, z: (batch, dim, seqlen); A: (dim, dstate) real, dstate <= 256 (float64 on CUDA: 128; the backward
    on CUDA devices with 99 KB of shared memory per block: 128, float64 64); B, C: (dim, dstate) constant or per
    step (batch, dstate, seqlen) / (batch, groups, dstate, seqlen), both per step with the same groups;
    D, delta_bias: (dim,).
    Activations (u, delta, z, per-step B/C) are promoted to one dtype (float32, float16, bfloat16 or
    float64) and weights to float32 (float64 with float64 activations); out has the activation dtype.

    initial_state: (nseq, dim, dstate), the state before the first step (0 when None); differentiable.
    cu_seqlens: int32 (nseq + 1,) offsets of sequences packed along seqlen (batch must be 1): the state
    restarts at each sequence start, from initial_state[s] or 0; 0 = cu[0] <= cu[1] <= ... <= cu[nseq] =
    seqlen. On CUDA the kernels check that on the device (no host sync): a bad offset fails as a
    device-side assert ("CUDA error: device-side assert triggered" at the next sync, the offending entry
    printed), as torch's indexing ops do.
    Returns out (batch, dim, seqlen), and with return_last_state also last_state (nseq, dim, dstate)
    (nseq = batch without cu_seqlens), which carries gradient.
    """
    refuse_forward_ad("selective_scan", u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                      initial_state=initial_state)
    for name, t in (("A", A), ("B", B), ("C", C)):  # before the shape checks, which complex per-step B, C fail
        _check_real(t, name)
    var_B, var_C = B.dim() >= 3, C.dim() >= 3
    itype = _itype(u, delta, z, B if var_B else None, C if var_C else None)
    wtype = _wtype(itype)
    expected = (u.shape[0], A.shape[1], u.shape[2]) if u.dim() == 3 and A.dim() == 2 else None
    if var_B and B.dim() == 3:
        B = _with_group_axis(B, "B", expected, "(batch, dstate, seqlen)")
    if var_C and C.dim() == 3:
        C = _with_group_axis(C, "C", expected, "(batch, dstate, seqlen)")
    out, last_state, _ = torch.ops.markovkit.selective_scan_fwd(
        _as(u, itype, "u"), _as(delta, itype, "delta"), _as(A, wtype, "A"), _as(B, itype if var_B else wtype, "B"),
        _as(C, itype if var_C else wtype, "C"), _as(D, wtype, "D"), _as(z, itype, "z"),
        _as(delta_bias, wtype, "delta_bias"), bool(delta_softplus), _as(initial_state, wtype, "initial_state"),
        None if cu_seqlens is None else cu_seqlens.contiguous())
    return (out, last_state) if return_last_state else out


selective_scan_fn = selective_scan


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *,
                           state_batch_indices=None):
    """One decode step of the scan: updates ``state`` in place and returns out.

    state: (batch, dim, dstate) float32 (float64 with float64 inputs); x, dt, z: (batch, dim); A: (dim, dstate);
    B, C: (batch, dstate) or (batch, groups, dstate); D, dt_bias: (dim,).
    state <- state * exp(Δ A) + Δ B x with Δ = dt + dt_bias, softplus(dt + dt_bias) with dt_softplus (same
    threshold as the scan);
    out = (Σ_n C state + D x) · silu(z). L steps from h0 equal ``selective_scan(..., initial_state=h0)``.
    As mamba_ssm's: the heads form (state (batch, nheads, headdim, dstate); x, dt, z (batch, nheads, headdim);
    A (nheads, headdim, dstate); D, dt_bias (nheads, headdim); head h reads group h // (nheads / groups)) is the
    channel form over dim = nheads * headdim; a float16 / bfloat16 state (a cache in the model's dtype), or one
    of other strides, is stepped in a float32 copy that is written back (rounded to its dtype; a copy of the
    whole state each call).
    Continuous batching: with state_batch_indices (batch,) int32/int64, state is a cache (rows, dim, dstate) and
    batch element b steps row state_batch_indices[b]; a negative index is a padding slot (out 0, no row touched).
    The non-negative indices must be distinct and < rows (checked; on CUDA by a device-side assert).
    No derivative: a state that autograd tracks is refused (update it under torch.no_grad()).
    """
    heads = x.dim() == 3
    target = state
    if heads:
        state, x, dt, A, D, z, dt_bias = _merge_heads(tuple(x.shape[1:]), state=state, x=x, dt=dt, A=A, D=D, z=z,
                                                      dt_bias=dt_bias)
    itype = _itype(x, dt, z, B, C)
    wtype = _wtype(itype)
    expected = (x.shape[0], A.shape[1]) if x.dim() == 2 and A.dim() == 2 else None
    if B.dim() == 2:
        B = _with_group_axis(B, "B", expected, "(batch, dstate)")
    if C.dim() == 2:
        C = _with_group_axis(C, "C", expected, "(batch, dstate)")
    # a contiguous state (heads merged: a view of it) steps in place; a half one or another's strides in a copy
    half = state.dtype in (torch.float16, torch.bfloat16)
    copy = half or not target.is_contiguous()
    work = state.to(wtype if half else state.dtype).contiguous() if copy else state  # other dtypes: the op refuses
    out = torch.ops.markovkit.selective_state_update(
        work, _as(x, itype, "x"), _as(dt, itype, "dt"), _as(A, wtype, "A"), _as(B, itype, "B"),
        _as(C, itype, "C"), _as(D, wtype, "D"), _as(z, itype, "z"), _as(dt_bias, wtype, "dt_bias"),
        bool(dt_softplus), state_batch_indices)
    if copy:
        target.copy_(work.view(target.shape))
    return out.view(out.shape[0], *target.shape[1:-1]) if heads else out


def _merge_heads(nh, **tensors):
    """mamba_ssm's heads form -> the channel form: each tensor's (nheads, headdim) = nh axes merged, at axis 1 of
    state, x, dt, z and axis 0 of A, D, dt_bias. Returns them in the order given."""
    out = []
    for name, t in tensors.items():
        at = 1 if name in ("state", "x", "dt", "z") else 0
        if t is not None:
            if tuple(t.shape[at:at + 2]) != nh:
                raise RuntimeError(f"{name}: expected (nheads, headdim) = {nh} at axes {at}, {at + 1} (x: (batch, "
                                   f"nheads, headdim)), got shape {list(t.shape)}")
            t = t.flatten(at, at + 1)
        out.append(t)
    return out


def _nseq(u, cu_seqlens):
    return u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@torch.library.register_fake("markovkit::selective_scan_fwd")
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens):
    check_devices("u", u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                  cu_seqlens=cu_seqlens)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    wtype = _wtype(u.dtype)
    n_chunks = (seqlen + CHUNK - 1) // CHUNK
    return (torch.empty_like(u, memory_format=torch.contiguous_format),
            u.new_empty((_nseq(u, cu_seqlens), dim, dstate), dtype=wtype),
            u.new_empty((batch * dim * n_chunks * dstate,), dtype=wtype))  # flat, as the kernel's


@torch.library.register_fake("markovkit::selective_scan_bwd")
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, chunk_states, dout,
      dlast_state):
    check_devices("u", u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                  cu_seqlens=cu_seqlens, chunk_states=chunk_states, dout=dout, dlast_state=dlast_state)
    dim, dstate = A.shape
    wtype = _wtype(u.dtype)
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return (like(u), like(u), like(A), like(B), like(C), u.new_empty((dim,), dtype=wtype),
            like(u) if z is not None else u.new_empty((0,)), u.new_empty((dim,), dtype=wtype),
            u.new_empty((_nseq(u, cu_seqlens), dim, dstate), dtype=wtype))


@torch.library.register_fake("markovkit::selective_state_update")
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices=None):
    check_devices("x", state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                  state_batch_indices=state_batch_indices)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_FWD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "initial_state",
             "cu_seqlens")


def _setup_context(ctx, inputs, output):
    ctx.delta_softplus = inputs[8]
    ctx.has = [t is not None for t in inputs]
    ctx.save_for_backward(*[inputs[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9, 10)], output[2])


def _backward(ctx, dout, dlast_state, _dchunk):
    u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, chunk_states = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = torch.ops.markovkit.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, cu_seqlens, chunk_states,
        dout.contiguous(), None if dlast_state is None else dlast_state.contiguous())
    has = dict(zip(_FWD_ARGS, ctx.has))
    return (du, ddelta, dA, dB, dC, dD if has["D"] else None, dz if has["z"] else None,
            dbias if has["delta_bias"] else None, None, dh0 if has["initial_state"] else None, None)


torch.library.register_autograd("markovkit::selective_scan_fwd", _backward, setup_context=_setup_context)

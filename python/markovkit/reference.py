"""Pure-PyTorch references of every markovkit op: the oracles the tests compare against (run them in
float64) and the eager / compiled peers of the benchmarks. Written for clarity, not speed."""
import torch

# --- philox --------------------------------------------------------------------------------------------
# (the stream is checked bit by bit against markovkit._C.philox4x32_10 in tests/test_philox.py)

# --- scan ----------------------------------------------------------------------------------------------


def _expand_groups(X, dim):
    """(batch, groups, dstate, seqlen) -> (batch, dim, dstate, seqlen); (batch, dstate, seqlen) has one group."""
    if X.dim() == 3:
        X = X.unsqueeze(1)
    return X.repeat_interleave(dim // X.shape[1], dim=1)


def _steps(X, dim, seqlen):
    """B or C per step: seqlen tensors (batch, dim, dstate), or the constant (dim, dstate) repeated."""
    if X.dim() == 2:
        return [X] * seqlen
    if X.dim() == 3:
        X = X.unsqueeze(1)
    rep = dim // X.shape[1]
    # unbind: one stack in the backward, not a full-size gradient per step
    return [Xt.repeat_interleave(rep, dim=1) for Xt in X.unbind(-1)]


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, cu_seqlens=None):
    """markovkit.selective_scan as a Python loop over time (float64 when u is float64, else float32)."""
    dtype_in = u.dtype
    f = torch.float64 if u.dtype == torch.float64 else torch.float32
    if cu_seqlens is not None:  # each packed sequence alone, its state starting from initial_state[s] or 0
        outs, lasts = [], []
        bounds = cu_seqlens.tolist()
        for s in range(len(bounds) - 1):
            sl = slice(bounds[s], bounds[s + 1])
            piece = lambda X: X[..., sl] if X is not None and X.dim() >= 3 else X  # noqa: E731
            out, last = selective_scan_ref(
                u[..., sl], delta[..., sl], A, piece(B), piece(C), D, piece(z), delta_bias, delta_softplus,
                True, None if initial_state is None else initial_state[s:s + 1])
            outs.append(out)
            lasts.append(last)
        out, last = torch.cat(outs, dim=-1), torch.cat(lasts, dim=0)
        return (out, last) if return_last_state else out
    batch, dim, seqlen = u.shape
    u, delta, A = u.to(f), delta.to(f), A.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)  # threshold 20, as the kernels
    Bs, Cs = _steps(B.to(f), dim, seqlen), _steps(C.to(f), dim, seqlen)
    h = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(f)
    dts, us = delta.unsqueeze(-1).unbind(2), u.unsqueeze(-1).unbind(2)
    ys = []
    for t in range(seqlen):
        h = torch.exp(dts[t] * A) * h + dts[t] * Bs[t] * us[t]
        ys.append((h * Cs[t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u * D.to(f)[:, None]
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(f))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step; updates state in place and returns out (x: (batch, dim); B, C: (batch, [groups,] dstate))."""
    f = state.dtype
    dim = x.shape[1]
    dt = dt.to(f)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f)
    if dt_softplus:
        dt = torch.nn.functional.softplus(dt)
    Bx = _expand_groups(B.to(f)[..., None], dim)[..., 0] if B.dim() == 3 else B.to(f)[:, None, :]
    Cx = _expand_groups(C.to(f)[..., None], dim)[..., 0] if C.dim() == 3 else C.to(f)[:, None, :]
    xf = x.to(f)
    state.copy_(state * torch.exp(dt[..., None] * A.to(f)) + (dt * xf)[..., None] * Bx)
    y = (state * Cx).sum(-1)
    if D is not None:
        y = y + D.to(f) * xf
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(f))
    return y.to(x.dtype)

# --- attention -----------------------------------------------------------------------------------------

# --- mafbm ---------------------------------------------------------------------------------------------

# --- mjp -----------------------------------------------------------------------------------------------

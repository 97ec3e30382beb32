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


def selective_scan_materialized_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                    return_last_state=False):
    """The classic Mamba reference algorithm, the eager peer of the benchmarks (what users run without the
    kernel): exp(Δ A) and Δ B u materialised at (batch, dim, seqlen, dstate), then a Python loop over time.
    Same semantics as selective_scan_ref (no initial_state / cu_seqlens); float32 math."""
    dtype_in = u.dtype
    batch, dim, seqlen = u.shape
    u, delta, A = u.float(), delta.float(), A.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)
    # per step: (batch, dim, seqlen, dstate); constant: (dim, 1, dstate)
    per_step = lambda X: _expand_groups(X.float(), dim).transpose(2, 3) if X.dim() >= 3 else X.float()[:, None]  # noqa: E731
    Bx, Cx = per_step(B), per_step(C)
    deltaA = torch.exp(delta[..., None] * A[:, None, :])
    deltaB_u = delta[..., None] * Bx * u[..., None]
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(seqlen):
        h = deltaA[:, :, t] * h + deltaB_u[:, :, t]
        ys.append((h * (Cx[:, :, t] if C.dim() >= 3 else Cx[:, 0])).sum(-1))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * torch.nn.functional.silu(z.float())
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_batch_indices=None):
    """One decode step; updates state in place and returns out (x: (batch, dim); B, C: (batch, [groups,] dstate));
    with state_batch_indices (batch,), element b steps state row state_batch_indices[b] (negative: out 0)."""
    if state_batch_indices is not None:
        rows = state_batch_indices.long()
        live = rows >= 0
        cache = state
        state = cache[rows.clamp_min(0)]
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
    if state_batch_indices is not None:
        cache[rows[live]] = state[live]
        y = torch.where(live[:, None], y, 0)
    return y.to(x.dtype)

# --- attention -----------------------------------------------------------------------------------------


def sliding_window_mask(seqlen: int, window: int, sink: int = 0, device=None) -> torch.Tensor:
    """(seqlen, seqlen) bool: query i sees key j iff j <= i and (i - j < window or j < sink)."""
    i = torch.arange(seqlen, device=device)[:, None]
    j = torch.arange(seqlen, device=device)[None, :]
    return (j <= i) & ((i - j < window) | (j < sink))


def sliding_window_attention(q, k, v, window: int, sink: int = 0, softmax_scale=None):
    """Dense masked softmax attention, computed in q's dtype (pass float64 for an oracle).

    q: (batch, seqlen, heads, headdim), k, v: (batch, seqlen, kv_heads, headdim). Returns out like q and
    lse: (batch, heads, seqlen) in float32 (float64 for float64 inputs)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    allowed = sliding_window_mask(q.shape[1], window, sink, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", torch.exp(scores - lse[..., None]), v)
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, lse.to(stat)


def bmojo_f_attention(q, k, v, kf, vf, window: int, softmax_scale=None):
    """One dense softmax over the concatenated scores of q against k (keys i - window < j <= i) and kf
    (keys i - 2 window < j <= i - window), computed in q's dtype. Returns out like q and lse (batch, heads, seqlen)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    group, seqlen = q.shape[2] // k.shape[2], q.shape[1]
    keys = torch.cat([k, kf], dim=1).repeat_interleave(group, dim=2)  # (batch, 2 seqlen, heads, headdim)
    values = torch.cat([v, vf], dim=1).repeat_interleave(group, dim=2)
    i = torch.arange(seqlen, device=q.device)[:, None]
    j = torch.arange(seqlen, device=q.device)[None, :]
    allowed = torch.cat([(j <= i) & (i - j < window), (j <= i - window) & (i - j < 2 * window)], dim=1)
    scores = (torch.einsum("bihd,bjhd->bhij", q, keys) * scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", torch.exp(scores - lse[..., None]), values)
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, lse.to(stat)

# --- mafbm ---------------------------------------------------------------------------------------------

def mafbm_step(x, y, drift, diffusion, omega, drop, phi, factor, dt, control=None, noise=None):
    """One augmented MA-fBM step with given noise (paths, dims, R): the oracle of markovkit::mafbm_step.

    dy = −drop·y + phi·u + factor @ z; y' = y + dy; x' = x + b dt + σ ω·dy; kl = ½ dt Σ_dims u².
    """
    u = torch.zeros_like(x) if control is None else control
    dy = -drop * y + phi * u[..., None] + noise @ factor.T
    x_next = x + drift * dt + diffusion * (dy @ omega)
    return x_next, y + dy, 0.5 * dt * (u * u).sum(-1)


def mafbm_simulate(x0, n_steps, dt, omega, drop, factor, y0, theta=0.0, mu=0.0, sigma=1.0, save_every=1,
                   generator=None):
    """Fractional OU paths by an eager loop of torch ops (the benchmark's reference), noise from torch.randn.

    x0: (paths,), y0: (paths, K) or None (zeros); omega, drop: (K,), factor: (K, R). -> (paths, n_saved).
    """
    y = x0.new_zeros(x0.shape[0], len(omega)) if y0 is None else y0
    x, saved = x0, [x0]
    for n in range(n_steps):
        z = torch.randn(x0.shape[0], factor.shape[1], dtype=x0.dtype, device=x0.device, generator=generator)
        dy = z @ factor.T - drop * y
        y = y + dy
        x = x + theta * (mu - x) * dt + sigma * (dy @ omega)
        if (n + 1) % save_every == 0:
            saved.append(x)
    return torch.stack(saved, 1)


# --- mjp -----------------------------------------------------------------------------------------------


def mjp_ctmc_direct(Q: torch.Tensor, x0: torch.Tensor, t_grid: torch.Tensor, generator=None) -> torch.Tensor:
    """Gillespie's direct method for CTMCs, vectorised over all paths in eager PyTorch (one loop iteration
    per jump of the slowest path; the pattern of NeuralMJP's generator). Q: (processes, S, S) off-diagonal
    rates (diagonal ignored), x0: (processes, paths) states, t_grid: (L,) -> states (processes, paths, L)
    int64, the state entered at the last jump at or before each grid time."""
    B, S, _ = Q.shape
    off = Q.double().masked_fill(torch.eye(S, dtype=torch.bool, device=Q.device), 0)
    exit_rates = off.sum(-1)  # (B, S)
    cum = off.cumsum(-1) / exit_rates.clamp_min(1e-300).unsqueeze(-1)  # (B, S, S) jump-chain CDF rows
    b = torch.arange(B, device=Q.device).unsqueeze(1).expand_as(x0)  # (B, P)
    grid = t_grid.double()
    x = x0.long()
    t = torch.zeros(x0.shape, dtype=torch.float64, device=Q.device)
    out = x.unsqueeze(-1).expand(*x.shape, grid.numel()).clone()  # (B, P, L)
    horizon = grid.max() if grid.numel() else 0.0
    while True:
        u = torch.rand((2,) + x.shape, dtype=torch.float64, device=Q.device, generator=generator)
        t = t - torch.log1p(-u[0]) / exit_rates[b, x]  # exit rate 0: +inf, never jumps again
        if not bool((t <= horizon).any()):
            return out
        x = (cum[b, x] <= u[1].unsqueeze(-1)).sum(-1).clamp_max(S - 1)
        out = torch.where(grid >= t.unsqueeze(-1), x.unsqueeze(-1), out)


def mjp_reactions_direct(reactants: torch.Tensor, products: torch.Tensor, rates: torch.Tensor, x0: torch.Tensor,
                         t_grid: torch.Tensor, generator=None) -> torch.Tensor:
    """Gillespie's direct method for mass-action networks, vectorised over all paths in eager PyTorch.
    reactants, products: (R, N); rates: (processes, R) or (R,); x0: (processes, paths, N); t_grid: (L,)
    -> counts (processes, paths, L, N) int64 (propensity k_r prod_s C(x_s, reactants[r, s]))."""
    B, P, N = x0.shape
    alpha, nu = reactants.long(), (products - reactants).long()  # (R, N)
    k = rates.double().expand(B, -1).unsqueeze(1)  # (B, 1, R)
    grid = t_grid.double()
    horizon = grid.max() if grid.numel() else 0.0
    x = x0.long()
    t = torch.zeros(B, P, dtype=torch.float64, device=x0.device)
    out = x.unsqueeze(2).expand(B, P, grid.numel(), N).clone()
    while True:
        a = k.expand(B, P, -1).clone()  # (B, P, R) propensities
        for m in range(int(alpha.max()) if alpha.numel() else 0):
            factor = ((x.unsqueeze(2) - m).clamp_min(0) / (m + 1)).double()  # (B, P, 1, N)
            a = a * torch.where(alpha > m, factor, torch.ones_like(factor)).prod(-1)
        a0 = a.sum(-1)
        u = torch.rand((2, B, P), dtype=torch.float64, device=x0.device, generator=generator)
        t = t - torch.log1p(-u[0]) / a0  # a0 = 0: +inf, never fires again
        active = t <= horizon
        if not bool(active.any()):
            return out
        r = (a.cumsum(-1) <= (u[1] * a0).unsqueeze(-1)).sum(-1).clamp_max(a.shape[-1] - 1)
        x = torch.where(active.unsqueeze(-1), x + nu[r], x)
        out = torch.where((grid >= t.unsqueeze(-1)).unsqueeze(-1), x.unsqueeze(2), out)

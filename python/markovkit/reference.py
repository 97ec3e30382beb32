"""Pure-PyTorch references of every markovkit op: the oracles the tests compare against (run them in
float64) and the eager / compiled peers of the benchmarks. Written for clarity, not speed."""
import torch

# --- philox --------------------------------------------------------------------------------------------
# (the stream is checked bit by bit against markovkit._C.philox4x32_10 in tests/test_philox.py)

# --- scan ----------------------------------------------------------------------------------------------

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

# --- mafbm ---------------------------------------------------------------------------------------------

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

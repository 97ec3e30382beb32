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

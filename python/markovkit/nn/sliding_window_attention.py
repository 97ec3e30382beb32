"""SlidingWindowAttention: q/k/v projections, optional rotary embedding, markovkit's sliding-window op,
output projection."""
import torch
from torch import nn

from markovkit.attention import HEADDIMS, sliding_window_attention


def rotary_embedding(x: torch.Tensor, base: float = 10000.0, *, offset: int = 0) -> torch.Tensor:
    """Rotary position embedding (rotate-half convention) of x: (batch, seqlen, heads, headdim) at positions
    offset .. offset + seqlen-1 (offset an int or a 0-dim integer tensor on x's device): channel pairs
    (c, c + headdim/2) turn by the angle pos * base^(-2c/headdim), so that rotated q·k depends on the positions only
    through their difference."""
    seqlen, headdim = x.shape[1], x.shape[-1]
    half = headdim // 2
    dtype = torch.promote_types(x.dtype, torch.float32)  # angles in float32 at least
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=dtype) * 2 / headdim)
    positions = (torch.arange(seqlen, device=x.device) + offset).to(dtype)  # summed exactly, then rounded
    angle = positions[:, None] * inv_freq  # (seqlen, half)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]  # (seqlen, 1, half)
    x1, x2 = x[..., :half].to(dtype), x[..., half:].to(dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def _head_dim(dim, heads, kv_heads, headdim):
    """The head dim, given or dim // heads, after checking it and the head counts against what the op takes."""
    if heads < 1:
        raise ValueError(f"heads: expected >= 1, got {heads}")
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(f"kv_heads: expected a positive divisor of heads = {heads}, got {kv_heads}")
    derived = ""
    if headdim is None:
        if dim % heads != 0:
            raise ValueError(f"dim: expected a multiple of heads = {heads} (headdim = dim // heads), got {dim}")
        headdim, derived = dim // heads, f" (dim // heads = {dim} // {heads})"
    if headdim not in HEADDIMS:  # all even, as rotary's channel pairs need
        raise ValueError(f"headdim: expected one of {HEADDIMS}, got {headdim}{derived}")
    return headdim


def _config(dim, heads, kv_heads, headdim, window):
    """(kv_heads, headdim): kv_heads defaults to heads, headdim to dim // heads; both and window checked."""
    kv_heads = heads if kv_heads is None else kv_heads
    headdim = _head_dim(dim, heads, kv_heads, headdim)
    if window < 1:
        raise ValueError(f"window: expected >= 1 (positions seen including self), got {window}")
    return kv_heads, headdim


def _add_projections(module, dim, bias, factory):
    """module.q_proj, k_proj, v_proj (dim -> heads / kv_heads x headdim) and out_proj (back to dim)."""
    heads, kv_heads, headdim = module.heads, module.kv_heads, module.headdim
    module.q_proj = nn.Linear(dim, heads * headdim, bias=bias, **factory)
    module.k_proj = nn.Linear(dim, kv_heads * headdim, bias=bias, **factory)
    module.v_proj = nn.Linear(dim, kv_heads * headdim, bias=bias, **factory)
    module.out_proj = nn.Linear(heads * headdim, dim, bias=bias, **factory)


class SlidingWindowAttention(nn.Module):
    """Causal self-attention of each position over its last `window` positions (and the first `sink`).

    x: (batch, seqlen, dim) -> (batch, seqlen, dim). heads query heads share kv_heads key/value heads
    (GQA; default kv_heads = heads); headdim defaults to dim // heads (dim a multiple of heads) and must be 32,
    64, 96, 128 or 256; window >= 1, sink >= 0. A bad configuration raises ValueError here, not in forward.
    """

    def __init__(self, dim: int, heads: int, window: int, *, kv_heads=None, headdim=None, sink: int = 0,
                 rotary: bool = True, rotary_base: float = 10000.0, bias: bool = False, device=None, dtype=None):
        super().__init__()
        kv_heads, headdim = _config(dim, heads, kv_heads, headdim, window)
        if sink < 0:
            raise ValueError(f"sink: expected >= 0, got {sink}")
        self.heads, self.kv_heads, self.headdim = heads, kv_heads, headdim
        self.window, self.sink, self.rotary, self.rotary_base = window, sink, rotary, rotary_base
        _add_projections(self, dim, bias, dict(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.heads, self.headdim)
        k = self.k_proj(x).view(batch, seqlen, self.kv_heads, self.headdim)
        v = self.v_proj(x).view(batch, seqlen, self.kv_heads, self.headdim)
        if self.rotary:
            q, k = rotary_embedding(q, self.rotary_base), rotary_embedding(k, self.rotary_base)
        out = sliding_window_attention(q, k, v, self.window, sink=self.sink)
        return self.out_proj(out.reshape(batch, seqlen, self.heads * self.headdim))

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, headdim={self.headdim}, window={self.window}, "
                f"sink={self.sink}, rotary={self.rotary}")

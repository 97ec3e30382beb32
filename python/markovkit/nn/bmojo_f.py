"""BMojoF: the B'MOJO-F hybrid layer (Zancato et al. 2024): an SSM's output as fading memory, a sliding
window as eidetic memory, one softmax over both."""
import torch
from torch import nn

from markovkit.attention import bmojo_f_attention
from markovkit.nn.mamba import Mamba
from markovkit.nn.sliding_window_attention import _head_dim, rotary_embedding


class BMojoF(nn.Module):
    """x: (batch, seqlen, dim) -> (batch, seqlen, dim). Fading tokens f = mixer(x); q, k, v project x and the
    same k, v projections give the fading kf, vf from f (tied weights); rotary embeddings at absolute positions;
    position i attends the in-context keys i - window < j <= i and the fading keys i - 2 window < j <= i - window
    in one softmax (:func:`markovkit.bmojo_f_attention`); output projection.

    mixer: a module (batch, seqlen, dim) -> (batch, seqlen, dim), default ``Mamba(dim)``. heads, kv_heads (GQA,
    default heads), headdim (default dim // heads; 32, 64, 96, 128 or 256) as in :class:`SlidingWindowAttention`;
    window >= 1. A bad configuration raises ValueError here, not in forward.
    """

    def __init__(self, dim: int, heads: int, window: int, *, kv_heads=None, headdim=None, mixer=None,
                 rotary: bool = True, rotary_base: float = 10000.0, bias: bool = False, device=None, dtype=None):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        headdim = _head_dim(dim, heads, kv_heads, headdim)
        if window < 1:
            raise ValueError(f"window: expected >= 1 (positions seen including self), got {window}")
        factory = dict(device=device, dtype=dtype)
        self.heads, self.kv_heads, self.headdim = heads, kv_heads, headdim
        self.window, self.rotary, self.rotary_base = window, rotary, rotary_base
        self.mixer = Mamba(dim, **factory) if mixer is None else mixer
        self.q_proj = nn.Linear(dim, heads * headdim, bias=bias, **factory)
        self.k_proj = nn.Linear(dim, kv_heads * headdim, bias=bias, **factory)
        self.v_proj = nn.Linear(dim, kv_heads * headdim, bias=bias, **factory)
        self.out_proj = nn.Linear(heads * headdim, dim, bias=bias, **factory)

    def _keys_values(self, x):
        """x: (batch, seqlen, dim) -> k, v: (batch, seqlen, kv_heads, headdim), k rotated."""
        shape = (*x.shape[:2], self.kv_heads, self.headdim)
        k, v = self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        return (rotary_embedding(k, self.rotary_base) if self.rotary else k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.heads, self.headdim)
        if self.rotary:
            q = rotary_embedding(q, self.rotary_base)
        k, v = self._keys_values(x)
        kf, vf = self._keys_values(self.mixer(x))
        out = bmojo_f_attention(q, k, v, kf, vf, self.window)
        return self.out_proj(out.reshape(batch, seqlen, self.heads * self.headdim))

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, headdim={self.headdim}, window={self.window}, "
                f"rotary={self.rotary}")

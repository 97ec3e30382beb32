"""BMojoF: the B'MOJO-F hybrid layer (Zancato et al. 2024): an SSM's output as fading memory, a sliding
window as eidetic memory, one softmax over both; a one-token ``step`` for decoding."""
from dataclasses import dataclass

import torch
from torch import nn

from markovkit.attention import bmojo_f_attention
from markovkit.nn.mamba import Mamba
from markovkit.nn.sliding_window_attention import _add_projections, _config, rotary_embedding


@dataclass
class BMojoFCache:
    """What one BMojoF layer keeps while decoding a batch: the mixer's states, ring buffers of the last `window`
    in-context keys / values and of the last 2 `window` fading ones (slot = position mod size; a fading key is
    seen window .. 2 window - 1 positions after its own), and the position of the next token."""
    mixer: tuple
    k: torch.Tensor   # (batch, window, kv_heads, headdim), rotated
    v: torch.Tensor   # (batch, window, kv_heads, headdim)
    kf: torch.Tensor  # (batch, 2 window, kv_heads, headdim), rotated
    vf: torch.Tensor  # (batch, 2 window, kv_heads, headdim)
    position: torch.Tensor  # (), int64, on the buffers' device: a tensor, so that a compiled step is one graph


class BMojoF(nn.Module):
    """x: (batch, seqlen, dim) -> (batch, seqlen, dim). Fading tokens f = mixer(x); q, k, v project x and the
    same k, v projections give the fading kf, vf from f (tied weights); rotary embeddings at absolute positions;
    position i attends the in-context keys i - window < j <= i and the fading keys i - 2 window < j <= i - window
    in one softmax (:func:`markovkit.bmojo_f_attention`); output projection.

    mixer: a module (batch, seqlen, dim) -> (batch, seqlen, dim), default ``Mamba(dim)``. heads, kv_heads (GQA,
    default heads), headdim (default dim // heads; 32, 64, 96, 128 or 256) as in :class:`SlidingWindowAttention`;
    window >= 1. A bad configuration raises ValueError here, not in forward.

    Decoding: ``cache = allocate_inference_cache(batch_size)``, then ``step(x_t, cache)`` per token
    (x_t: (batch, 1, dim)) gives what ``forward`` gives at that position; memory O(window). The mixer must then
    have ``allocate_inference_cache(batch_size, dtype=...)`` and ``step(x_t, *states) -> (out, *states)`` (as
    ``Mamba`` and mamba_ssm's).
    """

    def __init__(self, dim: int, heads: int, window: int, *, kv_heads=None, headdim=None, mixer=None,
                 rotary: bool = True, rotary_base: float = 10000.0, bias: bool = False, device=None, dtype=None):
        super().__init__()
        kv_heads, headdim = _config(dim, heads, kv_heads, headdim, window)
        factory = dict(device=device, dtype=dtype)
        self.heads, self.kv_heads, self.headdim = heads, kv_heads, headdim
        self.window, self.rotary, self.rotary_base = window, rotary, rotary_base
        self.mixer = Mamba(dim, **factory) if mixer is None else mixer
        _add_projections(self, dim, bias, factory)

    def _rotate(self, x, offset=0):
        return rotary_embedding(x, self.rotary_base, offset=offset) if self.rotary else x

    def _queries(self, x, offset=0):
        """x: (batch, seqlen, dim) at positions offset.. -> q: (batch, seqlen, heads, headdim), rotated."""
        return self._rotate(self.q_proj(x).view(*x.shape[:2], self.heads, self.headdim), offset)

    def _keys_values(self, x, offset=0):
        """x: (batch, seqlen, dim) at positions offset.. -> k, v: (batch, seqlen, kv_heads, headdim), k rotated."""
        shape = (*x.shape[:2], self.kv_heads, self.headdim)
        return self._rotate(self.k_proj(x).view(shape), offset), self.v_proj(x).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        k, v = self._keys_values(x)
        kf, vf = self._keys_values(self.mixer(x))
        out = bmojo_f_attention(self._queries(x), k, v, kf, vf, self.window)
        return self.out_proj(out.reshape(batch, seqlen, self.heads * self.headdim))

    def allocate_inference_cache(self, batch_size: int, max_seqlen=None, dtype=None) -> BMojoFCache:
        """An empty cache (position 0); keys and values in dtype (default the projections' dtype). max_seqlen is
        unused (the ring buffers hold 3 windows whatever the length), as in Mamba's signature."""
        w = self.k_proj.weight
        dtype = dtype or w.dtype
        buffers = [torch.zeros(batch_size, n * self.window, self.kv_heads, self.headdim, device=w.device,
                               dtype=dtype) for n in (1, 1, 2, 2)]
        position = torch.zeros((), dtype=torch.long, device=w.device)
        return BMojoFCache(self.mixer.allocate_inference_cache(batch_size, dtype=dtype), *buffers, position)

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: BMojoFCache) -> torch.Tensor:
        """x: (batch, 1, dim), the token at position cache.position -> (batch, 1, dim); cache updated in place.
        The position is a tensor, slots and rotary angles are computed from it on the device: torch.compile of
        step makes one graph for every position."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"x: expected shape (batch, 1, dim), one token, got {tuple(x.shape)}")
        t, w = cache.position, self.window
        if x.shape[0] != cache.k.shape[0]:
            raise ValueError(f"x: expected the cache's batch size {cache.k.shape[0]}, got {x.shape[0]}")
        k, v = self._keys_values(x, t)
        kf, vf = self._keys_values(self.mixer.step(x, *cache.mixer)[0], t)
        slot, fading_slot = (t % w).view(1), (t % (2 * w)).view(1)
        for buffer, index, new in ((cache.k, slot, k), (cache.v, slot, v), (cache.kf, fading_slot, kf),
                                   (cache.vf, fading_slot, vf)):
            buffer.index_copy_(1, index, new.to(buffer.dtype))
        seen = t - w + 1 + torch.arange(w, device=x.device)  # in-context positions; fading ones: seen - w
        keys = torch.cat([cache.k[:, seen % w], cache.kf[:, (seen - w) % (2 * w)]], dim=1)  # (batch, 2w, ...)
        values = torch.cat([cache.v[:, seen % w], cache.vf[:, (seen - w) % (2 * w)]], dim=1)
        visible = torch.cat([seen >= 0, seen - w >= 0])  # (2w,): positions before 0 are empty slots
        out = _attend(self._queries(x, t), keys, values, visible)
        cache.position.add_(1)
        return self.out_proj(out.reshape(x.shape[0], 1, self.heads * self.headdim))

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, headdim={self.headdim}, window={self.window}, "
                f"rotary={self.rotary}")


def _attend(q, keys, values, visible):
    """Softmax attention of q: (batch, 1, heads, headdim) over keys, values: (batch, n, kv_heads, headdim) where
    visible (n,) is true, in float32 at least -> (batch, 1, heads, headdim) in q's dtype."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[2] // keys.shape[2]
    keys, values = keys.repeat_interleave(group, dim=2).to(dtype), values.repeat_interleave(group, dim=2).to(dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), keys) * q.shape[-1] ** -0.5
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, values).to(q.dtype)

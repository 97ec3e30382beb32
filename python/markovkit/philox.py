"""The Philox4x32-10 counter-based stream that every randomized markovkit kernel draws from."""
import numbers

import torch


def check_seed(seed, fn: str) -> int:
    """seed, checked as the stream's 64-bit key: an int in [-2**63, 2**63) (a negative seed is its two's
    complement); TypeError / ValueError naming fn, the caller, otherwise."""
    expected = f"{fn}: seed: expected an int in [-2**63, 2**63) (the 64-bit Philox key)"
    if not isinstance(seed, (int, numbers.Integral, torch.SymInt)):  # int first: a fast exact match
        raise TypeError(f"{expected}, got {type(seed).__name__} {seed!r}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"{expected}, got {seed}")
    return seed


def philox_uniform(shape, seed: int, offset: int = 0, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Uniforms in the open interval (0, 1); flat element i is stream element ``offset + i`` of ``seed``.

    float32 is (k + 1/2) 2^-23 with k the top 23 bits of one 32-bit Philox word, float64 (k + 1/2) 2^-52
    with k the top 52 bits of two words: never 0, never 1. CPU and CUDA
    give bitwise-equal values, and ``offset=n`` continues a stream of which n values were drawn.
    """
    like = torch.empty(shape, dtype=dtype, device=device)
    return torch.ops.markovkit.philox_uniform(like, check_seed(seed, "philox_uniform"), offset)


def philox_normal(shape, seed: int, offset: int = 0, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normals by Box-Muller on the same stream; element i depends only on (seed, offset + i)."""
    like = torch.empty(shape, dtype=dtype, device=device)
    return torch.ops.markovkit.philox_normal(like, check_seed(seed, "philox_normal"), offset)


@torch.library.register_fake("markovkit::philox_uniform")
def _(like, seed, offset=0):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


@torch.library.register_fake("markovkit::philox_normal")
def _(like, seed, offset=0):
    return torch.empty_like(like, memory_format=torch.contiguous_format)

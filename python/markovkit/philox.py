"""The Philox4x32-10 counter-based stream that every randomized markovkit kernel draws from."""
import numbers

import torch


def check_seed(seed, fn: str) -> int:
    """seed, checked as the stream's 64-bit key: an int in [-2**63, 2**63) (a negative seed is its two's
    complement); TypeError / ValueError naming fn, the caller, otherwise."""
    return _check_int(seed, -(2**63), f"{fn}: seed: expected an int in [-2**63, 2**63) (the 64-bit Philox key)")


def check_position(value, name: str, fn: str) -> int:
    """A stream position (offset, step): an int in [0, 2**63); TypeError / ValueError naming fn and name."""
    return _check_int(value, 0, f"{fn}: {name}: expected an int in [0, 2**63)")


def _check_int(value, low: int, expected: str) -> int:
    # int first: a fast exact match; a bool is not taken for 0 or 1
    if isinstance(value, bool) or not isinstance(value, (int, numbers.Integral, torch.SymInt)):
        raise TypeError(f"{expected}, got {type(value).__name__} {value!r}")
    if not low <= value < 2**63:
        raise ValueError(f"{expected}, got {value}")
    return value


def _like(shape, dtype, device, fn: str) -> torch.Tensor:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: dtype: expected torch.float32 or torch.float64, got {dtype}")
    return torch.empty(shape, dtype=dtype, device=device)


def philox_uniform(shape, seed: int, offset: int = 0, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Uniforms in the open interval (0, 1); flat element i is stream element ``offset + i`` of ``seed``.

    float32 is (k + 1/2) 2^-23 with k the top 23 bits of one 32-bit Philox word, float64 (k + 1/2) 2^-52
    with k the top 52 bits of two words: never 0, never 1. CPU and CUDA
    give bitwise-equal values, and ``offset=n`` continues a stream of which n values were drawn.
    """
    return torch.ops.markovkit.philox_uniform(_like(shape, dtype, device, "philox_uniform"),
                                              check_seed(seed, "philox_uniform"),
                                              check_position(offset, "offset", "philox_uniform"))


def philox_normal(shape, seed: int, offset: int = 0, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normals by Box-Muller on the same stream; element i depends only on (seed, offset + i)."""
    return torch.ops.markovkit.philox_normal(_like(shape, dtype, device, "philox_normal"),
                                             check_seed(seed, "philox_normal"),
                                             check_position(offset, "offset", "philox_normal"))


@torch.library.register_fake("markovkit::philox_uniform")
def _(like, seed, offset=0):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


@torch.library.register_fake("markovkit::philox_normal")
def _(like, seed, offset=0):
    return torch.empty_like(like, memory_format=torch.contiguous_format)

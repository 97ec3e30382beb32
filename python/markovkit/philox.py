"""The Philox4x32-10 counter-based stream that every randomized markovkit kernel draws from."""
import torch


def philox_uniform(shape, seed: int, offset: int = 0, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Uniforms in the open interval (0, 1); flat element i is stream element ``offset + i`` of ``seed``.

    float32 is (k + 1/2) 2^-23 with k the top 23 bits of one 32-bit Philox word, float64 (k + 1/2) 2^-52
    with k the top 52 bits of two words: never 0, never 1. CPU and CUDA
    give bitwise-equal values, and ``offset=n`` continues a stream of which n values were drawn.
    """
    like = torch.empty(shape, dtype=dtype, device=device)
    return torch.ops.markovkit.philox_uniform(like, seed, offset)


def philox_normal(shape, seed: int, offset: int = 0, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normals by Box-Muller on the same stream; element i depends only on (seed, offset + i)."""
    like = torch.empty(shape, dtype=dtype, device=device)
    return torch.ops.markovkit.philox_normal(like, seed, offset)


@torch.library.register_fake("markovkit::philox_uniform")
def _(like, seed, offset=0):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


@torch.library.register_fake("markovkit::philox_normal")
def _(like, seed, offset=0):
    return torch.empty_like(like, memory_format=torch.contiguous_format)

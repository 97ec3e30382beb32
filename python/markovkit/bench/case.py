"""What a benchmark case is, and the registry the case modules add to."""
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch


@dataclass
class Case:
    """One workload. Every callable takes no arguments: inputs are built when the case is made.

    bytes/flops are the minimal memory traffic / arithmetic of one call of `ours` (for the roofline
    fraction); `rate` is (work per call, unit) for the op's natural rate, e.g. (paths * steps, "paths·steps").
    """

    family: str
    name: str
    shape: str
    dtype: torch.dtype
    ours: Callable[[], object]
    reference: Optional[Callable[[], object]] = None
    peers: dict = field(default_factory=dict)  # name -> callable, for peers that are importable
    bytes: float = 0.0
    flops: float = 0.0
    rate: Optional[tuple] = None


_PROVIDERS: dict = {}


def cases(family: str):
    """Decorator: register `fn(device: torch.device, quick: bool) -> Iterable[Case]` under `family`."""

    def register(fn: Callable[[torch.device, bool], Iterable[Case]]):
        _PROVIDERS.setdefault(family, []).append(fn)
        return fn

    return register


def registry() -> dict:
    """family -> list of case providers, after importing every module in markovkit.bench.cases."""
    import importlib
    import pkgutil

    import markovkit.bench.cases as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
    return _PROVIDERS

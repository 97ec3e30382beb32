"""The microbenchmark harness: `python -m markovkit.bench [--quick] [--json PATH] [--family NAME]`.

Each op family adds a module under `markovkit.bench.cases` with functions decorated by `@cases("family")`;
each such function takes `(device, quick)` and yields `Case`s. The harness times our op against the
pure-PyTorch reference (eager, and under torch.compile unless --quick) and every named peer that is
importable, and prints one table.
"""
from markovkit.bench.case import Case, cases, registry

__all__ = ["Case", "cases", "registry"]

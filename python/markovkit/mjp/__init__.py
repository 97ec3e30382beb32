"""Markov jump processes: Gillespie simulators (ops), model systems and exact marginals (systems), and the
FIM-MJP synthetic-data generator (fim)."""
from markovkit.mjp import fim, systems  # noqa: F401  (markovkit.mjp.fim, .systems after import markovkit)
from markovkit.mjp.ops import CtmcEvents, simulate_ctmc, simulate_reactions, state_dtype

__all__ = ["CtmcEvents", "simulate_ctmc", "simulate_reactions", "state_dtype"]

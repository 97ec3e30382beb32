"""torch.nn modules built on markovkit's ops."""
# --- scan ---
from markovkit.nn.mamba import Mamba  # noqa: F401

# --- attention ---

# --- mafbm ---

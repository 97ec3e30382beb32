"""torch.nn modules built on markovkit's ops."""
# --- scan ---

# --- attention ---

# --- mafbm ---
from markovkit.nn.fractional_sde import FractionalSDE  # noqa: F401

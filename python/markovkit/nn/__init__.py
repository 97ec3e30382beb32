"""torch.nn modules built on markovkit's ops."""
# --- scan ---
from markovkit.nn.mamba import Mamba  # noqa: F401

# --- attention ---
from markovkit.nn.sliding_window_attention import SlidingWindowAttention, rotary_embedding  # noqa: F401

# --- hybrid (scan + attention) ---
from markovkit.nn.bmojo_f import BMojoF  # noqa: F401

# --- mafbm ---
from markovkit.nn.fractional_sde import FractionalSDE  # noqa: F401

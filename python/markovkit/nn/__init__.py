"""torch.nn modules built on markovkit's ops."""
# --- scan ---

# --- attention ---
from markovkit.nn.sliding_window_attention import SlidingWindowAttention, rotary_embedding  # noqa: F401

# --- mafbm ---

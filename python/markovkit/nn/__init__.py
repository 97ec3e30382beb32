"""torch.nn modules built on markovkit's ops."""
# --- scan ---

# --- attention ---

# --- mafbm ---

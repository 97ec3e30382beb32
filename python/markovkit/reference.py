"""Pure-PyTorch references of every markovkit op: the oracles the tests compare against (run them in
float64) and the eager / compiled peers of the benchmarks. Written for clarity, not speed."""
import torch

# --- philox --------------------------------------------------------------------------------------------
# (the stream is checked bit by bit against markovkit._C.philox4x32_10 in tests/test_philox.py)

# --- scan ----------------------------------------------------------------------------------------------

# --- attention -----------------------------------------------------------------------------------------

# --- mafbm ---------------------------------------------------------------------------------------------

# --- mjp -----------------------------------------------------------------------------------------------

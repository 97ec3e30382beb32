"""markovkit: CUDA/C++ torch ops for finite-memory (Markov) realizations of sequences and processes."""
import torch

from markovkit._build_config import TORCH_VERSION as _BUILT_AGAINST

if torch.__version__ != _BUILT_AGAINST:
    raise ImportError(
        f"markovkit was built against torch {_BUILT_AGAINST} but torch {torch.__version__} is installed; "
        "rebuild it against this torch from the source tree: pip install --no-build-isolation --no-deps "
        "--force-reinstall ."
    )

from markovkit import _C  # noqa: E402  (loads the library: registers torch.ops.markovkit)
from markovkit.philox import philox_normal, philox_uniform  # noqa: E402

# --- scan ---
from markovkit.scan import selective_scan, selective_scan_fn, selective_state_update  # noqa: E402

# --- attention ---
from markovkit.attention import bmojo_f_attention, merge_attention, sliding_window_attention  # noqa: E402

# --- mafbm ---
from markovkit import fbm  # noqa: E402
from markovkit.mafbm import mafbm_simulate, mafbm_step, step_coefficients  # noqa: E402

# --- mjp ---
from markovkit.mjp import CtmcEvents, simulate_ctmc, simulate_reactions  # noqa: E402

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """Facts of this build: version, torch built against, CUDA compiled or not, CUDA archs, CUDA emulation."""
    return dict(_C.build_info())


from markovkit import nn  # noqa: E402  (modules; after the ops they use)

__all__ = [
    "build_info", "philox_normal", "philox_uniform",
    "selective_scan", "selective_scan_fn", "selective_state_update",
    "bmojo_f_attention", "merge_attention", "sliding_window_attention",
    "fbm", "mafbm_simulate", "mafbm_step", "step_coefficients",
    "CtmcEvents", "simulate_ctmc", "simulate_reactions",
    "nn",
]

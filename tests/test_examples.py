"""The examples run (a few iterations each, in a fresh process): an API change that breaks them fails here."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script,args,last_words", [
    ("fit_hurst.py", ["--iters", "2", "--sequences", "4", "--samples", "2"], "recovered H ="),
    ("fbm_bridge.py", ["--iters", "2", "--batch", "4", "--eval-paths", "16", "--png", "bridge.png"], "endpoint:"),
    ("mqar.py", ["--steps", "2"], "test accuracy, queries > 2 x 4 positions after their key"),
])
def test_example_runs(script, args, last_words, tmp_path):
    run = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert last_words in run.stdout

"""The package around the ops: the torch-version guard, `python -m markovkit info`, the build's CUDA architectures,
the bench harness."""
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import markovkit


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_import_under_another_torch_fails_with_both_versions():
    code = "import torch; torch.__version__ = '0.0.1'; import markovkit"
    result = _run("-c", code)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert f"built against torch {torch.__version__} but torch 0.0.1 is installed" in result.stderr


def test_info_prints_build_facts():
    result = _run("-m", "markovkit", "info")
    assert result.returncode == 0, result.stderr
    assert f"version: {markovkit.__version__}" in result.stdout
    assert f"torch_version: {torch.__version__}" in result.stdout
    assert f"cpu kernels: {markovkit._C.cpu_isa()} " in result.stdout
    lowered = subprocess.run([sys.executable, "-m", "markovkit", "info"], capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, ATEN_CPU_CAPABILITY="default"))
    assert "cpu kernels: default " in lowered.stdout


def test_build_info_names_the_cuda_architectures():
    info = markovkit.build_info()
    archs = info["cuda_archs"]
    if info["cuda_emulation"]:
        assert archs == "emulated"
    elif info["cuda"]:  # a CMake list, "80;90a" where the default (auto) saw no GPU
        assert all(re.fullmatch(r"\d+a?(-real|-virtual)?", a) for a in archs.split(";")), archs
    else:
        assert archs == ""


def _auto_archs(monkeypatch, capabilities):
    """What cmake/visible_archs.py (MARKOVKIT_CUDA_ARCHS=auto) prints where torch sees GPUs of these capabilities."""
    path = Path(__file__).resolve().parents[1] / "cmake" / "visible_archs.py"
    spec = importlib.util.spec_from_file_location("visible_archs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(capabilities))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main()
    return out.getvalue().strip()


def test_auto_archs_are_the_visible_gpus(monkeypatch):
    assert _auto_archs(monkeypatch, [(9, 0)]) == "90a"
    assert _auto_archs(monkeypatch, [(9, 0), (8, 0), (9, 0)]) == "80;90a"
    assert _auto_archs(monkeypatch, [(12, 0), (8, 6)]) == "86;120"
    assert _auto_archs(monkeypatch, [(7, 5), (8, 9)]) == "89"  # below 8.0: no code the kernels allow


def test_auto_archs_without_a_gpu_cover_ampere_to_hopper(monkeypatch):
    assert _auto_archs(monkeypatch, []) == "80;90a"
    assert _auto_archs(monkeypatch, [(7, 0)]) == "80;90a"


def test_bench_json_has_every_impl_and_consistent_speedups(tmp_path):
    path = tmp_path / "bench.json"
    result = _run("-m", "markovkit.bench", "--quick", "--family", "philox", "--json", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert {(r["case"], r["dtype"], r["impl"]) for r in rows} == {
        (case, dtype, impl)
        for case, impl in [("uniform", "markovkit"), ("uniform", "torch.rand"), ("normal", "markovkit"),
                           ("normal", "torch.randn")]
        for dtype in ["float32", "float64"]
    }
    ours = {(r["case"], r["dtype"]): r["ms"] for r in rows if r["impl"] == "markovkit"}
    for r in rows:
        assert r["ms"] > 0
        assert abs(r["speedup_of_ours"] - r["ms"] / ours[r["case"], r["dtype"]]) < 1e-9
        floor_s = max(r["bytes"] / data["roofline"]["copy_bytes_per_s"],
                      r["flops"] / data["roofline"]["matmul_flops_per_s"])
        assert r["bytes"] > 0 and abs(r["roofline_fraction"] - floor_s / (r["ms"] * 1e-3)) < 1e-9
    assert "markovkit" in result.stdout and "ours x" in result.stdout


def test_ab_table_lines_up_ours_the_bases_and_the_peer(tmp_path):
    """bench/ab_table.py (gpu_check.sh's last table): a case matches across runs without its parenthetical (a build
    time that differs from run to run); ours x is the peer's time over ours; a case a base lacks shows '-'."""
    def write(name, rows):
        keys = ("case", "shape", "dtype", "impl", "ms")
        (tmp_path / name).write_text(json.dumps({"rows": [dict(zip(keys, r), error="") for r in rows]}))

    write("bench_scan.json", [("forward (build 5.0 ms)", "(8,16)", "bfloat16", "markovkit", 2.0),
                              ("forward (build 5.0 ms)", "(8,16)", "bfloat16", "mamba_ssm", 3.0),
                              ("backward", "(8,16)", "bfloat16", "markovkit", 6.0)])
    write("bench_base0_scan.json", [("forward (build 7.5 ms)", "(8,16)", "bfloat16", "markovkit", 4.0)])
    result = _run(str(Path(__file__).parents[1] / "bench" / "ab_table.py"), str(tmp_path), "scan")
    assert result.returncode == 0, result.stderr
    header, forward, backward = result.stdout.splitlines()
    assert header.split() == ["family", "case", "shape", "dtype", "ours", "base0", "peer", "peer", "ms", "ours", "x"]
    assert forward.split() == ["scan", "forward", "(8,16)", "bfloat16", "2.000", "4.000", "mamba_ssm", "3.000",
                               "1.50x"]
    assert backward.split() == ["scan", "backward", "(8,16)", "bfloat16", "6.000", "-", "-", "-", "-"]


def test_bench_rejects_an_unknown_family():
    result = _run("-m", "markovkit.bench", "--quick", "--family", "nope")
    assert result.returncode != 0
    assert "unknown family ['nope']" in result.stderr


def test_bench_rejects_a_bad_device_and_an_unwritable_json_path_before_timing(tmp_path):
    result = _run("-m", "markovkit.bench", "--quick", "--device", "gpu")
    assert result.returncode == 2 and "invalid choice: 'gpu'" in result.stderr
    result = _run("-m", "markovkit.bench", "--quick", "--family", "philox", "--json", str(tmp_path / "no" / "x.json"))
    assert result.returncode != 0 and "No such file or directory" in result.stderr
    assert "device:" not in result.stdout  # nothing was timed
    if not torch.cuda.is_available():
        result = _run("-m", "markovkit.bench", "--quick", "--device", "cuda")
        assert result.returncode == 2 and "--device cuda: torch sees no CUDA device" in result.stderr


def test_bench_json_has_null_for_a_failed_impl(tmp_path):
    """A failed impl's NaN figures go to JSON as null (NaN is not JSON), and its row shows '-' for ours x."""
    from markovkit.bench.__main__ import _strict, print_rows

    nan = float("nan")
    row = {"family": "f", "case": "c", "shape": "(2,)", "dtype": "float32", "impl": "peer", "ms": nan,
           "error": "", "rate": "", "speedup_of_ours": nan, "roofline_fraction": None}
    assert json.loads(json.dumps(_strict(row), allow_nan=False)) == dict(row, ms=None, speedup_of_ours=None)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_rows([dict(row, ms=2.0)])
    assert out.getvalue().split()[-1] == "-"


def test_bench_exits_nonzero_when_our_op_fails_not_when_a_peer_does(monkeypatch):
    """CI's bench command and gpu_check judge the bench by its exit status: our op's failure must reach it (it was
    a 'failed' row and exit 0); a peer's (out of memory, a shape it lacks) is reported only."""
    from markovkit.bench import __main__ as bench
    from markovkit.bench.case import Case

    def broken():
        raise RuntimeError("kernel broke")

    def fine():
        return torch.zeros(1)

    def one_case(ours, peer):
        return lambda *args: [Case(family="f", name="c", shape="(1,)", dtype=torch.float32, ours=ours,
                                   peers={"peer": peer}, bytes=4.0)]

    roof = {"copy_bytes_per_s": 1e9, "matmul_flops_per_s": 1e9, "matmul_dtype": torch.float32}
    monkeypatch.setattr(bench, "roofline", lambda device, quick: roof)
    monkeypatch.setattr(sys, "argv", ["python -m markovkit.bench", "--quick", "--device", "cpu"])
    monkeypatch.setattr(bench, "select_cases", one_case(fine, broken))
    bench.main()
    monkeypatch.setattr(bench, "select_cases", one_case(broken, fine))
    with pytest.raises(SystemExit, match=r"markovkit failed in 1 case\(s\): f c \(1,\)"):
        bench.main()


def test_bench_cases_of_each_shape_run_that_shape(monkeypatch):
    """Every case's callables compute the case's own shape (the cases are all built before any is timed, so a
    callable that closed over a loop variable would run the last shape)."""
    from markovkit.bench.cases import attention

    shapes = [(1, 40, 2, 32, 8, torch.float32), (1, 24, 4, 64, 5, torch.float32)]
    monkeypatch.setattr(attention, "_shapes", lambda device, quick: shapes)
    cases = list(attention.attention_cases(torch.device("cpu"), True))
    forwards = [c for c in cases if c.name.startswith("forward") and "backward" not in c.name]
    assert len(forwards) == len(shapes)
    for case, (batch, seqlen, heads, headdim, window, _) in zip(forwards, shapes):
        assert case.shape == f"b={batch} L={seqlen} h={heads} d={headdim} w={window}"
        for fn in [case.ours, case.reference]:
            assert fn().shape == (batch, seqlen, heads, headdim)


def test_all_lists_the_public_names():
    """`from markovkit import *` gives every public function and class the package imports, and fbm and nn."""
    import inspect

    public = {name for name, value in vars(markovkit).items()
              if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))}
    assert public | {"fbm", "nn"} == set(markovkit.__all__)

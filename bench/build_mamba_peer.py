"""Build the scan bench's peer, mamba_ssm's selective scan CUDA extension, from a mamba source checkout kept
outside this repository. Usage: python bench/build_mamba_peer.py MAMBA_SRC OUT

OUT receives `selective_scan_cuda` (sm_90 only, mamba's own nvcc flags) and a minimal `mamba_ssm` package (the
four modules `selective_scan_interface` imports; empty package inits, so its models and their imports stay out).
With OUT on PYTHONPATH the scan bench times `mamba_ssm.ops.selective_scan_interface.selective_scan_fn`.
"""
import os
import shutil
import sys
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

MODULES = ["utils/torch.py", "utils/determinism.py", "ops/selective_scan_interface.py", "ops/triton/layer_norm.py"]
PACKAGES = ["", "utils", "ops", "ops/triton"]


def copy_package(src: Path, out: Path) -> None:
    for pkg in PACKAGES:
        (out / "mamba_ssm" / pkg).mkdir(parents=True, exist_ok=True)
        (out / "mamba_ssm" / pkg / "__init__.py").write_text("")
    for module in MODULES:
        shutil.copy(src / "mamba_ssm" / module, out / "mamba_ssm" / module)


def build_extension(src: Path, out: Path) -> None:
    csrc = src / "csrc" / "selective_scan"
    sources = ["selective_scan.cpp"] + [f"selective_scan_fwd_{d}.cu" for d in ("fp32", "fp16", "bf16")] + [
        f"selective_scan_bwd_{d}_{k}.cu" for d in ("fp32", "fp16", "bf16") for k in ("real", "complex")]
    std = "-std=c++20" if torch.__version__ >= (2, 13) else "-std=c++17"  # newer torch headers need C++20
    nvcc = ["-O3", std, "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
            "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo"]
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    load(name="selective_scan_cuda", sources=[str(csrc / s) for s in sources], extra_cflags=["-O3", std],
         extra_cuda_cflags=nvcc, extra_include_paths=[str(csrc)], build_directory=str(out), verbose=False)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    if not (src / "csrc" / "selective_scan").is_dir():
        raise SystemExit(f"MAMBA_SRC: expected a mamba checkout with csrc/selective_scan, got {src}")
    out.mkdir(parents=True, exist_ok=True)
    copy_package(src, out)
    build_extension(src, out)
    print("peer built:", sorted(p.name for p in out.glob("*.so")))


if __name__ == "__main__":
    main()

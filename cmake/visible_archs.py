"""Prints the CUDA architectures (CMake list) of MARKOVKIT_CUDA_ARCHS=auto: those of the GPUs torch sees now,
compute capability 9.0 as 90a (the attention's wgmma kernels), or 80;90a where it sees none (Ampere and Ada run
the sm_80 code, Hopper its own, newer GPUs JIT-compile the compute_80 PTX). GPUs below 8.0 are left out: the kernels
need 8.0 (bfloat16 mma.sync, cp.async); on such a GPU the ops say so."""
import torch


def arch(major: int, minor: int) -> str:
    return "90a" if (major, minor) == (9, 0) else f"{major}{minor}"


def main() -> None:
    seen = set()
    if torch.cuda.is_available():
        seen = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    archs = [arch(*cc) for cc in sorted(seen) if cc >= (8, 0)]
    print(";".join(archs) if archs else "80;90a")


if __name__ == "__main__":
    main()

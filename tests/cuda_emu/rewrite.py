"""Rewrites a CUDA source into C++ for the CPU emulator (cuda_emu.h): python rewrite.py IN.cu OUT.cpp"""
import re
import sys

# kernel<...><<<grid, block[, smem[, stream]]>>>(args);
#   ->  mk_emu::launch(mk_emu::kernel_id(kernel<...>, "kernel<...>"), grid, block, ...,
#                      [&] { kernel<...>(args); });
LAUNCH = re.compile(r"(?P<kernel>[\w:]+(?:<[^;{}]*?>)?)\s*<<<(?P<config>[^;]*?)>>>\s*\((?P<args>[^;]*?)\)\s*;")
# extern __shared__ [__align__(n)] T name[];  ->  T* name = static_cast<T*>(mk_emu::dynamic_smem());
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(?P<type>[\w:\s]+?)\s+(?P<name>\w+)\[\]\s*;")


def rewrite(text: str) -> str:
    text = LAUNCH.sub(
        lambda m: f"::mk_emu::launch(::mk_emu::kernel_id({m['kernel']}, \"{m['kernel']}\"), {m['config']}, "
        f"[&] {{ {m['kernel']}({m['args']}); }});",
        text,
    )
    return DYNAMIC_SHARED.sub(
        lambda m: f"{m['type']}* {m['name']} = static_cast<{m['type']}*>(::mk_emu::dynamic_smem());", text
    )


def main(src: str, dst: str) -> None:
    with open(src) as f:
        text = f.read()
    if "<<<" in rewrite(text):
        sys.exit(f"rewrite.py: a kernel launch in {src} has a form this script does not know")
    with open(dst, "w") as f:
        f.write(f'#include "cuda_emu.h"\n#line 1 "{src}"\n{rewrite(text)}')


if __name__ == "__main__":
    main(*sys.argv[1:])

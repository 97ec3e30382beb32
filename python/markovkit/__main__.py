"""`python -m markovkit info`: the build facts and the devices torch sees."""
import argparse

import torch

import markovkit


def info() -> None:
    for key, value in markovkit.build_info().items():
        print(f"{key:>14}: {value}")
    print(f"{'torch now':>14}: {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"{'cpu threads':>14}: {torch.get_num_threads()}")
    print(f"{'cpu kernels':>14}: {markovkit._C.cpu_isa()} (ATEN_CPU_CAPABILITY=default|avx2 lowers it)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"{'cuda:' + str(i):>14}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        print(f"{'devices':>14}: no CUDA device visible")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m markovkit")
    parser.add_argument("command", choices=["info"])
    parser.parse_args()
    info()


if __name__ == "__main__":
    main()

"""`python -m markovkit.bench`: time every registered case against its peers on the best device present."""
import argparse
import json
import platform

import torch

from markovkit._progress import Progress
from markovkit.bench.case import registry
from markovkit.bench.timing import median_ms, roofline


def _impls(case, compiled: bool) -> dict:
    """name -> callable: ours first, then the reference (eager, compiled) and the named peers."""
    impls = {"markovkit": case.ours}
    if case.reference is not None:
        impls["reference"] = case.reference
        if compiled:
            impls["reference+compile"] = torch.compile(case.reference)
    impls.update(case.peers)
    return impls


def _rate(case, ms: float) -> str:
    if case.rate is None:
        return ""
    amount, unit = case.rate
    return f"{amount / (ms * 1e-3):.3g} {unit}/s"


def _roof_fraction(case, ms: float, roof: dict) -> float:
    """Best possible time (bytes at copy bandwidth, or FLOPs at the matmul rate) over the measured time."""
    floor_s = max(case.bytes / roof["copy_bytes_per_s"], case.flops / roof["matmul_flops_per_s"])
    return floor_s / (ms * 1e-3)


def run(device: torch.device, quick: bool, families, compiled: bool):
    providers = registry()
    chosen = [f for f in providers if not families or f in families]
    unknown = set(families or []) - set(providers)
    if unknown:
        raise SystemExit(f"unknown family {sorted(unknown)}; registered: {sorted(providers)}")
    all_cases = [c for f in chosen for provide in providers[f] for c in provide(device, quick)]
    roof = roofline(device, quick)
    min_time = 0.1 if quick else 0.5
    rows = []
    with Progress(len(all_cases), "bench") as bar:
        for case in all_cases:
            times = {}
            for name, fn in _impls(case, compiled).items():
                times[name] = median_ms(fn, device, min_time)
            ours = times["markovkit"]
            for name, ms in times.items():
                rows.append({
                    "family": case.family, "case": case.name, "shape": case.shape,
                    "dtype": str(case.dtype).replace("torch.", ""), "impl": name, "ms": ms,
                    "rate": _rate(case, ms), "speedup_of_ours": ms / ours, "bytes": case.bytes, "flops": case.flops,
                    "roofline_fraction": _roof_fraction(case, ms, roof) if (case.bytes or case.flops) else None,
                })
            bar.update(1, f"{case.family} {case.name}")
    return rows, roof


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_table(rows, roof, device_name: str) -> None:
    print(f"device: {device_name}; copy bandwidth {roof['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"matmul {roof['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s ({roof['matmul_dtype']})")
    head = ["family", "case", "shape", "dtype", "impl", "ms", "rate", "ours x", "roof"]
    table = [head]
    for r in rows:
        roof_txt = "" if r["roofline_fraction"] is None else f"{100 * r['roofline_fraction']:.1f}%"
        ours_x = "" if r["impl"] == "markovkit" else f"{r['speedup_of_ours']:.2f}x"
        table.append([r["family"], r["case"], r["shape"], r["dtype"], r["impl"], f"{r['ms']:.3f}",
                      r["rate"], ours_x, roof_txt])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("'ours x': how many times faster markovkit is than that impl; 'roof': the floor time "
          "(bytes at copy bandwidth or FLOPs at matmul rate) over the measured time.")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m markovkit.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, eager peers only (seconds on a CPU)")
    parser.add_argument("--json", metavar="PATH", help="write every figure to PATH")
    parser.add_argument("--family", action="append", help="only this family (repeatable)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows, roof = run(device, args.quick, args.family, compiled=not (args.quick or args.no_compile))
    name = _device_name(device)
    print_table(rows, roof, name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "quick": args.quick, "roofline": roof,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

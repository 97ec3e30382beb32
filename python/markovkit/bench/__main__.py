"""`python -m markovkit.bench`: time every registered case against its peers on the best device present."""
import argparse
import json
import math
import platform
import sys

import torch

from markovkit import _C
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


def _measure(fn, device, min_time: float):
    """(ms, error): an impl that raises (out of memory, a peer's unsupported shape) is reported, not fatal."""
    try:
        return median_ms(fn, device, min_time), ""
    except Exception as e:  # noqa: BLE001 - any failure of one impl must not lose the rest of the table
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        return float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def select_cases(device: torch.device, quick: bool, families) -> list:
    providers = registry()
    unknown = set(families or []) - set(providers)
    if unknown:
        raise SystemExit(f"unknown family {sorted(unknown)}; registered: {sorted(providers)}")
    chosen = [f for f in providers if not families or f in families]
    return [c for f in chosen for provide in providers[f] for c in provide(device, quick)]


def run(all_cases: list, device: torch.device, roof: dict, quick: bool, compiled: bool, emit) -> list:
    """Time every case; `emit(rows)` gets each case's rows as soon as they are measured."""
    min_time = 0.1 if quick else 0.5
    rows = []
    with Progress(len(all_cases), "bench") as bar:
        for case in all_cases:
            measured = {name: _measure(fn, device, min_time) for name, fn in _impls(case, compiled).items()}
            ours = measured["markovkit"][0]
            case_rows = [{
                "family": case.family, "case": case.name, "shape": case.shape,
                "dtype": str(case.dtype).replace("torch.", ""), "impl": name, "ms": ms, "error": error,
                "rate": _rate(case, ms) if not error else "", "speedup_of_ours": ms / ours,
                "bytes": case.bytes, "flops": case.flops,
                "roofline_fraction": _roof_fraction(case, ms, roof) if (case.bytes or case.flops) else None,
            } for name, (ms, error) in measured.items()]
            rows += case_rows
            emit(case_rows)
            bar.update(1, f"{case.family} {case.name}")
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    machine = platform.processor() or platform.machine()
    return f"CPU ({machine}, {torch.get_num_threads()} threads, markovkit's {_C.cpu_isa()} kernels)"


COLUMNS = [("family", 9), ("case", 26), ("shape", 34), ("dtype", 8), ("impl", 26), ("ms", 9), ("rate", 20),
           ("ours x", 8), ("roof", 6)]


def _line(cells) -> str:
    return "  ".join(str(c).ljust(w) for c, (_, w) in zip(cells, COLUMNS)).rstrip()


def print_header(roof, device_name: str) -> None:
    print(f"device: {device_name}; copy bandwidth {roof['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"matmul {roof['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s ({roof['matmul_dtype']})")
    print("'ours x': how many times faster markovkit is than that impl; 'roof': the floor time "
          "(bytes at copy bandwidth or FLOPs at matmul rate) over the measured time.")
    print(_line(name for name, _ in COLUMNS))
    print(_line("-" * w for _, w in COLUMNS), flush=True)


def print_rows(rows) -> None:
    for r in rows:
        if r["error"]:
            print(_line([r["family"], r["case"], r["shape"], r["dtype"], r["impl"], "failed", r["error"]]))
            continue
        roof_txt = "" if r["roofline_fraction"] is None else f"{100 * r['roofline_fraction']:.1f}%"
        speedup = r["speedup_of_ours"]
        ours_x = "" if r["impl"] == "markovkit" else ("-" if math.isnan(speedup) else f"{speedup:.2f}x")
        print(_line([r["family"], r["case"], r["shape"], r["dtype"], r["impl"], f"{r['ms']:.3f}", r["rate"],
                     ours_x, roof_txt]))
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m markovkit.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, eager peers only (seconds on a CPU)")
    parser.add_argument("--json", metavar="PATH", help="write every figure to PATH")
    parser.add_argument("--family", action="append", help="only this family (repeatable)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when present")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    all_cases = select_cases(device, args.quick, args.family)
    out = open(args.json, "w") if args.json else None  # an unwritable path fails now, not after the timing
    roof = roofline(device, args.quick)
    name = _device_name(device)
    print_header(roof, name)
    rows = run(all_cases, device, roof, args.quick, compiled=not (args.quick or args.no_compile), emit=print_rows)
    if out is not None:
        with out:
            json.dump({"device": name, "torch": torch.__version__, "quick": args.quick, "roofline": roof,
                       "rows": [_strict(r) for r in rows]}, out, indent=1, allow_nan=False)
    failed = [f"{r['family']} {r['case']} {r['shape']}" for r in rows if r["impl"] == "markovkit" and r["error"]]
    if failed:  # a peer may fail (out of memory, a shape it lacks); our op may not
        sys.exit(f"markovkit failed in {len(failed)} case(s): {'; '.join(failed)}")


def _strict(row: dict) -> dict:
    """The row with None for a failed impl's NaN figures (NaN is not JSON)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


if __name__ == "__main__":
    main()

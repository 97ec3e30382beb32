"""One table of a GPU check's bench results: per case our time, the time of each BASE_SRC build's markovkit and
of the issue's peer (mamba_ssm, FlexAttention), and how many times faster than the peer we are.

Usage: python bench/ab_table.py OUTDIR FAMILY [FAMILY ...]   (reads OUTDIR/bench_FAMILY.json and, for N = 0, 1, ...,
OUTDIR/bench_baseN_FAMILY.json, as bench/gpu_check.sh writes them)
"""
import json
import re
import sys
from pathlib import Path

PEERS = ("mamba_ssm", "flex_attention")


def times(path):
    """{(case, shape, dtype): {impl: ms}} of one bench JSON; a case's parenthetical (a build time) left out."""
    out = {}
    for row in json.loads(path.read_text())["rows"]:
        if row.get("error") or row.get("ms") is None:
            continue
        key = (re.sub(r" \(.*\)$", "", row["case"]), row["shape"], row["dtype"])
        out.setdefault(key, {})[row["impl"]] = row["ms"]
    return out


def main(outdir, families):
    outdir = Path(outdir)
    runs = []  # (family, ours, [base0, base1, ...])
    for family in families:
        if (outdir / f"bench_{family}.json").exists():
            bases = []
            while (path := outdir / f"bench_base{len(bases)}_{family}.json").exists():
                bases.append(times(path))
            runs.append((family, times(outdir / f"bench_{family}.json"), bases))
    n = max((len(bases) for _, _, bases in runs), default=0)
    header = ["family", "case", "shape", "dtype", "ours", *(f"base{i}" for i in range(n)), "peer", "peer ms", "ours x"]
    rows = []
    for family, ours, bases in runs:
        for key, impls in ours.items():
            if "markovkit" not in impls:
                continue
            mine = impls["markovkit"]
            row = [family, *key, f"{mine:.3f}"]
            for i in range(n):
                base = bases[i].get(key, {}) if i < len(bases) else {}
                row.append(f"{base['markovkit']:.3f}" if "markovkit" in base else "-")
            peer = next((p for p in PEERS if p in impls), None)
            row += [peer or "-", f"{impls[peer]:.3f}" if peer else "-", f"{impls[peer] / mine:.2f}x" if peer else "-"]
            rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])

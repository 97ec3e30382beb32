"""The SASS instructions with the most warp-stall samples, per kernel, from Nsight Compute's source page
(`ncu -i REPORT --page source --csv --print-source sass`, the report collected with the SourceCounters section).
Usage: python bench/ncu_top.py SOURCE_CSV [N]   (bench/gpu_check.sh runs it; N: rows per kernel, default 25)

The page is read loosely: a CSV row with a "Source" column and a column whose name holds "Sampl" starts a
kernel's table (the line before it, if not CSV, names the kernel); the table's rows follow until the next header.
"""
import csv
import sys


def tables(lines):
    """(title, header, rows) for each table of the page."""
    last_text, found = "", []
    for line in lines:
        cells = next(csv.reader([line]), [])
        if "Source" in cells and any("Sampl" in c for c in cells):
            found.append((last_text, cells, []))
        elif found and len(cells) == len(found[-1][1]):
            found[-1][2].append(cells)
        elif line.strip():
            last_text = line.strip()
    return found


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main(path, n=25):
    with open(path, errors="replace") as f:
        found = tables(f.read().splitlines())
    if not found:
        print(f"ncu_top: no source table in {path}")
        return
    for title, header, rows in found:
        col = next(i for i, c in enumerate(header) if "Sampl" in c)
        src = header.index("Source")
        total = sum(number(r[col]) for r in rows) or 1.0
        print(f"== {title[:120]}: {len(rows)} instructions, {total:.0f} samples ({header[col]})")
        for r in sorted(rows, key=lambda r: -number(r[col]))[:n]:
            print(f"{100 * number(r[col]) / total:5.1f}%  {r[0][:12]:12}  {r[src][:110]}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))

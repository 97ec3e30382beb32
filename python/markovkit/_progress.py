"""A dependency-free progress bar on stderr (used by the bench and the data generators)."""
import sys
import time


class Progress:
    """`with Progress(total, label) as bar: bar.update(n, note)`; draws only when stderr is a terminal,
    else prints one line per tenth of the work."""

    def __init__(self, total: int, label: str = ""):
        self.total, self.label, self.done = max(int(total), 1), label, 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last_tenth = -1

    def update(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.done + n, self.total)
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.start
        if self.tty:
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:6.1f}s {note[:40]:<40}")
        elif int(10 * frac) > self._last_tenth:
            self._last_tenth = int(10 * frac)
            sys.stderr.write(f"{self.label} {self.done}/{self.total} ({elapsed:.1f}s) {note}\n")
        sys.stderr.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tty:
            sys.stderr.write("\n")
        return False

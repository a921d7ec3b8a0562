"""Progress lines for long work: count, rate and ETA every few seconds, never one line per item."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("answersheet.progress")


class Progress:
    """Thread-safe counter that logs `label: done/total (pct) rate/s ETA` at most every `every` s."""

    def __init__(self, label: str, total: int, unit: str = "img", every: float = 5.0) -> None:
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.done = 0
        self.started = self.last = time.monotonic()
        self._lock = threading.Lock()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self.last >= self.every and self.done < self.total:
                self.last = now
                log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
        return f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%) {rate:.1f} {self.unit}/s ETA {eta_s}"

    def finish(self) -> None:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        log.info("%s: done %d %s in %.1fs (%.1f %s/s)", self.label, self.done, self.unit, elapsed, rate, self.unit)

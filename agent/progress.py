"""A progress bar on stderr, shown only on a terminal and only when a job takes more than a moment."""

from __future__ import annotations

import time


class Progress:
    def __init__(self, total: int, stream, delay_s: float = 0.5, interval_s: float = 0.2, width: int = 30):
        self.total = max(int(total), 1)
        self.stream = stream
        self.enabled = hasattr(stream, "isatty") and stream.isatty()
        self.start = time.monotonic()
        self.delay_s = delay_s
        self.interval_s = interval_s
        self.width = width
        self._last = 0.0
        self._shown = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < self.delay_s or now - self._last < self.interval_s:
            return
        self._last = now
        frac = min(done / self.total, 1.0)
        filled = int(frac * self.width)
        rate = done / max(now - self.start, 1e-9) / 1e6
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {frac:6.1%} {rate:6.1f} MB/s")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * (self.width + 30) + "\r")
            self.stream.flush()

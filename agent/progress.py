"""A progress bar on stderr with frames, rate and ETA, shown only on a terminal and only when a job takes
more than a moment.  Commands advance it by frames (``replay_files`` hands the pipeline pieces of
:data:`PIECE_FRAMES` frames while a bar is shown, so it moves every few thousand frames, not once per
8 MiB read block); the fraction done is by bytes of the input, whose total is known up front.

>>> import io
>>> out = io.StringIO(); out.isatty = lambda: True
>>> p = Progress(1000, out, delay_s=0, interval_s=0); p.start -= 2.0
>>> p.update(250, frames=5000); print(out.getvalue().strip())
[#######.......................]  25.0%  5,000 frames  2,500 frames/s  ETA 0:06
"""

from __future__ import annotations

import os
import time

PIECE_FRAMES = 4096  # frames handed to the pipeline at a time while a bar is shown


def clock(seconds: float) -> str:
    s = int(max(seconds, 0) + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, stream, delay_s: float | None = None, interval_s: float | None = None,
                 width: int = 30, unit: str = "frames"):
        # $OTWATCH_PROGRESS_DELAY: seconds before the bar shows and between redraws (tests set 0)
        env = os.environ.get("OTWATCH_PROGRESS_DELAY")
        delay_s = delay_s if delay_s is not None else float(env) if env else 0.5
        interval_s = interval_s if interval_s is not None else float(env) if env else 0.2
        self.total = max(int(total), 1)
        self.stream = stream
        self.enabled = hasattr(stream, "isatty") and stream.isatty()
        self.start = time.monotonic()
        self.delay_s = delay_s
        self.interval_s = interval_s
        self.width = width
        self.unit = unit
        self._last = 0.0
        self._shown = False
        self._len = 0

    def update(self, done: float, frames: int | None = None) -> None:
        """``done`` of ``total`` (bytes read, or another measure), ``frames`` processed so far."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < self.delay_s or now - self._last < self.interval_s:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        frac = min(max(done / self.total, 0.0), 1.0)
        filled = int(frac * self.width)
        line = f"\r[{'#' * filled}{'.' * (self.width - filled)}] {frac:6.1%}"
        if frames is not None:
            line += f"  {frames:,} {self.unit}  {frames / elapsed:,.0f} {self.unit}/s"
        if frac > 0:
            line += f"  ETA {clock(elapsed * (1 - frac) / frac)}"
        self._len = max(self._len, len(line))
        self.stream.write(line.ljust(self._len))
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Wipe the bar (before printing a line); the next update draws it again."""
        if self._shown:
            self.stream.write("\r" + " " * self._len + "\r")
            self.stream.flush()

    def close(self) -> None:
        self.clear()
        self._shown = False

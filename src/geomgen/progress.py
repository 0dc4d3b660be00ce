"""A one-line progress display for batches on a terminal.

Fed with GeometryEvents, it keeps each item's latest state and redraws one
status line on stderr; result lines printed through it appear above that line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from geomgen.batch import FINAL, GeometryEvent

_STATES = ("queued", "generating", "glb_ready", "converting", "retrying")
REDRAW_INTERVAL_S = 0.1  # at most ten redraws a second


class Progress:
    """Progress of ``total`` items; silent unless ``stream`` is a terminal (or ``enabled``)."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.state: dict[int, str] = {}
        self.ok = 0
        self.failed = 0
        self._start = time.monotonic()
        self._drawn_at = 0.0
        self._width = 0

    def update(self, event: GeometryEvent) -> None:
        """Record ``event`` and redraw (throttled, except for final events)."""
        if event.kind == FINAL:
            self.state.pop(event.index, None)
            if event.result is not None and event.result.ok:
                self.ok += 1
            else:
                self.failed += 1
        elif event.kind in _STATES:
            self.state[event.index] = "generating" if event.kind == "retrying" else event.kind
        now = time.monotonic()
        if event.kind == FINAL or now - self._drawn_at >= REDRAW_INTERVAL_S:
            self._draw(now)

    def line(self) -> str:
        """The status line, without terminal control characters."""
        counts = {s: 0 for s in ("queued", "generating", "converting")}
        for state in self.state.values():
            counts["converting" if state == "glb_ready" else state] += 1
        done = self.ok + self.failed
        busy = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        failed = f" ({self.failed} failed)" if self.failed else ""
        return f"[{done}/{self.total} done{failed}] {busy}  {time.monotonic() - self._start:.0f} s".rstrip()

    def print(self, text: str, stream: TextIO | None = None) -> None:
        """Print a line above the status line."""
        self._clear()
        print(text, file=stream if stream is not None else sys.stdout, flush=True)
        self._draw(time.monotonic())

    def close(self) -> None:
        """Remove the status line."""
        self._clear()

    def _draw(self, now: float) -> None:
        if not self.enabled:
            return
        text = self.line()
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)
        self._drawn_at = now

    def _clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

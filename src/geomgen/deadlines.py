"""Deadlines of many jobs, in a heap: arm, disarm, and take those that are due.

Pure state driven by monotonic timestamps passed in; dispatch.py keeps one for
the requests' overall deadlines and one for the GPU attempts' deadlines.
"""

from __future__ import annotations

import heapq
import itertools


class Deadlines:
    """One deadline per key (a job id), each with a tag (an attempt number).

    ``due(now)`` returns the (key, tag) pairs whose deadline passed, once each;
    re-arming a key replaces its deadline, disarming forgets it. Costs
    O(log n) per arm and per expiry; stale heap entries are skipped lazily.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._current: dict[str, tuple[int, int, float]] = {}  # key -> (seq, tag, at)
        self._seq = itertools.count(1)

    def __len__(self) -> int:
        return len(self._current)

    def arm(self, key: str, at: float, tag: int = 0) -> None:
        seq = next(self._seq)
        self._current[key] = (seq, tag, at)
        heapq.heappush(self._heap, (at, seq, key))

    def disarm(self, key: str) -> None:
        self._current.pop(key, None)

    def at(self, key: str) -> float | None:
        """When ``key`` is due, or None if it has no deadline."""
        entry = self._current.get(key)
        return entry[2] if entry else None

    def due(self, now: float) -> list[tuple[str, int]]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, seq, key = heapq.heappop(self._heap)
            entry = self._current.get(key)
            if entry is None or entry[0] != seq:
                continue
            del self._current[key]
            out.append((key, entry[1]))
        if len(self._heap) > 2 * len(self._current) + 1024:  # many disarmed entries: rebuild
            self._heap = [(at, seq, key) for key, (seq, _, at) in self._current.items()]
            heapq.heapify(self._heap)
        return out

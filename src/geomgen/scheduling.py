"""The broker's bookkeeping: fair per-backend queues, no-worker deadlines and
the GPU worker registry (the SDF pool's credits and leases: sdf_pool.py).

Pure state with no sockets, so each rule is unit-tested on its own; broker.py
feeds it what arrives and acts on what it returns. Times are monotonic seconds.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from geomgen import defaults


class RoundRobinQueue:
    """One FIFO per scene key, served in strict round-robin over keys with work.

    With scene A holding 10 items and scene B 2, pops go A, B, A, B, A, A, ...
    A key that gets work joins the rotation at the end; a key whose FIFO runs
    dry leaves it. Items are opaque hashable ids (the broker uses job ids).
    """

    def __init__(self) -> None:
        self._fifos: dict[str, deque[str]] = {}
        self._rotation: deque[str] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, key: str, item: str) -> None:
        """Append ``item`` to the FIFO of ``key``."""
        fifo = self._fifos.get(key)
        if fifo is None:
            fifo = self._fifos[key] = deque()
            self._rotation.append(key)
        fifo.append(item)
        self._size += 1

    def push_front(self, key: str, item: str) -> None:
        """Put ``item`` first in its key's FIFO (a re-queued job).

        A key with no other work goes to the front of the rotation too: the job
        already waited its turn once and lost it through no fault of its own.
        """
        fifo = self._fifos.get(key)
        if fifo is None:
            fifo = self._fifos[key] = deque()
            self._rotation.appendleft(key)
        fifo.appendleft(item)
        self._size += 1

    def pop(self) -> tuple[str, str] | None:
        """``(key, item)`` next in turn, or None when empty."""
        if not self._rotation:
            return None
        key = self._rotation.popleft()
        fifo = self._fifos[key]
        item = fifo.popleft()
        self._size -= 1
        if fifo:
            self._rotation.append(key)
        else:
            del self._fifos[key]
        return key, item

    def remove(self, key: str, item: str) -> bool:
        """Take ``item`` out of ``key``'s FIFO (a cancel); False if it is not there.

        Linear in that FIFO's length, which is fine for the rare cancel.
        """
        fifo = self._fifos.get(key)
        if fifo is None:
            return False
        try:
            fifo.remove(item)
        except ValueError:
            return False
        self._size -= 1
        if not fifo:
            del self._fifos[key]
            self._rotation.remove(key)
        return True

    def remove_all(self, items: set[str]) -> int:
        """Take every one of ``items`` out of the queue in one pass (a client
        that left); returns how many were there."""
        removed = 0
        for key in list(self._fifos):
            fifo = self._fifos[key]
            kept = deque(item for item in fifo if item not in items)
            removed += len(fifo) - len(kept)
            if kept:
                self._fifos[key] = kept
            else:
                del self._fifos[key]
                self._rotation.remove(key)
        self._size -= removed
        return removed

    def keys(self) -> list[str]:
        """Scene keys with work, in the order they will next be served."""
        return list(self._rotation)

    def __iter__(self) -> Iterator[str]:
        for fifo in self._fifos.values():
            yield from fifo


SDF_POOL = ""  # wait-pool name of the SDF queue; backend names are never empty


class WaitList:
    """No-worker deadlines of queued jobs, per pool (a backend, or SDF_POOL).

    A job whose deadline passes while its pool has no live worker is due to
    fail. If the pool has workers (all busy) it is parked instead, and gets one
    more full wait if the pool later loses its last worker.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._current: dict[str, tuple[str, int, float]] = {}  # job -> (pool, seq, timeout_s)
        self._parked: dict[str, dict[str, None]] = {}  # pool -> job ids
        self._seq = itertools.count(1)

    def __len__(self) -> int:
        return len(self._current)

    def arm(self, job_id: str, pool: str, timeout_s: float, now: float) -> None:
        """Start (or restart) the job's wait in ``pool``."""
        self.cancel(job_id)
        seq = next(self._seq)
        self._current[job_id] = (pool, seq, timeout_s)
        heapq.heappush(self._heap, (now + timeout_s, seq, job_id))

    def cancel(self, job_id: str) -> None:
        """The job left its queue (dispatched, cancelled, failed)."""
        entry = self._current.pop(job_id, None)
        if entry is not None:
            self._parked.get(entry[0], {}).pop(job_id, None)

    def due(self, now: float, live: Callable[[str], int]) -> list[tuple[str, str]]:
        """(job_id, pool) of jobs whose wait ran out with no live worker in
        their pool; their waits are over. ``live(pool)`` counts live workers."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, seq, job_id = heapq.heappop(self._heap)
            entry = self._current.get(job_id)
            if entry is None or entry[1] != seq:
                continue
            pool = entry[0]
            if live(pool):
                self._parked.setdefault(pool, {})[job_id] = None
                continue
            del self._current[job_id]
            out.append((job_id, pool))
        return out

    def pool_emptied(self, pool: str, now: float) -> None:
        """``pool`` lost its last worker: parked jobs start a new full wait."""
        for job_id in self._parked.pop(pool, {}):
            entry = self._current.get(job_id)
            if entry is not None and entry[0] == pool:
                heapq.heappush(self._heap, (now + entry[2], entry[1], job_id))


# --- GPU workers ----------------------------------------------------------------


@dataclass(eq=False)
class GpuWorkerRecord:
    """A registered GPU worker as the broker sees it."""

    identity: bytes  # its DEALER identity on the worker ROUTER
    worker_id: str
    backend: str
    hostname: str = ""
    pid: int = 0
    gpu: str | None = None
    info: dict = field(default_factory=dict)
    option_specs: tuple | None = None  # its backend's declared options (OptionSpec), None if undeclared
    key: str | None = None  # the CURVE key (Z85) it registered with; None without keys
    last_seen: float = 0.0
    heartbeat_interval_s: float = 0.0  # as the worker declared it
    job_id: str | None = None  # the job the broker gave it
    attempt: int = 0
    job_sent_at: float = 0.0
    generate_key: str | None = None  # the result cache's key of the job it runs (its result is cached even if the job is gone)
    heartbeat_due: float = 0.0  # when the broker next owes it a message (any message counts)
    blocked: bool = False  # said "busy" with a job we did not give it; waits for an idle heartbeat
    completed: int = 0
    failed: int = 0

    @property
    def busy(self) -> bool:
        return self.job_id is not None or self.blocked


class WorkerRegistry:
    """Live GPU workers by identity, with an ordered idle set per backend so that
    picking a worker for a job is O(1)."""

    def __init__(self) -> None:
        self._workers: dict[bytes, GpuWorkerRecord] = {}
        self._by_worker_id: dict[str, bytes] = {}
        self._idle: dict[str, dict[bytes, None]] = {}
        self._alive: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[GpuWorkerRecord]:
        return iter(list(self._workers.values()))

    def get(self, identity: bytes) -> GpuWorkerRecord | None:
        return self._workers.get(identity)

    def add(self, worker: GpuWorkerRecord) -> list[GpuWorkerRecord]:
        """Register ``worker`` as idle; returns the registrations it replaces
        (same identity, or same worker_id on a new connection), already removed."""
        replaced = []
        for identity in {worker.identity, self._by_worker_id.get(worker.worker_id)}:
            old = self.remove(identity) if identity is not None else None
            if old is not None:
                replaced.append(old)
        self._workers[worker.identity] = worker
        self._by_worker_id[worker.worker_id] = worker.identity
        self._alive[worker.backend] = self._alive.get(worker.backend, 0) + 1
        self._idle.setdefault(worker.backend, {})[worker.identity] = None
        return replaced

    def remove(self, identity: bytes) -> GpuWorkerRecord | None:
        worker = self._workers.pop(identity, None)
        if worker is None:
            return None
        if self._by_worker_id.get(worker.worker_id) == identity:
            del self._by_worker_id[worker.worker_id]
        self._alive[worker.backend] -= 1
        self._idle.get(worker.backend, {}).pop(identity, None)
        return worker

    def alive(self, backend: str) -> int:
        """Live workers registered for ``backend``."""
        return self._alive.get(backend, 0)

    def find(self, worker_id: str) -> GpuWorkerRecord | None:
        """The registration of ``worker_id``, if any."""
        identity = self._by_worker_id.get(worker_id)
        return self._workers.get(identity) if identity is not None else None

    def has_idle(self, backend: str) -> bool:
        return bool(self._idle.get(backend))

    def take_idle(self, backend: str, now: float | None = None, interval_s: float = 0.0) -> GpuWorkerRecord | None:
        """The longest-idle worker of ``backend``, removed from the idle set.

        With ``now``, a worker not heard from for QUIET_AFTER_INTERVALS of its
        (or ``interval_s``, if longer) heartbeat intervals is passed over: alive
        on TCP but silent (frozen, wedged), it would only hold the job until
        the liveness rule declared it dead."""
        idle = self._idle.get(backend)
        if not idle:
            return None
        for identity in idle:
            worker = self._workers[identity]
            quiet_after_s = defaults.QUIET_AFTER_INTERVALS * max(interval_s, worker.heartbeat_interval_s)
            if now is None or now - worker.last_seen <= quiet_after_s:
                del idle[identity]
                return worker
        return None

    def assign(self, worker: GpuWorkerRecord, job_id: str, attempt: int, now: float) -> None:
        self._idle.get(worker.backend, {}).pop(worker.identity, None)
        worker.job_id, worker.attempt, worker.job_sent_at = job_id, attempt, now

    def release(self, worker: GpuWorkerRecord) -> None:
        """The worker finished its job: idle again unless it is blocked."""
        worker.job_id, worker.attempt = None, 0
        if not worker.blocked and worker.identity in self._workers:
            self._idle.setdefault(worker.backend, {})[worker.identity] = None

    def block(self, worker: GpuWorkerRecord) -> None:
        worker.blocked = True
        worker.job_id, worker.attempt = None, 0
        self._idle.get(worker.backend, {}).pop(worker.identity, None)

    def unblock(self, worker: GpuWorkerRecord) -> None:
        worker.blocked = False
        if worker.job_id is None and worker.identity in self._workers:
            self._idle.setdefault(worker.backend, {})[worker.identity] = None

    def silent(self, now: float, liveness: int, interval_s: float) -> list[GpuWorkerRecord]:
        """Workers not heard from for ``liveness`` heartbeat intervals: theirs, or
        ``interval_s`` if that is longer, so mismatched settings never flap."""
        return [w for w in self._workers.values()
                if now - w.last_seen > liveness * max(interval_s, w.heartbeat_interval_s)]

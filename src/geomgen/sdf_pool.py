"""The SDF pool as the broker sees it: each SDF worker's slots, the jobs sent to
it, and a lease per job.

Pure state with no sockets; dispatch.py picks a worker here, sends it the job
(addressed to it, over the SDF job ROUTER) and acts on what expires. Times are
monotonic seconds.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from dataclasses import dataclass, field

from geomgen import defaults

# A worker not heard from for this many of its heartbeat intervals gets no new
# job: a frozen (SIGSTOPped) or wedged worker is bypassed at once, long before
# the liveness rule declares it dead and its leases run out.
QUIET_AFTER_INTERVALS = defaults.QUIET_AFTER_INTERVALS


@dataclass(eq=False)
class SdfWorkerRecord:
    """A registered SDF worker as the broker sees it."""

    worker_id: str  # also its DEALER identity on the SDF job socket
    slots: int = 0
    free: int = 0
    held: list = field(default_factory=list)  # [[job_id, attempt], ...] as last reported
    hostname: str = ""
    pid: int = 0
    last_seen: float = 0.0
    heartbeat_interval_s: float = 0.0  # as the worker declared it
    key: str | None = None  # the CURVE key (Z85) it registered with; None without keys
    completed: int = 0
    failed: int = 0


@dataclass
class Lease:
    attempt: int
    deadline: float
    worker_id: str | None = None  # the SDF worker it was sent to, then the last one seen holding it


class SdfPool:
    """Per-worker credit and leases for the SDF pool (docs/protocol.md).

    A worker's credit = its free slots (last status) - jobs sent to it that no
    status has listed yet; a job goes to the worker with the most credit among
    those heard from recently. Each sent (job, attempt) has a lease renewed
    whenever a status lists it in ``held``; ``expired()`` returns those whose
    lease ran out so the broker can send them again.
    """

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.workers: dict[str, SdfWorkerRecord] = {}
        self.waiting: deque[str] = deque()  # job ids waiting for a slot
        self._unseen: dict[tuple[str, int], str] = {}  # (job, attempt) sent, not yet listed -> worker id
        self._unseen_per_worker: Counter[str] = Counter()
        self._leases: dict[str, Lease] = {}
        self._heap: list[tuple[float, str, int]] = []

    @property
    def slots(self) -> int:
        return sum(w.slots for w in self.workers.values())

    @property
    def free(self) -> int:
        return sum(w.free for w in self.workers.values())

    @property
    def in_flight(self) -> int:
        """Sent jobs with a live lease."""
        return len(self._leases)

    def credit(self, worker_id: str | None = None) -> int:
        """Slots a job may be sent to: one worker's, or the pool's."""
        if worker_id is not None:
            worker = self.workers.get(worker_id)
            return worker.free - self._unseen_per_worker[worker_id] if worker else 0
        return sum(max(0, self.credit(w)) for w in self.workers)

    def pick(self, now: float, interval_s: float, exclude: set[str] | frozenset = frozenset()) -> str | None:
        """The worker to send the next job to: the most credit among workers
        heard from within QUIET_AFTER_INTERVALS of their (or our longer)
        heartbeat interval; None if none has credit."""
        best, best_credit = None, 0
        for worker_id, worker in self.workers.items():
            if worker_id in exclude:
                continue
            if now - worker.last_seen > QUIET_AFTER_INTERVALS * max(interval_s, worker.heartbeat_interval_s):
                continue
            credit = self.credit(worker_id)
            if credit > best_credit:
                best, best_credit = worker_id, credit
        return best

    def status(self, worker_id: str, slots: int, free: int, held: list, now: float, **about) -> bool:
        """Apply an SdfStatus; True when the worker is new. Renews the leases of
        the current attempts it holds. Malformed ``held`` entries are skipped."""
        slots = max(0, slots)
        free = max(0, min(free, slots))
        worker = self.workers.get(worker_id)
        is_new = worker is None
        if worker is None:
            worker = self.workers[worker_id] = SdfWorkerRecord(worker_id)
        worker.slots, worker.free, worker.last_seen = slots, free, now
        worker.hostname = about.get("hostname", worker.hostname)
        worker.pid = about.get("pid", worker.pid)
        worker.heartbeat_interval_s = about.get("heartbeat_interval_s", worker.heartbeat_interval_s)
        if is_new:
            worker.key = about.get("key")
        worker.held = []
        for entry in held:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                continue
            job_id, attempt = entry
            if not isinstance(job_id, str) or not isinstance(attempt, int):
                continue
            worker.held.append([job_id, attempt])
            # A held job now counts in this worker's `free`, not as an unseen send.
            self._seen(job_id, attempt)
            lease = self._leases.get(job_id)
            if lease is not None and lease.attempt == attempt:
                lease.deadline = now + self.lease_s
                lease.worker_id = worker_id
        return is_new

    def pushed(self, job_id: str, attempt: int, now: float, worker_id: str) -> None:
        """The job was sent to ``worker_id``."""
        deadline = now + self.lease_s
        self._leases[job_id] = Lease(attempt, deadline, worker_id)
        self._unseen[(job_id, attempt)] = worker_id
        self._unseen_per_worker[worker_id] += 1
        heapq.heappush(self._heap, (deadline, job_id, attempt))

    def _seen(self, job_id: str, attempt: int) -> None:
        worker_id = self._unseen.pop((job_id, attempt), None)
        if worker_id is not None:
            self._unseen_per_worker[worker_id] -= 1
            if not self._unseen_per_worker[worker_id]:
                del self._unseen_per_worker[worker_id]

    def finished(self, job_id: str, attempt: int, worker_id: str | None = None) -> bool:
        """A result for (job, attempt) arrived (from ``worker_id``): True if it is
        the current attempt and that worker holds its lease (the lease is
        dropped), False for a superseded or unknown one, or one from a worker
        the job was never sent to."""
        lease = self._leases.get(job_id)
        if worker_id is not None and lease is not None and lease.worker_id not in (None, worker_id):
            return False
        self._seen(job_id, attempt)
        if lease is None or lease.attempt != attempt:
            return False
        del self._leases[job_id]
        return True

    def forget(self, job_id: str) -> None:
        """Stop tracking a job's lease (cancelled). Its unseen send keeps
        counting against its worker's credit until the lease deadline, since
        the message may still sit in that worker's pipe."""
        self._leases.pop(job_id, None)

    def expired(self, now: float) -> list[tuple[str, int]]:
        """(job_id, attempt) pairs whose lease ran out; their leases are dropped."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, job_id, attempt = heapq.heappop(self._heap)
            lease = self._leases.get(job_id)
            if lease is not None and lease.attempt == attempt and lease.deadline > now:
                heapq.heappush(self._heap, (lease.deadline, job_id, attempt))  # renewed since it was pushed
                continue
            self._seen(job_id, attempt)
            if lease is None or lease.attempt != attempt:
                continue
            del self._leases[job_id]
            out.append((job_id, attempt))
        return out

    def remove(self, worker_id: str, now: float) -> SdfWorkerRecord | None:
        """Drop a dead or departed worker: its slots stop counting and the
        leases of the jobs it held, or was sent and never listed, run out now."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return None
        sent_unseen = [key for key, target in self._unseen.items() if target == worker_id]
        for job_id, attempt in [*map(tuple, worker.held), *sent_unseen]:
            lease = self._leases.get(job_id)
            if lease is not None and lease.attempt == attempt:
                lease.deadline = now
                heapq.heappush(self._heap, (now, job_id, attempt))
        return worker

    def silent(self, now: float, liveness: int, interval_s: float) -> list[str]:
        """Ids of SDF workers quiet for ``liveness`` of their (or our longer) intervals."""
        return [w.worker_id for w in self.workers.values()
                if now - w.last_seen > liveness * max(interval_s, w.heartbeat_interval_s)]

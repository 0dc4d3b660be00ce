"""Counters and running timings behind the broker's health reply and its
activity line in the log.

Kept apart from the broker loop so the loop only calls ``record_*`` and the
health query assembles one dict; every duration is in seconds.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from geomgen import defaults

if TYPE_CHECKING:
    from geomgen.scheduling import RoundRobinQueue
    from geomgen.sdf_pool import SdfPool

log = logging.getLogger("geomgen.broker")


@dataclass
class Running:
    """Count, mean and maximum of a stream of durations (seconds)."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    def add(self, value_s: float) -> None:
        self.count += 1
        self.total_s += value_s
        if value_s > self.max_s:
            self.max_s = value_s

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count if self.count else 0.0


@dataclass
class BackendCounters:
    """Lifetime counts of one backend, surviving the workers that served it."""

    registrations: int = 0  # READY messages accepted
    completed: int = 0  # GLBs produced
    failed: int = 0  # error results from its workers
    lost: int = 0  # workers that died or went silent


@dataclass
class BrokerStats:
    started_at: float  # monotonic seconds
    accepted: int = 0  # requests queued
    rejected: int = 0  # requests answered with an error before queueing
    completed: int = 0  # FINAL ok
    failed: int = 0  # FINAL error after acceptance (cancelled ones included)
    cancelled: int = 0
    retried: int = 0  # GPU jobs re-queued after a lost worker
    repushed: int = 0  # SDF jobs pushed again after a lease ran out
    dropped_messages: int = 0  # undecodable or unexpected peer messages
    stale_results: int = 0  # results of superseded attempts or cancelled jobs
    clients_lost: int = 0  # clients silent past the liveness window while holding jobs
    jobs_dropped: int = 0  # jobs of those clients, withdrawn unseen (queued) or discarded (running)
    results_undelivered: int = 0  # messages to a client that left or stopped reading, dropped
    queue_wait: Running = field(default_factory=Running)
    generate: Running = field(default_factory=Running)
    convert: Running = field(default_factory=Running)
    total: Running = field(default_factory=Running)
    backends: dict[str, BackendCounters] = field(default_factory=dict)

    def backend(self, name: str) -> BackendCounters:
        counters = self.backends.get(name)
        if counters is None:
            counters = self.backends[name] = BackendCounters()
        return counters

    def summary(self, now: float) -> dict:
        """The scalar part of the health reply."""
        return {
            "uptime_s": round(now - self.started_at, 3),
            "accepted": self.accepted,
            "rejected": self.rejected,
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "retried": self.retried,
            "sdf_repushed": self.repushed,
            "dropped_messages": self.dropped_messages,
            "stale_results": self.stale_results,
            "clients_lost": self.clients_lost,
            "jobs_dropped": self.jobs_dropped,
            "results_undelivered": self.results_undelivered,
            "avg_queue_wait_s": round(self.queue_wait.mean_s, 6),
            "max_queue_wait_s": round(self.queue_wait.max_s, 6),
            "avg_generate_s": round(self.generate.mean_s, 6),
            "avg_convert_s": round(self.convert.mean_s, 6),
            "avg_total_s": round(self.total.mean_s, 6),
        }


def health_report(
    stats: BrokerStats,
    now: float,
    *,
    header: dict,
    backend_names: Iterable[str],
    workers: list,
    sdf: "SdfPool",
    queues: dict[str, "RoundRobinQueue"],
    job_states: Iterable[str],
) -> dict:
    """The HealthReply map (docs/protocol.md "Health").

    ``workers`` are the registry's GpuWorkerRecord entries. ``alive`` has one
    meaning everywhere (health, GeometryServer.wait_until_ready, backend=auto,
    no-worker waits): registered and heard from within its liveness window,
    which is what the registry holds, since housekeeping removes the silent.
    ``job_states`` are the states of the jobs in flight.
    """
    backends = {}
    for name in sorted(set(backend_names) | set(stats.backends) | set(queues)):
        mine = [w for w in workers if w.backend == name]
        counters = stats.backend(name)
        backends[name] = {
            "alive": len(mine),
            "busy": sum(w.busy for w in mine),
            "idle": sum(not w.busy for w in mine),
            "completed": counters.completed,
            "failed": counters.failed,
            "lost": counters.lost,
            "registrations": counters.registrations,
            "queued": len(queues.get(name, ())),
        }
    states = Counter(job_states)
    return {
        "status": "ok",
        **header,
        **stats.summary(now),
        "backends": backends,
        "workers": [
            {"worker_id": w.worker_id, "backend": w.backend, "hostname": w.hostname, "pid": w.pid, "gpu": w.gpu,
             "busy": w.busy, "job_id": w.job_id, "completed": w.completed, "failed": w.failed,
             "load_s": w.info.get("load_s"), "last_seen_s": round(now - w.last_seen, 3)}
            for w in workers
        ],
        "sdf_workers": [
            {"worker_id": w.worker_id, "hostname": w.hostname, "pid": w.pid, "slots": w.slots, "free": w.free,
             "held": len(w.held), "completed": w.completed, "failed": w.failed,
             "last_seen_s": round(now - w.last_seen, 3)}
            for w in sdf.workers.values()
        ],
        "sdf_slots": sdf.slots,
        "sdf_free": sdf.free,
        "sdf_credit": sdf.credit(),
        "sdf_queued": len(sdf.waiting),
        "sdf_in_flight": sdf.in_flight,
        "queue_sizes": {name: len(q) for name, q in queues.items()},
        "queue_size": sum(len(q) for q in queues.values()),
        "jobs": {state: states.get(state, 0) for state in ("queued", "generating", "converting")},
        "in_flight": sum(states.values()),
        "scenes": {name: q.keys() for name, q in queues.items() if q},
    }


class ActivityLog:
    """One INFO line per period that had jobs: done, failed, in flight, queued."""

    def __init__(self, stats: BrokerStats, now: float, interval_s: float = defaults.ACTIVITY_LOG_INTERVAL_S) -> None:
        self.stats = stats
        self.interval_s = interval_s
        self._since = now
        self._counts = (stats.completed, stats.failed, stats.total.count, stats.total.total_s)

    def maybe_log(self, now: float, in_flight: int, queued: int) -> None:
        if now - self._since < self.interval_s:
            return
        s = self.stats
        counts = (s.completed, s.failed, s.total.count, s.total.total_s)
        done, failed = counts[0] - self._counts[0], counts[1] - self._counts[1]
        if done or failed or in_flight:
            finished = counts[2] - self._counts[2]
            mean_s = (counts[3] - self._counts[3]) / finished if finished else 0.0
            log.info("last %.0f s: %d done, %d failed (mean %.2f s per job); %d in flight, %d waiting in queues",
                     now - self._since, done, failed, mean_s, in_flight, queued)
        self._since, self._counts = now, counts

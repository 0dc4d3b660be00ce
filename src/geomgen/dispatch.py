"""The broker's job life cycle without sockets: queued -> generating ->
converting -> done / failed, with retries, leases, no-worker waits and cancels.

broker.py decodes what arrives and calls in; everything that goes out leaves
through an Outbox. Times are monotonic seconds passed in by the caller. Here:
requests, cancels, the GPU queues and the end of a job; the rest of the
Dispatcher is in dispatch_workers.py, dispatch_sdf.py and dispatch_guards.py.
"""

from __future__ import annotations

import itertools
import secrets
import logging
from typing import Any, Iterable, Protocol

from geomgen import defaults
from geomgen.admission import Admission, Limits
from geomgen.backends import find_backend_class
from geomgen.cache import ResultCache
from geomgen.cache_stage import CacheStage, new_cache_counts
from geomgen.contract import check_backend_options
from geomgen.deadlines import Deadlines
from geomgen.dispatch_guards import Guards
from geomgen.dispatch_sdf import SdfStage
from geomgen.dispatch_workers import GpuWorkers
from geomgen.errors import InputError, Stage
from geomgen.jobs import JobRecord, validate_request
from geomgen.protocol import (
    BrokerHeartbeat,
    ClientRequest,
    Event,
    EventKind,
    Job,
    JobState,
    Result,
    SdfJob,
    error_dict,
)
from geomgen.scheduling import SDF_POOL, GpuWorkerRecord, RoundRobinQueue, WaitList, WorkerRegistry
from geomgen.sdf_pool import SdfPool
from geomgen.stats import ActivityLog, BrokerStats

log = logging.getLogger("geomgen.broker")


class Outbox(Protocol):
    """Where the dispatcher's messages go (the broker's sockets)."""

    def to_client(self, identity: bytes, message: Any) -> None:
        """Best effort: a client that left cannot be reached and asks again later."""

    def to_worker(self, identity: bytes, message: Any) -> bool:
        """False when the worker's connection is gone."""

    def to_sdf(self, worker_id: str, job: SdfJob) -> bool:
        """False when that SDF worker cannot be reached now; the job stays queued."""


class Dispatcher(GpuWorkers, SdfStage, Guards, CacheStage):
    """Jobs, queues and workers of one broker. Settings as in Broker.

    The methods for GPU workers' messages, the SDF stage and the guards
    (admission, client liveness, deadlines) live in the modules of the bases."""

    def __init__(self, out: Outbox, *, broker_id: str, address: str, heartbeat_interval_s: float,
                 heartbeat_liveness: int, max_retries: int, no_worker_timeout_s: float, sdf_lease_s: float,
                 known_backends: Iterable[str], now: float, limits: Limits | None = None,
                 client_liveness_s: float = defaults.CLIENT_LIVENESS_S, cache: ResultCache | None = None) -> None:
        self.out = out
        self.broker_id = broker_id
        self.address = address  # HOST:PORT clients and workers use, for error messages
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_liveness = heartbeat_liveness
        self.dead_after_s = heartbeat_liveness * heartbeat_interval_s
        self.max_retries = max_retries
        self.no_worker_timeout_s = no_worker_timeout_s
        self.known_backends = set(known_backends)
        self.jobs: dict[str, JobRecord] = {}
        self.keys: dict[tuple[bytes, str], str] = {}  # (client identity, request_id) -> job id
        self.queues: dict[str, RoundRobinQueue] = {}
        self.workers = WorkerRegistry()
        self.registered: set[str] = set()  # backends some worker has registered
        # Each backend's declared options: from its workers' READY, else from the
        # backend class when it is installed here (None: undeclared, or unknown here).
        self.declared: dict[str, tuple | None] = {}
        self.sdf = SdfPool(sdf_lease_s)
        self.waits = WaitList()
        self.request_deadlines = Deadlines()  # job id -> the request's overall deadline
        self.attempt_deadlines = Deadlines()  # job id -> its GPU attempt's deadline plus the liveness window
        self.stats = BrokerStats(started_at=now)
        self.client_liveness_s = client_liveness_s
        self.clients_seen: dict[bytes, float] = {}  # last message from each client holding jobs
        self.admission = Admission(limits or Limits(defaults.MAX_HELD_JOBS, defaults.MAX_HELD_BYTES,
                                                    defaults.MAX_CLIENT_JOBS, defaults.MAX_CLIENT_BYTES))
        # Job ids: this broker's id and a counter, unique across broker restarts, and
        # 48 random bits (see request()).
        self._job_numbers = itertools.count(1)
        self._job_prefix = broker_id[:12] + "-"
        self._activity = ActivityLog(self.stats, now)
        self.cache = cache  # results already computed (cache_stage.py); None: no cache
        self.cache_counts = new_cache_counts()
        self.model_identities: dict[str, str] = {}  # backend -> the model identity its latest worker announced

    # --- clients ---------------------------------------------------------------

    def holds(self, identity: bytes, request_id: str) -> bool:
        return (identity, request_id) in self.keys

    def available_backends(self) -> list[str]:
        return sorted(self.known_backends | self.registered)

    def client_seen(self, identity: bytes, now: float) -> None:
        """Any message from a client (or its pulse) proves it alive."""
        self.clients_seen[identity] = now

    def request(self, identity: bytes, req: ClientRequest, now: float) -> None:
        """A client's REQUEST: validate, queue, and dispatch if a worker is idle."""
        if self.holds(identity, req.request_id):
            log.info("ignored request %s from client %s: already in flight", req.request_id, identity.hex(),
                     extra={"request_id": req.request_id})
            return
        try:
            terms = validate_request(req, lambda name: name in self.known_backends or name in self.registered,
                                     self.option_specs)
        except InputError as exc:
            message = exc.message
            if exc.code == "unknown_backend":
                message += f"; available backends: {', '.join(self.available_backends())}"
            self.reject(identity, req.request_id, req.backend, exc.stage, exc.code, message)
            return
        size_bytes = len(req.input_data)
        if self._admission_refused(identity, req, size_bytes):
            return
        timeout_s = self.no_worker_timeout_s if req.no_worker_timeout_s is None else float(req.no_worker_timeout_s)
        # The counter keeps ids unique; the random part keeps them unguessable
        # (a result names its job: knowing the next id must not let a peer forge one).
        job_id = f"{self._job_prefix}{next(self._job_numbers):x}-{secrets.token_hex(6)}"
        job = JobRecord(job_id, identity, req, terms, req.scene_id or f"client:{identity.hex()}",
                        accepted_at=now, no_worker_timeout_s=timeout_s)
        self.jobs[job.job_id] = job
        self.keys[(identity, req.request_id)] = job.job_id
        self.admission.charge(job.job_id, identity, size_bytes)
        self.clients_seen[identity] = now
        if req.deadline_s is not None:
            self.request_deadlines.arm(job.job_id, now + req.deadline_s)
        self.stats.accepted += 1
        self._event(job, EventKind.QUEUED, detail=f"backend {req.backend}, scene {job.scene_key}")
        if self._answer_from_cache(job, now):
            return
        self._enqueue(job, now)
        self._dispatch(req.backend, now)

    def option_specs(self, backend: str) -> tuple | None:
        """The options ``backend`` declares (OptionSpec), or None when undeclared or unknown here."""
        if backend not in self.declared:
            cls = find_backend_class(backend)
            if cls is None:  # a plug-in installed only where its workers run: learnt at READY
                return None
            self.declared[backend] = cls.options_spec
        return self.declared[backend]

    def reject(self, identity: bytes, request_id: str, backend: str, stage: Any, code: str, message: str,
               retry_after_s: float | None = None) -> None:
        """Answer a request that was never accepted with its one FINAL error
        (with ``retry_after_s`` in the error map for a ``busy`` refusal)."""
        self.stats.rejected += 1
        log.info("rejected request %s from client %s: %s (%s)", request_id, identity.hex(), message, code,
                 extra={"request_id": request_id})
        error: dict[str, Any] = error_dict(stage, code, message)
        if retry_after_s is not None:
            error["retry_after_s"] = round(retry_after_s, 3)
        self.out.to_client(identity, Result(request_id, ok=False, error=error, backend=backend, attempts=0))

    def unknown(self, identity: bytes, request_ids: list) -> list[str]:
        """Ids from a client heartbeat that this broker does not hold."""
        return [r for r in request_ids if isinstance(r, str) and not self.holds(identity, r)]

    def cancel(self, identity: bytes, request_ids: list, now: float) -> None:
        """A client's CANCEL: each listed request it holds gets FINAL ``cancelled`` now."""
        for request_id in request_ids:
            job = self.jobs.get(self.keys.get((identity, request_id), "")) if isinstance(request_id, str) else None
            if job is not None:
                self._withdraw(job)
                self._finish(job, now, error=error_dict(Stage.TRANSPORT, "cancelled", "cancelled by the client"))

    def _withdraw(self, job: JobRecord) -> None:
        """Take a job out of whatever queue or lease holds it, before it is finished.
        A GPU worker running it stays busy until its result comes; that result is discarded."""
        if job.waiting_in == SDF_POOL:
            self.sdf.waiting.remove(job.job_id)
        elif job.waiting_in is not None:
            self.queues[job.waiting_in].remove(job.scene_key, job.job_id)
        elif job.state is JobState.CONVERTING:
            self.sdf.forget(job.job_id)
        job.waiting_in = None

    def _event(self, job: JobRecord, kind: EventKind, *, attempt: int | None = None, detail: str = "",
               glb: bytes | None = None, timings: dict | None = None, worker: str = "") -> None:
        if not job.request.events and kind is not EventKind.GLB_READY:
            return  # the client asked for results only; glb_ready carries the GLB itself
        attempt = attempt if attempt is not None else max(1, job.attempt)
        # DEBUG: at thousands of jobs a second, a log record per event costs more than the event.
        log.debug("job %s request %s: %s (attempt %d) %s", job.job_id, job.request.request_id, kind.value, attempt,
                  detail, extra={"job_id": job.job_id, "request_id": job.request.request_id, "attempt": attempt})
        self.out.to_client(job.client, Event(job.request.request_id, kind.value, attempt, detail, glb,
                                             timings or {}, worker))

    def _finish(self, job: JobRecord, now: float, *, error: dict | None = None, files: dict | None = None,
                sdf_file: str | None = None, info: dict | None = None, notify: bool = True) -> None:
        """Send the one FINAL of ``job`` (unless nobody is there to read it) and forget the job."""
        self.jobs.pop(job.job_id, None)
        self.keys.pop((job.client, job.request.request_id), None)
        self.admission.release(job.job_id)
        self.request_deadlines.disarm(job.job_id)
        self.attempt_deadlines.disarm(job.job_id)
        self.waits.cancel(job.job_id)
        job.state, job.waiting_in = (JobState.FAILED if error else JobState.DONE), None
        info = dict(info or {})
        if job.gen_info:
            info["generate"] = job.gen_info
        if job.debug_files:  # Result has no field of its own; the client pops this key
            info["debug_files"] = job.debug_files
        timings = job.timings(now)
        attempts = job.attempt + max(0, job.sdf_attempt - 1)
        cached = error is None and job.from_cache_generate and (job.from_cache_convert or not job.request.want_sdf)
        if self.cache is not None:
            info["cache"] = self.cache_info(job)
        if notify:
            self.out.to_client(job.client, Result(job.request.request_id, error is None, error, files or {},
                                                  sdf_file, info, timings, job.request.backend, attempts, cached))
        self.stats.total.add(timings["total_s"])
        if error is None:
            self.stats.completed += 1
            # DEBUG: a record per job costs a sixth of the broker's time per job; the
            # activity line sums them up once a minute.
            log.debug("job %s request %s: done in %.3f s", job.job_id, job.request.request_id, timings["total_s"],
                      extra={"job_id": job.job_id, "request_id": job.request.request_id})
        else:
            self.stats.failed += 1
            self.stats.cancelled += error.get("code") == "cancelled"
            log.log(logging.INFO if notify else logging.DEBUG, "job %s request %s: failed (%s/%s): %s", job.job_id,
                    job.request.request_id, error.get("stage"), error.get("code"), error.get("message"))

    # --- GPU queue ---------------------------------------------------------------

    def _enqueue(self, job: JobRecord, now: float, front: bool = False) -> None:
        self.attempt_deadlines.disarm(job.job_id)
        job.state, job.worker, job.waiting_in = JobState.QUEUED, None, job.request.backend
        queue = self.queues.get(job.request.backend)
        if queue is None:
            queue = self.queues[job.request.backend] = RoundRobinQueue()
        (queue.push_front if front else queue.push)(job.scene_key, job.job_id)
        self.waits.arm(job.job_id, job.request.backend, job.no_worker_timeout_s, now)

    def _dispatch(self, backend: str, now: float) -> None:
        """Hand queued jobs of ``backend`` to its idle workers, in round-robin order."""
        queue = self.queues.get(backend)
        while queue:
            worker = self.workers.take_idle(backend, now, self.heartbeat_interval_s)
            if worker is None:
                return
            _, job_id = queue.pop()
            job = self.jobs.get(job_id)
            if job is None:  # every path that ends a job takes it out of its queue; stay safe anyway
                self.workers.release(worker)
                continue
            self._start(job, worker, now)

    def _start(self, job: JobRecord, worker: GpuWorkerRecord, now: float) -> None:
        self.waits.cancel(job.job_id)
        due = self.request_deadlines.at(job.job_id)
        if due is not None and due <= now:
            self.workers.release(worker)
            self._request_expired(job.job_id, now)
            return
        if not job.terms.options_checked and worker.option_specs is not None:
            # Accepted before any declaration was known: checked against this
            # worker's before it spends a second on the job.
            try:
                job.terms.backend_options = check_backend_options(job.request.backend, worker.option_specs,
                                                                  job.terms.backend_options)
            except InputError as exc:
                self.workers.release(worker)
                self._finish(job, now, error=exc.to_dict())
                return
            job.terms.options_checked = True
        if self._answer_at_dispatch(job, worker, now):
            return
        job.attempt += 1
        job.state, job.waiting_in, job.worker, job.attempt_started_at = JobState.GENERATING, None, worker.identity, now
        if job.dispatched_at is None:
            job.dispatched_at = now
            self.stats.queue_wait.add(now - job.accepted_at)
        self.workers.assign(worker, job.job_id, job.attempt, now)
        worker.generate_key = job.generate_key
        req = job.request
        deadline_s = self._attempt_deadline_s(job, worker, now)
        message = Job(job.job_id, job.attempt, req.backend, req.input_name, req.input_data, req.prompt,
                      job.terms.backend_options, req.debug, deadline_s)
        if deadline_s is not None:
            self.attempt_deadlines.arm(job.job_id, now + deadline_s + self.dead_after_s, job.attempt)
        worker.heartbeat_due = now + self.heartbeat_interval_s  # the job tells it the broker is alive
        if not self.out.to_worker(worker.identity, message):
            # The worker's connection is gone and it never saw the job: not a counted attempt.
            worker.job_id = None
            self._lose_worker(worker, now, "its connection closed")
            job.attempt -= 1
            self._enqueue(job, now, front=True)
            return
        self._event(job, EventKind.GENERATING, detail=f"on worker {worker.worker_id}", worker=worker.worker_id)

    # --- housekeeping ------------------------------------------------------------

    def housekeeping(self, now: float) -> None:
        """Expire silent workers, leases and no-worker waits; heartbeat; dispatch."""
        liveness, interval_s = self.heartbeat_liveness, self.heartbeat_interval_s
        for worker in self.workers.silent(now, liveness, interval_s):
            self._lose_worker(worker, now, f"silent for {now - worker.last_seen:.2f} s")
        for worker_id in self.sdf.silent(now, liveness, interval_s):
            self._lose_sdf_worker(worker_id, now, f"silent for {liveness} heartbeat intervals")
        for job_id, attempt in self.sdf.expired(now):
            self._lease_expired(job_id, attempt, now)
        for job_id, pool in self.waits.due(now, self._live_workers):
            self._no_worker(self.jobs[job_id], pool, now)
        self._expire_clients(now)
        for job_id, attempt in self.attempt_deadlines.due(now):
            self._attempt_overran(job_id, attempt, now)
        for job_id, _ in self.request_deadlines.due(now):
            self._request_expired(job_id, now)
        # Each worker on its own phase: a hundred heartbeats at once would hold up
        # the requests that arrive behind them.
        heartbeat = BrokerHeartbeat(self.broker_id)
        for worker in self.workers:
            if now >= worker.heartbeat_due:
                worker.heartbeat_due = now + self.heartbeat_interval_s
                if not self.out.to_worker(worker.identity, heartbeat):
                    self._lose_worker(worker, now, "its connection closed")
        for backend, queue in list(self.queues.items()):
            if queue:
                self._dispatch(backend, now)
        self.pump_sdf(now)
        queued = sum(len(queue) for queue in self.queues.values()) + len(self.sdf.waiting)
        self._activity.maybe_log(now, len(self.jobs), queued)

    def _live_workers(self, pool: str) -> int:
        return len(self.sdf.workers) if pool == SDF_POOL else self.workers.alive(pool)

    def _no_worker(self, job: JobRecord, pool: str, now: float) -> None:
        if pool == SDF_POOL:
            self.sdf.waiting.remove(job.job_id)
            message = (f"no SDF worker was connected to convert this GLB within {job.no_worker_timeout_s:g} s; "
                       f"start one with `geomgen sdf-worker --broker {self.address}`")
        else:
            self.queues[pool].remove(job.scene_key, job.job_id)
            message = (f"no worker for backend {pool!r} was connected within {job.no_worker_timeout_s:g} s; "
                       f"start one with `geomgen gpu-worker --backend {pool} --broker {self.address}`")
        self._finish(job, now, error=error_dict(Stage.TRANSPORT, "no_worker", message))


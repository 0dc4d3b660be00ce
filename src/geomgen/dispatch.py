"""The broker's job life cycle without sockets: queued -> generating ->
converting -> done / failed, with retries, leases, no-worker waits and cancels.

broker.py decodes what arrives and calls in; everything that goes out leaves
through an Outbox. Times are monotonic seconds passed in by the caller.
"""

from __future__ import annotations

import itertools
import logging
import random
from typing import Any, Iterable, Protocol

from geomgen import defaults
from geomgen.admission import Admission, Limits
from geomgen.deadlines import Deadlines
from geomgen.errors import InputError, Stage
from geomgen.backends import load_backend_class
from geomgen.contract import check_backend_options
from geomgen.errors import GeomgenError
from geomgen.jobs import JobRecord, peer_error, validate_request
from geomgen.optionspec import specs_from_wire
from geomgen.protocol import (
    BrokerHeartbeat,
    ClientRequest,
    Command,
    Disconnect,
    Event,
    EventKind,
    Job,
    JobResult,
    JobState,
    Result,
    SdfJob,
    SdfResult,
    WorkerReady,
    error_dict,
)
from geomgen.scheduling import SDF_POOL, GpuWorkerRecord, RoundRobinQueue, WaitList, WorkerRegistry
from geomgen.sdf_pool import SdfPool
from geomgen.stats import BrokerStats

log = logging.getLogger("geomgen.broker")


class Outbox(Protocol):
    """Where the dispatcher's messages go (the broker's sockets)."""

    def to_client(self, identity: bytes, message: Any) -> None:
        """Best effort: a client that left cannot be reached and asks again later."""

    def to_worker(self, identity: bytes, message: Any) -> bool:
        """False when the worker's connection is gone."""

    def to_sdf(self, worker_id: str, job: SdfJob) -> bool:
        """False when that SDF worker cannot be reached now; the job stays queued."""


class Dispatcher:
    """Jobs, queues and workers of one broker. Settings as in Broker."""

    def __init__(self, out: Outbox, *, broker_id: str, address: str, heartbeat_interval_s: float,
                 heartbeat_liveness: int, max_retries: int, no_worker_timeout_s: float, sdf_lease_s: float,
                 known_backends: Iterable[str], now: float, limits: Limits | None = None,
                 client_liveness_s: float = defaults.CLIENT_LIVENESS_S) -> None:
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
        # Job ids: this broker's id and a counter, unique across broker restarts and
        # cheaper than a uuid per job.
        self._job_numbers = itertools.count(1)
        self._job_prefix = broker_id[:12] + "-"
        self._activity = _ActivityLog(self.stats, now)

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
            log.info("ignored request %s from client %s: already in flight", req.request_id, identity.hex())
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
        crowded = self.admission.refusal(identity, size_bytes)
        if crowded is not None:
            self.admission.refused += 1
            retry_after_s = self._retry_after_s()
            self.reject(identity, req.request_id, req.backend, Stage.TRANSPORT, "busy",
                        f"{crowded}; send it again in {retry_after_s:.1f} s (GeometryClient does)",
                        retry_after_s=retry_after_s)
            return
        timeout_s = self.no_worker_timeout_s if req.no_worker_timeout_s is None else float(req.no_worker_timeout_s)
        job_id = f"{self._job_prefix}{next(self._job_numbers):x}"
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
        self._enqueue(job, now)
        self._dispatch(req.backend, now)

    def option_specs(self, backend: str) -> tuple | None:
        """The options ``backend`` declares (OptionSpec), or None when undeclared or unknown here."""
        if backend not in self.declared:
            try:
                self.declared[backend] = load_backend_class(backend).options_spec
            except GeomgenError:  # a plug-in installed only where its workers run: learnt at READY
                return None
        return self.declared[backend]

    def reject(self, identity: bytes, request_id: str, backend: str, stage: Any, code: str, message: str,
               retry_after_s: float | None = None) -> None:
        """Answer a request that was never accepted with its one FINAL error
        (with ``retry_after_s`` in the error map for a ``busy`` refusal)."""
        self.stats.rejected += 1
        log.info("rejected request %s from client %s: %s (%s)", request_id, identity.hex(), message, code)
        error: dict[str, Any] = error_dict(stage, code, message)
        if retry_after_s is not None:
            error["retry_after_s"] = round(retry_after_s, 3)
        self.out.to_client(identity, Result(request_id, ok=False, error=error, backend=backend, attempts=0))

    def _retry_after_s(self) -> float:
        """When a refused request may find room: about one job's time, within bounds."""
        typical_s = self.stats.total.mean_s if self.stats.total.count else defaults.BUSY_RETRY_MIN_S
        return min(defaults.BUSY_RETRY_MAX_S, max(defaults.BUSY_RETRY_MIN_S, typical_s))

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

    def _request_expired(self, job_id: str, now: float) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        state = job.state.value
        self._withdraw(job)
        self._finish(job, now, error=error_dict(
            Stage.TRANSPORT, "timeout",
            f"the request's deadline of {job.request.deadline_s:g} s passed while it was {state}; "
            "send it again with a longer deadline_s, or when the broker is less busy"))

    def _attempt_overran(self, job_id: str, attempt: int, now: float) -> None:
        """A GPU attempt outlived its deadline and the liveness window after it
        without an answer: the worker did not abandon it as it should, so the
        job fails and the worker gets no work until it reports idle."""
        job = self.jobs.get(job_id)
        if job is None or job.state is not JobState.GENERATING or job.attempt != attempt:
            return
        worker = self.workers.get(job.worker) if job.worker else None
        name = worker.worker_id if worker else "?"
        if worker is not None and worker.job_id == job_id:
            self.workers.block(worker)
        log.warning("job %s attempt %d: worker %s did not answer by its deadline; the job fails and the worker "
                    "gets no work until it reports idle", job_id, attempt, name)
        self._finish(job, now, error=error_dict(
            Stage.GENERATE, "timeout",
            f"the {job.request.backend} worker {name} did not finish or abandon this job within its deadline "
            f"(+{self.dead_after_s:g} s); it gets no more work until it reports idle"))

    def _expire_clients(self, now: float) -> None:
        """Drop the jobs of clients silent past the liveness window: nobody would
        read their results, so no GPU second is spent on them."""
        for client in self.admission.clients():
            silent_s = now - self.clients_seen.get(client, now)
            if silent_s > self.client_liveness_s:
                self._drop_client(client, now, silent_s)
        for client in [c for c in self.clients_seen if not self.admission.client_jobs(c)]:
            del self.clients_seen[client]

    def _drop_client(self, client: bytes, now: float, silent_s: float) -> None:
        job_ids = {job_id for (identity, _), job_id in self.keys.items() if identity == client}
        queued = sum(queue.remove_all(job_ids) for queue in self.queues.values())
        waiting = len(self.sdf.waiting)
        self.sdf.waiting = type(self.sdf.waiting)(j for j in self.sdf.waiting if j not in job_ids)
        queued += waiting - len(self.sdf.waiting)
        message = f"the client was silent for {silent_s:.0f} s (liveness window {self.client_liveness_s:g} s)"
        for job_id in job_ids:
            job = self.jobs[job_id]
            job.waiting_in = None  # out of its queue already
            if job.state is JobState.CONVERTING:
                self.sdf.forget(job_id)
            # A running GPU job's result is discarded when it comes.
            self._finish(job, now, error=error_dict(Stage.TRANSPORT, "client_gone", message), notify=False)
        self.clients_seen.pop(client, None)
        self.stats.clients_lost += 1
        self.stats.jobs_dropped += len(job_ids)
        log.warning("client %s gone: %s; dropped its %d jobs (%d queued, %d running or converting)",
                    client.hex(), message, len(job_ids), queued, len(job_ids) - queued)

    def _event(self, job: JobRecord, kind: EventKind, *, attempt: int | None = None, detail: str = "",
               glb: bytes | None = None, timings: dict | None = None, worker: str = "") -> None:
        if not job.request.events and kind is not EventKind.GLB_READY:
            return  # the client asked for results only; glb_ready carries the GLB itself
        attempt = attempt if attempt is not None else max(1, job.attempt)
        # DEBUG: at thousands of jobs a second, a log record per event costs more than the event.
        log.debug("job %s request %s: %s (attempt %d) %s", job.job_id, job.request.request_id, kind.value, attempt,
                  detail)
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
        if notify:
            self.out.to_client(job.client, Result(job.request.request_id, error is None, error, files or {},
                                                  sdf_file, info, timings, job.request.backend, attempts))
        self.stats.total.add(timings["total_s"])
        if error is None:
            self.stats.completed += 1
            # DEBUG: a record per job costs a sixth of the broker's time per job; the
            # activity line sums them up once a minute.
            log.debug("job %s request %s: done in %.3f s", job.job_id, job.request.request_id, timings["total_s"])
        else:
            self.stats.failed += 1
            self.stats.cancelled += error.get("code") == "cancelled"
            log.log(logging.INFO if notify else logging.DEBUG, "job %s request %s: failed (%s/%s): %s", job.job_id,
                    job.request.request_id, error.get("stage"), error.get("code"), error.get("message"))

    # --- GPU queue and workers ---------------------------------------------------

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
        job.attempt += 1
        job.state, job.waiting_in, job.worker, job.attempt_started_at = JobState.GENERATING, None, worker.identity, now
        if job.dispatched_at is None:
            job.dispatched_at = now
            self.stats.queue_wait.add(now - job.accepted_at)
        self.workers.assign(worker, job.job_id, job.attempt, now)
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

    def _attempt_deadline_s(self, job: JobRecord, worker: GpuWorkerRecord, now: float) -> float | None:
        """How long this attempt may run: the worker's generate timeout, or what is
        left of the request's deadline if that is sooner (None: no limit known)."""
        limits = []
        declared = worker.info.get("generate_timeout_s")
        if isinstance(declared, (int, float)) and not isinstance(declared, bool) and declared > 0:
            limits.append(float(declared))
        due = self.request_deadlines.at(job.job_id)
        if due is not None:
            limits.append(max(0.0, due - now))
        return min(limits) if limits else None

    def worker_message(self, identity: bytes, command: Command, msg: Any, now: float) -> None:
        """A decoded message from a GPU worker."""
        if command is Command.READY:
            self._worker_ready(identity, msg, now)
            return
        worker = self.workers.get(identity)
        if worker is None:
            if command is not Command.DISCONNECT:
                # Typically this broker restarted: the worker reconnects and says READY again.
                log.info("told unknown GPU worker %s to reconnect", identity.hex())
                self.out.to_worker(identity, Disconnect("unknown worker: send READY again", getattr(msg, "worker_id", "")))
            return
        worker.last_seen = now
        if command is Command.HEARTBEAT:
            if msg.loading:
                if worker.job_id is None and not worker.blocked:
                    self.workers.block(worker)  # its backend is reloading: no work until it says otherwise
            elif worker.blocked and msg.job_id is None:
                self.workers.unblock(worker)
                self._dispatch(worker.backend, now)
            elif worker.job_id is None and msg.job_id is not None:
                self.workers.block(worker)  # it runs something we did not give it
        elif command is Command.PARTIAL:
            job = self.jobs.get(msg.job_id)
            if job is not None and job.attempt == msg.attempt and job.worker == identity:
                self._event(job, EventKind.PROGRESS, detail=msg.detail, worker=worker.worker_id)
        elif command is Command.FINAL:
            self._job_result(worker, msg, now)
        elif command is Command.DISCONNECT:
            self._lose_worker(worker, now, f"it disconnected ({msg.reason or 'no reason given'})", left=True)

    def worker_result_unreadable(self, identity: bytes, reason: str, now: float) -> None:
        """A known worker's FINAL could not be decoded: fail the job it ran rather than wait forever."""
        worker = self.workers.get(identity)
        if worker is None or worker.job_id is None:
            return
        job = self.jobs.get(worker.job_id)
        attempt = worker.attempt
        self.workers.release(worker)
        if job is not None and job.attempt == attempt and job.state is JobState.GENERATING:
            message = f"worker {worker.worker_id} sent a result the broker could not read: {reason}"
            self._finish(job, now, error=error_dict(Stage.TRANSPORT, "protocol", message))
        self._dispatch(worker.backend, now)

    def _worker_ready(self, identity: bytes, msg: WorkerReady, now: float) -> None:
        if not msg.backend or not msg.worker_id:
            log.warning("GPU worker %s sent READY without backend or worker_id; told it to go", identity.hex())
            self.out.to_worker(identity, Disconnect("READY needs a backend and a worker_id", msg.worker_id))
            return
        try:
            specs = specs_from_wire(msg.info.get("options"))
        except (ValueError, TypeError) as exc:
            log.warning("GPU worker %s declared options the broker cannot read (%s); its requests are checked "
                        "where they run", msg.worker_id, exc)
            specs = None
        worker = GpuWorkerRecord(identity, msg.worker_id, msg.backend, msg.hostname, msg.pid, msg.gpu, msg.info,
                                 option_specs=specs, last_seen=now, heartbeat_interval_s=msg.heartbeat_interval_s,
                                 heartbeat_due=now + self.heartbeat_interval_s * random.uniform(0.5, 1.0))
        running = _running_job(msg.info.get("running_job"))
        replaced = self.workers.add(worker)
        for old in replaced:
            if running is not None and (old.job_id, old.attempt) == running:
                # It reconnected mid-job (a new connection, the same process): the
                # job goes on there, so it keeps the job instead of losing it.
                self._transfer(old, worker, now)
            else:
                self._lose_worker(old, now, "it registered again", removed=True)
        if running is not None and worker.job_id is None:
            # Busy with a job this broker did not give it (the broker restarted):
            # no work until a heartbeat says it is idle.
            self.workers.block(worker)
        if specs is not None or msg.backend not in self.declared:
            self.declared[msg.backend] = specs
        self.registered.add(msg.backend)
        self.stats.backend(msg.backend).registrations += 1
        log.info("GPU worker %s ready: backend %s on %s (pid %d, gpu %s)", msg.worker_id, msg.backend,
                 msg.hostname, msg.pid, msg.gpu)
        self._dispatch(msg.backend, now)

    def _transfer(self, old: GpuWorkerRecord, new: GpuWorkerRecord, now: float) -> None:
        """The job ``old`` ran continues on ``new``, the same worker on a new connection."""
        self.workers.assign(new, old.job_id, old.attempt, now)
        new.job_sent_at, new.completed, new.failed = old.job_sent_at, old.completed, old.failed
        job = self.jobs.get(old.job_id)
        if job is not None and job.state is JobState.GENERATING and job.attempt == old.attempt:
            job.worker = new.identity
        log.info("GPU worker %s reconnected mid-job; job %s attempt %d goes on there", new.worker_id, old.job_id,
                 old.attempt)

    def _job_result(self, worker: GpuWorkerRecord, res: JobResult, now: float) -> None:
        if worker.job_id != res.job_id or worker.attempt != res.attempt:
            self.stats.stale_results += 1
            log.info("dropped result of job %s attempt %d from worker %s: not its current job",
                     res.job_id, res.attempt, worker.worker_id)
            return
        job = self.jobs.get(res.job_id)
        current = job is not None and job.attempt == res.attempt and job.state is JobState.GENERATING
        error = res.error if isinstance(res.error, dict) else {}
        if not res.ok and error.get("code") == "busy":
            self.workers.block(worker)  # busy with a job we do not know of; it waits for an idle heartbeat
            if current:
                job.attempt -= 1  # a refusal is not an attempt
                self._enqueue(job, now, front=True)
                self._dispatch(worker.backend, now)
            return
        self.workers.release(worker)
        counters = self.stats.backend(worker.backend)
        if not current:
            self.stats.stale_results += 1
            log.info("discarded result of job %s attempt %d: cancelled or superseded", res.job_id, res.attempt)
        elif res.ok and res.glb:
            worker.completed += 1
            counters.completed += 1
            self._glb_ready(job, res, worker, now)
        else:
            worker.failed += 1
            counters.failed += 1
            fallback = "the worker reported success but sent no GLB" if res.ok else "the worker reported a failure"
            self._finish(job, now, error=peer_error(res.error, Stage.GENERATE, "generate_failed", fallback))
        self._dispatch(worker.backend, now)

    def _lose_worker(self, worker: GpuWorkerRecord, now: float, reason: str, *, removed: bool = False,
                     left: bool = False) -> None:
        """Forget a dead, silent or departed (``left``) worker and re-queue the job it ran."""
        if not removed:
            self.workers.remove(worker.identity)
        job = self.jobs.get(worker.job_id) if worker.job_id else None
        if left and job is None:
            log.info("GPU worker %s (%s) left: %s", worker.worker_id, worker.backend, reason)
        else:
            self.stats.backend(worker.backend).lost += 1
            log.warning("GPU worker %s (%s) lost: %s", worker.worker_id, worker.backend, reason)
        if job is not None and job.state is JobState.GENERATING and job.attempt == worker.attempt:
            job.lost += 1
            if job.lost > self.max_retries:
                self._finish(job, now, error=error_dict(
                    Stage.TRANSPORT, "worker_lost",
                    f"the {worker.backend} worker running this job stopped responding {job.lost} times (last: "
                    f"{reason}); check the GPU workers' logs for a crash or an out-of-memory kill, then send it again"))
            else:
                self.stats.retried += 1
                self._event(job, EventKind.RETRYING, attempt=job.attempt + 1,
                            detail=f"worker {worker.worker_id} lost ({reason}); retry {job.lost} of {self.max_retries}")
                self._enqueue(job, now, front=True)
        if self.workers.alive(worker.backend) == 0:
            self.waits.pool_emptied(worker.backend, now)

    # --- SDF pool -------------------------------------------------------------------

    def _glb_ready(self, job: JobRecord, res: JobResult, worker: GpuWorkerRecord, now: float) -> None:
        job.generate_s = now - job.attempt_started_at
        job.worker_generate_s = res.seconds
        job.gen_info, job.debug_files = dict(res.info), dict(res.debug_files)
        job.request.input_data = b""  # a finished generation never runs again; free the input
        glb = bytes(res.glb)
        self.admission.resize(job.job_id, len(glb) if job.request.want_sdf else 0)
        self.stats.generate.add(job.generate_s)
        self._event(job, EventKind.GLB_READY, glb=glb, timings=job.timings(now), worker=worker.worker_id)
        if not job.request.want_sdf:
            self._finish(job, now)
            return
        job.state, job.glb, job.sdf_queued_at, job.waiting_in = JobState.CONVERTING, glb, now, SDF_POOL
        self.sdf.waiting.append(job.job_id)
        self.waits.arm(job.job_id, SDF_POOL, job.no_worker_timeout_s, now)
        self.pump_sdf(now)

    def pump_sdf(self, now: float) -> None:
        """Send waiting SDF jobs, each to the live SDF worker with the most free
        slots, while one has credit. A worker that has gone quiet gets none."""
        pool, unreachable = self.sdf, set()
        while pool.waiting:
            job = self.jobs.get(pool.waiting[0])
            if job is None:
                pool.waiting.popleft()
                continue
            worker_id = pool.pick(now, self.heartbeat_interval_s, unreachable)
            if worker_id is None:
                return
            attempt = job.sdf_attempt + 1
            message = SdfJob(job.job_id, attempt, job.request.output_name, job.glb, job.terms.convert)
            if not self.out.to_sdf(worker_id, message):
                unreachable.add(worker_id)  # its connection is not up (yet): another worker, or later
                continue
            pool.waiting.popleft()
            self.waits.cancel(job.job_id)
            job.waiting_in, job.sdf_attempt, job.sdf_pushed_at = None, attempt, now
            pool.pushed(job.job_id, attempt, now, worker_id)
            self._event(job, EventKind.CONVERTING, attempt=attempt, detail=f"sent to SDF worker {worker_id}",
                        worker=worker_id)

    def sdf_message(self, command: Command, msg: Any, now: float) -> None:
        """A decoded message from an SDF worker."""
        if command in (Command.READY, Command.HEARTBEAT):
            if not msg.worker_id:
                self.stats.dropped_messages += 1
                log.warning("dropped an SDF status without worker_id")
                return
            if self.sdf.status(msg.worker_id, msg.slots, msg.free, msg.held, now, hostname=msg.hostname, pid=msg.pid,
                           heartbeat_interval_s=msg.heartbeat_interval_s):
                log.info("SDF worker %s ready: %d slots on %s (pid %d)", msg.worker_id, msg.slots, msg.hostname, msg.pid)
            self.pump_sdf(now)
        elif command is Command.FINAL:
            self._sdf_result(msg, now)
        elif command is Command.DISCONNECT:
            self._lose_sdf_worker(msg.worker_id, now, f"it disconnected ({msg.reason or 'no reason given'})")

    def _sdf_result(self, res: SdfResult, now: float) -> None:
        worker = self.sdf.workers.get(res.worker_id)
        bounced = not res.ok and (res.error or {}).get("code") == "busy"
        if worker is not None:
            worker.last_seen = now
            worker.completed += res.ok
            worker.failed += not res.ok and not bounced
        current = self.sdf.finished(res.job_id, res.attempt)
        job = self.jobs.get(res.job_id)
        if not current or job is None or job.state is not JobState.CONVERTING or job.sdf_attempt != res.attempt:
            self.stats.stale_results += 1
            log.info("discarded SDF result of job %s attempt %d: cancelled or superseded", res.job_id, res.attempt)
            return
        if bounced:
            # PUSH picked a worker with no free slot (it cannot know which one has
            # credit): the job comes straight back, uncounted, for the next worker.
            log.debug("SDF worker %s had no free slot for job %s; pushing it again", res.worker_id, res.job_id)
            job.waiting_in, job.sdf_attempt = SDF_POOL, job.sdf_attempt - 1  # not an attempt: push it as the same one
            self.sdf.waiting.appendleft(job.job_id)
            self.pump_sdf(now)
            return
        job.convert_s, job.worker_convert_s = now - job.sdf_pushed_at, res.seconds
        self.stats.convert.add(job.convert_s)
        if res.ok and res.files:
            self._finish(job, now, files=res.files, sdf_file=res.sdf_file, info=res.info)
        else:
            fallback = "the SDF worker reported success but sent no files" if res.ok else "the SDF worker reported a failure"
            self._finish(job, now, error=peer_error(res.error, Stage.CONVERT, "convert_failed", fallback), info=res.info)
        self.pump_sdf(now)

    def _lose_sdf_worker(self, worker_id: str, now: float, reason: str) -> None:
        if self.sdf.remove(worker_id, now) is None:
            return
        log.warning("SDF worker %s lost: %s", worker_id, reason)
        if not self.sdf.workers:
            self.waits.pool_emptied(SDF_POOL, now)

    def _lease_expired(self, job_id: str, attempt: int, now: float) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.state is not JobState.CONVERTING or job.sdf_attempt != attempt:
            return
        job.sdf_lost += 1
        if job.sdf_lost > self.max_retries:
            self._finish(job, now, error=error_dict(
                Stage.CONVERT, "worker_lost",
                f"the SDF conversion of this job was lost {job.sdf_lost} times (no SDF worker held it for "
                f"{self.sdf.lease_s:g} s); check the SDF workers' logs for crashes, then send the request again"))
            return
        self.stats.repushed += 1
        self._event(job, EventKind.RETRYING, attempt=attempt + 1,
                    detail=f"SDF lease ran out; re-push {job.sdf_lost} of {self.max_retries}")
        job.waiting_in = SDF_POOL
        self.sdf.waiting.appendleft(job_id)
        self.waits.arm(job_id, SDF_POOL, job.no_worker_timeout_s, now)

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


def _running_job(value: Any) -> tuple[str, int] | None:
    """A READY's ``info.running_job`` ([job_id, attempt]) when well formed."""
    if (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool)):
        return value[0], value[1]
    return None


class _ActivityLog:
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

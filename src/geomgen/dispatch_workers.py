"""The Dispatcher's side of the GPU workers: READY (a new worker, or one back
mid-job), heartbeats, progress, results and lost workers.

Methods of Dispatcher (dispatch.py), which holds the state they use.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from geomgen.errors import Stage
from geomgen.jobs import declared_interval_s, peer_error
from geomgen.optionspec import specs_from_wire
from geomgen.protocol import Command, Disconnect, EventKind, JobResult, JobState, WorkerReady, error_dict
from geomgen.scheduling import GpuWorkerRecord

log = logging.getLogger("geomgen.broker")


class GpuWorkers:
    """Dispatcher methods for what GPU workers say and for losing one."""

    def worker_message(self, identity: bytes, command: Command, msg: Any, now: float, key: str | None = None) -> None:
        """A decoded message from a GPU worker; ``key`` is the CURVE key it came with (None without keys)."""
        if command is Command.READY:
            self._worker_ready(identity, msg, now, key)
            return
        worker = self.workers.get(identity)
        if worker is not None and worker.key != key:
            self.stats.dropped_messages += 1  # not the key that registered this connection's worker
            return
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

    def _worker_ready(self, identity: bytes, msg: WorkerReady, now: float, key: str | None = None) -> None:
        if not msg.backend or not msg.worker_id:
            log.warning("GPU worker %s sent READY without backend or worker_id; told it to go", identity.hex())
            self.out.to_worker(identity, Disconnect("READY needs a backend and a worker_id", msg.worker_id))
            return
        registered = self.workers.find(msg.worker_id)
        if registered is not None and registered.key != key:
            # Only the key that registered a worker id may announce it again.
            self.stats.dropped_messages += 1
            log.warning("refused READY for GPU worker %s from another key than the one that registered it",
                        msg.worker_id)
            self.out.to_worker(identity, Disconnect("this worker id is registered by another key", msg.worker_id))
            return
        try:
            specs = specs_from_wire(msg.info.get("options"))
        except (ValueError, TypeError) as exc:
            log.warning("GPU worker %s declared options the broker cannot read (%s); its requests are checked "
                        "where they run", msg.worker_id, exc)
            specs = None
        # The model identity rides in the record's info, for the result cache's keys.
        info = {**msg.info, "model_identity": msg.model_identity}
        worker = GpuWorkerRecord(identity, msg.worker_id, msg.backend, msg.hostname, msg.pid, msg.gpu, info,
                                 option_specs=specs, key=key, last_seen=now,
                                 heartbeat_interval_s=declared_interval_s(msg.heartbeat_interval_s,
                                                                          f"GPU worker {msg.worker_id}"),
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
        self.model_identities[msg.backend] = msg.model_identity
        self.stats.backend(msg.backend).registrations += 1
        log.info("GPU worker %s ready: backend %s on %s (pid %d, gpu %s)", msg.worker_id, msg.backend,
                 msg.hostname, msg.pid, msg.gpu)
        self._dispatch(msg.backend, now)

    def _transfer(self, old: GpuWorkerRecord, new: GpuWorkerRecord, now: float) -> None:
        """The job ``old`` ran continues on ``new``, the same worker on a new connection."""
        self.workers.assign(new, old.job_id, old.attempt, now)
        new.job_sent_at, new.completed, new.failed = old.job_sent_at, old.completed, old.failed
        new.generate_key = old.generate_key
        job = self.jobs.get(old.job_id)
        if job is not None and job.state is JobState.GENERATING and job.attempt == old.attempt:
            job.worker = new.identity
        log.info("GPU worker %s reconnected mid-job; job %s attempt %d goes on there", new.worker_id, old.job_id,
                 old.attempt, extra={"job_id": old.job_id, "attempt": old.attempt})

    def _job_result(self, worker: GpuWorkerRecord, res: JobResult, now: float) -> None:
        if worker.job_id != res.job_id or worker.attempt != res.attempt:
            self.stats.stale_results += 1
            log.info("dropped result of job %s attempt %d from worker %s: not its current job",
                     res.job_id, res.attempt, worker.worker_id, extra={"job_id": res.job_id, "attempt": res.attempt})
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
            log.info("discarded result of job %s attempt %d: cancelled or superseded", res.job_id, res.attempt,
                     extra={"job_id": res.job_id, "attempt": res.attempt})
            if res.ok and res.glb:  # the GPU time is spent: a retry of the same request finds it in the cache
                self._store_generated_as(worker.generate_key, res, bytes(res.glb))
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


def _running_job(value: Any) -> tuple[str, int] | None:
    """A READY's ``info.running_job`` ([job_id, attempt]) when well formed."""
    if (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool)):
        return value[0], value[1]
    return None

"""The Dispatcher's guards: a request refused while the broker holds too much,
clients gone silent, requests past their deadline and GPU attempts overrunning.

Methods of Dispatcher (dispatch.py), which holds the state they use.
"""

from __future__ import annotations

import logging

from geomgen import defaults
from geomgen.errors import Stage
from geomgen.jobs import JobRecord
from geomgen.protocol import ClientRequest, JobState, error_dict
from geomgen.scheduling import GpuWorkerRecord

log = logging.getLogger("geomgen.broker")


class Guards:
    """Dispatcher methods that refuse, drop or fail work the broker should not carry on."""

    # --- admission -------------------------------------------------------------

    def _admission_refused(self, identity: bytes, req: ClientRequest, size_bytes: int) -> bool:
        """Refuse ``req`` as ``busy`` (True) when accepting it would pass a limit."""
        crowded = self.admission.refusal(identity, size_bytes)
        if crowded is None:
            return False
        self.admission.refused += 1
        retry_after_s = self._retry_after_s()
        self.reject(identity, req.request_id, req.backend, Stage.TRANSPORT, "busy",
                    f"{crowded}; send it again in {retry_after_s:.1f} s (GeometryClient does)",
                    retry_after_s=retry_after_s)
        return True

    def _retry_after_s(self) -> float:
        """When a refused request may find room: about one job's time, within bounds."""
        typical_s = self.stats.total.mean_s if self.stats.total.count else defaults.BUSY_RETRY_MIN_S
        return min(defaults.BUSY_RETRY_MAX_S, max(defaults.BUSY_RETRY_MIN_S, typical_s))

    # --- client liveness -------------------------------------------------------

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

    # --- deadlines -------------------------------------------------------------

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
                    "gets no work until it reports idle", job_id, attempt, name,
                    extra={"job_id": job_id, "attempt": attempt})
        self._finish(job, now, error=error_dict(
            Stage.GENERATE, "timeout",
            f"the {job.request.backend} worker {name} did not finish or abandon this job within its deadline "
            f"(+{self.dead_after_s:g} s); it gets no more work until it reports idle"))

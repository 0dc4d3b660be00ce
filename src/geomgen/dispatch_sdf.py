"""The Dispatcher's SDF stage: a finished GLB queued for conversion, pushed to
the SDF worker with credit, its result or bounce, lost SDF workers and leases.

Methods of Dispatcher (dispatch.py), which holds the state they use.
"""

from __future__ import annotations

import logging
from typing import Any

from geomgen.errors import Stage
from geomgen.jobs import JobRecord, declared_interval_s, declared_slots, peer_error
from geomgen.protocol import Command, EventKind, JobResult, JobState, SdfJob, SdfResult, error_dict
from geomgen.scheduling import SDF_POOL, GpuWorkerRecord

log = logging.getLogger("geomgen.broker")


class SdfStage:
    """Dispatcher methods from a GLB that is ready to the job's converted files."""

    def _glb_ready(self, job: JobRecord, res: JobResult, worker: GpuWorkerRecord, now: float) -> None:
        job.generate_s = now - job.attempt_started_at
        job.worker_generate_s = res.seconds
        job.gen_info, job.debug_files = dict(res.info), dict(res.debug_files)
        job.request.input_data = b""  # a finished generation never runs again; free the input
        glb = bytes(res.glb)
        self.admission.resize(job.job_id, len(glb) if job.request.want_sdf else 0)
        self.stats.generate.add(job.generate_s)
        self._store_generated(job, res, glb)
        self._event(job, EventKind.GLB_READY, glb=glb, timings=job.timings(now), worker=worker.worker_id)
        if not job.request.want_sdf:
            self._finish(job, now)
            return
        self._to_conversion(job, glb, now)

    def _to_conversion(self, job: JobRecord, glb: bytes, now: float) -> None:
        """Queue a job whose GLB is ready for the SDF pool, unless the result cache holds its package."""
        if self._converted_from_cache(job, glb, now):
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

    def sdf_message(self, command: Command, msg: Any, now: float, key: str | None = None) -> None:
        """A decoded message from an SDF worker; ``key`` is the CURVE key it came with (None without keys)."""
        registered = self.sdf.workers.get(getattr(msg, "worker_id", ""))
        if registered is not None and registered.key != key:
            # Statuses, results and goodbyes of a worker id come from the key that registered it.
            self.stats.dropped_messages += 1
            log.debug("dropped an SDF %s for worker %s sent with another key", command.name, msg.worker_id)
            return
        if command in (Command.READY, Command.HEARTBEAT):
            if not msg.worker_id:
                self.stats.dropped_messages += 1
                log.warning("dropped an SDF status without worker_id")
                return
            peer = f"SDF worker {msg.worker_id}"
            if self.sdf.status(msg.worker_id, declared_slots(msg.slots, peer), msg.free, msg.held, now,
                               hostname=msg.hostname, pid=msg.pid,
                               heartbeat_interval_s=declared_interval_s(msg.heartbeat_interval_s, peer), key=key):
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
        current = self.sdf.finished(res.job_id, res.attempt, res.worker_id)
        job = self.jobs.get(res.job_id)
        if not current or job is None or job.state is not JobState.CONVERTING or job.sdf_attempt != res.attempt:
            self.stats.stale_results += 1
            log.info("discarded SDF result of job %s attempt %d: cancelled or superseded", res.job_id, res.attempt,
                     extra={"job_id": res.job_id, "attempt": res.attempt})
            return
        if bounced:
            # PUSH picked a worker with no free slot (it cannot know which one has
            # credit): the job comes straight back, uncounted, for the next worker.
            log.debug("SDF worker %s had no free slot for job %s; pushing it again", res.worker_id, res.job_id,
                      extra={"job_id": res.job_id})
            job.waiting_in, job.sdf_attempt = SDF_POOL, job.sdf_attempt - 1  # not an attempt: push it as the same one
            self.sdf.waiting.appendleft(job.job_id)
            self.pump_sdf(now)
            return
        job.convert_s, job.worker_convert_s = now - job.sdf_pushed_at, res.seconds
        self.stats.convert.add(job.convert_s)
        if res.ok and res.files:
            self._store_converted(job, res)
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

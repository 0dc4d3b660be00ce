"""The SDF worker process: pulls GLBs from the broker and pushes back Drake SDF packages.

It holds at most ``procs`` jobs, announces its free slots on every change, and
runs each conversion in its own child process (geomgen.conversion, which
also drives the fallback ladder across children), so a crash, a hang or a leak
in native code fails one job and never the worker.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import zmq

from geomgen import contract, convert_child, defaults, logs, protocol
from geomgen.conversion import KILL_WAIT_S, Conversion, package_files
from geomgen.endpoints import Endpoints
from geomgen.geometry.formats import check_writable
from geomgen.keys import PeerKeys, apply_client_curve
from geomgen.lifecycle import stop_on_signals, stop_signals_ignored
from geomgen.errors import GeomgenError, InputError, ProtocolError, Stage

log = logging.getLogger("geomgen.sdf_worker")

START_CHECK_TIMEOUT_S = 120.0  # first child at start-up: forkserver launch plus warm imports
MAX_WORKER_ID_BYTES = 255  # a ZeroMQ identity's limit
TIMEOUT_HINT = "raise the SDF worker's conversion timeout (--convert-timeout)"


@dataclass
class _Held:
    """A job this worker holds, and the conversion running it."""

    job_id: str
    attempt: int
    name: str
    conversion: Conversion


class SdfWorker:
    """Receives SdfJobs on a DEALER whose identity is its worker id (the broker
    addresses each job to a worker with a free slot; one that arrives with none,
    after a stale status, is handed back as "busy"), converts each in a child
    process, PUSHes SdfResults and SdfStatus heartbeats to the broker.

    Drive it with ``run(stop_event)`` or ``run_once(timeout_s)``; ``stop()``
    says DISCONNECT and kills running conversions; ``close()`` frees sockets.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        procs: int = 1,
        heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S,
        convert_timeout_s: float = defaults.SDF_CONVERT_TIMEOUT_S,
        worker_id: str | None = None,
        keys: PeerKeys | None = None,
    ):
        if procs < 1:
            raise InputError(f"procs must be at least 1, got {procs}", code="bad_option")
        for label, value_s in (("heartbeat interval", heartbeat_interval_s), ("conversion timeout", convert_timeout_s)):
            if not value_s > 0:
                raise InputError(f"the {label} must be > 0 seconds, got {value_s}", code="bad_option")
        self.endpoints = endpoints
        self.slots = procs
        self.heartbeat_interval_s = heartbeat_interval_s
        self.convert_timeout_s = convert_timeout_s
        self.worker_id = worker_id or f"sdf-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if not 0 < len(self.worker_id.encode()) <= MAX_WORKER_ID_BYTES or self.worker_id.startswith("\0"):
            raise InputError(f"worker id must be 1 to {MAX_WORKER_ID_BYTES} bytes (it is the socket identity the "
                             f"broker sends jobs to), got {self.worker_id!r}", code="bad_option")
        self.completed = 0
        self.failed = 0
        self.max_held = 0  # the most jobs held at once, never above slots

        self.convert_fn = convert_child.convert_fn_spec()  # resolved here, named to each child
        self._mp = convert_child.child_context()
        self._running: dict[tuple[str, int], _Held] = {}  # by (job_id, attempt)
        self._ctx = zmq.Context()
        self._jobs = self._ctx.socket(zmq.DEALER)
        self._results = self._ctx.socket(zmq.PUSH)
        if keys is not None:  # CURVE keys for a broker started with --keys
            apply_client_curve(self._jobs, keys)
            apply_client_curve(self._results, keys)
        self._jobs.setsockopt(zmq.IDENTITY, self.worker_id.encode())  # how the broker addresses this worker
        self._jobs.setsockopt(zmq.LINGER, 0)
        self._jobs.setsockopt(zmq.MAXMSGSIZE, defaults.MAX_MESSAGE_BYTES)
        self._jobs.connect(endpoints.sdf_job)
        self._results.setsockopt(zmq.LINGER, 0)
        self._results.connect(endpoints.sdf_result)
        self._next_heartbeat_s = 0.0
        self._announced = False
        self._dropping = False  # the result queue was full at the last send
        self._closed = False

    @property
    def free(self) -> int:
        return self.slots - len(self._running)

    # --- the loop -------------------------------------------------------------

    def check_children(self, timeout_s: float = START_CHECK_TIMEOUT_S) -> None:
        """Start one child that only imports the conversion function: launches
        the forkserver (warm imports) before READY. Raises InputError if
        children cannot start or the converter cannot be imported."""
        started_s = time.monotonic()
        probe = self._mp.Process(target=convert_child.check, name="convert-check", daemon=False)
        probe.start()
        probe.join(timeout_s)
        if probe.exitcode is None:
            probe.kill()
            probe.join(KILL_WAIT_S)
            raise InputError(f"a conversion process did not start within {timeout_s:g} s", code="start_failed",
                             stage=Stage.CONVERT)
        if probe.exitcode == convert_child.CHECK_FAILED_EXIT:
            raise InputError(f"the conversion function {convert_child.convert_fn_spec()!r} cannot be loaded "
                             "(see the line above)", code="start_failed", stage=Stage.CONVERT)
        if probe.exitcode != 0:
            raise InputError(
                f"a conversion process failed at start (exit code {probe.exitcode}); see its traceback above "
                f"(a conversion process imports the converter {convert_child.convert_fn_spec()!r} and the "
                "program's main module, which must guard its entry with if __name__ == '__main__')",
                code="start_failed", stage=Stage.CONVERT,
            )
        probe.close()
        log.info("conversion processes ready in %.2f s", time.monotonic() - started_s)

    def run(self, stop_event: threading.Event) -> None:
        """Serve until ``stop_event`` is set, then ``stop()``."""
        while not stop_event.is_set():
            self.run_once(defaults.POLL_INTERVAL_S)
        self.stop()

    def run_once(self, timeout_s: float) -> None:
        """One turn: poll at most ``timeout_s`` for jobs and for news from the
        conversion children, handle them, move every conversion on (finished,
        next rung, timed out), heartbeat."""
        if not self._announced:
            self._send_status(protocol.Command.READY)
            self._announced = True
        now_s = time.monotonic()
        poller = zmq.Poller()
        # Read jobs even when full: the broker sends by the last status it had, so
        # a job that lands here while all slots are taken goes straight back
        # ("busy") instead of waiting in this socket behind a long conversion.
        poller.register(self._jobs, zmq.POLLIN)
        for held in self._running.values():
            for fd in held.conversion.waitables():
                poller.register(fd, zmq.POLLIN)
        wakes = [held.conversion.wake_s for held in self._running.values()]
        wait_s = min([timeout_s, self._next_heartbeat_s - now_s, *(w - now_s for w in wakes)])
        events = dict(poller.poll(math.ceil(max(0.0, wait_s) * 1000.0)))
        # Every conversion, readable or not: advancing one is a pipe poll and an exit check.
        self._advance()
        if self._jobs in events:
            self._take_jobs()
        if time.monotonic() >= self._next_heartbeat_s:
            self._send_status(protocol.Command.HEARTBEAT)

    def stop(self) -> None:
        """Say DISCONNECT and kill running conversions (the broker's lease
        re-pushes them elsewhere)."""
        self._send(protocol.encode(protocol.Disconnect(reason="shutdown", worker_id=self.worker_id)))
        for held in list(self._running.values()):
            log.warning("stopping: abandoning job %s", held.job_id, extra={"job_id": held.job_id})
            self._abandon(held)
        self._running.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for held in self._running.values():
            self._abandon(held)
        self._running.clear()
        self._jobs.close(linger=0)
        # A short linger lets the last results and the DISCONNECT reach the broker.
        self._results.close(linger=1000)
        self._ctx.term()

    def __enter__(self) -> "SdfWorker":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- messages -------------------------------------------------------------

    def _send(self, frames: list[bytes]) -> None:
        try:
            self._results.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # The broker is away and ZeroMQ's queue to it is full; its lease re-pushes lost jobs.
            if not self._dropping:
                log.warning("the broker is not taking messages; dropping results and heartbeats until it does")
            self._dropping = True
            return
        if self._dropping:
            log.info("the broker takes messages again")
        self._dropping = False

    def _send_status(self, command: protocol.Command) -> None:
        held = [[h.job_id, h.attempt] for h in self._running.values()]
        status = protocol.SdfStatus(
            worker_id=self.worker_id, slots=self.slots, free=self.free, held=held,
            hostname=socket.gethostname(), pid=os.getpid(), heartbeat_interval_s=self.heartbeat_interval_s,
        )
        self._send(protocol.encode(status, command))
        self._next_heartbeat_s = time.monotonic() + self.heartbeat_interval_s

    def _reply(self, job: protocol.SdfJob, *, error: dict | None = None, files: dict | None = None,
               sdf_file: str | None = None, info: dict | None = None, seconds: float = 0.0) -> None:
        result = protocol.SdfResult(
            worker_id=self.worker_id, job_id=job.job_id, attempt=job.attempt, ok=error is None,
            files=files or {}, sdf_file=sdf_file, info=info or {}, error=error, seconds=seconds,
        )
        if error is None:
            self.completed += 1
            log.info("job %s attempt %d converted in %.2f s", job.job_id, job.attempt, seconds,
                     extra={"job_id": job.job_id, "attempt": job.attempt})
        else:
            self.failed += 1
            log.warning("job %s attempt %d failed after %.2f s: %s/%s: %s", job.job_id, job.attempt, seconds,
                        error["stage"], error["code"], error["message"],
                        extra={"job_id": job.job_id, "attempt": job.attempt})
        self._send(protocol.encode(result, protocol.Command.FINAL))

    def _take_jobs(self) -> None:
        while True:
            try:
                frames = self._jobs.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            try:
                _, job = protocol.decode(frames, protocol.BROKER_TO_SDF)
            except ProtocolError as exc:
                log.warning("dropped a job message: %s", exc)
                continue
            if self.free <= 0:
                self._bounce(job)
                continue
            if (job.job_id, job.attempt) in self._running:
                log.warning("job %s attempt %d is already converting here; duplicate dropped", job.job_id, job.attempt,
                            extra={"job_id": job.job_id, "attempt": job.attempt})
                continue
            try:
                options = _checked_options(job)
            except GeomgenError as exc:
                self._reply(job, error=exc.to_dict())
                continue
            self._start(job, options)
        self._send_status(protocol.Command.HEARTBEAT)

    def _bounce(self, job: protocol.SdfJob) -> None:
        """Hand back a job that arrived with every slot taken (not a failure)."""
        log.debug("no free slot for job %s attempt %d; handed back", job.job_id, job.attempt,
                  extra={"job_id": job.job_id, "attempt": job.attempt})
        busy = protocol.error_dict(Stage.CONVERT, "busy", "no free conversion slot on this SDF worker")
        self._send(protocol.encode(protocol.SdfResult(
            worker_id=self.worker_id, job_id=job.job_id, attempt=job.attempt, ok=False, error=busy),
            protocol.Command.FINAL))

    def _start(self, job: protocol.SdfJob, options: contract.ConvertOptions) -> None:
        job_dir = Path(tempfile.mkdtemp(prefix=f"geomgen-sdf-{job.job_id[:16]}-"))
        task = convert_child.glb_task(job.glb, f"{job.name}.glb", job.name, self.convert_fn)
        try:
            conversion = Conversion(job_dir, task, options, self.convert_timeout_s, context=self._mp,
                                    label=f"job {job.job_id}", timeout_hint=TIMEOUT_HINT, job_id=job.job_id)
        except GeomgenError as exc:  # fork/forkserver failures end this job only
            shutil.rmtree(job_dir, ignore_errors=True)
            self._reply(job, error=exc.to_dict())
            return
        self._running[(job.job_id, job.attempt)] = _Held(job.job_id, job.attempt, job.name, conversion)
        self.max_held = max(self.max_held, len(self._running))
        log.info("job %s attempt %d: converting %s (%d bytes) in pid %s", job.job_id, job.attempt, job.name,
                 len(job.glb), conversion.pid, extra={"job_id": job.job_id, "attempt": job.attempt})

    # --- children -------------------------------------------------------------

    def _advance(self) -> None:
        """Move every conversion on; reply for those that ended."""
        for key, held in list(self._running.items()):
            try:
                outcome = held.conversion.advance()
            except GeomgenError as exc:  # a next child could not start
                outcome = {"error": exc.to_dict()}
            if outcome is None:
                continue
            del self._running[key]
            conversion = held.conversion
            try:
                reply = outcome if "error" in outcome else package_files(conversion.job_dir, outcome)
            finally:
                conversion.close()
                shutil.rmtree(conversion.job_dir, ignore_errors=True)
            self._reply(_job_of(held), seconds=time.monotonic() - conversion.started_s, **reply)
            self._send_status(protocol.Command.HEARTBEAT)

    @staticmethod
    def _abandon(held: _Held) -> None:
        held.conversion.close()
        shutil.rmtree(held.conversion.job_dir, ignore_errors=True)


def _checked_options(job: protocol.SdfJob) -> contract.ConvertOptions:
    """A job's conversion options, checked once here (the child and the
    converter take the object as it is); InputError naming what is wrong."""
    contract.check_output_name(job.name, "output name")
    if not job.glb:
        raise InputError("the job carries no GLB bytes", code="bad_mesh")
    options = contract.convert_options(job.convert)
    check_writable(options.formats)  # e.g. usd on a worker without usd-core: fails now, not after CoACD
    return options


def _job_of(held: _Held) -> protocol.SdfJob:
    return protocol.SdfJob(job_id=held.job_id, attempt=held.attempt, name=held.name, glb=b"")


# --- process entry --------------------------------------------------------------


def main(
    endpoints: Endpoints,
    *,
    procs: int = 1,
    heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S,
    convert_timeout_s: float = defaults.SDF_CONVERT_TIMEOUT_S,
    worker_id: str | None = None,
    keys: PeerKeys | None = None,
) -> int:
    """Run an SDF worker until SIGTERM/SIGINT. Returns the exit code: 0 after a
    clean stop, 2 when conversion processes cannot start here.

    CoACD runs OpenMP threads; ``procs`` conversions at once each get
    cores // procs of them (unless OMP_NUM_THREADS is set), so a full pool does
    not oversubscribe the cores. Set here, before any conversion process starts,
    so that every one of them inherits it.
    """
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, procs))))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        worker = SdfWorker(endpoints, procs=procs, heartbeat_interval_s=heartbeat_interval_s,
                           convert_timeout_s=convert_timeout_s, worker_id=worker_id, keys=keys)
    except GeomgenError as exc:
        logs.error_line(f"geomgen sdf-worker: {exc.message}")
        return 2
    try:
        with stop_signals_ignored():
            # The forkserver starts here and so ignores a batch system's SIGTERM to every
            # process of the job; the conversions it forks ignore it too (convert_child.run).
            worker.check_children()
        with stop_on_signals(log) as stop:
            log.info("SDF worker %s: %d slot(s), broker %s", worker.worker_id, procs, endpoints.sdf_job)
            worker.run(stop)
    except GeomgenError as exc:
        logs.error_line(f"geomgen sdf-worker: cannot start: {exc.message}")
        return 2
    finally:
        worker.close()
    return 0

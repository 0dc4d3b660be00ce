"""The GPU worker process: one backend on one GPU, serving jobs from the broker.

The worker supervises a backend process (backend_process.py) that loads the
backend once and runs one job at a time, while the worker keeps its socket loop
and heartbeats. It announces itself with READY once the backend is loaded; a
job past its deadline, or a backend process that dies, costs that process: the
worker answers the job, starts a fresh one and heartbeats ``loading`` until it
is loaded again. It reconnects with back-off when the broker goes silent or
disowns it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid

import zmq

from geomgen import __version__, defaults, logs, protocol
from geomgen.backend_process import BackendFacts, BackendProcess, BackendStartFailed, Kind, RunningJob, startup_message
from geomgen.contract import check_backend_options
from geomgen.endpoints import Endpoints
from geomgen.keys import PeerKeys, apply_client_curve
from geomgen.errors import InputError, ProtocolError, Stage
from geomgen.lifecycle import stop_on_signals
from geomgen.optionspec import specs_to_wire

log = logging.getLogger("geomgen.gpu_worker")

__all__ = ["GpuWorker", "check_heartbeat", "main", "startup_message"]

SHUTDOWN_GRACE_S = 5.0  # how long a stopping worker lets its running job finish
BACKEND_CLOSE_WAIT_S = 10.0  # how long an idle backend process may take to release its models at stop


class GpuWorker:
    """Serves jobs for one backend over a DEALER connected to the broker.

    ``load()`` starts the backend process and waits for its first load; then
    drive it with ``run(stop_event)`` or, in tests, ``run_once(timeout_s)``.
    ``close()`` releases sockets and ends the backend process.
    """

    def __init__(
        self,
        backend_name: str,
        endpoints: Endpoints,
        *,
        backend_options: dict[str, str] | None = None,
        gpu: str | None = None,
        generate_timeout_s: float | None = None,
        heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S,
        heartbeat_liveness: int = defaults.HEARTBEAT_LIVENESS,
        reconnect_min_s: float = defaults.RECONNECT_MIN_S,
        reconnect_max_s: float = defaults.RECONNECT_MAX_S,
        worker_id: str | None = None,
        keys: PeerKeys | None = None,
    ):
        check_heartbeat(heartbeat_interval_s, heartbeat_liveness)
        check_generate_timeout(generate_timeout_s)
        self.backend_name = backend_name
        self.endpoints = endpoints
        self.gpu = gpu
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_liveness = heartbeat_liveness
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.keys = keys  # CURVE keys for a broker started with --keys
        self.completed = 0
        self.failed = 0
        self.exit_code = 0  # non-zero once the worker cannot serve (a reload failed)
        self.facts: BackendFacts | None = None  # from the first load
        self.backend = BackendProcess(backend_name, backend_options or {})
        self._generate_timeout_s = generate_timeout_s  # None: the backend class's own

        self._ctx = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._outbox: list[list[bytes]] = []  # FINALs finished while disconnected
        self._reconnect_at_s = 0.0  # connect on the first run_once
        self._backoff_s = reconnect_min_s
        self._heard_s = 0.0
        self._next_heartbeat_s = 0.0
        self._closed = False

    # --- the loop -------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.backend.busy

    @property
    def loading(self) -> bool:
        """A fresh backend process is loading (after a timeout or crash): no jobs yet."""
        return self.backend.loading

    @property
    def connected(self) -> bool:
        return self._socket is not None

    @property
    def generate_timeout_s(self) -> float:
        """How long one job may run here, seconds (before a job's own deadline)."""
        if self._generate_timeout_s is not None:
            return self._generate_timeout_s
        return self.facts.generate_timeout_s if self.facts is not None else defaults.CPU_GENERATE_TIMEOUT_S

    def load(self) -> BackendFacts:
        """Start the backend process and wait for its first load; READY goes out
        only after it. Raises BackendStartFailed."""
        self.backend.start()
        self.facts = self.backend.wait_loaded()
        return self.facts

    def run(self, stop_event: threading.Event, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Serve until ``stop_event`` is set (or a reload fails), then shut down
        warmly: a running job gets up to ``grace_s`` to finish and report, then
        DISCONNECT."""
        while not stop_event.is_set() and self.exit_code == 0:
            self.run_once(defaults.POLL_INTERVAL_S)
        self.stop(grace_s)

    def run_once(self, timeout_s: float) -> None:
        """One turn of the loop: poll at most ``timeout_s``, handle what is
        readable, then heartbeat and check the broker's liveness."""
        now_s = time.monotonic()
        if self._socket is None and self.facts is not None and now_s >= self._reconnect_at_s:
            self._connect()
        wait_s = min(timeout_s, self._next_timer_s() - now_s)
        poller = zmq.Poller()  # anew each turn: the backend's descriptors change when it is restarted
        for fd in self.backend.waitables():
            poller.register(fd, zmq.POLLIN)
        if self._socket is not None:
            poller.register(self._socket, zmq.POLLIN)
        events = dict(poller.poll(math.ceil(max(0.0, wait_s) * 1000.0)))  # ms, rounded up: no spin
        self._handle_backend()  # also what no descriptor announces: a job past its deadline
        if self._socket is not None and self._socket in events:
            self._handle_broker()
        self._heartbeat_and_expire()

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Let a running job finish within ``grace_s`` (heartbeats go on and new
        REQUESTs are refused as busy), then kill the backend process if it still
        runs one, and tell the broker we leave."""
        self.backend.reload = False  # a job failing now is not worth a fresh backend
        deadline_s = time.monotonic() + grace_s
        job = self.backend.job
        if job is not None:
            log.info("stopping: waiting up to %.1f s for job %s", grace_s, job.job_id, extra={"job_id": job.job_id})
        while self.backend.busy and time.monotonic() < deadline_s:
            self.run_once(min(defaults.POLL_INTERVAL_S, max(0.0, deadline_s - time.monotonic())))
        if job is not None and self.backend.busy:
            log.warning("abandoning job %s after the %.1f s grace period; killing the backend process",
                        job.job_id, grace_s, extra={"job_id": job.job_id})
            self.backend.kill()
        if self._socket is not None:
            reason = "shutdown" if self.exit_code == 0 else "backend failed to reload"
            self._send(protocol.encode(protocol.Disconnect(reason=reason, worker_id=self.worker_id)))

    def close(self) -> None:
        """Close sockets and end the backend process: an idle one is asked to
        release its backend first, a busy or loading one is killed."""
        if self._closed:
            return
        self._closed = True
        self.backend.stop(BACKEND_CLOSE_WAIT_S)
        if self._socket is not None:
            # A short linger lets a final DISCONNECT or result reach the broker.
            self._socket.close(linger=1000)
            self._socket = None
        self._ctx.term()

    # --- connection -----------------------------------------------------------

    def _next_timer_s(self) -> float:
        if self._socket is None:
            return min(self._reconnect_at_s, self.backend.wake_s)
        return min(self._next_heartbeat_s, self._heard_s + self._liveness_s(), self.backend.wake_s)

    def _liveness_s(self) -> float:
        return self.heartbeat_liveness * self.heartbeat_interval_s

    def _connect(self) -> None:
        assert self.facts is not None  # run_once connects only after load()
        sock = self._ctx.socket(zmq.DEALER)
        if self.keys is not None:
            apply_client_curve(sock, self.keys)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, defaults.MAX_MESSAGE_BYTES)
        sock.connect(self.endpoints.worker)
        self._socket = sock
        info = {"version": __version__, "input_kind": self.facts.input_kind, "uses_gpu": self.facts.uses_gpu,
                "options": specs_to_wire(self.facts.options_spec), "generate_timeout_s": self.generate_timeout_s,
                "load_s": round(self.facts.load_s, 3)}
        job = self.backend.job
        if job is not None:
            # Re-announced mid-job: tell the broker so it does not route to us yet.
            info["running_job"] = [job.job_id, job.attempt]
        if self.loading:
            info["loading"] = True
        ready = protocol.WorkerReady(
            worker_id=self.worker_id, backend=self.backend_name, hostname=socket.gethostname(), pid=os.getpid(),
            gpu=self.gpu, info=info, heartbeat_interval_s=self.heartbeat_interval_s,
            model_identity=self.facts.identity,
        )
        self._send(protocol.encode(ready))
        log.info("READY sent to %s as %s (backend %s)", self.endpoints.worker, self.worker_id, self.backend_name)
        outbox, self._outbox = self._outbox, []
        for frames in outbox:
            self._send(frames, keep=True)
        now_s = time.monotonic()
        self._heard_s = now_s
        self._next_heartbeat_s = now_s + self.heartbeat_interval_s

    def _disconnect(self, why: str) -> None:
        if self._socket is None:
            return
        self._socket.close(linger=0)
        self._socket = None
        self._reconnect_at_s = time.monotonic() + self._backoff_s
        log.warning("%s; reconnecting in %.1f s", why, self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2.0, self.reconnect_max_s)

    def _send(self, frames: list[bytes], keep: bool = False) -> None:
        """Send to the broker; a FINAL (``keep``) waits in the outbox when the
        broker cannot take it now, anything else is dropped."""
        if self._socket is None:
            if keep:
                self._outbox.append(frames)
            return
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if keep:
                self._outbox.append(frames)

    def _heartbeat_and_expire(self) -> None:
        if self._socket is None:
            return
        now_s = time.monotonic()
        if now_s - self._heard_s > self._liveness_s():
            self._disconnect(f"broker silent for {now_s - self._heard_s:.1f} s")
            return
        if now_s >= self._next_heartbeat_s:
            job = self.backend.job
            beat = protocol.WorkerHeartbeat(
                worker_id=self.worker_id,
                job_id=job.job_id if job else None,
                attempt=job.attempt if job else 0,
                loading=self.loading,
            )
            self._send(protocol.encode(beat))
            self._next_heartbeat_s = now_s + self.heartbeat_interval_s

    # --- messages from the broker -------------------------------------------------

    def _handle_broker(self) -> None:
        while self._socket is not None:
            try:
                frames = self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._heard_s = time.monotonic()
            self._backoff_s = self.reconnect_min_s
            try:
                command, message = protocol.decode(frames, protocol.BROKER_TO_WORKER)
            except ProtocolError as exc:
                log.warning("dropped a message from the broker: %s", exc)
                continue
            if command is protocol.Command.REQUEST:
                self._accept(message)
            elif command is protocol.Command.DISCONNECT:
                self._disconnect(f"the broker disconnected us ({message.reason or 'no reason given'})")
            # HEARTBEAT: hearing it was the point.

    def _accept(self, job: protocol.Job) -> None:
        if job.backend != self.backend_name:
            self._refuse(job, Stage.INPUT, "unknown_backend",
                         f"this worker serves backend {self.backend_name!r}, not {job.backend!r}")
            return
        if self.backend.job is not None:
            self._refuse(job, Stage.TRANSPORT, "busy",
                         f"worker {self.worker_id} is busy with job {self.backend.job.job_id}; send it elsewhere")
            return
        if self.loading or self.exit_code != 0:
            self._refuse(job, Stage.TRANSPORT, "busy",
                         f"worker {self.worker_id} is reloading its backend; send the job elsewhere")
            return
        try:
            # The broker checked them against the declaration this worker sent at
            # READY; checked again here, at this boundary, before any GPU second.
            check_backend_options(self.backend_name, self.facts.options_spec if self.facts else None,
                                  job.backend_options)
        except InputError as exc:
            self._refuse(job, exc.stage, exc.code, exc.message)
            return
        limit_s = self.generate_timeout_s if job.deadline_s is None else min(self.generate_timeout_s, job.deadline_s)
        if limit_s <= 0:  # no time left: refused here rather than paid for with a reload
            self._refuse(job, Stage.GENERATE, "timeout", "the job's deadline passed before it reached the worker")
            return
        log.info("job %s attempt %d started (%s, %d bytes, %g s allowed)", job.job_id, job.attempt, job.input_name,
                 len(job.input_data), limit_s, extra={"job_id": job.job_id, "attempt": job.attempt})
        self.backend.submit(job, limit_s)

    def _refuse(self, job: protocol.Job, stage: Stage, code: str, message: str) -> None:
        log.warning("job %s refused: %s", job.job_id, message, extra={"job_id": job.job_id, "attempt": job.attempt})
        result = protocol.JobResult(job.job_id, job.attempt, ok=False, error=protocol.error_dict(stage, code, message))
        self._send(protocol.encode(result), keep=True)

    # --- the backend process ---------------------------------------------------------

    def _handle_backend(self) -> None:
        for report in self.backend.reports():
            if report.kind is Kind.PROGRESS:
                self._send(report.frames)
            elif report.kind is Kind.FINAL:
                if report.job is not None:
                    self._log_end(report.job, report.frames)
                self._send(report.frames, keep=True)
            elif report.kind is Kind.RELOADING:
                self._next_heartbeat_s = time.monotonic()  # say at once that we are loading
            elif report.kind is Kind.LOADED and report.facts is not None:
                self._next_heartbeat_s = time.monotonic()  # say at once that jobs may come
                log.info("backend %s reloaded in %.2f s (reload %d)", self.backend_name, report.facts.load_s,
                         self.backend.reloads)
            elif report.kind is Kind.LOAD_FAILED:
                log.error("%s; this worker stops", report.text)
                self.exit_code = report.exit_code or 1

    def _log_end(self, job: RunningJob, frames: list[bytes]) -> None:
        seconds = time.monotonic() - job.started_s
        try:
            _, result = protocol.decode(frames, protocol.WORKER_TO_BROKER)
        except ProtocolError:
            result = None
        if result is not None and result.ok:
            self.completed += 1
            log.info("job %s attempt %d done in %.2f s", job.job_id, job.attempt, seconds,
                     extra={"job_id": job.job_id, "attempt": job.attempt})
        else:
            self.failed += 1
            error = result.error if result is not None else {}
            log.warning("job %s attempt %d failed in %.2f s: %s/%s: %s", job.job_id, job.attempt, seconds,
                        error.get("stage"), error.get("code"), error.get("message"),
                        extra={"job_id": job.job_id, "attempt": job.attempt})


# --- process entry --------------------------------------------------------------


def check_heartbeat(interval_s: float, liveness: int) -> None:
    """InputError unless ``interval_s`` > 0 seconds and ``liveness`` >= 1 intervals."""
    if not interval_s > 0 or liveness < 1:
        raise InputError(f"heartbeats need an interval > 0 s and a liveness >= 1, got {interval_s} s and "
                         f"{liveness}", code="bad_option")


def check_generate_timeout(timeout_s: float | None) -> None:
    """InputError unless ``timeout_s`` is None (the backend's own) or > 0 seconds."""
    if timeout_s is not None and not timeout_s > 0:
        raise InputError(f"the generate timeout must be > 0 s, got {timeout_s} s", code="bad_option")


def main(
    backend: str,
    endpoints: Endpoints,
    *,
    gpu: str | None = None,
    backend_options: dict[str, str] | None = None,
    generate_timeout_s: float | None = None,
    heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S,
    heartbeat_liveness: int = defaults.HEARTBEAT_LIVENESS,
    worker_id: str | None = None,
    keys: PeerKeys | None = None,
) -> int:
    """Run a GPU worker until SIGTERM/SIGINT. Returns the process exit code:
    0 after a clean stop, 2 when the backend cannot start here (message on
    stderr), 1 when loading it crashed unexpectedly; after a failed reload,
    the same codes."""
    if gpu is not None:
        # Before any backend module is imported (in the backend process, which
        # inherits it): torch reads it once, at CUDA init.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        worker = GpuWorker(backend, endpoints, backend_options=backend_options, gpu=gpu,
                           generate_timeout_s=generate_timeout_s, heartbeat_interval_s=heartbeat_interval_s,
                           heartbeat_liveness=heartbeat_liveness, worker_id=worker_id, keys=keys)
    except InputError as exc:
        logs.error_line(f"geomgen gpu-worker: {exc.message}")
        return 2
    try:
        try:
            facts = worker.load()
        except BackendStartFailed as exc:
            logs.error_line(exc.text)
            return exc.exit_code
        log.info("serving backend %s (loaded in %.2f s); a job may run %g s", backend, facts.load_s,
                 worker.generate_timeout_s)
        with stop_on_signals(log) as stop:
            worker.run(stop)
    finally:
        worker.close()
    return worker.exit_code

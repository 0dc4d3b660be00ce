"""The GPU worker process: one backend on one GPU, serving jobs from the broker.

It loads its backend once, announces itself with READY, runs one job at a time
in a thread beside its socket loop (so heartbeats flow during inference), and
reconnects with back-off when the broker goes silent or disowns it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import zmq

from geomgen import __version__, defaults, gpu_job, protocol
from geomgen.backends import load_backend_class
from geomgen.backends.base import Backend
from geomgen.contract import check_backend_options, scoped_options
from geomgen.optionspec import specs_to_wire
from geomgen.endpoints import Endpoints
from geomgen.lifecycle import stop_on_signals
from geomgen.errors import BackendUnavailable, GeomgenError, InputError, ProtocolError, Stage, UnknownBackend

log = logging.getLogger("geomgen.gpu_worker")

SHUTDOWN_GRACE_S = 5.0  # how long a stopping worker lets its running job finish


@dataclass
class _RunningJob:
    job_id: str
    attempt: int
    thread: threading.Thread
    started_s: float  # time.monotonic() at start


class GpuWorker:
    """Serves jobs for one loaded backend over a DEALER connected to the broker.

    Drive it with ``run(stop_event)`` or, in tests, ``run_once(timeout_s)``;
    ``close()`` releases sockets and the backend.
    """

    def __init__(
        self,
        backend: Backend,
        backend_name: str,
        endpoints: Endpoints,
        *,
        gpu: str | None = None,
        heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S,
        heartbeat_liveness: int = defaults.HEARTBEAT_LIVENESS,
        reconnect_min_s: float = defaults.RECONNECT_MIN_S,
        reconnect_max_s: float = defaults.RECONNECT_MAX_S,
        worker_id: str | None = None,
    ):
        check_heartbeat(heartbeat_interval_s, heartbeat_liveness)
        self.backend = backend
        self.backend_name = backend_name
        self.endpoints = endpoints
        self.gpu = gpu
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_liveness = heartbeat_liveness
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.completed = 0
        self.failed = 0

        self._ctx = zmq.Context()
        self._pipe = self._ctx.socket(zmq.PAIR)
        self._pipe.setsockopt(zmq.LINGER, 0)
        pipe_address = f"inproc://geomgen-job-{uuid.uuid4().hex}"
        self._pipe.bind(pipe_address)
        job_end = self._ctx.socket(zmq.PAIR)
        job_end.setsockopt(zmq.LINGER, 0)
        job_end.connect(pipe_address)
        self._channel = gpu_job.JobChannel(job_end)
        self._poller = zmq.Poller()
        self._poller.register(self._pipe, zmq.POLLIN)

        self._socket: zmq.Socket | None = None
        self._job: _RunningJob | None = None
        self._outbox: list[list[bytes]] = []  # FINALs finished while disconnected
        self._reconnect_at_s = 0.0  # connect on the first run_once
        self._backoff_s = reconnect_min_s
        self._heard_s = 0.0
        self._next_heartbeat_s = 0.0
        self._closed = False

    # --- the loop -------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._job is not None

    @property
    def connected(self) -> bool:
        return self._socket is not None

    def run(self, stop_event: threading.Event, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Serve until ``stop_event`` is set, then shut down warmly: a running
        job gets up to ``grace_s`` to finish and report, then DISCONNECT."""
        while not stop_event.is_set():
            self.run_once(defaults.POLL_INTERVAL_S)
        self.stop(grace_s)

    def run_once(self, timeout_s: float) -> None:
        """One turn of the loop: poll at most ``timeout_s``, handle what is
        readable, then heartbeat and check the broker's liveness."""
        now_s = time.monotonic()
        if self._socket is None and now_s >= self._reconnect_at_s:
            self._connect()
        wait_s = min(timeout_s, self._next_timer_s() - now_s)
        events = dict(self._poller.poll(math.ceil(max(0.0, wait_s) * 1000.0)))  # ms, rounded up: no spin
        if self._pipe in events:
            self._handle_pipe()
        if self._socket is not None and self._socket in events:
            self._handle_broker()
        self._heartbeat_and_expire()

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Let a running job finish within ``grace_s`` (heartbeats go on and new
        REQUESTs are refused as busy), then tell the broker we leave."""
        deadline_s = time.monotonic() + grace_s
        if self._job is not None:
            log.info("stopping: waiting up to %.1f s for job %s", grace_s, self._job.job_id)
        while self._job is not None and time.monotonic() < deadline_s:
            self.run_once(min(defaults.POLL_INTERVAL_S, max(0.0, deadline_s - time.monotonic())))
        if self._job is not None:
            log.warning("abandoning job %s after the %.1f s grace period", self._job.job_id, grace_s)
        if self._socket is not None:
            self._send(protocol.encode(protocol.Disconnect(reason="shutdown", worker_id=self.worker_id)))

    def close(self) -> None:
        """Close sockets and release the backend (unless a job still uses it)."""
        if self._closed:
            return
        self._closed = True
        abandoned = self._job is not None
        self._channel.close()
        self._pipe.close(linger=0)
        if self._socket is not None:
            # A short linger lets a final DISCONNECT or result reach the broker.
            self._socket.close(linger=1000)
            self._socket = None
        self._ctx.term()
        if not abandoned:
            self.backend.close()

    # --- connection -----------------------------------------------------------

    def _next_timer_s(self) -> float:
        if self._socket is None:
            return self._reconnect_at_s
        return min(self._next_heartbeat_s, self._heard_s + self._liveness_s())

    def _liveness_s(self) -> float:
        return self.heartbeat_liveness * self.heartbeat_interval_s

    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, defaults.MAX_MESSAGE_BYTES)
        sock.connect(self.endpoints.worker)
        self._socket = sock
        self._poller.register(sock, zmq.POLLIN)
        info = {"version": __version__, "input_kind": self.backend.input_kind, "uses_gpu": self.backend.uses_gpu,
                "options": specs_to_wire(self.backend.options_spec)}
        if self._job is not None:
            # Re-announced mid-job: tell the broker so it does not route to us yet.
            info["running_job"] = [self._job.job_id, self._job.attempt]
        ready = protocol.WorkerReady(
            worker_id=self.worker_id, backend=self.backend_name, hostname=socket.gethostname(), pid=os.getpid(),
            gpu=self.gpu, info=info, heartbeat_interval_s=self.heartbeat_interval_s,
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
        self._poller.unregister(self._socket)
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
            job = self._job
            beat = protocol.WorkerHeartbeat(
                worker_id=self.worker_id,
                job_id=job.job_id if job else None,
                attempt=job.attempt if job else 0,
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
        if self._job is not None:
            self._refuse(job, Stage.TRANSPORT, "busy",
                         f"worker {self.worker_id} is busy with job {self._job.job_id}; send it elsewhere")
            return
        try:
            # The broker checked them against the declaration this worker sent at
            # READY; checked again here, at this boundary, before any GPU second.
            check_backend_options(self.backend_name, self.backend.options_spec, job.backend_options)
        except InputError as exc:
            self._refuse(job, exc.stage, exc.code, exc.message)
            return
        # A daemon thread: a job abandoned at shutdown must not keep the process alive.
        thread = threading.Thread(target=gpu_job.run_job, args=(self.backend, self.backend_name, job, self._channel),
                                  name=f"job-{job.job_id}", daemon=True)
        self._job = _RunningJob(job.job_id, job.attempt, thread, time.monotonic())
        log.info("job %s attempt %d started (%s, %d bytes)", job.job_id, job.attempt, job.input_name,
                 len(job.input_data))
        thread.start()

    def _refuse(self, job: protocol.Job, stage: Stage, code: str, message: str) -> None:
        log.warning("job %s refused: %s", job.job_id, message)
        result = protocol.JobResult(job.job_id, job.attempt, ok=False, error=protocol.error_dict(stage, code, message))
        self._send(protocol.encode(result), keep=True)

    # --- reports from the job thread ---------------------------------------------

    def _handle_pipe(self) -> None:
        while True:
            try:
                tag, *frames = self._pipe.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if tag == gpu_job.PROGRESS:
                self._send(frames)
                continue
            job = self._job
            self._job = None
            if job is not None:
                job.thread.join(timeout=1.0)  # it sent its last message; it is ending
                self._log_end(job, frames)
            self._send(frames, keep=True)

    def _log_end(self, job: _RunningJob, frames: list[bytes]) -> None:
        seconds = time.monotonic() - job.started_s
        try:
            _, result = protocol.decode(frames, protocol.WORKER_TO_BROKER)
        except ProtocolError:
            result = None
        if result is not None and result.ok:
            self.completed += 1
            log.info("job %s attempt %d done in %.2f s", job.job_id, job.attempt, seconds)
        else:
            self.failed += 1
            error = result.error if result is not None else {}
            log.warning("job %s attempt %d failed in %.2f s: %s/%s: %s", job.job_id, job.attempt, seconds,
                        error.get("stage"), error.get("code"), error.get("message"))


# --- process entry --------------------------------------------------------------


def check_heartbeat(interval_s: float, liveness: int) -> None:
    """InputError unless ``interval_s`` > 0 seconds and ``liveness`` >= 1 intervals."""
    if not interval_s > 0 or liveness < 1:
        raise InputError(f"heartbeats need an interval > 0 s and a liveness >= 1, got {interval_s} s and "
                         f"{liveness}", code="bad_option")


def startup_message(backend: str, exc: GeomgenError, extra: str | None = None) -> str:
    """One paragraph for stderr: what failed and what to do about it."""
    text = f"geomgen gpu-worker: cannot start backend {backend!r}: {exc.message}"
    if isinstance(exc, UnknownBackend):
        text += (" A third-party backend is registered through the 'geomgen.backends' entry point"
                 " or GEOMGEN_BACKENDS='name=module:Class'.")
    elif isinstance(exc, BackendUnavailable) and extra and "pip install" not in exc.message:
        text += f" Install its dependencies with: pip install 'geomgen[{extra}]'."
    elif isinstance(exc, InputError):
        text += " Check the --backend-option values."
    return text


def main(
    backend: str,
    endpoints: Endpoints,
    *,
    gpu: str | None = None,
    backend_options: dict[str, str] | None = None,
    heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S,
    heartbeat_liveness: int = defaults.HEARTBEAT_LIVENESS,
    worker_id: str | None = None,
) -> int:
    """Run a GPU worker until SIGTERM/SIGINT. Returns the process exit code:
    0 after a clean stop, 2 when the backend cannot start here (message on
    stderr), 1 when loading it crashed unexpectedly."""
    if gpu is not None:
        # Before any backend module is imported: torch reads it once, at CUDA init.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        check_heartbeat(heartbeat_interval_s, heartbeat_liveness)
    except InputError as exc:
        print(f"geomgen gpu-worker: {exc.message}", file=sys.stderr)
        return 2
    cls = None
    try:
        cls = load_backend_class(backend)
        instance = cls(scoped_options(backend_options or {}, backend))
        load_started_s = time.monotonic()
        instance.load()
    except GeomgenError as exc:
        print(startup_message(backend, exc, getattr(cls, "extra", None)), file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - report any load crash as a start-up failure
        log.exception("loading backend %s failed", backend)
        print(f"geomgen gpu-worker: loading backend {backend!r} failed with {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    log.info("backend %s loaded in %.2f s", backend, time.monotonic() - load_started_s)

    worker = GpuWorker(instance, backend, endpoints, gpu=gpu, heartbeat_interval_s=heartbeat_interval_s,
                       heartbeat_liveness=heartbeat_liveness, worker_id=worker_id)
    try:
        with stop_on_signals(log) as stop:
            worker.run(stop)
    finally:
        worker.close()
    return 0

"""The backend process: the GPU worker's backend, loaded in a child process so
that a generate() that never returns, or native code that crashes, costs only
that child. The worker (the supervisor) keeps its socket loop and heartbeats,
and kills and restarts the child when a job runs past its deadline.

The child (:func:`serve`) builds and loads the backend once, then runs one job
at a time from a pipe, answering with progress and exactly one final JobResult,
both as the frames the worker forwards to the broker. The worker drives it
through :class:`BackendProcess`.
"""

from __future__ import annotations

import enum
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from geomgen import gpu_job, logs, protocol
from geomgen.backends import load_backend_class
from geomgen.backends.base import Backend
from geomgen.contract import scoped_options
from geomgen.errors import BackendUnavailable, GeomgenError, InputError, Stage, UnknownBackend
from geomgen.processes import describe_exit, die_with_parent, end_process

log = logging.getLogger("geomgen.backend_process")

KILL_WAIT_S = 5.0  # how long to wait for a killed backend process to be reaped


class Kind(str, enum.Enum):
    """What a Report from the backend process says."""

    LOADED = "loaded"  # the backend is loaded (facts); jobs may come
    LOAD_FAILED = "load_failed"  # it could not load (exit_code, text); the worker cannot serve
    PROGRESS = "progress"  # a JobProgress for the broker (frames)
    FINAL = "final"  # the job's one JobResult for the broker (frames, job)
    RELOADING = "reloading"  # a fresh process is loading after a timeout or crash (parent-made)


@dataclass(frozen=True)
class BackendFacts:
    """What the worker needs of the backend class; learnt from the child, so
    the worker itself never imports a backend module."""

    input_kind: str
    uses_gpu: bool
    options_spec: tuple | None  # OptionSpec declarations, None if undeclared
    generate_timeout_s: float  # the class's generate_timeout_s
    load_s: float  # how long load() took, seconds
    identity: str = ""  # Backend.identity(), for the broker's result cache ("": results not cached)


@dataclass
class RunningJob:
    """The job in the backend process, as the worker tracks it."""

    job_id: str
    attempt: int
    started_s: float  # time.monotonic() when it was handed over
    limit_s: float  # it may run this long, seconds

    @property
    def deadline_s(self) -> float:  # on time.monotonic()'s clock
        return self.started_s + self.limit_s


@dataclass
class Report:
    kind: Kind
    frames: list[bytes] = field(default_factory=list)
    facts: BackendFacts | None = None
    exit_code: int | None = None
    text: str = ""
    job: RunningJob | None = None  # the job a FINAL ends (set by the parent)


class BackendStartFailed(Exception):
    """The backend could not be built or loaded. ``text`` is the paragraph for
    stderr, ``exit_code`` the worker's (2: cannot start here, 1: a crash)."""

    def __init__(self, text: str, exit_code: int):
        super().__init__(text)
        self.text = text
        self.exit_code = exit_code


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


# --- the child -------------------------------------------------------------------


def serve(backend_name: str, options: dict[str, str], conn: multiprocessing.connection.Connection,
          parent_pid: int, log_level: int, log_format: str = logs.DEFAULT_FORMAT) -> None:
    """Backend-process body: build and load the backend (LOADED or LOAD_FAILED),
    then run each Job received on ``conn`` (PROGRESS..., FINAL) until the
    worker sends None or goes away."""
    _detach(parent_pid)
    logs.setup(logging.getLevelName(log_level).lower(), log_format, role="gpu-worker")  # as its worker logs
    backend = _load(backend_name, options, conn)
    if backend is None:
        return
    lock = threading.Lock()  # a backend may report progress from threads of its own

    def send(report: Report) -> None:
        with lock:
            conn.send(report)

    try:
        while True:
            try:
                job = conn.recv()
            except EOFError:  # the worker is gone
                break
            if job is None:  # the worker stops
                break
            frames = gpu_job.run_job(backend, backend_name, job,
                                     lambda progress: send(Report(Kind.PROGRESS, frames=progress)))
            send(Report(Kind.FINAL, frames=frames))
    finally:
        backend.close()


def _detach(parent_pid: int) -> None:
    # Its own process group, so the worker's kill takes whatever the backend
    # started too; and out of the terminal's group, so Ctrl-C reaches only the
    # worker, which decides when the backend stops.
    try:
        os.setsid()
    except OSError:  # already a group leader
        pass
    # A batch system stops a job by signalling every process in it (Slurm's
    # scancel and time limit: SIGTERM to the whole tree), so the backend ignores
    # SIGTERM and SIGINT: the worker decides whether its job finishes or is handed
    # back to the broker, and ends this process with SIGKILL.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # A worker killed with SIGKILL cannot stop its backend; have the kernel do it.
    # (The signal follows the thread that started this process: the worker's loop.)
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the worker died before the kernel was told
        os._exit(1)


def _load(backend_name: str, options: dict[str, str], conn: multiprocessing.connection.Connection) -> Backend | None:
    cls = None
    try:
        cls = load_backend_class(backend_name)
        backend = cls(scoped_options(options, backend_name))
        started_s = time.monotonic()
        backend.load()
        load_s = time.monotonic() - started_s
    except GeomgenError as exc:
        conn.send(Report(Kind.LOAD_FAILED, exit_code=2, text=startup_message(backend_name, exc,
                                                                              getattr(cls, "extra", None))))
        return None
    except BaseException as exc:  # noqa: BLE001 - report any load crash as a start-up failure
        log.exception("loading backend %s failed", backend_name)
        conn.send(Report(Kind.LOAD_FAILED, exit_code=1, text=(
            f"geomgen gpu-worker: loading backend {backend_name!r} failed with {type(exc).__name__}: {exc}")))
        return None
    facts = BackendFacts(input_kind=backend.input_kind, uses_gpu=backend.uses_gpu, options_spec=backend.options_spec,
                         generate_timeout_s=float(backend.generate_timeout_s), load_s=load_s,
                         identity=_identity(backend))
    log.info("backend %s loaded in %.2f s (backend process %d)", backend_name, load_s, os.getpid())
    conn.send(Report(Kind.LOADED, facts=facts))
    return backend


def _identity(backend: Backend) -> str:
    """The backend's identity for the result cache; "" (not cached) if it cannot tell."""
    try:
        identity = backend.identity()
    except Exception:  # noqa: BLE001 - a plug-in's bug costs only caching
        log.exception("backend %s could not tell its identity; its results are not cached", backend.name)
        return ""
    return identity if isinstance(identity, str) else ""


# --- the parent ----------------------------------------------------------------------


class BackendProcess:
    """The worker's handle on its backend process and the one job in it.

    ``start()`` and ``wait_loaded()`` once; then poll ``waitables()`` (and
    wake at ``wake_s``) and act on ``reports()``, ``submit()`` a job when
    neither ``loading`` nor ``busy``. A job past its limit, or a process that
    dies, is answered here with a FINAL ``timeout`` or ``crashed`` and a fresh
    process is started (RELOADING, then LOADED), unless ``reload`` is off.
    """

    def __init__(self, backend_name: str, options: dict[str, str]):
        self.backend_name = backend_name
        self.options = dict(options)
        self.job: RunningJob | None = None
        self.loading = False  # started, not yet LOADED
        self.reload = True  # start a fresh process after a timeout or crash
        self.reloads = 0  # processes started after the first
        # spawn: never a plain fork of a process with ZeroMQ threads. The child
        # inherits the environment, CUDA_VISIBLE_DEVICES included.
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None  # multiprocessing Process
        self._conn: multiprocessing.connection.Connection | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def busy(self) -> bool:
        return self.job is not None

    @property
    def wake_s(self) -> float:
        """When reports() has something to do without news (a job's deadline), on time.monotonic()."""
        return self.job.deadline_s if self.job is not None else math.inf

    def start(self) -> None:
        """Start a child that builds and loads the backend; it reports LOADED or LOAD_FAILED."""
        self.kill()
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=serve, args=(self.backend_name, self.options, child_end, os.getpid(),
                                logging.getLogger().getEffectiveLevel(), logs.current_format()),
            name=f"backend-{self.backend_name}", daemon=False,  # a backend may start processes of its own
        )
        try:
            process.start()
        finally:
            child_end.close()  # the child holds its own end; a dead child reads as end-of-file here
        self._process, self._conn = process, parent_end
        self.loading = True

    def wait_loaded(self) -> BackendFacts:
        """Block until the child has loaded its backend (the worker's start,
        before any READY); BackendStartFailed if it could not."""
        while True:
            multiprocessing.connection.wait(self.waitables())
            for report in self.reports():
                if report.kind is Kind.LOADED and report.facts is not None:
                    return report.facts
                if report.kind is Kind.LOAD_FAILED:
                    raise BackendStartFailed(report.text, report.exit_code or 1)

    def waitables(self) -> list[int]:
        """File descriptors that become readable when the child has news."""
        if self._process is None:
            return []
        if self._conn is None:  # its pipe is closed: only its end is left to see
            return [self._process.sentinel]
        return [self._conn.fileno(), self._process.sentinel]

    def submit(self, job: protocol.Job, limit_s: float) -> None:
        """Hand one job to the loaded, idle child; it may run ``limit_s`` seconds."""
        self.job = RunningJob(job.job_id, job.attempt, time.monotonic(), limit_s)
        if self._conn is None:
            return
        try:
            self._conn.send(job)
        except OSError as exc:  # it died meanwhile: reports() answers the job as crashed
            log.warning("could not hand job %s to the backend process: %s", job.job_id, exc,
                        extra={"job_id": job.job_id, "attempt": job.attempt})

    def reports(self) -> list[Report]:
        """What the child said since the last call, then what the parent
        decided: the running job's FINAL when it died or ran past its limit."""
        reports: list[Report] = []
        while self._conn is not None and self._conn.poll():
            try:
                report = self._conn.recv()
            except (EOFError, OSError):
                self._conn.close()
                self._conn = None
                break
            if report.kind is Kind.FINAL:
                report.job, self.job = self.job, None
            elif report.kind is Kind.LOADED:
                self.loading = False
            elif report.kind is Kind.LOAD_FAILED:
                self.kill()
            reports.append(report)
        process = self._process
        if process is not None and process.exitcode is not None:
            how = describe_exit(process.exitcode)
            if self.loading:
                self.kill()
                reports.append(Report(Kind.LOAD_FAILED, exit_code=1, text=(
                    f"geomgen gpu-worker: loading backend {self.backend_name!r} failed: its process ended ({how})")))
            elif self.job is not None:
                reports += self._abandon("crashed", f"the backend process of {self.backend_name!r} died during the "
                                                    f"job ({how}); the backend was restarted. The input may trigger "
                                                    "a bug in the backend, or the machine ran out of memory")
            else:
                log.warning("the backend process ended while idle (%s)", how)
                reports += self._restart()
        elif self.job is not None and time.monotonic() >= self.job.deadline_s:
            reports += self._abandon("timeout", (
                f"backend {self.backend_name!r} ran past its {self.job.limit_s:g} s deadline on this job; the "
                "backend was restarted. Retry, or allow more time (the request's deadline, or the worker's "
                "--generate-timeout)"))
        return reports

    def _abandon(self, code: str, message: str) -> list[Report]:
        """Kill the process with the running job, restart it, and answer the
        job with a generate-stage error ``code``."""
        job = self.job
        assert job is not None
        self.kill()
        reloading = self._restart()
        error = protocol.error_dict(Stage.GENERATE, code, message)
        result = protocol.JobResult(job.job_id, job.attempt, ok=False, error=error,
                                    seconds=time.monotonic() - job.started_s, info={"reloads": self.reloads})
        return [Report(Kind.FINAL, frames=protocol.encode(result), job=job), *reloading]

    def _restart(self) -> list[Report]:
        self.kill()
        if not self.reload:
            return []
        self.reloads += 1
        log.info("starting backend process %d for %s", self.reloads + 1, self.backend_name)
        try:
            self.start()
        except Exception as exc:  # noqa: BLE001 - e.g. out of processes or memory: the worker cannot serve
            return [Report(Kind.LOAD_FAILED, exit_code=1,
                           text=f"geomgen gpu-worker: cannot start a backend process ({type(exc).__name__}: {exc})")]
        return [Report(Kind.RELOADING)]

    def stop(self, wait_s: float) -> None:
        """Ask an idle child to close its backend and end; kill it after
        ``wait_s``. A busy or loading child is killed at once."""
        if self._process is not None and self._conn is not None and not self.busy and not self.loading:
            try:
                self._conn.send(None)
                self._process.join(wait_s)
            except OSError:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the child's process group (the backend and whatever it
        started), reap it and close the pipe; any running job is dropped."""
        process, self._process = self._process, None
        self.job, self.loading = None, False
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if process is not None:
            end_process(process, KILL_WAIT_S)

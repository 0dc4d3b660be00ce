"""The parent's side of one conversion: runs a job across conversion children
(convert_child), moving a rung that crashes or overruns down the ladder
coacd -> vhacd -> hull within one deadline, and reads what the last child left.
"""

from __future__ import annotations

import enum
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack

from geomgen import convert_child, defaults, protocol
from geomgen.contract import ConvertOptions
from geomgen.convert_child import LOG_FILE, OUT_DIR, RESULT_FILE, Task
from geomgen.errors import ConvertError, GeomgenError, Stage
from geomgen.files import replace_dir
from geomgen.geometry.convert import convert_file
from geomgen.geometry.decomposition import next_rung
from geomgen.processes import describe_exit, end_process, signal_name

log = logging.getLogger("geomgen.conversion")

PACKAGE_LIMIT_BYTES = defaults.MAX_PACKAGE_BYTES  # the broker takes this plus a margin for the rest
# CoACD or V-HACD may take this fraction of the time left to the deadline when
# it starts; then the next rung is tried. With the default 600 s: CoACD gets
# about 300 s, V-HACD about half of what is left after it, the hull the rest.
RUNG_SHARE = 0.5
KILL_WAIT_S = 5.0  # how long to wait for a killed child to be reaped
LOG_TAIL_CHARS = 300  # of a crashed child's output, quoted in the reason


# --- what to do next --------------------------------------------------------------


class Action(str, enum.Enum):
    WAIT = "wait"  # the child works; look again at wake_s or when it says something
    FINISH = "finish"  # the child ended: read what it left
    RETRY = "retry"  # a new child for the same job, at the next rung
    TIMEOUT = "timeout"  # the deadline passed: the job fails


@dataclass(frozen=True)
class Step:
    action: Action
    wake_s: float | None = None  # WAIT: when the next decision is due (time.monotonic())
    rung: str | None = None  # RETRY: the rung the next child starts at
    reason: str | None = None  # RETRY: "coacd: crashed (killed by SIGSEGV)", for the report's fallbacks


def rung_limit_s(rung_started_s: float, deadline_s: float) -> float:
    """When a rung that started at ``rung_started_s`` has used its share of the time left."""
    return rung_started_s + RUNG_SHARE * max(0.0, deadline_s - rung_started_s)


def next_step(*, exitcode: int | None, has_result: bool, rung: str | None, rung_started_s: float | None,
              now_s: float, deadline_s: float) -> Step:
    """The parent's decision for one conversion, from what it knows now.

    ``exitcode``: the child's (None while it runs); ``has_result``: it wrote
    its result; ``rung``: the decomposition method it last announced (None
    before and after the decomposition), started at ``rung_started_s``. Times
    are time.monotonic() seconds. Only CoACD and V-HACD are retried: a crash or
    hang anywhere else is the job's own failure.
    """
    retryable = rung is not None and next_rung(rung) is not None
    if exitcode is not None:
        if retryable and not (exitcode == 0 and has_result) and now_s < deadline_s:
            return Step(Action.RETRY, rung=next_rung(rung), reason=f"{rung}: crashed ({describe_exit(exitcode)})")
        return Step(Action.FINISH)
    if now_s >= deadline_s:
        return Step(Action.TIMEOUT)
    if retryable and rung_started_s is not None:
        limit_s = rung_limit_s(rung_started_s, deadline_s)
        if now_s >= limit_s:
            return Step(Action.RETRY, rung=next_rung(rung), reason=(
                f"{rung}: timed out after {now_s - rung_started_s:.3g} s ({RUNG_SHARE:.0%} of the "
                f"{deadline_s - rung_started_s:.3g} s left)"))
        return Step(Action.WAIT, wake_s=limit_s)
    return Step(Action.WAIT, wake_s=deadline_s)


# --- one job across its children ------------------------------------------------------


class Conversion:
    """The parent's handle on one job: the child converting it now, the rung
    that child is in, the one deadline, and why earlier rungs failed.

    Drive it with ``advance()`` whenever one of ``waitables()`` is ready or
    ``wake_s`` has come; it returns None while the job runs, then the outcome
    (see read_outcome). ``close()`` kills a child still running.
    """

    def __init__(self, job_dir: Path, task: Task, options: ConvertOptions, timeout_s: float, *,
                 context: multiprocessing.context.BaseContext | None = None, label: str = "conversion",
                 timeout_hint: str = "raise the conversion timeout", job_id: str | None = None):
        self.job_dir = Path(job_dir)
        self.log_extra = {"job_id": job_id} if job_id is not None else {}  # on its log lines (logs.py)
        self.task = task
        self.options = options
        self.timeout_s = timeout_s
        self.label = label
        self.timeout_hint = timeout_hint
        self.started_s = time.monotonic()
        self.deadline_s = self.started_s + timeout_s
        self.wake_s = self.deadline_s
        self.fallbacks: list[str] = []
        self.children = 0
        self.rung: str | None = None
        self.rung_started_s: float | None = None
        self._context = context or convert_child.child_context()
        self.process: multiprocessing.process.BaseProcess | None = None
        self._stage: multiprocessing.connection.Connection | None = None
        self._start(None)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def waitables(self) -> list[int]:
        """File descriptors that become readable when this job has news."""
        fds = [self.process.sentinel] if self.process is not None else []
        return fds + ([self._stage.fileno()] if self._stage is not None else [])

    def advance(self, now_s: float | None = None) -> dict | None:
        """Read what the child said, decide (next_step) and act: None while the
        job goes on, else its outcome."""
        self._read_stage()
        exitcode = self.process.exitcode
        if exitcode is not None:
            self._read_stage()  # what it said just before it ended
        now_s = time.monotonic() if now_s is None else now_s
        step = next_step(exitcode=exitcode, has_result=(self.job_dir / RESULT_FILE).is_file(), rung=self.rung,
                         rung_started_s=self.rung_started_s, now_s=now_s, deadline_s=self.deadline_s)
        if step.action is Action.WAIT:
            self.wake_s = step.wake_s
            return None
        if step.action is Action.RETRY:
            said = self._log_tail() if exitcode is not None else ""
            reason = step.reason + (f": {said}" if said else "")
            log.warning("%s: %s; starting again at %s with %.1f s left", self.label, reason, step.rung,
                        self.deadline_s - now_s, extra=self.log_extra)
            self._end_child()
            self.fallbacks.append(reason)
            self._start(step.rung)
            return None
        if step.action is Action.TIMEOUT:
            self._end_child()
            after = f" (after: {'; '.join(self.fallbacks)})" if self.fallbacks else ""
            return _failure("timeout", f"the conversion ran past the {self.timeout_s:g} s limit and was stopped"
                                       f"{after}; try collision='hull' or a smaller simplify_faces for this mesh, "
                                       f"or {self.timeout_hint}")
        said = self._log_tail() if exitcode != 0 else ""
        self._end_child()
        outcome = read_outcome(self.job_dir, exitcode, said)
        if "error" in outcome and self.fallbacks:
            outcome["error"]["message"] += f" (after: {'; '.join(self.fallbacks)})"
        return outcome

    def close(self) -> None:
        """Kill the running child, if any (shutdown, or a job abandoned)."""
        self._end_child()

    def _start(self, rung: str | None) -> None:
        shutil.rmtree(self.job_dir / OUT_DIR, ignore_errors=True)  # what a killed child left half-written
        for leftover in (RESULT_FILE, LOG_FILE):
            (self.job_dir / leftover).unlink(missing_ok=True)
        receiver, sender = self._context.Pipe(duplex=False)
        remaining_s = self.deadline_s - time.monotonic()
        process = self._context.Process(
            target=convert_child.run, args=(str(self.job_dir), self.task, self.options, rung, tuple(self.fallbacks), sender,
                              remaining_s),
            name=f"convert-{self.label}", daemon=False,  # a conversion function may start processes of its own
        )
        try:
            process.start()
        except Exception as exc:  # noqa: BLE001 - fork/forkserver failures end this job only
            receiver.close()
            raise ConvertError(f"could not start a conversion process ({type(exc).__name__}: {exc})",
                               code="crashed") from None
        finally:
            sender.close()  # the child holds its own end; a dead child reads as end-of-file here
        self.process, self._stage = process, receiver
        self.rung, self.rung_started_s = rung, None
        self.children += 1

    def _read_stage(self) -> None:
        while self._stage is not None and self._stage.poll():
            try:
                self.rung = self._stage.recv()
            except (EOFError, OSError):
                self._stage.close()
                self._stage = None
                return
            self.rung_started_s = time.monotonic() if self.rung is not None else None

    def _end_child(self) -> None:
        process = self.process
        if process is None:
            return
        end_process(process, KILL_WAIT_S)
        if self._stage is not None:
            self._stage.close()
        self.process, self._stage = None, None

    def _log_tail(self) -> str:
        """The last words the child wrote, on one line."""
        try:
            with open(self.job_dir / LOG_FILE, "rb") as output:
                output.seek(0, os.SEEK_END)
                output.seek(max(0, output.tell() - LOG_TAIL_CHARS))
                text = output.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return " ".join(text.split())


def drive(conversion: Conversion) -> dict:
    """Run ``conversion`` to its outcome, blocking (``geomgen convert``); the
    SDF worker drives the same class from its poll loop instead."""
    try:
        while True:
            outcome = conversion.advance()
            if outcome is not None:
                return outcome
            multiprocessing.connection.wait(conversion.waitables(),
                                            timeout=max(0.0, conversion.wake_s - time.monotonic()))
    finally:
        conversion.close()


def convert_path(path: Path, out_dir: Path, options: ConvertOptions, timeout_s: float) -> dict:
    """``geomgen convert`` of one file, in one child within ``timeout_s``: the
    package lands in ``out_dir/<name>/`` (replacing an older one only when
    complete). Returns the report's info with ``sdf_path`` absolute; raises the
    conversion's GeomgenError."""
    out_dir = Path(out_dir).resolve()  # the child reports paths relative to its own folder: keep both absolute
    out_dir.mkdir(parents=True, exist_ok=True)
    job_dir = Path(tempfile.mkdtemp(prefix=".geomgen-convert-", dir=out_dir))  # beside: the move is a rename
    try:
        task = functools.partial(convert_file, Path(path).resolve())
        conversion = Conversion(job_dir, task, options, timeout_s, label=Path(path).name,
                                timeout_hint="raise --timeout")
        outcome = drive(conversion)
        if "error" in outcome:
            error = outcome["error"]
            raise GeomgenError(error["message"], code=error["code"], stage=error["stage"])
        package = Path(outcome["sdf_file"]).parts[0]
        replace_dir(job_dir / OUT_DIR / package, out_dir / package)
        return {**outcome["info"], "sdf_path": str(out_dir / outcome["sdf_file"])}
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


# --- reading what a child left ------------------------------------------------------


def read_outcome(job_dir: Path, exitcode: int | None, said: str = "") -> dict:
    """What a child that ended with ``exitcode`` left: ``{"info", "sdf_file"}``
    (the SDF path relative to ``<job_dir>/out``, POSIX) or ``{"error"}``;
    ``said``: the child's last words, quoted in a crash."""
    words = f" Its last output: {said}" if said else ""
    if exitcode is not None and exitcode < 0:
        return _failure("crashed", (
            f"the conversion process died with signal {-exitcode} ({signal_name(-exitcode)}); native code in "
            f"the decomposition or mesh libraries failed on this mesh - try collision='hull' or repair the mesh."
            f"{words}"))
    result_path = job_dir / RESULT_FILE
    if exitcode != 0 or not result_path.is_file():
        return _failure("crashed", f"the conversion process exited with status {exitcode} without a result."
                                   f"{words or ' See the log.'}")
    try:
        outcome = msgpack.unpackb(result_path.read_bytes(), raw=False)
    except Exception as exc:  # noqa: BLE001 - a damaged result file is this job's failure
        return _failure("crashed", f"the conversion result could not be read ({exc})")
    if not isinstance(outcome, dict) or not outcome.get("ok"):
        error = outcome.get("error") if isinstance(outcome, dict) else None
        return {"error": error} if isinstance(error, dict) else _failure(
            "convert_failed", "the conversion failed without saying why")
    return {"info": outcome.get("info") or {}, "sdf_file": outcome.get("sdf_file")}


def package_files(job_dir: Path, outcome: dict) -> dict:
    """An SDF reply from a successful outcome: ``{"files", "sdf_file", "info"}``
    with every file under ``<job_dir>/out`` read (paths relative, POSIX), or
    ``{"error"}`` when the package is too large or has no SDF."""
    out_dir = job_dir / OUT_DIR
    files, total_bytes = {}, 0
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        total_bytes += path.stat().st_size
        if total_bytes > PACKAGE_LIMIT_BYTES:
            return _failure("too_large", f"the SDF package exceeds {PACKAGE_LIMIT_BYTES // 2**20} MiB; "
                                         "simplify the mesh or shrink its textures")
        files[path.relative_to(out_dir).as_posix()] = path.read_bytes()
    if outcome.get("sdf_file") not in files:
        return _failure("convert_failed", "the conversion reported success but wrote no SDF file")
    return {"files": files, "sdf_file": outcome["sdf_file"], "info": outcome["info"]}


def _failure(code: str, message: str) -> dict:
    return {"error": protocol.error_dict(Stage.CONVERT, code, message)}

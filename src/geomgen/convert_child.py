"""The child side of one conversion: the process body (:func:`run`) that converts
in-process, announces each decomposition rung on a pipe and writes its outcome
to the job dir, and how the conversion function is resolved and preloaded.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import msgpack

from geomgen import protocol
from geomgen.contract import ConvertOptions
from geomgen.errors import GeomgenError, InputError, Stage
from geomgen.geometry.decomposition import Resume, resumed

CONVERT_FN_ENV = "GEOMGEN_CONVERT_FN"  # "module:function" with convert_mesh's signature
DEFAULT_CONVERT_FN = "geomgen.geometry.convert:convert_mesh"
# The job dir a child leaves to its parent:
RESULT_FILE = "result.msgpack"
LOG_FILE = "child.log"  # the child's stdout and stderr: native code's last words before a crash
OUT_DIR = "out"  # under the job dir; the package lands in out/<name>/
# An orphaned child (its parent killed) ends itself this long after the deadline.
ORPHAN_GRACE_S = 5.0
# Imported once by the forkserver so each conversion child starts warm; names
# that are not installed are skipped by multiprocessing.
WARM_MODULES = ("numpy", "trimesh", "geomgen.geometry.convert", "pydrake.multibody.parsing",
                "pydrake.multibody.plant", "pydrake.systems.framework")

# A conversion task: called in the child as task(out_dir=..., options=...), returns a ConversionReport.
Task = Callable[..., Any]


def convert_fn_spec() -> str:
    """The conversion function's "module:function", from GEOMGEN_CONVERT_FN."""
    return os.environ.get(CONVERT_FN_ENV, "").strip() or DEFAULT_CONVERT_FN


def resolve_convert_fn(spec: str | None = None) -> Callable[..., Any]:
    """Import the conversion function named by ``spec`` (default: the env var).

    Raises InputError naming the variable when it cannot be found.
    """
    spec = spec or convert_fn_spec()
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr or "convert_mesh")
    except (ImportError, AttributeError) as exc:
        raise InputError(
            f"cannot load the conversion function {spec!r} ({exc}); check {CONVERT_FN_ENV} "
            "or that geomgen is installed completely",
            code="converter_missing", stage=Stage.CONVERT,
        ) from exc
    if not callable(fn):
        raise InputError(f"{spec!r} is not a function; check {CONVERT_FN_ENV}", code="converter_missing",
                         stage=Stage.CONVERT)
    return fn


def preload_modules() -> list[str]:
    """Modules the forkserver imports before forking conversion children."""
    return [__name__, convert_fn_spec().partition(":")[0], *WARM_MODULES]


def child_context() -> multiprocessing.context.BaseContext:
    """Where conversion children come from: a forkserver that imported the
    converter once (each child starts warm), and that is safe beside the
    threads of a ZeroMQ process, which a plain fork is not."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload_modules())
    return context


CHECK_FAILED_EXIT = 3  # exit code of check() when the conversion function cannot be loaded


def check() -> None:
    """Run in a first child at worker start: proves children start and the
    conversion function imports; else prints why and exits CHECK_FAILED_EXIT."""
    try:
        resolve_convert_fn()
    except InputError as exc:
        print(f"geomgen conversion process: {exc.message}", file=sys.stderr, flush=True)
        sys.exit(CHECK_FAILED_EXIT)


def glb_task(glb: bytes, input_name: str, name: str, spec: str) -> Task:
    """The task of an SDF job: ``glb`` through the conversion function ``spec``
    (resolved in the parent's environment, named here so the child need not
    share it)."""
    return functools.partial(_convert_glb, glb, input_name, name, spec)


def _convert_glb(glb: bytes, input_name: str, name: str, spec: str, *, out_dir: Path, options: ConvertOptions):
    return resolve_convert_fn(spec)(glb, input_name, out_dir, name, options)


# --- the process body -----------------------------------------------------------


def run(job_dir: str, task: Task, options: ConvertOptions, resume_at: str | None, fallbacks: tuple[str, ...],
        stage: multiprocessing.connection.Connection, timeout_s: float) -> None:
    """Child process body: ``task`` into ``<job_dir>/out/`` with the ladder
    resumed at ``resume_at`` (None: the requested method) after ``fallbacks``;
    each rung is announced on ``stage`` as it starts (None once the
    decomposition is over). The outcome map (ok, info, sdf_file | error) goes
    to ``<job_dir>/result.msgpack``.
    """
    # SIGTERM to every process of a job (Slurm's scancel) must not fail the
    # conversion: the SDF worker decides, and ends this child with SIGKILL.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # Own process group: the parent kills the whole group on timeout or shutdown.
    try:
        os.setsid()
    except OSError:  # already a group leader: killing the group still works
        pass
    # SIGALRM's default action ends the process even inside native code, so a
    # child whose parent was killed does not outlive the deadline.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 0.0) + ORPHAN_GRACE_S)
    root = Path(job_dir)
    log_fd = os.open(root / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    out_dir = root / OUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with resumed(Resume(start=resume_at, fallbacks=tuple(fallbacks), on_rung=stage.send)):
            report = task(out_dir=out_dir, options=options)
        outcome = {"ok": True, "info": plain(report.to_dict()), "sdf_file": _relative(report.sdf_path, out_dir)}
    except GeomgenError as exc:
        outcome = {"ok": False, "error": exc.to_dict()}
    except Exception as exc:  # noqa: BLE001 - a bug in the converter fails this job, clearly
        outcome = {"ok": False, "error": protocol.error_dict(
            Stage.CONVERT, "convert_failed", f"the conversion raised {type(exc).__name__}: {exc}")}
    # Write then rename: the parent never reads half a result from a child killed mid-write.
    partial = root / (RESULT_FILE + ".part")
    partial.write_bytes(msgpack.packb(outcome, use_bin_type=True))
    partial.rename(root / RESULT_FILE)


def _relative(sdf_path: Any, out_dir: Path) -> str:
    path = Path(sdf_path)
    if not path.is_absolute():
        path = out_dir / path
    try:
        return path.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        raise GeomgenError(f"the converter wrote its SDF outside its output folder ({path})",
                           code="convert_failed", stage=Stage.CONVERT) from None


def plain(value: Any) -> Any:
    """``value`` with numpy scalars / arrays, paths and tuples turned into
    msgpack-able Python types (maps keep string keys)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if isinstance(value, (str, bytes, bool, int, float)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return plain(value.tolist())
    return str(value)

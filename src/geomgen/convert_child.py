"""One GLB -> SDF conversion, run in a child process of the SDF worker.

The worker checks a job with :func:`checked_options`, starts :func:`run` in a
fresh process forked from a warm forkserver (a crash or hang in native code
costs only that job), and turns what the child left into its reply with
:func:`read_outcome`.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import msgpack

from geomgen import defaults, protocol
from geomgen.errors import GeomgenError, InputError, Stage

CONVERT_FN_ENV = "GEOMGEN_CONVERT_FN"  # "module:function" with convert_mesh's signature
DEFAULT_CONVERT_FN = "geomgen.geometry.convert:convert_mesh"
RESULT_FILE = "result.msgpack"
OUT_DIR = "out"  # under the job dir; the package lands in out/<name>/
MAX_NAME_CHARS = 200  # longest output name accepted, characters
PACKAGE_LIMIT_BYTES = defaults.MAX_MESSAGE_BYTES - 2**20  # leaves room for the rest of the result
# Imported once by the forkserver so each conversion child starts warm; names
# that are not installed are skipped by multiprocessing.
WARM_MODULES = ("numpy", "trimesh", "pydrake.multibody.parsing", "pydrake.multibody.plant",
                "pydrake.systems.framework")


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
    """Modules the worker's forkserver imports before forking conversion children."""
    return [__name__, convert_fn_spec().partition(":")[0], *WARM_MODULES]


CHECK_FAILED_EXIT = 3  # exit code of check() when the conversion function cannot be loaded


def check() -> None:
    """Run in a first child at worker start: proves children start and the
    conversion function imports; else prints why and exits CHECK_FAILED_EXIT."""
    try:
        resolve_convert_fn()
    except InputError as exc:
        print(f"geomgen conversion process: {exc.message}", file=sys.stderr, flush=True)
        sys.exit(CHECK_FAILED_EXIT)


def run(job_dir: str, glb: bytes, input_name: str, name: str, options: dict) -> None:
    """Child process body: convert ``glb`` into ``<job_dir>/out/<name>/`` and
    write the outcome map (ok, info, sdf_file | error) to ``<job_dir>/result.msgpack``.

    ``options`` is a ConvertOptions dict the parent already validated.
    """
    # Own process group: the worker kills the whole tree (decomposition
    # grandchildren included) on timeout or shutdown.
    try:
        os.setsid()
    except OSError:  # already a group leader: killing the group still works
        pass
    root = Path(job_dir)
    out_dir = root / OUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from geomgen.contract import ConvertOptions

        convert = resolve_convert_fn()
        report = convert(glb, input_name, out_dir, name, ConvertOptions.from_dict(options))
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


# --- the parent's side ----------------------------------------------------------


def checked_options(name: str, glb: bytes, options: dict) -> dict:
    """Check a job before a child is started for it: ``name`` is a plain file
    stem, ``glb`` is not empty, ``options`` a valid ConvertOptions map (returned
    complete). Raises InputError naming what is wrong."""
    from geomgen.contract import ConvertOptions

    if not name or len(name) > MAX_NAME_CHARS or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise InputError(f"output name {name!r} is not a plain file name", code="bad_name")
    if not glb:
        raise InputError("the job carries no GLB bytes", code="bad_mesh")
    try:
        return ConvertOptions.from_dict(options).to_dict()
    except GeomgenError:
        raise
    except Exception as exc:  # noqa: BLE001 - a value of a type the options cannot take
        culprit = next((k for k, v in options.items() if not _options_ok({k: v})), None)
        if culprit is None:
            raise InputError(f"bad conversion options ({type(exc).__name__}: {exc})", code="bad_option") from None
        raise InputError(f"conversion option {culprit!r} cannot take the value {options[culprit]!r}",
                         code="bad_option") from None


def _options_ok(options: dict) -> bool:
    from geomgen.contract import ConvertOptions

    try:
        ConvertOptions.from_dict(options)
    except Exception:  # noqa: BLE001 - any failure marks the culprit
        return False
    return True


def read_outcome(job_dir: Path, exitcode: int | None) -> dict:
    """What the SDF worker replies for a child that ended with ``exitcode``:
    ``{"files", "sdf_file", "info"}`` read from ``<job_dir>/out`` (paths
    relative to it, POSIX: ``<name>/<name>.sdf``...), or ``{"error"}``."""
    if exitcode is not None and exitcode < 0:
        return _failure("crashed", (
            f"the conversion process died with signal {-exitcode} ({_signal_name(-exitcode)}); native code in "
            "the decomposition or mesh libraries failed on this mesh - try collision='hull' or repair the mesh"))
    result_path = job_dir / RESULT_FILE
    if exitcode != 0 or not result_path.is_file():
        return _failure("crashed", f"the conversion process exited with status {exitcode} without a result; "
                                   "see the SDF worker's log")
    try:
        outcome = msgpack.unpackb(result_path.read_bytes(), raw=False)
    except Exception as exc:  # noqa: BLE001 - a damaged result file is this job's failure
        return _failure("crashed", f"the conversion result could not be read ({exc})")
    if not isinstance(outcome, dict) or not outcome.get("ok"):
        error = outcome.get("error") if isinstance(outcome, dict) else None
        return {"error": error} if isinstance(error, dict) else _failure(
            "convert_failed", "the conversion failed without saying why")
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
    return {"files": files, "sdf_file": outcome["sdf_file"], "info": outcome.get("info") or {}}


def _failure(code: str, message: str) -> dict:
    return {"error": protocol.error_dict(Stage.CONVERT, code, message)}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"

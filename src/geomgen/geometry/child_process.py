"""Run one function in a child process with a time limit, so that native code
that crashes or hangs (convex decomposition) takes only that child down.

Works from the main process and from a non-daemonic child (an SDF worker's
conversion process); the child dies with its parent.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from geomgen.errors import ConvertError

# forkserver forks each child from a small clean server process: cheap after the
# first call, and safe beside the threads of a ZeroMQ process (fork is not).
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
EXIT_GRACE_S = 5.0  # how long a child that has sent its result may take to exit
LOG_TAIL_CHARS = 300  # of a crashed child's output, quoted in the failure


class ChildFailed(Exception):
    """The child crashed, timed out or raised; the message says which, in a few words."""


def run_in_child(func: Callable[..., Any], args: tuple, timeout_s: float) -> Any:
    """``func(*args)`` computed in a child process and returned here.

    ``func`` and ``args`` must be picklable (``func`` a module-level function).
    Raises ChildFailed when the child raises, exits without an answer (a crash
    in native code) or runs longer than ``timeout_s`` seconds (it is killed),
    and ConvertError when this process may not start children (it is daemonic).
    """
    if multiprocessing.current_process().daemon:
        raise ConvertError(
            "convex decomposition runs in a child process, and daemonic processes may not have children; "
            "run the conversion in a non-daemonic process",
            code="decomposition_failed",
        )
    ctx = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        # Keep the server from importing the caller's __main__ (a CLI or a test runner).
        ctx.set_forkserver_preload([__name__])
    # Native code reports fatal errors on stderr just before aborting; keep them for the message.
    log_fd, log_path = tempfile.mkstemp(prefix="geomgen-child-", suffix=".log")
    os.close(log_fd)
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(sender, log_path, func, args), name="geomgen-child", daemon=True)
    try:
        proc.start()
    except Exception as exc:
        receiver.close()
        sender.close()
        os.unlink(log_path)
        raise ChildFailed(f"could not start a child process ({type(exc).__name__}: {exc})") from None
    sender.close()  # so that a dead child reads as end-of-file here
    answered = False
    try:
        ready = multiprocessing.connection.wait([receiver, proc.sentinel], timeout=timeout_s)
        if not ready:
            raise ChildFailed(f"timed out after {timeout_s:g} s")
        try:
            status, payload = receiver.recv()
        except (EOFError, OSError):
            proc.join(EXIT_GRACE_S)
            said = _tail(log_path)
            raise ChildFailed(f"crashed ({_describe_exit(proc.exitcode)})" + (f": {said}" if said else "")) from None
        answered = True
        if status != "ok":
            raise ChildFailed(f"raised {payload}")
        return payload
    finally:
        if answered:
            proc.join(EXIT_GRACE_S)
        if proc.is_alive():
            proc.kill()
        proc.join()
        receiver.close()
        proc.close()
        os.unlink(log_path)


def _tail(path: str) -> str:
    """The last lines a child wrote, on one line."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - LOG_TAIL_CHARS))
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " ".join(text.split())


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _child_main(sender, log_path: str, func: Callable[..., Any], args: tuple) -> None:
    _die_with_parent()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        result = func(*args)
    except BaseException as exc:  # the parent reports it; nothing here may escape silently
        sender.send(("error", f"{type(exc).__name__}: {exc}"))
    else:
        sender.send(("ok", result))
    finally:
        sender.close()


def _die_with_parent() -> None:
    """Ask Linux to kill this child when its parent dies, so a killed conversion
    never leaves a decomposition running on its own."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)

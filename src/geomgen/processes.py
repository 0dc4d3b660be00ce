"""Child processes of the roles: how one ended, in words, and how to end one
with everything it started. Shared by the GPU worker's backend process, the
SDF worker's conversion children and the launcher. Stdlib only, so importing
it costs nothing (the GPU worker must not load the geometry stack).
"""

from __future__ import annotations

import ctypes
import multiprocessing.process
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies (Linux)


def signal_name(number: int) -> str:
    """``SIGSEGV`` for 11; ``signal N`` for a number Python does not name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(code: int | None) -> str:
    """How a process ended, for a sentence: ``killed by SIGSEGV``, ``exit code 3``."""
    if code is None:
        return "no exit code"
    if code < 0:
        return f"killed by {signal_name(-code)}"
    return f"exit code {code}"


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send this process ``sig`` when its parent dies: a parent
    killed with SIGKILL cannot stop its children itself. No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        pass


def kill_group(pid: int | None) -> None:
    """SIGKILL the process group led by ``pid`` (a child that called setsid)."""
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def end_process(process: multiprocessing.process.BaseProcess, wait_s: float) -> None:
    """Kill a group-leader child and whatever it left in its group, reap it
    (waiting at most ``wait_s``) and release its handle."""
    if process.exitcode is None:
        kill_group(process.pid)
        process.kill()
    process.join(wait_s)
    kill_group(process.pid)  # anything it left behind in its group
    if process.exitcode is not None:
        process.close()

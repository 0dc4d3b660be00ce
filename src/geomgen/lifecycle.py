"""Process life cycle shared by every role: SIGINT/SIGTERM become a stop event
that the role's loop checks, so each process stops warmly and the same loop
can be driven to completion by tests."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def stop_on_signals(log: logging.Logger) -> Iterator[threading.Event]:
    """An Event set by SIGINT or SIGTERM while the block runs.

    Previous handlers are restored afterwards. Outside the main thread (where
    Python cannot install handlers) the event is only set by the caller.
    """
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, _frame: object) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def stop_signals_ignored() -> Iterator[None]:
    """SIGTERM and SIGINT ignored while the block runs (main thread only).

    A helper process started inside the block (multiprocessing's forkserver)
    keeps ignoring them, also across exec: a batch system stops a job by
    signalling every process in it (Slurm: SIGTERM to the whole tree), and only
    the role's own process should decide how its work ends.
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

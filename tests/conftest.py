"""Shared fixtures: loopback ports, child processes that are always reaped,
sockets that are always closed, and bounded waits instead of sleeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import zmq

from geomgen.endpoints import Endpoints
from geomgen.server import free_base_port as server_free_base_port

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def free_base_port(count: int = 4) -> int:
    """A base port with ``count`` consecutive free ports after it on 127.0.0.1."""
    return server_free_base_port("127.0.0.1", count)


@pytest.fixture(scope="session", autouse=True)
def session_result_cache(tmp_path_factory) -> Iterator[Path]:
    """Brokers started by module-scoped fixtures (set up before any test's own
    fixtures) get this session's empty result cache, never the user's."""
    folder = tmp_path_factory.mktemp("session-result-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GEOMGEN_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def private_result_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test's brokers (started here or by a GeometryServer) get an empty
    result cache of their own, not the user's: a result cached by one test
    would otherwise answer another's request without any worker."""
    folder = tmp_path_factory.mktemp("result-cache")
    monkeypatch.setenv("GEOMGEN_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def endpoints() -> Endpoints:
    return Endpoints.from_base("127.0.0.1", free_base_port())


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


class ProcessGroup:
    """Starts geomgen role processes (``python -m geomgen ...``) and reaps them."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, env: dict | None = None, name: str | None = None) -> subprocess.Popen:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        log = open(self.log_dir / f"{name or args[0]}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "geomgen", *args], env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
        proc.log_path = Path(log.name)  # type: ignore[attr-defined]
        log.close()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs(tmp_path: Path):
    group = ProcessGroup(tmp_path)
    yield group
    group.stop_all()


def wait_for(predicate: Callable[[], object], timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)

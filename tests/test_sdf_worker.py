"""The SDF worker against a broker played by the test: a real PUSH (jobs) and
PULL (results) on loopback ports, real worker processes
(``geomgen sdf-worker``) and real conversion child processes. Test
converters (tests/plugins.py:selectable_convert) crash or hang on demand."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import zmq

from geomgen import protocol
from geomgen.endpoints import Endpoints
from geomgen.sdf_worker import SdfWorker
from tests.conftest import REPO, wait_for
from tests.plugins import box_glb

CONVERT_FN = "tests.plugins:selectable_convert"
HULL = {"collision": "hull"}


def worker_env(pid_dir: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1",
            "GEOMGEN_CONVERT_FN": CONVERT_FN, "GEOMGEN_TEST_PID_DIR": str(pid_dir)}


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaped yet counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


class FakeBroker:
    """The broker's SDF side: a ROUTER for jobs (addressed to the worker by the
    id its statuses carry) and a PULL for results and status."""

    def __init__(self, ctx: zmq.Context, endpoints: Endpoints):
        self.jobs = ctx.socket(zmq.ROUTER)
        self.jobs.setsockopt(zmq.LINGER, 0)
        self.jobs.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.jobs.setsockopt(zmq.SNDHWM, 100)  # over-send on purpose: the worker must hand back what it cannot hold
        self.jobs.bind(endpoints.sdf_job)
        self.worker_id: str | None = None  # learnt from the worker's READY
        self.results = ctx.socket(zmq.PULL)
        self.results.setsockopt(zmq.LINGER, 0)
        self.results.bind(endpoints.sdf_result)
        self.statuses: list[protocol.SdfStatus] = []
        self.bounced: list[protocol.SdfJob] = []  # handed back "busy", re-pushed when a slot frees
        self.bounces = 0
        self._pushed: dict[str, protocol.SdfJob] = {}
        self._early: dict[str, protocol.SdfResult] = {}

    def push(self, name: str, glb: bytes | None = None, **options) -> protocol.SdfJob:
        job = protocol.SdfJob(job_id=uuid.uuid4().hex[:10], attempt=1, name=name,
                              glb=box_glb() if glb is None else glb, convert=options or dict(HULL))
        self._pushed[job.job_id] = job
        self._send(job)
        return job

    def _send(self, job: protocol.SdfJob) -> None:
        """Send to the worker, waiting (bounded) for its job socket to connect."""
        assert self.worker_id, "no READY from the SDF worker yet"
        deadline_s = time.monotonic() + 10.0
        while True:
            try:
                self.jobs.send_multipart([self.worker_id.encode(), *protocol.encode(job)], flags=zmq.NOBLOCK)
                return
            except zmq.ZMQError:
                if time.monotonic() > deadline_s:
                    raise AssertionError(f"SDF worker {self.worker_id} never connected its job socket") from None
                self.jobs.poll(10)

    def _repush(self, free: int) -> None:
        # what the real broker's credit does: push again only when a slot is free
        while self.bounced and free > 0:
            self._send(self.bounced.pop(0))
            free -= 1

    def recv(self, timeout_s: float = 30.0, statuses: bool = False):
        """Next (command, message); status heartbeats are recorded in
        ``self.statuses`` and skipped unless ``statuses``."""
        deadline_s = time.monotonic() + timeout_s
        while True:
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0 or not self.results.poll(remaining_s * 1000):
                raise AssertionError(f"no message from the SDF worker within {timeout_s} s")
            command, message = protocol.decode(self.results.recv_multipart(), protocol.SDF_TO_BROKER)
            if command in (protocol.Command.READY, protocol.Command.HEARTBEAT):
                self.worker_id = message.worker_id
            if command is protocol.Command.FINAL and not message.ok and message.error["code"] == "busy":
                self.bounces += 1
                self.bounced.append(self._pushed[message.job_id])
                continue
            if command is protocol.Command.HEARTBEAT:
                self.statuses.append(message)
                self._repush(message.free)
                if not statuses:
                    continue
            return command, message

    def result(self, job: protocol.SdfJob, timeout_s: float = 60.0) -> protocol.SdfResult:
        """The FINAL of ``job``; FINALs of other jobs that come first are kept for later."""
        while job.job_id not in self._early:
            command, message = self.recv(timeout_s)
            assert command is protocol.Command.FINAL, f"expected FINAL, got {command.name}: {message}"
            self._early[message.job_id] = message
        message = self._early.pop(job.job_id)
        assert message.attempt == job.attempt
        return message

    def close(self) -> None:
        self.jobs.close(linger=0)
        self.results.close(linger=0)


@pytest.fixture
def broker(zctx, endpoints):
    fake = FakeBroker(zctx, endpoints)
    yield fake
    fake.close()


@pytest.fixture
def pid_dir(tmp_path):
    path = tmp_path / "pids"
    path.mkdir()
    return path


@pytest.fixture
def spawn(tmp_path, endpoints, pid_dir):
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        log = open(tmp_path / f"sdf-{len(started)}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "geomgen", "sdf-worker", "--broker", f"127.0.0.1:{endpoints.client_port}", *args],
            cwd=REPO, env=worker_env(pid_dir), stdout=log, stderr=subprocess.STDOUT,
        )
        proc.log_path = Path(log.name)  # type: ignore[attr-defined]
        log.close()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def child_pid(pid_dir: Path, name: str) -> int:
    path = pid_dir / f"{name}.pid"
    wait_for(lambda: path.is_file() and path.read_text(), timeout_s=30, what=f"the child of job {name}")
    return int(path.read_text())


def test_converts_crashes_and_goes_on(broker, spawn, pid_dir, tmp_path):
    from geomgen.geometry.drake_check import validate_sdf

    spawn("--procs", "1")
    command, ready = broker.recv(timeout_s=60)
    assert command is protocol.Command.READY
    assert (ready.slots, ready.free, ready.held) == (1, 1, [])

    job = broker.push("box", mass_kg=2.0, **HULL)
    result = broker.result(job)
    assert result.ok, result.error
    assert result.sdf_file == "box/box.sdf" and result.sdf_file in result.files
    assert all(not Path(rel).is_absolute() and ".." not in Path(rel).parts for rel in result.files)
    for rel, data in result.files.items():
        (tmp_path / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / rel).write_bytes(data)
    validate_sdf(tmp_path / "pkg" / result.sdf_file)  # raises if Drake rejects the package
    assert result.info["mass_kg"] == pytest.approx(2.0) and result.seconds > 0

    crash = broker.push("segfault")
    result = broker.result(crash)
    assert not result.ok and (result.error["stage"], result.error["code"]) == ("convert", "crashed")
    assert "signal 11" in result.error["message"] and "SIGSEGV" in result.error["message"]
    assert not alive(child_pid(pid_dir, "segfault"))

    broker.jobs.send_multipart([b"not a geomgen message"])  # dropped and logged; the worker goes on
    cases = [
        (broker.push("bad_input"), "input", "bad_mesh", "no faces"),
        (broker.push("bad_convert"), "convert", "decomposition_failed", "every decomposition"),
        (broker.push("oops"), "convert", "convert_failed", "ValueError"),
        (broker.push("opts", collision="bogus"), "input", "bad_option", "collision"),
        (broker.push("opts2", material=["wood"]), "input", "bad_option", "material"),
        (broker.push("../escape"), "input", "bad_name", "not a valid output name"),
        (broker.push("empty", glb=b""), "input", "bad_mesh", "no GLB"),
    ]
    for job, stage, code, text in cases:
        result = broker.result(job)
        assert not result.ok and (result.error["stage"], result.error["code"]) == (stage, code), result.error
        assert text in result.error["message"]

    # CoACD dying in native code: a new child goes on with V-HACD, and the report says why.
    crash = broker.push("coacd_crash", collision="coacd")
    result = broker.result(crash)
    assert result.ok, result.error
    assert result.info["method"] == "vhacd"
    assert [f.split(":")[0] for f in result.info["fallbacks"]] == ["coacd"]
    assert result.info["fallbacks"][0].startswith("coacd: crashed (killed by SIGSEGV)")

    after = broker.push("box_again")
    result = broker.result(after)
    assert result.ok, result.error
    assert result.sdf_file == "box_again/box_again.sdf"


def test_one_deadline_for_hangs_then_sigterm_kill_the_children(broker, spawn, pid_dir):
    """Two jobs side by side under one 8 s deadline each: a conversion that hangs
    outside the decomposition fails ``timeout`` at the deadline; one whose CoACD
    and V-HACD hang falls down to the hull within it."""
    proc = spawn("--procs", "2", "--convert-timeout", "8", "--heartbeat-interval", "0.2")
    broker.recv(timeout_s=60)  # READY

    hang = broker.push("hang_1")
    ladder = broker.push("decomp_hang", collision="coacd")
    started_s = time.monotonic()
    result = broker.result(ladder)
    assert time.monotonic() - started_s < 8.0
    assert result.ok, result.error
    assert result.info["method"] == "hull"
    assert [f.split(" after ")[0] for f in result.info["fallbacks"]] == ["coacd: timed out", "vhacd: timed out"]
    result = broker.result(hang)
    assert time.monotonic() - started_s >= 7.9
    assert not result.ok and (result.error["stage"], result.error["code"]) == ("convert", "timeout")
    assert "8 s" in result.error["message"]
    wait_for(lambda: not alive(child_pid(pid_dir, "hang_1")), timeout_s=10, what="the timed-out child to die")

    hang = broker.push("hang_2")
    pid = child_pid(pid_dir, "hang_2")
    wait_for(lambda: broker.recv(statuses=True)[1].held == [[hang.job_id, 1]], timeout_s=10,
             what="a heartbeat holding the job")
    proc.send_signal(signal.SIGTERM)
    command, message = broker.recv()
    while command is protocol.Command.HEARTBEAT:
        command, message = broker.recv()
    assert command is protocol.Command.DISCONNECT and message.reason == "shutdown"
    assert proc.wait(timeout=15) == 0
    wait_for(lambda: not alive(pid), timeout_s=10, what="the running child to be killed")


def test_takes_only_as_many_jobs_as_slots(broker, endpoints, pid_dir, monkeypatch):
    """In process: run(stop_event) with 2 slots and 5 jobs pushed at once.
    Every status says held <= 2 and free = slots - held; jobs beyond the slots
    are handed back "busy" (the fake broker re-pushes them when a slot frees);
    a slot taken or freed is announced at once (the periodic heartbeat is 30 s away)."""
    for key, value in worker_env(pid_dir).items():
        monkeypatch.setenv(key, value)
    worker = SdfWorker(endpoints, procs=2, heartbeat_interval_s=30.0, convert_timeout_s=60.0, worker_id="flow")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    try:
        worker.check_children()
        thread.start()
        command, ready = broker.recv(statuses=True)
        assert command is protocol.Command.READY and (ready.slots, ready.free) == (2, 2)
        jobs = [broker.push(f"sleep_{i}") for i in range(5)]
        finals: dict[str, protocol.SdfResult] = {}
        while len(finals) < len(jobs):
            command, message = broker.recv(timeout_s=60, statuses=True)
            if command is protocol.Command.FINAL:
                assert message.ok, message.error
                finals[message.job_id] = message
                # the freed slot is announced at once, not at the next periodic heartbeat
                command, status = broker.recv(timeout_s=5, statuses=True)
                assert command is protocol.Command.HEARTBEAT and [message.job_id, 1] not in status.held
                message = status
            assert command is protocol.Command.HEARTBEAT
            assert len(message.held) <= 2 and message.free == 2 - len(message.held), message
            assert not any(job_id in finals for job_id, _ in message.held)
        assert set(finals) == {job.job_id for job in jobs}
        assert worker.max_held == 2 and (message.free, message.held) == (2, [])
        assert broker.bounces >= 3  # five pushed at once at two slots: three came back "busy"
        # taken slots were announced at once too: two jobs held within moments of the push
        assert broker.statuses[0].held and len(broker.statuses[0].held) <= 2
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=15)
        worker.close()
    assert not thread.is_alive()
    assert broker.recv()[0] is protocol.Command.DISCONNECT


def test_start_up_failures_exit_2_with_a_clear_message(tmp_path, endpoints, pid_dir):
    broker = f"127.0.0.1:{endpoints.client_port}"
    env = worker_env(pid_dir)
    runs = {
        "procs": ({}, ["--procs", "0"]),
        "timeout": ({}, ["--convert-timeout", "0"]),
        "converter": ({"GEOMGEN_CONVERT_FN": "no_such_module:convert"}, []),
    }
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "geomgen", "sdf-worker", "--broker", broker, *args], cwd=REPO,
                               env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, (extra, args) in runs.items()
    }
    out = {name: proc.communicate(timeout=60)[0] for name, proc in procs.items()}
    assert {name: proc.returncode for name, proc in procs.items()} == {name: 2 for name in runs}
    assert "'--procs': 0 is not in the range" in out["procs"]
    assert "conversion timeout must be > 0" in out["timeout"]
    assert "'no_such_module:convert'" in out["converter"] and "GEOMGEN_CONVERT_FN" in out["converter"]

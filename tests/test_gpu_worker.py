"""The GPU worker against a broker played by the test: a real ROUTER on a
loopback port, real worker processes (``geomgen gpu-worker``) with the
test backends of tests/plugins.py registered through GEOMGEN_BACKENDS."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import trimesh
import zmq

from geomgen import protocol
from geomgen.endpoints import Endpoints
from geomgen.gpu_worker import GpuWorker
from tests.conftest import REPO, wait_for
from tests.plugins import BOX_EXTENTS_M, box_glb

PLUGINS = ",".join(
    f"{name}=tests.plugins:{cls}"
    for name, cls in [("instant", "InstantBackend"), ("slow", "SlowBackend"), ("failing", "FailingBackend"),
                      ("crashing", "CrashingBackend"), ("unavailable", "UnavailableBackend"),
                      ("hanging", "HangingBackend")]
)
HEARTBEAT_S = 0.2
LIVENESS = 5  # the reconnect test: the worker gives up on a silent broker after 1 s
# Elsewhere the test only heartbeats while it waits in recv(); be patient with it.
RELAXED_LIVENESS = 50


def worker_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "GEOMGEN_BACKENDS": PLUGINS, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


class FakeBroker:
    """The broker's worker-facing ROUTER, driven by the test. While waiting for
    a message it heartbeats every worker that said READY (unless ``silent``)
    and answers any other worker with DISCONNECT, as a restarted broker does."""

    def __init__(self, ctx: zmq.Context, endpoints: Endpoints):
        self.ctx = ctx
        self.endpoints = endpoints
        self.silent = False
        self.peers: set[bytes] = set()
        self.heartbeats: list[tuple[float, protocol.WorkerHeartbeat]] = []
        self._bind()

    def _bind(self) -> None:
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        wait_for(self._try_bind, timeout_s=5, what=f"binding {self.endpoints.worker}")
        self._next_beat_s = 0.0

    def _try_bind(self) -> bool:
        # ZeroMQ closes a listener asynchronously, so a rebind may briefly find the port taken.
        try:
            self.socket.bind(self.endpoints.worker)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE:
                raise
            return False
        return True

    def restart(self) -> None:
        """Close the ROUTER and bind a new one on the same port, like a broker restart."""
        self.socket.close(linger=0)
        self.peers.clear()
        self._bind()

    def send(self, identity: bytes, message, command: protocol.Command | None = None) -> None:
        self.socket.send_multipart([identity, *protocol.encode(message, command)])

    def recv(self, timeout_s: float = 10.0, keep_heartbeats: bool = False):
        """Next (identity, command, message) from any worker; heartbeats are
        recorded in ``self.heartbeats`` and skipped unless ``keep_heartbeats``."""
        deadline_s = time.monotonic() + timeout_s
        while True:
            now_s = time.monotonic()
            if not self.silent and now_s >= self._next_beat_s:
                for peer in self.peers:
                    self.send(peer, protocol.BrokerHeartbeat(broker_id="fake"))
                self._next_beat_s = now_s + HEARTBEAT_S
            remaining_s = deadline_s - now_s
            if remaining_s <= 0:
                raise AssertionError(f"no message from a worker within {timeout_s} s")
            if self.socket.poll(min(remaining_s, HEARTBEAT_S) * 1000):
                identity, *frames = self.socket.recv_multipart()
                command, message = protocol.decode(frames, protocol.WORKER_TO_BROKER)
                if command is protocol.Command.READY:
                    self.peers.add(identity)
                elif identity not in self.peers:
                    # as docs/protocol.md asks of a broker: disown workers it does not know
                    self.send(identity, protocol.Disconnect(reason="unknown worker"))
                if command is protocol.Command.HEARTBEAT:
                    self.heartbeats.append((time.monotonic(), message))
                    if not keep_heartbeats:
                        continue
                return identity, command, message

    def expect(self, command: protocol.Command, timeout_s: float = 10.0):
        identity, got, message = self.recv(timeout_s, keep_heartbeats=command is protocol.Command.HEARTBEAT)
        assert got is command, f"expected {command.name}, got {got.name}: {message}"
        return identity, message

    def close(self) -> None:
        self.socket.close(linger=0)


@pytest.fixture
def broker(zctx, endpoints):
    fake = FakeBroker(zctx, endpoints)
    yield fake
    fake.close()


@pytest.fixture
def spawn(tmp_path, endpoints):
    """Start `geomgen gpu-worker` processes; every one is reaped."""
    started: list[subprocess.Popen] = []

    def start(backend: str, *args: str, liveness: int = RELAXED_LIVENESS) -> subprocess.Popen:
        log = open(tmp_path / f"gpu-{backend}-{len(started)}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "geomgen", "gpu-worker", "--backend", backend,
             "--broker", f"127.0.0.1:{endpoints.client_port}",
             "--heartbeat-interval", str(HEARTBEAT_S), "--liveness", str(liveness), *args],
            cwd=REPO, env=worker_env(), stdout=log, stderr=subprocess.STDOUT,
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


def job(backend: str, data: bytes = b"not a mesh", **options) -> protocol.Job:
    return protocol.Job(job_id=uuid.uuid4().hex[:8], attempt=1, backend=backend, input_name="input.png",
                        input_data=data, backend_options=options)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the task ended meanwhile
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until_loaded(broker: FakeBroker, since: int, timeout_s: float = 30.0) -> int:
    """Read heartbeats until, among those from ``since`` on, some said
    ``loading`` and the latest does not; returns how many said it."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        beats = [beat for _, beat in broker.heartbeats[since:]]
        loading = sum(beat.loading for beat in beats)
        if loading and not beats[-1].loading:
            return loading
        broker.expect(protocol.Command.HEARTBEAT, timeout_s=max(0.1, deadline_s - time.monotonic()))


def test_ready_after_load_then_a_job_returns_a_glb(broker, spawn):
    proc = spawn("instant", "--gpu", "3")
    identity, ready = broker.expect(protocol.Command.READY, timeout_s=30)
    assert (ready.backend, ready.pid, ready.gpu) == ("instant", proc.pid, "3")
    assert ready.heartbeat_interval_s == HEARTBEAT_S

    request = job("instant")
    broker.send(identity, request)
    _, result = broker.expect(protocol.Command.FINAL)
    assert (result.job_id, result.attempt, result.ok, result.error) == (request.job_id, 1, True, None)
    mesh = trimesh.load(io.BytesIO(result.glb), file_type="glb", force="mesh")
    assert mesh.extents == pytest.approx(BOX_EXTENTS_M)
    # CUDA_VISIBLE_DEVICES was set before the backend module was imported
    assert result.info["cuda_visible_devices"] == "3"
    # a fresh work dir existed during the job and is gone after it
    assert result.info["work_dir_existed"] and not Path(result.info["work_dir"]).exists()

    glb_in = box_glb()
    echo = job("instant", data=glb_in)
    broker.send(identity, echo)
    _, result = broker.expect(protocol.Command.FINAL)
    assert result.ok and result.glb == glb_in and result.job_id == echo.job_id
    _, beat = broker.expect(protocol.Command.HEARTBEAT)
    assert beat.worker_id == ready.worker_id and beat.job_id is None


def test_heartbeats_while_busy_busy_reply_and_warm_stop(broker, spawn):
    proc = spawn("slow", "--backend-option", "delay_s=1.5")
    identity, _ = broker.expect(protocol.Command.READY, timeout_s=30)
    first = job("slow")
    broker.send(identity, first)
    _, progress = broker.expect(protocol.Command.PARTIAL)
    assert progress.job_id == first.job_id and "1.5" in progress.detail

    second = job("slow")
    broker.send(identity, second)
    _, refused = broker.expect(protocol.Command.FINAL)
    assert refused.job_id == second.job_id and not refused.ok
    assert refused.error["code"] == "busy" and first.job_id in refused.error["message"]

    broker.heartbeats.clear()
    _, done = broker.expect(protocol.Command.FINAL)
    assert done.job_id == first.job_id and done.ok and done.seconds >= 1.4
    during = [beat for _, beat in broker.heartbeats if beat.job_id == first.job_id]
    assert len(during) >= 4, f"only {len(during)} heartbeats during a 1.5 s job at {HEARTBEAT_S} s"
    assert all(beat.attempt == 1 for beat in during)

    # SIGTERM during a job: it finishes within the grace period, reports, then DISCONNECT, exit 0
    third = job("slow", delay_s="0.5")
    broker.send(identity, third)
    broker.expect(protocol.Command.PARTIAL)
    below = descendants(proc.pid)
    assert done.info["pid"] in below
    proc.send_signal(signal.SIGTERM)
    _, done = broker.expect(protocol.Command.FINAL)
    assert done.job_id == third.job_id and done.ok
    broker.expect(protocol.Command.DISCONNECT)
    assert proc.wait(timeout=10) == 0
    assert not alive(done.info["pid"])  # the worker reaped its backend process before it exited
    # multiprocessing's resource tracker ends on its own once its pipe from the worker closes
    wait_for(lambda: not [pid for pid in below if alive(pid)], timeout_s=10, what="the worker's children to end")


def test_backend_exceptions_become_error_results(broker, spawn):
    proc = spawn("failing")
    identity, _ = broker.expect(protocol.Command.READY, timeout_s=30)
    cases = [
        ("runtime", "generate", "generate_failed", "RuntimeError"),
        ("input", "input", "bad_image", "not an image"),
        ("generate", "generate", "empty_mesh", "empty mesh"),
        ("exit", "generate", "generate_failed", "SystemExit"),
    ]
    for mode, stage, code, text in cases:
        request = job("failing", fail=mode)
        broker.send(identity, request)
        _, result = broker.expect(protocol.Command.FINAL)
        assert result.job_id == request.job_id and not result.ok and result.glb is None
        assert (result.error["stage"], result.error["code"]) == (stage, code), result.error
        assert text in result.error["message"]
    request = job("failing", fail="no")
    broker.send(identity, request)
    _, result = broker.expect(protocol.Command.FINAL)
    assert result.ok and result.glb[:4] == b"glTF"
    wrong = job("instant")
    broker.send(identity, wrong)
    _, result = broker.expect(protocol.Command.FINAL)
    assert not result.ok and result.error["code"] == "unknown_backend" and "'failing'" in result.error["message"]
    assert proc.poll() is None


def test_reconnects_and_announces_again(broker, spawn):
    spawn("instant", liveness=LIVENESS)
    first_identity, first = broker.expect(protocol.Command.READY, timeout_s=30)

    # 1. the broker goes silent: after LIVENESS x HEARTBEAT_S the worker reconnects (new socket)
    broker.silent = True
    started_s = time.monotonic()
    identity, ready = broker.expect(protocol.Command.READY, timeout_s=10)
    waited_s = time.monotonic() - started_s
    assert identity != first_identity and ready.worker_id == first.worker_id
    assert waited_s >= LIVENESS * HEARTBEAT_S * 0.9, waited_s
    broker.silent = False

    # 2. the broker disowns it with DISCONNECT: it reconnects and says READY again
    broker.send(identity, protocol.Disconnect(reason="unknown worker"))
    identity2, _ = broker.expect(protocol.Command.READY, timeout_s=10)
    assert identity2 != identity

    # 3. the broker restarts on the same port: the worker finds the new one and serves it
    broker.restart()
    identity3, ready = broker.expect(protocol.Command.READY, timeout_s=15)
    assert ready.worker_id == first.worker_id
    request = job("instant")
    broker.send(identity3, request)
    _, result = broker.expect(protocol.Command.FINAL)
    assert result.ok and result.job_id == request.job_id


def test_start_up_failures_exit_2_with_a_clear_message(broker, spawn):
    cases = {
        "unavailable": spawn("unavailable"),
        "unknown": spawn("no-such-backend"),
        "bad_option": spawn("instant", "--backend-option", "delay_s=soon"),
        "bad_heartbeat": spawn("instant", "--heartbeat-interval", "0"),
    }
    for proc in cases.values():
        assert proc.wait(timeout=30) == 2
    logs = {name: proc.log_path.read_text() for name, proc in cases.items()}
    assert "cannot start backend 'unavailable'" in logs["unavailable"]
    assert "pip install 'geomgen[unavailable-extra]'" in logs["unavailable"]
    assert "unknown backend 'no-such-backend'" in logs["unknown"] and "GEOMGEN_BACKENDS" in logs["unknown"]
    assert "delay_s must be a number" in logs["bad_option"]
    assert "interval > 0 s" in logs["bad_heartbeat"]
    for text in logs.values():
        assert "Traceback" not in text
    assert not broker.socket.poll(0), "a worker whose backend cannot start said READY"


def test_a_hung_backend_is_abandoned_at_its_deadline_and_reloaded(broker, spawn, tmp_path):
    loads = tmp_path / "loads.txt"
    proc = spawn("hanging", "--generate-timeout", "1.5", "--backend-option", "load_s=1",
                 "--backend-option", f"loads_file={loads}")
    identity, ready = broker.expect(protocol.Command.READY, timeout_s=30)
    assert ready.info["generate_timeout_s"] == 1.5 and ready.info["load_s"] >= 0.9
    broker.send(identity, job("hanging", hang="no"))
    _, result = broker.expect(protocol.Command.FINAL)
    first_pid = result.info["pid"]
    assert result.ok and first_pid != proc.pid
    # no time left: refused at once, without costing a reload
    late = dataclasses.replace(job("hanging"), deadline_s=0.0)
    broker.send(identity, late)
    _, result = broker.expect(protocol.Command.FINAL)
    assert result.job_id == late.job_id and result.error["code"] == "timeout" and not result.info

    # past the worker's --generate-timeout: FINAL timeout, the backend process is killed and reloaded
    hung = job("hanging")
    since = len(broker.heartbeats)
    broker.send(identity, hung)
    started_s = time.monotonic()
    broker.expect(protocol.Command.PARTIAL)
    _, result = broker.expect(protocol.Command.FINAL)
    waited_s = time.monotonic() - started_s
    assert result.job_id == hung.job_id and not result.ok
    assert (result.error["stage"], result.error["code"]) == ("generate", "timeout"), result.error
    assert "1.5 s deadline" in result.error["message"] and "restarted" in result.error["message"]
    assert result.info == {"reloads": 1}
    assert 1.4 <= waited_s < 1.5 + 2.0, waited_s
    assert not alive(first_pid)

    # while it reloads (load_s=1) it heartbeats `loading` and refuses work as busy
    refused = job("hanging", hang="no")
    broker.send(identity, refused)
    _, result = broker.expect(protocol.Command.FINAL)
    assert result.job_id == refused.job_id and result.error["code"] == "busy"
    assert "reloading" in result.error["message"]
    assert wait_until_loaded(broker, since) >= 2

    # loaded again: served by a new backend process; the model was loaded twice
    broker.send(identity, job("hanging", hang="no"))
    _, result = broker.expect(protocol.Command.FINAL)
    assert result.ok and result.info["pid"] not in (first_pid, proc.pid)
    assert loads.read_text().split() == [str(first_pid), str(result.info["pid"])]

    # a job's own deadline, below the worker's, is the one that holds
    short = dataclasses.replace(job("hanging"), deadline_s=0.5)
    broker.send(identity, short)
    started_s = time.monotonic()
    broker.expect(protocol.Command.PARTIAL)
    _, result = broker.expect(protocol.Command.FINAL)
    assert result.job_id == short.job_id and result.error["code"] == "timeout"
    assert "0.5 s deadline" in result.error["message"] and result.info == {"reloads": 2}
    assert time.monotonic() - started_s < 0.5 + 2.0
    assert proc.poll() is None


def test_a_crashed_backend_process_fails_its_job_and_is_reloaded(broker, spawn):
    proc = spawn("crashing")
    identity, _ = broker.expect(protocol.Command.READY, timeout_s=30)
    broker.send(identity, job("crashing", crash="no"))
    _, result = broker.expect(protocol.Command.FINAL)
    first_pid = result.info["pid"]

    crash = job("crashing")
    since = len(broker.heartbeats)
    broker.send(identity, crash)
    _, result = broker.expect(protocol.Command.FINAL)
    assert result.job_id == crash.job_id and not result.ok
    assert (result.error["stage"], result.error["code"]) == ("generate", "crashed"), result.error
    assert "SIGKILL" in result.error["message"] and result.info == {"reloads": 1}
    wait_until_loaded(broker, since)

    broker.send(identity, job("crashing", crash="no"))
    _, result = broker.expect(protocol.Command.FINAL)
    assert result.ok and result.info["pid"] != first_pid
    assert proc.poll() is None


def test_a_failed_reload_disconnects_and_exits(broker, spawn, tmp_path):
    loads = tmp_path / "loads.txt"
    proc = spawn("hanging", "--generate-timeout", "0.5", "--backend-option", f"loads_file={loads}",
                 "--backend-option", "max_loads=1")
    identity, _ = broker.expect(protocol.Command.READY, timeout_s=30)
    broker.send(identity, job("hanging"))
    broker.expect(protocol.Command.PARTIAL)
    _, result = broker.expect(protocol.Command.FINAL)
    assert result.error["code"] == "timeout"
    _, bye = broker.expect(protocol.Command.DISCONNECT)
    assert bye.reason == "backend failed to reload"
    assert proc.wait(timeout=10) == 2
    assert "may load 1 times only" in proc.log_path.read_text()


def test_no_backend_process_outlives_a_killed_worker(broker, spawn):
    proc = spawn("slow")
    identity, _ = broker.expect(protocol.Command.READY, timeout_s=30)
    below = descendants(proc.pid)
    assert below, "no backend process under the worker"
    broker.send(identity, job("slow", delay_s="60"))
    broker.expect(protocol.Command.PARTIAL)
    proc.kill()
    proc.wait(timeout=10)
    wait_for(lambda: not [pid for pid in below if alive(pid)], timeout_s=10,
             what="the backend process to end with its worker")


def test_importing_the_worker_does_not_import_torch():
    code = "import sys, geomgen.gpu_worker; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=worker_env(), capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture
def plugins_env(monkeypatch):
    """The test backends, registered for backend processes started by this process."""
    monkeypatch.setenv("GEOMGEN_BACKENDS", PLUGINS)


def test_in_process_loop_runs_to_completion(broker, endpoints, plugins_env):
    """run(stop_event) in a thread: serves, reports progress, stops with DISCONNECT."""
    worker = GpuWorker("instant", endpoints, backend_options={"delay_s": "0.3"}, heartbeat_interval_s=HEARTBEAT_S,
                       heartbeat_liveness=LIVENESS, worker_id="in-process")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"grace_s": 2.0})
    try:
        facts = worker.load()
        assert facts.input_kind == "mesh" and worker.generate_timeout_s == 300.0
        backend_pid = worker.backend.pid
        thread.start()
        identity, ready = broker.expect(protocol.Command.READY)
        assert ready.worker_id == "in-process" and ready.pid == os.getpid()
        request = job("instant")
        broker.send(identity, request)
        _, progress = broker.expect(protocol.Command.PARTIAL)
        assert progress.job_id == request.job_id
        assert worker.busy
        _, result = broker.expect(protocol.Command.FINAL)
        assert result.ok and worker.completed == 1 and not worker.busy
        assert result.info["pid"] == backend_pid != os.getpid()
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=10)
        worker.close()
    assert not thread.is_alive() and not alive(backend_pid)
    _, bye = broker.expect(protocol.Command.DISCONNECT)
    assert bye.worker_id == "in-process" and bye.reason == "shutdown"


def test_stop_kills_a_job_past_the_grace_period(broker, endpoints, plugins_env):
    """A job still running when the grace period ends is abandoned: its backend
    process is killed and DISCONNECT goes out at once."""
    worker = GpuWorker("instant", endpoints, backend_options={"delay_s": "60"}, heartbeat_interval_s=HEARTBEAT_S,
                       heartbeat_liveness=RELAXED_LIVENESS, worker_id="abandoning")
    try:
        worker.load()
        backend_pid = worker.backend.pid
        worker.run_once(0.0)
        identity, _ = broker.expect(protocol.Command.READY)
        broker.send(identity, job("instant"))
        wait_for(lambda: worker.run_once(0.05) or worker.busy, timeout_s=10, what="the job to start")
        started_s = time.monotonic()
        worker.stop(grace_s=0.3)
        assert 0.25 <= time.monotonic() - started_s < 5 and not worker.busy
        assert not alive(backend_pid)
        _, progress = broker.expect(protocol.Command.PARTIAL)
        _, bye = broker.expect(protocol.Command.DISCONNECT)
        assert bye.worker_id == "abandoning"
    finally:
        worker.close()

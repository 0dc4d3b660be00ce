"""The GPU worker against a broker played by the test: a real ROUTER on a
loopback port, real worker processes (``geomgen gpu-worker``) with the
test backends of tests/plugins.py registered through GEOMGEN_BACKENDS."""

from __future__ import annotations

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
from tests.plugins import BOX_EXTENTS_M, InstantBackend, box_glb

PLUGINS = ",".join(
    f"{name}=tests.plugins:{cls}"
    for name, cls in [("instant", "InstantBackend"), ("slow", "SlowBackend"), ("failing", "FailingBackend"),
                      ("crashing", "CrashingBackend"), ("unavailable", "UnavailableBackend")]
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
    proc.send_signal(signal.SIGTERM)
    _, done = broker.expect(protocol.Command.FINAL)
    assert done.job_id == third.job_id and done.ok
    broker.expect(protocol.Command.DISCONNECT)
    assert proc.wait(timeout=10) == 0


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


def test_start_up_failures_exit_2_with_a_clear_message(spawn):
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


def test_crashing_backend_takes_only_its_process(broker, spawn):
    proc = spawn("crashing")
    identity, _ = broker.expect(protocol.Command.READY, timeout_s=30)
    broker.send(identity, job("crashing"))
    assert proc.wait(timeout=10) == -signal.SIGKILL


def test_importing_the_worker_does_not_import_torch():
    code = "import sys, geomgen.gpu_worker; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=worker_env(), capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_in_process_loop_runs_to_completion(broker, endpoints):
    """run(stop_event) in a thread: serves, reports progress, stops with DISCONNECT."""
    backend = InstantBackend({"delay_s": "0.3"})
    backend.load()
    worker = GpuWorker(backend, "instant", endpoints, heartbeat_interval_s=HEARTBEAT_S,
                       heartbeat_liveness=LIVENESS, worker_id="in-process")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"grace_s": 2.0})
    thread.start()
    try:
        identity, ready = broker.expect(protocol.Command.READY)
        assert ready.worker_id == "in-process" and ready.pid == os.getpid()
        request = job("instant")
        broker.send(identity, request)
        _, progress = broker.expect(protocol.Command.PARTIAL)
        assert progress.job_id == request.job_id
        assert worker.busy
        _, result = broker.expect(protocol.Command.FINAL)
        assert result.ok and worker.completed == 1 and not worker.busy
    finally:
        stop.set()
        thread.join(timeout=10)
        worker.close()
    assert not thread.is_alive()
    _, bye = broker.expect(protocol.Command.DISCONNECT)
    assert bye.worker_id == "in-process" and bye.reason == "shutdown"


def test_stop_abandons_a_job_past_the_grace_period(broker, endpoints):
    """A job still running when the grace period ends is abandoned: DISCONNECT
    goes out at once and the backend is not closed under the running job."""
    closed = threading.Event()

    class Recorded(InstantBackend):
        def close(self) -> None:
            closed.set()

    backend = Recorded({"delay_s": "5"})
    backend.load()
    worker = GpuWorker(backend, "instant", endpoints, heartbeat_interval_s=HEARTBEAT_S,
                       heartbeat_liveness=RELAXED_LIVENESS, worker_id="abandoning")
    try:
        worker.run_once(0.0)
        identity, _ = broker.expect(protocol.Command.READY)
        broker.send(identity, job("instant"))
        wait_for(lambda: worker.run_once(0.05) or worker.busy, timeout_s=10, what="the job to start")
        started_s = time.monotonic()
        worker.stop(grace_s=0.3)
        assert 0.25 <= time.monotonic() - started_s < 5 and worker.busy
        _, progress = broker.expect(protocol.Command.PARTIAL)
        _, bye = broker.expect(protocol.Command.DISCONNECT)
        assert bye.worker_id == "abandoning"
    finally:
        worker.close()
    assert not closed.is_set()

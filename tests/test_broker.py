"""The broker over real loopback sockets: an in-process Broker in a thread, and
small fake peers written here (a client, GPU workers, SDF workers) that speak
GGP/1 through protocol.encode / decode. Short heartbeat settings keep the
failure cases fast; every wait is bounded."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
import uuid

import msgpack
import pytest
import zmq

from geomgen import protocol
from geomgen.broker import Broker
from geomgen.errors import TransportError
from geomgen.protocol import (
    Cancel,
    ClientHeartbeat,
    ClientRequest,
    Command,
    Disconnect,
    HealthQuery,
    JobProgress,
    JobResult,
    SdfResult,
    SdfStatus,
    WorkerHeartbeat,
    WorkerReady,
)

from .conftest import wait_for

INTERVAL_S = 0.05
LIVENESS = 6  # a peer is dead after 0.3 s of silence
FAST = dict(heartbeat_interval_s=INTERVAL_S, heartbeat_liveness=LIVENESS, max_retries=2,
            no_worker_timeout_s=10.0, sdf_lease_s=5.0)
DEAD_AFTER_S = INTERVAL_S * LIVENESS


@pytest.fixture
def start_broker(endpoints):
    """Start a Broker in a thread with FAST settings (overridable); stopped and closed after the test."""
    running = []

    def start(**settings) -> Broker:
        broker = Broker(endpoints, known_backends=["fake"], **{**FAST, **settings})
        broker.bind()
        stop = threading.Event()
        thread = threading.Thread(target=broker.run, args=(stop,), daemon=True)
        thread.start()
        running.append((broker, stop, thread))
        return broker

    yield start
    for broker, stop, thread in running:
        stop.set()
        thread.join(5)
        broker.close()


@pytest.fixture
def peers(zctx, endpoints):
    """Factory of fake peers; every one is stopped and its sockets closed after the test."""
    made = []

    class Factory:
        def client(self, identity: bytes | None = None) -> "FakeClient":
            peer = FakeClient(zctx, endpoints, identity)
            made.append(peer)
            return peer

        def worker(self, backend: str = "fake", **kw) -> "FakeWorker":
            peer = FakeWorker(zctx, endpoints, backend, **kw)
            made.append(peer)
            peer.start()
            return peer

        def sdf(self, **kw) -> "FakeSdf":
            peer = FakeSdf(zctx, endpoints, **kw)
            made.append(peer)
            peer.start()
            return peer

    yield Factory()
    for peer in made:
        peer.close()


class FakeClient:
    """A client DEALER used from the test thread."""

    def __init__(self, ctx, endpoints, identity=None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity or uuid.uuid4().hex.encode())
        self.sock.connect(endpoints.client)

    def close(self):
        self.sock.close(linger=0)

    def send(self, message, command=None):
        self.sock.send_multipart(protocol.encode(message, command))

    def request(self, request_id="r1", backend="fake", **fields) -> ClientRequest:
        req = ClientRequest(request_id=request_id, backend=backend, input_name=f"{request_id}.png",
                            input_data=b"image-bytes", output_name="thing", **fields)
        self.send(req)
        return req

    def recv(self, timeout_s=5.0):
        if not self.sock.poll(timeout_s * 1000):
            raise AssertionError(f"no message from the broker within {timeout_s} s")
        return protocol.decode(self.sock.recv_multipart(), protocol.BROKER_TO_CLIENT)

    def quiet_for(self, duration_s: float) -> bool:
        """True if nothing arrives for ``duration_s`` (a bounded negative check)."""
        return not self.sock.poll(duration_s * 1000)

    def final(self, request_id="r1", timeout_s=5.0):
        """(events, result) for one request, skipping nothing: every message must be about it."""
        events = []
        while True:
            command, msg = self.recv(timeout_s)
            assert msg.request_id == request_id, msg
            if command is Command.FINAL:
                return events, msg
            events.append(msg)

    def finals(self, count, timeout_s=5.0) -> dict:
        results = {}
        while len(results) < count:
            command, msg = self.recv(timeout_s)
            if command is Command.FINAL:
                assert msg.request_id not in results, f"second FINAL for {msg.request_id}"
                results[msg.request_id] = msg
        return results

    def health(self) -> dict:
        self.send(HealthQuery())
        while True:
            command, msg = self.recv()
            if command is Command.HEALTH:
                return msg.stats


class PeerThread(threading.Thread):
    """A fake peer that owns its sockets in its own thread: it heartbeats on its
    own, queues what it receives in ``inbox`` and sends what the test puts in
    ``outbox`` (frames lists or messages)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.silent = threading.Event()  # stop heartbeating (a hung process)
        self.dead = threading.Event()  # close the sockets (a killed process)
        self._halt = threading.Event()

    def close(self):
        self._halt.set()
        self.join(5)

    def take(self, command=Command.REQUEST, timeout_s=5.0):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                got, msg = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{type(self).__name__} got no {command.name} within {timeout_s} s") from None
            if got is command:
                return msg


class FakeWorker(PeerThread):
    def __init__(self, ctx, endpoints, backend, worker_id=None, ready=True):
        super().__init__()
        self.ctx, self.url, self.backend = ctx, endpoints.worker, backend
        self.worker_id = worker_id or f"w-{uuid.uuid4().hex[:6]}"
        self.ready = ready
        self.running: protocol.Job | None = None

    def run(self):
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.url)
        if self.ready:
            sock.send_multipart(protocol.encode(WorkerReady(self.worker_id, self.backend, "testhost", 1,
                                                                  heartbeat_interval_s=INTERVAL_S)))
        next_beat = 0.0
        while not self._halt.is_set() and not self.dead.is_set():
            if sock.poll(5):
                command, msg = protocol.decode(sock.recv_multipart(), protocol.BROKER_TO_WORKER)
                if command is Command.REQUEST:
                    self.running = msg
                self.inbox.put((command, msg))
            while not self.outbox.empty():
                item = self.outbox.get()
                if isinstance(item, JobResult) and self.running and item.job_id == self.running.job_id:
                    self.running = None
                sock.send_multipart(item if isinstance(item, list) else protocol.encode(item))
            if not self.silent.is_set() and time.monotonic() >= next_beat:
                job = self.running
                beat = WorkerHeartbeat(self.worker_id, job.job_id if job else None, job.attempt if job else 0)
                sock.send_multipart(protocol.encode(beat))
                next_beat = time.monotonic() + INTERVAL_S
        sock.close(linger=0)

    def reply(self, job, ok=True, glb=b"GLB-BYTES", error=None, **kw):
        self.outbox.put(JobResult(job.job_id, job.attempt, ok, glb if ok else None, error, 0.01, **kw))


class FakeSdf(PeerThread):
    """An SDF worker: PULL for jobs (read only with a free slot), PUSH for status and results."""

    def __init__(self, ctx, endpoints, slots=1, paused=False, report_held=True, worker_id=None):
        super().__init__()
        self.ctx, self.endpoints = ctx, endpoints
        self.slots, self.report_held = slots, report_held
        self.paused = threading.Event()
        if paused:
            self.paused.set()
        self.worker_id = worker_id or f"s-{uuid.uuid4().hex[:6]}"
        self.held: list[list] = []
        self.arrived_while_paused = False

    def free(self) -> int:
        return 0 if self.paused.is_set() else self.slots - len(self.held)

    def status(self, command=Command.HEARTBEAT):
        held = [list(h) for h in self.held] if self.report_held else []
        return protocol.encode(SdfStatus(self.worker_id, self.slots, self.free(), held, "testhost", 2,
                                         heartbeat_interval_s=INTERVAL_S), command)

    def run(self):
        pull = self.ctx.socket(zmq.PULL)
        push = self.ctx.socket(zmq.PUSH)
        for sock in (pull, push):
            sock.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 1)
        pull.connect(self.endpoints.sdf_job)
        push.connect(self.endpoints.sdf_result)
        push.send_multipart(self.status(Command.READY))
        next_beat, was_paused = time.monotonic() + INTERVAL_S, self.paused.is_set()
        while not self._halt.is_set() and not self.dead.is_set():
            if self.paused.is_set():
                self.arrived_while_paused |= bool(pull.poll(5))
            elif was_paused:  # resumed: announce the free slots at once
                push.send_multipart(self.status())
            elif self.free() > 0 and pull.poll(5):
                command, msg = protocol.decode(pull.recv_multipart(), protocol.BROKER_TO_SDF)
                self.held.append([msg.job_id, msg.attempt])
                push.send_multipart(self.status())  # a slot was taken: say so at once
                self.inbox.put((command, msg))
            else:
                time.sleep(0.005)  # nothing to read until a slot frees; keep the thread cheap
            was_paused = self.paused.is_set()
            while not self.outbox.empty():
                item = self.outbox.get()
                push.send_multipart(item if isinstance(item, list) else protocol.encode(item, Command.FINAL))
                if isinstance(item, SdfResult) and [item.job_id, item.attempt] in self.held:
                    self.held.remove([item.job_id, item.attempt])
                    push.send_multipart(self.status())  # a slot was freed
            if not self.silent.is_set() and time.monotonic() >= next_beat:
                push.send_multipart(self.status())
                next_beat = time.monotonic() + INTERVAL_S
        pull.close(linger=0)
        push.close(linger=0)

    def reply(self, job, ok=True, error=None):
        files = {f"{job.name}/{job.name}.sdf": b"<sdf/>"} if ok else {}
        sdf_file = f"{job.name}/{job.name}.sdf" if ok else None
        self.outbox.put(SdfResult(self.worker_id, job.job_id, job.attempt, ok, files, sdf_file,
                                  {"method": "hull"}, error, 0.02))


def kinds(events) -> list[str]:
    return [e.event for e in events]


# --- routing --------------------------------------------------------------------------


def test_request_is_routed_to_a_worker_and_the_glb_comes_back(start_broker, peers):
    start_broker()
    worker = peers.worker()
    client = peers.client()
    client.request("r1", want_sdf=False, prompt="a chair", backend_options={"steps": 5})
    job = worker.take()
    assert (job.attempt, job.backend, job.input_data, job.prompt, job.backend_options) == (
        1, "fake", b"image-bytes", "a chair", {"steps": 5})
    worker.outbox.put(JobProgress(job.job_id, job.attempt, "shape done"))
    worker.reply(job, glb=b"THE-GLB", info={"faces": 12}, debug_files={"mask.png": b"M"})
    events, result = client.final("r1")
    assert kinds(events) == ["queued", "generating", "progress", "glb_ready"]
    assert events[2].detail == "shape done"
    assert events[3].glb == b"THE-GLB" and events[3].worker == worker.worker_id
    assert result.ok and result.attempts == 1 and result.files == {} and result.sdf_file is None
    assert result.info["generate"] == {"faces": 12} and result.info["debug_files"] == {"mask.png": b"M"}
    assert set(result.timings) >= {"queue_wait_s", "generate_s", "total_s"}


def test_full_pipeline_through_the_sdf_pool(start_broker, peers):
    start_broker()
    worker, sdf = peers.worker(), peers.sdf(slots=1)
    client = peers.client()
    client.request("r1", convert={"mass_kg": 2.0})
    worker.reply(worker.take(), glb=b"G")
    sdf_job = sdf.take()
    assert (sdf_job.attempt, sdf_job.glb, sdf_job.name, sdf_job.convert["mass_kg"]) == (1, b"G", "thing", 2.0)
    sdf.reply(sdf_job)
    events, result = client.final("r1")
    assert kinds(events) == ["queued", "generating", "glb_ready", "converting"]
    assert result.ok and result.sdf_file == "thing/thing.sdf" and result.files["thing/thing.sdf"] == b"<sdf/>"
    assert result.info["method"] == "hull" and result.timings["convert_s"] >= 0


def test_scenes_are_served_in_strict_round_robin(start_broker, peers):
    start_broker()
    client = peers.client()
    for i in range(6):
        client.request(f"A{i}", scene_id="A", want_sdf=False)
    for i in range(2):
        client.request(f"B{i}", scene_id="B", want_sdf=False)
    wait_for(lambda: client.health()["queue_sizes"].get("fake") == 8, 5, what="8 queued requests")
    worker = peers.worker()  # one worker: the dispatch order is the scheduling order
    order = []
    for _ in range(8):
        job = worker.take()
        order.append(job.input_name.split(".")[0])
        worker.reply(job)
    assert order == ["A0", "B0", "A1", "B1", "A2", "A3", "A4", "A5"]
    assert len(client.finals(8)) == 8


def test_worker_error_is_forwarded_to_the_client(start_broker, peers):
    start_broker()
    worker, client = peers.worker(), peers.client()
    client.request("r1")
    error = {"stage": "input", "code": "bad_image", "message": "the image is truncated"}
    worker.reply(worker.take(), ok=False, error=error)
    _, result = client.final("r1")
    assert not result.ok and result.error == error


def test_duplicate_request_id_in_flight_is_ignored(start_broker, peers):
    start_broker()
    worker, client = peers.worker(), peers.client()
    client.request("r1", want_sdf=False)
    job = worker.take()
    client.request("r1", want_sdf=False)  # re-sent while in flight: ignored
    other = peers.client()
    other.request("r1", want_sdf=False)  # the same id from another client is another request
    assert other.recv()[1].event == "queued"
    worker.reply(job)
    second = worker.take()
    assert second.job_id != job.job_id
    worker.reply(second)
    assert client.finals(1)["r1"].ok and other.finals(1)["r1"].ok
    assert client.quiet_for(0.2), "a second FINAL for a duplicate request"
    health = client.health()
    assert (health["accepted"], health["completed"], health["in_flight"]) == (2, 2, 0)


# --- failures of GPU workers ----------------------------------------------------------------


def test_silent_worker_job_is_retried_and_its_late_result_dropped(start_broker, peers):
    start_broker()
    hung = peers.worker(worker_id="hung")
    client = peers.client()
    client.request("r1", want_sdf=False)
    first = hung.take()
    hung.silent.set()  # stops heartbeating mid-job, like a hung process
    spare = peers.worker(worker_id="spare")
    second = spare.take(timeout_s=DEAD_AFTER_S + 5)
    assert second.job_id == first.job_id and second.attempt == 2
    hung.reply(first, glb=b"LATE")  # the superseded attempt answers after all
    assert hung.take(Command.DISCONNECT).reason  # the broker no longer knows it
    spare.reply(second, glb=b"FRESH")
    events, result = client.final("r1")
    assert "retrying" in kinds(events)
    assert [e.glb for e in events if e.event == "glb_ready"] == [b"FRESH"]
    assert result.ok and result.attempts == 2
    assert client.quiet_for(0.2), "a second FINAL after a late result"


def test_worker_that_disconnects_mid_job_has_its_job_rerun(start_broker, peers):
    start_broker()
    leaving = peers.worker(worker_id="leaving")
    client = peers.client()
    client.request("r1", want_sdf=False)
    first = leaving.take()
    leaving.outbox.put(Disconnect("shutdown", "leaving"))
    stays = peers.worker(worker_id="stays")
    second = stays.take()
    assert (second.job_id, second.attempt) == (first.job_id, 2)
    stays.reply(second)
    events, result = client.final("r1")
    assert "retrying" in kinds(events) and result.ok


def test_stale_attempt_from_a_live_worker_is_dropped(start_broker, peers):
    start_broker()
    worker, client = peers.worker(), peers.client()
    client.request("r1", want_sdf=False)
    job = worker.take()
    worker.outbox.put(JobResult(job.job_id, job.attempt + 5, True, b"WRONG"))
    worker.reply(job, glb=b"RIGHT")
    events, result = client.final("r1")
    assert [e.glb for e in events if e.event == "glb_ready"] == [b"RIGHT"] and result.ok
    assert client.health()["stale_results"] == 1


def test_worker_lost_after_max_retries(start_broker, peers):
    start_broker(max_retries=2)
    client = peers.client()
    client.request("r1", want_sdf=False)
    for n in range(3):  # each attempt's worker dies: killed, hung, killed
        worker = peers.worker(worker_id=f"doomed{n}")
        job = worker.take(timeout_s=DEAD_AFTER_S + 5)
        assert job.attempt == n + 1
        (worker.silent if n == 1 else worker.dead).set()
    events, result = client.final("r1", timeout_s=DEAD_AFTER_S + 5)
    assert kinds(events).count("retrying") == 2
    assert not result.ok and result.error["code"] == "worker_lost" and result.error["stage"] == "transport"
    assert "3 times" in result.error["message"]


def test_busy_refusal_requeues_without_counting(start_broker, peers):
    start_broker(max_retries=0)
    busy = peers.worker(worker_id="busy")
    client = peers.client()
    client.request("r1", want_sdf=False)
    job = busy.take()
    busy.running = None  # it claims to run something else from here on
    busy.outbox.put(JobResult(job.job_id, job.attempt, False, None,
                              {"stage": "transport", "code": "busy", "message": "busy"}))
    free = peers.worker(worker_id="free")
    again = free.take()
    assert again.job_id == job.job_id
    free.reply(again)
    _, result = client.final("r1")
    assert result.ok  # with max_retries 0 a counted loss would have failed it


def test_unknown_worker_is_told_to_reconnect(start_broker, peers):
    start_broker()
    stranger = peers.worker(ready=False)  # heartbeats without READY, as after a broker restart
    assert stranger.take(Command.DISCONNECT).reason


# --- waiting for workers --------------------------------------------------------------------


def test_no_worker_timeout_names_the_backend_and_the_command(start_broker, peers):
    start_broker()
    client = peers.client()
    client.request("r1", no_worker_timeout_s=0.2)
    events, result = client.final("r1")
    assert kinds(events) == ["queued"]
    assert result.error["code"] == "no_worker" and result.error["stage"] == "transport"
    assert "geomgen gpu-worker --backend fake --broker 127.0.0.1:" in result.error["message"]


def test_busy_workers_keep_requests_waiting_past_the_timeout(start_broker, peers):
    start_broker()
    worker, client = peers.worker(), peers.client()
    client.request("r1", want_sdf=False)
    first = worker.take()
    client.request("r2", want_sdf=False, no_worker_timeout_s=0.1)
    _events_within(client, 0.4)  # fails on any FINAL: r2 outlives its 0.1 s wait
    wait_for(lambda: client.health()["queue_sizes"]["fake"] == 1, 5, what="r2 still queued")
    worker.reply(first)
    worker.reply(worker.take())
    assert all(r.ok for r in client.finals(2).values())


def test_sdf_jobs_wait_for_an_sdf_worker_then_fail_clearly(start_broker, peers):
    start_broker(no_worker_timeout_s=0.3)
    worker, client = peers.worker(), peers.client()
    client.request("r1")
    worker.reply(worker.take())
    events, result = client.final("r1")
    assert kinds(events)[-1] == "glb_ready"
    assert result.error["code"] == "no_worker" and "geomgen sdf-worker --broker" in result.error["message"]


# --- bad requests ----------------------------------------------------------------------------


def test_unknown_backend_lists_what_is_available(start_broker, peers):
    start_broker()
    peers.worker(backend="plugin")
    client = peers.client()
    wait_for(lambda: "plugin" in client.health()["backends"], 5, what="plugin registered")
    client.request("r1", backend="nope")
    _, result = client.final("r1")
    assert result.error["code"] == "unknown_backend" and result.error["stage"] == "input"
    assert "fake" in result.error["message"] and "plugin" in result.error["message"]
    client.request("r2", backend="plugin", want_sdf=False)  # a backend a worker registered is accepted
    assert client.recv()[1].event == "queued"


@pytest.mark.parametrize("fields, code", [
    ({"convert": {"mass_kg": -1}}, "bad_option"),
    ({"convert": {"colour": "red"}}, "bad_option"),
    ({"output_name": ""}, "bad_request"),
])
def test_bad_fields_get_an_input_error(start_broker, peers, fields, code):
    start_broker()
    client = peers.client()
    req = ClientRequest("r1", "fake", "a.png", b"x", "thing")
    for key, value in fields.items():
        setattr(req, key, value)
    client.send(req)
    events, result = client.final("r1")
    assert events == [] and not result.ok
    assert (result.error["stage"], result.error["code"]) == ("input", code)


def test_malformed_messages_are_dropped_and_the_broker_keeps_serving(start_broker, peers, zctx, endpoints):
    start_broker(max_message_bytes=64 * 1024)
    stray = peers.client()
    good_header = protocol.header(Command.REQUEST)
    body = msgpack.packb({"request_id": "bad1", "backend": "fake"})  # missing fields
    stray.sock.send_multipart([b"garbage"])  # one frame
    stray.sock.send_multipart([good_header, body, b"extra"])  # three frames
    stray.sock.send_multipart([b"XYZ\x01\x02", body])  # wrong signature
    stray.sock.send_multipart([protocol.header(Command(2)), b"\xc1\xc1"])  # not msgpack
    stray.sock.send_multipart([b"GGP\x01\x63", body])  # unknown command
    stray.sock.send_multipart([good_header, b"x" * (128 * 1024)])  # oversized: ZeroMQ drops the peer
    # A stray peer on the worker and SDF ports too.
    for url, kind in ((endpoints.worker, zmq.DEALER), (endpoints.sdf_result, zmq.PUSH)):
        sock = zctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(url)
        sock.send_multipart([b"junk", b"\x00", b"more"])
        sock.send_multipart([protocol.header(Command.FINAL), msgpack.packb([1, 2])])
        sock.close(linger=2000)  # bounded: deliver, then close
    client = peers.client()
    client.sock.send_multipart([good_header, body])  # readable id, missing fields: answered
    _, result = client.final("bad1")
    assert result.error["code"] == "protocol" and "missing field" in result.error["message"]
    client.sock.send_multipart([b"GGP\x09\x02", msgpack.packb({"request_id": "v9"})])  # unknown version: answered
    _, result = client.final("v9")
    assert result.error["code"] == "bad_version" and result.error["stage"] == "transport"
    worker = peers.worker()
    client.request("ok1", want_sdf=False)
    worker.reply(worker.take())
    assert client.final("ok1")[1].ok
    # 5 unreadable on the client port, 2 answered, 2 each on the worker and SDF ports.
    wait_for(lambda: client.health()["dropped_messages"] == 11, 5, what="every bad message counted")


# --- SDF pool ----------------------------------------------------------------------------------


def test_sdf_push_waits_for_credit(start_broker, peers):
    start_broker()
    worker, client = peers.worker(), peers.client()
    sdf = peers.sdf(slots=1, paused=True)  # announces 1 slot, 0 free
    wait_for(lambda: client.health()["sdf_slots"] == 1, 5, what="SDF worker registered")
    client.request("r1")
    worker.reply(worker.take())
    wait_for(lambda: client.health()["sdf_queued"] == 1, 5, what="SDF job queued in the broker")
    health = client.health()
    assert health["sdf_in_flight"] == 0 and health["sdf_free"] == 0
    assert not sdf.arrived_while_paused, "pushed without credit"
    sdf.paused.clear()  # a status with a free slot arrives
    job = sdf.take()
    assert job.attempt == 1
    sdf.reply(job)
    assert client.final("r1")[1].ok


def test_sdf_lease_renewed_by_held_reports(start_broker, peers):
    start_broker(sdf_lease_s=0.15)
    worker, sdf, client = peers.worker(), peers.sdf(slots=2, report_held=True), peers.client()
    client.request("r1")
    worker.reply(worker.take())
    job = sdf.take()
    assert not any(e for e in _events_within(client, 0.5) if e.event == "retrying")  # 3 leases long
    sdf.reply(job)
    _, result = client.final("r1")
    assert result.ok and result.attempts == 1


def test_sdf_lease_expiry_repushes_and_drops_the_stale_result(start_broker, peers):
    start_broker(sdf_lease_s=0.2)
    worker, client = peers.worker(), peers.client()
    sdf = peers.sdf(slots=2, report_held=False)  # never reports what it holds: leases run out
    client.request("r1")
    worker.reply(worker.take())
    first = sdf.take()
    second = sdf.take(timeout_s=5)
    assert (second.job_id, second.attempt) == (first.job_id, 2)
    sdf.reply(first)  # superseded attempt: dropped
    sdf.reply(second)
    events, result = client.final("r1")
    assert "retrying" in kinds(events) and result.ok and result.attempts == 2
    assert client.quiet_for(0.2)


def test_sdf_worker_lost_after_max_repushes(start_broker, peers):
    start_broker(sdf_lease_s=0.15, max_retries=1)
    worker, client = peers.worker(), peers.client()
    sdf = peers.sdf(slots=3, report_held=False)
    client.request("r1")
    worker.reply(worker.take())
    assert [sdf.take().attempt, sdf.take().attempt] == [1, 2]
    _, result = client.final("r1")
    assert result.error["code"] == "worker_lost" and result.error["stage"] == "convert"


def test_killed_sdf_worker_job_goes_to_another(start_broker, peers):
    start_broker()
    worker, client = peers.worker(), peers.client()
    doomed = peers.sdf(slots=1)
    client.request("r1")
    worker.reply(worker.take())
    first = doomed.take()
    doomed.dead.set()  # killed mid-conversion: no more heartbeats, its sockets gone
    wait_for(lambda: client.health()["sdf_workers"] == [], 5, what="dead SDF worker removed")
    rescue = peers.sdf(slots=1)
    second = rescue.take()
    assert (second.job_id, second.attempt) == (first.job_id, 2)
    rescue.reply(second)
    results = client.finals(1)
    assert results["r1"].ok and results["r1"].attempts == 2


def test_results_only_request_gets_glb_ready_and_final(start_broker, peers):
    start_broker()
    worker, sdf, client = peers.worker(), peers.sdf(), peers.client()
    client.request("r1", events=False)
    job = worker.take()
    worker.outbox.put(JobProgress(job.job_id, job.attempt, "shape done"))
    worker.reply(job, glb=b"THE-GLB")
    sdf.reply(sdf.take())
    events, result = client.final("r1")
    assert kinds(events) == ["glb_ready"] and events[0].glb == b"THE-GLB"
    assert result.ok


def turn_until(broker: Broker, done, what: str, timeout_s: float = 5.0) -> None:
    """Run the broker's loop in this thread until ``done()``."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"the broker never {what}"
        broker.run_once(0.01)


def results_waiting(broker: Broker, peers, count: int):
    """``count`` + 1 workers; ``count`` of them have answered a job, and their
    results wait in the broker's socket, unread. Returns the client."""
    workers = [peers.worker() for _ in range(count + 1)]
    client = peers.client()
    turn_until(broker, lambda: broker.dispatcher.workers.alive("fake") == count + 1, "saw the workers")
    for n in range(count):
        client.request(f"r{n}", want_sdf=False, events=False)
    turn_until(broker, lambda: sum(w.running is not None for w in workers) == count, "dispatched the jobs")
    busy = [w for w in workers if w.running is not None]
    for worker in busy:
        worker.reply(worker.running)
    deadline = time.monotonic() + 5
    while any(not w.outbox.empty() for w in busy):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)  # the results are in the broker's socket before it reads the first
    return client


def test_a_new_request_is_dispatched_ahead_of_a_backlog_of_results(endpoints, peers):
    """A request that arrives while the broker works through GPU results is
    dispatched before the rest of them: results can wait, an idle worker should not."""
    broker = Broker(endpoints, known_backends=["fake"], **FAST)
    broker.bind()
    try:
        client = results_waiting(broker, peers, 3)
        order = []
        to_worker, to_client, on_worker = broker.to_worker, broker.to_client, broker._on_worker

        def record_worker(identity, message):
            order.append(("job", message.input_name) if isinstance(message, protocol.Job) else ("beat",))
            return to_worker(identity, message)

        def record_client(identity, message):
            if isinstance(message, protocol.Result):
                order.append(("final", message.request_id))
            return to_client(identity, message)

        def first_result_brings_a_request(frames):
            on_worker(frames)
            if len(order) == 1 and order[0][0] == "final":
                client.request("r3", want_sdf=False, events=False)
                assert broker._client.poll(5000), "r3 never reached the broker"

        broker.to_worker, broker.to_client = record_worker, record_client
        broker._on_worker = first_result_brings_a_request
        turn_until(broker, lambda: len([o for o in order if o[0] in ("job", "final")]) == 4,
                   "answered r0-r2 and sent r3")
        steps = [o for o in order if o[0] in ("job", "final")]
        assert steps[0][0] == "final" and steps[1] == ("job", "r3.png"), steps
    finally:
        broker.close()


def test_a_flood_of_requests_holds_results_back_only_so_long(endpoints, peers):
    """Requests go first, but a result waits for at most CLIENT_YIELD_BATCH of
    them: GPU workers must not sit idle behind a client's batch of thousands."""
    from geomgen.broker import CLIENT_YIELD_BATCH

    broker = Broker(endpoints, known_backends=["fake"], **FAST)
    broker.bind()
    try:
        client = results_waiting(broker, peers, 2)
        handled = []
        on_worker, on_client = broker._on_worker, broker._on_client

        def worker_message(frames):
            on_worker(frames)
            if bytes(frames[1])[protocol.HEADER_LEN - 1] == Command.FINAL:
                handled.append("result")
                if handled.count("result") == 1:  # a batch of 200 arrives behind the first result
                    for n in range(200):
                        client.request(f"flood{n}", want_sdf=False, events=False)
                    time.sleep(0.3)

        def client_message(frames):
            on_client(frames)
            handled.append("request")

        broker._on_worker, broker._on_client = worker_message, client_message
        turn_until(broker, lambda: handled.count("result") == 2, "read the second result")
        first = handled.index("result")
        between = handled[first + 1:handled.index("result", first + 1)]
        assert between and set(between) == {"request"} and len(between) <= CLIENT_YIELD_BATCH, handled
    finally:
        broker.close()


def test_sdf_job_handed_back_busy_is_pushed_again_uncounted(start_broker, peers):
    """PUSH may hand a job to a worker whose slots are all taken; it answers
    "busy" and the broker pushes the same attempt again, to whoever is next."""
    start_broker()
    worker, sdf, client = peers.worker(), peers.sdf(slots=1), peers.client()
    client.request("r1")
    worker.reply(worker.take())
    first = sdf.take()
    busy = {"stage": "convert", "code": "busy", "message": "no free conversion slot on this SDF worker"}
    sdf.reply(first, ok=False, error=busy)
    again = sdf.take(timeout_s=5)
    assert (again.job_id, again.attempt) == (first.job_id, first.attempt)
    sdf.reply(again)
    events, result = client.final("r1")
    assert result.ok and result.attempts == 1
    assert "retrying" not in kinds(events)
    assert client.health()["failed"] == 0


def test_sdf_error_is_forwarded(start_broker, peers):
    start_broker()
    worker, sdf, client = peers.worker(), peers.sdf(), peers.client()
    client.request("r1")
    worker.reply(worker.take())
    error = {"stage": "convert", "code": "bad_mesh", "message": "the mesh has no faces"}
    sdf.reply(sdf.take(), ok=False, error=error)
    _, result = client.final("r1")
    assert result.error == error


# --- cancel, heartbeat, health, serve ---------------------------------------------------------


def test_cancel_queued_and_running_requests(start_broker, peers):
    start_broker()
    worker, client = peers.worker(), peers.client()
    client.request("run", want_sdf=False)
    running = worker.take()
    client.request("wait", want_sdf=False)
    client.request("keep", want_sdf=False)
    client.send(Cancel(["run", "wait", "never-sent"]))
    results = client.finals(2)
    assert results["run"].error["code"] == "cancelled" and results["wait"].error["code"] == "cancelled"
    worker.reply(running)  # discarded; the worker is free again
    kept = worker.take()
    assert kept.input_name == "keep.png"
    worker.reply(kept)
    assert client.finals(1)["keep"].ok
    assert client.quiet_for(0.2), "a second FINAL for a cancelled request"


def test_client_heartbeat_reports_unknown_ids(start_broker, peers):
    start_broker()
    client = peers.client()
    client.request("held")
    client.recv()  # queued
    client.send(ClientHeartbeat(["held", "lost"]))
    command, beat = client.recv()
    assert command is Command.HEARTBEAT and beat.unknown == ["lost"] and beat.broker_id


def test_health_reports_workers_queues_and_timings(start_broker, peers):
    broker = start_broker()
    worker, sdf, client = peers.worker(), peers.sdf(slots=3), peers.client()
    client.request("r1", want_sdf=False)
    worker.reply(worker.take())
    client.final("r1")
    stats = wait_for(lambda: (s := client.health())["sdf_slots"] == 3 and s, 5, what="SDF slots")
    for key in ("version", "broker_id", "uptime_s", "backends", "workers", "sdf_workers", "sdf_slots", "sdf_free",
                "queue_sizes", "sdf_queued", "in_flight", "completed", "failed", "avg_generate_s", "avg_convert_s",
                "avg_queue_wait_s", "max_queue_wait_s", "scenes"):
        assert key in stats, key
    assert stats["broker_id"] == broker.broker_id
    assert stats["backends"]["fake"]["workers"] == 1 and stats["backends"]["fake"]["completed"] == 1
    assert stats["workers"][0]["worker_id"] == worker.worker_id and stats["completed"] == 1
    assert stats["sdf_workers"][0]["worker_id"] == sdf.worker_id
    assert stats["sdf_workers"][0]["slots"] == 3 and stats["sdf_free"] == 3
    assert stats["in_flight"] == 0 and stats["avg_generate_s"] > 0


def test_free_ports_are_below_the_ephemeral_range_and_free():
    """Outgoing connections take their local ports from the ephemeral range; a
    broker port picked there could be taken before the broker binds it."""
    import socket

    from geomgen.server import _ephemeral_low, free_base_port

    for _ in range(20):
        base = free_base_port("127.0.0.1")
        assert base + 4 <= _ephemeral_low()
        held = []
        try:
            for port in range(base, base + 4):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))  # raises if it was not free
        finally:
            for sock in held:
                sock.close()


def test_second_broker_on_the_same_ports_fails_clearly(start_broker, endpoints):
    start_broker()
    other = Broker(endpoints, known_backends=["fake"])
    with pytest.raises(TransportError) as info:
        other.bind()
    assert info.value.code == "bind_failed" and endpoints.client in info.value.message
    other.close()


def test_serve_logs_where_it_listens_and_exits_0_on_sigterm(endpoints, procs, tmp_path):
    log_path = tmp_path / "broker.log"
    code = ("import sys; from geomgen.broker import serve; from geomgen.endpoints import Endpoints; "
            f"sys.exit(serve(Endpoints.from_base('127.0.0.1', {endpoints.client_port})))")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: b"listening" in log_path.read_bytes(), 20, what="broker listening line")
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert endpoints.client.encode() in log_path.read_bytes()


def _events_within(client: FakeClient, duration_s: float) -> list:
    """Every PARTIAL that arrives in the next ``duration_s`` seconds."""
    events, deadline = [], time.monotonic() + duration_s
    while (left := deadline - time.monotonic()) > 0:
        if client.sock.poll(left * 1000):
            command, msg = protocol.decode(client.sock.recv_multipart(), protocol.BROKER_TO_CLIENT)
            assert command is Command.PARTIAL, msg
            events.append(msg)
    return events


def test_activity_is_logged_once_per_period_not_per_job(caplog):
    from geomgen.dispatch import _ActivityLog
    from geomgen.stats import BrokerStats

    stats = BrokerStats(started_at=0.0)
    activity = _ActivityLog(stats, now=0.0, interval_s=60.0)
    caplog.set_level("INFO", logger="geomgen.broker")
    for total_s in (1.0, 3.0):
        stats.completed += 1
        stats.total.add(total_s)
    stats.failed += 1
    stats.total.add(2.0)
    activity.maybe_log(30.0, in_flight=4, queued=1)
    assert caplog.records == []  # not a minute yet
    activity.maybe_log(61.0, in_flight=4, queued=1)
    assert [r.getMessage() for r in caplog.records] == [
        "last 61 s: 2 done, 1 failed (mean 2.00 s per job); 4 in flight, 1 waiting in queues"]
    activity.maybe_log(130.0, in_flight=0, queued=0)  # an idle minute says nothing
    assert len(caplog.records) == 1


class RecordingOutbox:
    """The dispatcher's Outbox, recording instead of sending."""

    def __init__(self):
        self.sent = []  # (to, message)

    def to_client(self, identity, message):
        self.sent.append((identity, message))

    def to_worker(self, identity, message):
        self.sent.append((identity, message))
        return True

    def to_sdf(self, job):
        self.sent.append(("sdf", job))
        return True


def test_broker_heartbeats_each_worker_on_its_own_phase():
    """Workers that registered together are heartbeated spread over the interval,
    each once per interval, and a job counts as a heartbeat."""
    from geomgen.dispatch import Dispatcher

    out = RecordingOutbox()
    d = Dispatcher(out, broker_id="b" * 32, address="host:5555", heartbeat_interval_s=1.0, heartbeat_liveness=5,
                   max_retries=2, no_worker_timeout_s=10.0, sdf_lease_s=5.0, known_backends=["fake"], now=0.0)
    names = [f"w{n}".encode() for n in range(20)]
    for name in names:
        d.worker_message(name, Command.READY, WorkerReady(name.decode(), "fake"), 0.0)
    beats: dict[bytes, list[float]] = {name: [] for name in names}
    for tick in range(1, 61):  # 3 s in 50 ms ticks
        now = tick * 0.05
        for worker in d.workers:
            worker.last_seen = now  # they answer
        if tick == 20:
            d.request(b"client", ClientRequest("r1", "fake", "r1.png", b"png", "thing", want_sdf=False), now)
            got_job = next(to for to, msg in out.sent if isinstance(msg, protocol.Job))
        del out.sent[:]
        d.housekeeping(now)
        for to, msg in out.sent:
            if isinstance(msg, protocol.BrokerHeartbeat):
                beats[to].append(now)
    first = sorted(times[0] for times in beats.values())
    assert 0.5 <= first[0] and first[-1] <= 1.05 and len(set(first)) > 5, first  # spread, not one burst
    assert not any(1.0 < t < 1.95 for t in beats[got_job]), beats[got_job]  # the job at 1.0 s was its beat
    beats[got_job] = sorted([*beats[got_job], 1.0])
    for name, times in beats.items():
        gaps = [b - a for a, b in zip(times, times[1:])]
        shortest = 0.0 if name == got_job else 0.95  # the job came between two beats
        assert len(times) >= 3 and all(shortest <= gap <= 1.06 for gap in gaps), (name, times)

"""The broker over real loopback sockets: the poll loop and the wire. An
in-process Broker runs in a thread (or is turned by hand), and the fake peers
of tests/peers.py speak GGP/1 to it. The job life-cycle rules themselves are
tested without sockets in tests/test_dispatch.py; here a request goes end to
end, bad frames are dropped, requests go ahead of results, and the loop keeps
its own clock. Every wait is bounded."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq

from geomgen import __version__, protocol
from geomgen.broker import CLIENT_YIELD_BATCH, Broker
from geomgen.errors import TransportError
from geomgen.protocol import Cancel, ClientHeartbeat, Command, JobProgress
from geomgen.server import _ephemeral_low, free_base_port

from .conftest import wait_for
from .peers import HEARTBEAT_INTERVAL_S, Peers, kinds

LIVENESS = 6  # a peer is dead after 0.3 s of silence
FAST = {"heartbeat_interval_s": HEARTBEAT_INTERVAL_S, "heartbeat_liveness": LIVENESS, "max_retries": 2,
        "no_worker_timeout_s": 10.0, "sdf_lease_s": 5.0}
DEAD_AFTER_S = HEARTBEAT_INTERVAL_S * LIVENESS


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
    made = Peers(zctx, endpoints)
    yield made
    made.close()


# --- end to end -----------------------------------------------------------------------------


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


def test_client_commands_are_answered_over_the_wire(start_broker, peers, endpoints):
    """HEARTBEAT, HEALTH and CANCEL reach the dispatcher and their answers come
    back on the client's own connection."""
    broker = start_broker()
    client = peers.client()
    client.request("held")  # no worker: it waits
    assert client.recv()[1].event == "queued"
    client.send(ClientHeartbeat(["held", "lost"]))
    command, beat = client.recv()
    assert command is Command.HEARTBEAT and beat.unknown == ["lost"] and beat.broker_id == broker.broker_id
    stats = client.health()
    assert (stats["broker_id"], stats["version"], stats["endpoints"]["client"]) == (
        broker.broker_id, __version__, endpoints.client)
    assert stats["in_flight"] == 1 and stats["queue_sizes"] == {"fake": 1}
    client.send(Cancel(["held"]))
    _, result = client.final("held")
    assert result.error["code"] == "cancelled"


def test_the_loop_expires_a_killed_worker_on_its_own_clock(start_broker, peers):
    """Housekeeping runs in the loop without anyone asking: a worker whose
    process died is found out within its liveness window and its job runs elsewhere."""
    start_broker()
    doomed = peers.worker(worker_id="doomed")
    client = peers.client()
    client.request("r1", want_sdf=False)
    first = doomed.take()
    doomed.dead.set()  # killed mid-job: no more heartbeats, its socket gone
    spare = peers.worker(worker_id="spare")
    second = spare.take(timeout_s=DEAD_AFTER_S + 5)
    assert (second.job_id, second.attempt) == (first.job_id, 2)
    spare.reply(second)
    events, result = client.final("r1")
    assert "retrying" in kinds(events) and result.ok and result.attempts == 2


# --- bad frames ----------------------------------------------------------------------------------


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


# --- requests before results ----------------------------------------------------------------------


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

        def first_result_brings_a_request(frames, key=None):
            on_worker(frames, key)
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
    broker = Broker(endpoints, known_backends=["fake"], **FAST)
    broker.bind()
    try:
        client = results_waiting(broker, peers, 2)
        handled = []
        on_worker, on_client = broker._on_worker, broker._on_client

        def worker_message(frames, key=None):
            on_worker(frames, key)
            if bytes(frames[1])[protocol.HEADER_LEN - 1] == Command.FINAL:
                handled.append("result")
                if handled.count("result") == 1:  # a batch of 200 arrives behind the first result
                    for n in range(200):
                        client.request(f"flood{n}", want_sdf=False, events=False)
                    time.sleep(0.3)

        def client_message(frames, key=None):
            on_client(frames, key)
            handled.append("request")

        broker._on_worker, broker._on_client = worker_message, client_message
        turn_until(broker, lambda: handled.count("result") == 2, "read the second result")
        first = handled.index("result")
        between = handled[first + 1:handled.index("result", first + 1)]
        assert between and set(between) == {"request"} and len(between) <= CLIENT_YIELD_BATCH, handled
    finally:
        broker.close()


# --- ports and serve ----------------------------------------------------------------------------


def test_free_ports_are_below_the_ephemeral_range_and_free():
    """Outgoing connections take their local ports from the ephemeral range; a
    broker port picked there could be taken before the broker binds it."""
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


def test_message_limits_are_per_role(start_broker, peers, zctx, endpoints):
    """With the default per-socket limits: a REQUEST over the input limit is cut
    off by ZeroMQ before the broker buffers it (no answer, the broker serves
    on); a worker's GLB of the same size, under the GLB limit, goes through."""
    from geomgen import defaults

    # A 65 MiB message holds up the worker's heartbeats behind it: give it 5 s of liveness, not 0.3 s.
    start_broker(max_message_bytes=None, heartbeat_liveness=100)
    over_input = defaults.MAX_INPUT_BYTES + defaults.MESSAGE_MARGIN_BYTES + 1
    big = zctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(endpoints.client)
    big.send_multipart(protocol.encode(protocol.ClientRequest(
        request_id="huge", backend="fake", input_name="huge.png", input_data=b"\0" * over_input, output_name="huge")))
    assert not big.poll(1000), "an oversized request must get nothing back: its connection is dropped"
    big.close(0)
    worker, client = peers.worker(), peers.client()
    client.request("r1", want_sdf=False)  # the broker goes on serving
    worker.reply(worker.take(), glb=b"\1" * over_input)  # a GLB this size is a worker's to send
    events, result = client.final("r1", timeout_s=30)
    assert result.ok and len(events[-1].glb) == over_input

"""Fake peers of the broker, shared by its tests.

Over sockets (tests/test_broker.py): a client DEALER used from the test thread,
and GPU and SDF workers that each own their sockets in a thread, heartbeat on
their own and speak GGP/1 through protocol.encode / decode. Without sockets
(tests/test_dispatch.py): a RecordingOutbox that the Dispatcher sends into.
Every wait is bounded: a missing message fails the test instead of hanging it.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from typing import Any

import zmq

from geomgen import protocol
from geomgen.protocol import (
    ClientRequest,
    Command,
    HealthQuery,
    JobResult,
    SdfResult,
    SdfStatus,
    WorkerHeartbeat,
    WorkerReady,
)

HEARTBEAT_INTERVAL_S = 0.05  # the fake workers' heartbeat, short so that failure cases are fast


def kinds(events) -> list[str]:
    """The event names of a list of PARTIAL events."""
    return [e.event for e in events]


class Peers:
    """Makes fake peers on ``endpoints``; ``close()`` stops every one and closes its sockets."""

    def __init__(self, ctx: zmq.Context, endpoints) -> None:
        self.ctx, self.endpoints = ctx, endpoints
        self._made: list = []

    def client(self, identity: bytes | None = None) -> FakeClient:
        peer = FakeClient(self.ctx, self.endpoints, identity)
        self._made.append(peer)
        return peer

    def worker(self, backend: str = "fake", **kw) -> FakeWorker:
        peer = FakeWorker(self.ctx, self.endpoints, backend, **kw)
        self._made.append(peer)
        peer.start()
        return peer

    def sdf(self, **kw) -> FakeSdf:
        peer = FakeSdf(self.ctx, self.endpoints, **kw)
        self._made.append(peer)
        peer.start()
        return peer

    def close(self) -> None:
        for peer in self._made:
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
    """A GPU worker: READY (unless ``ready`` is False), then heartbeats naming the job it runs."""

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
                                                            heartbeat_interval_s=HEARTBEAT_INTERVAL_S)))
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
                next_beat = time.monotonic() + HEARTBEAT_INTERVAL_S
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
                                         heartbeat_interval_s=HEARTBEAT_INTERVAL_S), command)

    def run(self):
        pull = self.ctx.socket(zmq.DEALER)  # jobs, addressed to this worker by its id
        push = self.ctx.socket(zmq.PUSH)
        for sock in (pull, push):
            sock.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        pull.connect(self.endpoints.sdf_job)
        push.connect(self.endpoints.sdf_result)
        push.send_multipart(self.status(Command.READY))
        next_beat, was_paused = time.monotonic() + HEARTBEAT_INTERVAL_S, self.paused.is_set()
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
                next_beat = time.monotonic() + HEARTBEAT_INTERVAL_S
        pull.close(linger=0)
        push.close(linger=0)

    def reply(self, job, ok=True, error=None):
        files = {f"{job.name}/{job.name}.sdf": b"<sdf/>"} if ok else {}
        sdf_file = f"{job.name}/{job.name}.sdf" if ok else None
        self.outbox.put(SdfResult(self.worker_id, job.job_id, job.attempt, ok, files, sdf_file,
                                  {"method": "hull"}, error, 0.02))


class RecordingOutbox:
    """The Dispatcher's Outbox, recording instead of sending.

    ``sent`` holds (to, message) in order: to is a client or worker identity,
    or "sdf" for the SDF pool (``sdf_to`` lists the SDF worker each went to).
    A worker identity in ``unreachable`` has lost its connection (to_worker
    returns False); with ``sdf_room`` False no SDF worker can be reached
    (to_sdf returns False).
    """

    def __init__(self) -> None:
        self.sent: list[tuple[Any, Any]] = []
        self.sdf_to: list[str] = []
        self.unreachable: set[bytes] = set()
        self.sdf_room = True

    def to_client(self, identity: bytes, message: Any) -> None:
        self.sent.append((identity, message))

    def to_worker(self, identity: bytes, message: Any) -> bool:
        if identity in self.unreachable:
            return False
        self.sent.append((identity, message))
        return True

    def to_sdf(self, worker_id: str, job: protocol.SdfJob) -> bool:
        if not self.sdf_room:
            return False
        self.sent.append(("sdf", job))
        self.sdf_to.append(worker_id)
        return True

    def take(self, to: Any, cls: type = object) -> list:
        """The messages of type ``cls`` sent to ``to``, oldest first, taken out of ``sent``."""
        taken = [msg for peer, msg in self.sent if peer == to and isinstance(msg, cls)]
        self.sent = [(peer, msg) for peer, msg in self.sent if not (peer == to and isinstance(msg, cls))]
        return taken

    def take_one(self, to: Any, cls: type) -> Any:
        """The one message of type ``cls`` sent to ``to``; fails on none or several."""
        taken = self.take(to, cls)
        assert len(taken) == 1, f"expected one {cls.__name__} to {to!r}, got {taken}"
        return taken[0]

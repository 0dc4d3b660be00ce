"""The least a broker can do on geomgen's sockets, for calibrating bench_broker.py.

It binds the client and GPU-worker ROUTERs as `geomgen broker` does, remembers
idle workers from their READY, hands each client REQUEST to an idle worker as
a Job, and answers the client with one FINAL per worker result. No queues,
scenes, validation, retries, heartbeats, events or statistics: what is left of
the dispatch latency with this in place of the broker is the cost of Python,
pyzmq, loopback TCP and this machine's scheduler, the floor under any broker
written this way.

    python benchmarks/floor_broker.py PORT      # client port; workers on PORT + 1
"""

from __future__ import annotations

import signal
import sys
from collections import deque
from pathlib import Path

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geomgen import protocol
from geomgen.endpoints import Endpoints


def main() -> None:
    endpoints = Endpoints.from_base("127.0.0.1", int(sys.argv[1]))
    ctx = zmq.Context()
    clients, workers = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    clients.bind(endpoints.client)
    workers.bind(endpoints.worker)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    idle: deque[bytes] = deque()
    waiting: deque[tuple[bytes, dict]] = deque()  # requests with no idle worker yet
    owner: dict[str, bytes] = {}  # job id -> client identity
    request_header = protocol.header(protocol.Command.REQUEST)

    def start(client: bytes, body: dict) -> None:
        job_id = body["request_id"]
        owner[job_id] = client
        job = {"job_id": job_id, "attempt": 1, "backend": body["backend"], "input_name": body["input_name"],
               "input_data": body["input_data"]}
        workers.send_multipart([idle.popleft(), request_header, msgpack.packb(job)])

    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(workers, zmq.POLLIN)
    while True:
        ready = dict(poller.poll(100))  # wakes for SIGTERM now and then
        while clients in ready and clients.poll(0):
            client, head, body = clients.recv_multipart()
            if head[4] == protocol.Command.HEALTH:  # the harness waits for its workers this way
                stats = {"backends": {"bench": {"alive": len(idle) + len(owner)}}}
                clients.send_multipart([client, *protocol.encode(protocol.HealthReply(stats))])
            elif head[4] == protocol.Command.REQUEST:
                waiting.append((client, msgpack.unpackb(body)))
                if idle:
                    start(*waiting.popleft())
        while workers in ready and workers.poll(0):
            worker, head, body = workers.recv_multipart()
            if head[4] == protocol.Command.READY:
                idle.append(worker)
            elif head[4] == protocol.Command.FINAL:
                job_id = msgpack.unpackb(body)["job_id"]
                final = protocol.Result(request_id=job_id, ok=True)
                clients.send_multipart([owner.pop(job_id), *protocol.encode(final)])
                idle.append(worker)
                if waiting:
                    start(*waiting.popleft())


if __name__ == "__main__":
    main()

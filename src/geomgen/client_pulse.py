"""The client's pulse: heartbeats to the broker from a thread of their own while
a generate() call is open, so a slow reader of results is not taken for gone.
"""

from __future__ import annotations

import threading

import zmq

from geomgen import protocol
from geomgen.keys import PeerKeys, apply_client_curve


class Pulse:
    """Heartbeats for a client's socket from a thread and a socket of its own,
    while a generate() call is open: an application that holds the thread
    between two results (placing a chair in its scene) is not taken for gone
    by the broker, whose liveness window drops the jobs of silent clients."""

    def __init__(self, context: zmq.Context, address: str, owner: bytes, interval_s: float,
                 keys: PeerKeys | None = None) -> None:
        self._context, self._address, self._interval_s, self._keys = context, address, interval_s, keys
        self._frames = protocol.encode(protocol.ClientHeartbeat(owner=owner))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="geomgen-client-pulse", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval_s + 1.0)

    def _run(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        if self._keys is not None:
            apply_client_curve(sock, self._keys)  # the client's own key: the broker binds the pulse to it
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 2)  # a heartbeat that cannot leave now is stale later
        sock.connect(self._address)
        try:
            while not self._stop.wait(self._interval_s):
                try:
                    sock.send_multipart(self._frames, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass  # the broker is away; the main socket notices its silence
        finally:
            sock.close(linger=0)

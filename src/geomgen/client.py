"""The Python client: batches of GeometryRequests to a broker, results streamed back.

It reads each input file and sends its bytes; it writes what comes back (the
GLB, the SDF package, debug files) under the request's folders. One DEALER
socket, not thread-safe: use one GeometryClient per thread.
"""

from __future__ import annotations

import collections
import logging
import random
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import zmq

from geomgen import defaults, protocol
from geomgen.endpoints import parse_broker
from geomgen.batch import (
    ERROR_BY_STAGE,
    FINAL,
    GeometryEvent,
    GeometryRequest,
    GeometryResult,
    failure,
    final_event,
    write_package,
)
from geomgen.client_items import Item, ItemBuilder, busy_retry_after_s
from geomgen.client_pulse import Pulse
from geomgen.files import write_file
from geomgen.keys import PeerKeys, apply_client_curve, peer_keys_from_env
from geomgen.errors import GeomgenError, InputError, ProtocolError, TransportError
from geomgen.protocol import Command, EventKind

__all__ = ["GeometryClient", "GeometryEvent", "GeometryRequest", "GeometryResult", "FINAL"]

log = logging.getLogger(__name__)


def _positional_hint(address: object, extra: tuple[object, ...]) -> str:
    """Why GeometryClient refuses a second positional argument, with the call
    the user probably meant when it looks like a port (the old client took
    ``(host, port)``)."""
    message = ("GeometryClient takes the broker address as its only positional argument; "
               "timeout_s and the other settings are keyword-only")
    port = extra[0]
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 and isinstance(address, str):
        message += f": did you mean GeometryClient('{address.removeprefix('tcp://')}:{port}')?"
    return message


class GeometryClient:
    """Client of one broker.

    Args:
        address: the broker's client endpoint: ``tcp://HOST:PORT``, ``HOST:PORT`` or ``HOST``
            (port 5555). The only positional argument: the others are keyword-only, so
            ``GeometryClient("127.0.0.1", 7000)`` is refused instead of read as a timeout.
        timeout_s: broker silence after which outstanding items fail (stage transport).
        max_in_flight: requests one generate() call keeps outstanding at the broker.
        heartbeat_interval_s: how often a waiting client heartbeats the broker.
        keys: this client's CURVE keys and the broker's public key (keys.PeerKeys),
            for a broker started with --keys; "env" (the default): from the files
            GEOMGEN_KEY and GEOMGEN_BROKER_KEY name, when they are set; None: none.
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *positional: object,
        timeout_s: float = defaults.CLIENT_TIMEOUT_S,
        max_in_flight: int = defaults.CLIENT_MAX_IN_FLIGHT,
        heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S,
        keys: PeerKeys | None | str = "env",
    ) -> None:
        if positional:
            raise TypeError(_positional_hint(address, positional))
        if timeout_s <= 0 or max_in_flight < 1 or heartbeat_interval_s <= 0:
            raise ValueError("timeout_s and heartbeat_interval_s must be > 0 and max_in_flight >= 1")
        self.address = parse_broker(address).client
        self.timeout_s = float(timeout_s)
        self.max_in_flight = int(max_in_flight)
        self.heartbeat_interval_s = float(heartbeat_interval_s)
        self.keys: PeerKeys | None = peer_keys_from_env(None, None) if keys == "env" else keys
        # The broker keys requests by (identity, request_id): one identity for the
        # client's life lets a re-sent request be recognised after a reconnect.
        self.identity = b"client-" + uuid.uuid4().hex.encode()
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._inbox: collections.deque = collections.deque()  # messages read by health() for generate()
        self._pulses: set[Pulse] = set()  # of generate() calls still open
        self._connect()

    # --- connection -------------------------------------------------------------

    def _connect(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        if self.keys is not None:
            apply_client_curve(sock, self.keys)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.MAXMSGSIZE, defaults.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        self._socket = sock

    def _reconnect(self) -> None:
        # After a silence, drop what still sits in the socket's queue so a broker
        # that comes back does not run requests nobody waits for.
        if self._socket is not None:
            self._socket.close(linger=0)
        self._inbox.clear()
        self._connect()

    def close(self) -> None:
        """Close the socket; the client cannot be used afterwards."""
        for pulse in list(self._pulses):  # a generate() left open: its pulse socket must close first
            pulse.stop()
        self._pulses.clear()
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if not self._context.closed:
            self._context.term()

    def __enter__(self) -> "GeometryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, message: Any) -> bool:
        """Send without blocking; False if the queue towards the broker is full."""
        return self._send_frames(protocol.encode(message))

    def _send_frames(self, frames: list[bytes]) -> bool:
        if self._socket is None:
            raise TransportError("this GeometryClient is closed", code="closed")
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _receive(self, timeout_s: float) -> tuple[Command, Any] | None:
        """One decoded message from the broker, or None after ``timeout_s``."""
        if self._inbox:
            return self._inbox.popleft()
        assert self._socket is not None
        if not self._socket.poll(max(0, int(timeout_s * 1000))):
            return None
        frames = self._socket.recv_multipart()
        try:
            return protocol.decode(frames, protocol.BROKER_TO_CLIENT)
        except ProtocolError as exc:
            log.warning("dropped a message from the broker: %s", exc)
            return None

    def _silence(self, seconds: float) -> str:
        return f"no answer from the broker at {self.address} for {seconds:.3g} s; is `geomgen broker` running?"

    # --- health ---------------------------------------------------------------------

    def health(self, timeout_s: float | None = None) -> dict:
        """The broker's statistics (docs/protocol.md, Health); TransportError after ``timeout_s``."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not self._send(protocol.HealthQuery()):
            raise TransportError(self._silence(timeout_s), code="timeout")
        deadline = time.monotonic() + timeout_s
        assert self._socket is not None
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                self._reconnect()
                raise TransportError(self._silence(timeout_s), code="timeout")
            if not self._socket.poll(max(1, int(remaining_s * 1000))):
                continue
            try:
                command, message = protocol.decode(self._socket.recv_multipart(), protocol.BROKER_TO_CLIENT)
            except ProtocolError as exc:
                log.warning("dropped a message from the broker: %s", exc)
                continue
            if command == Command.HEALTH:
                return dict(message.stats)
            self._inbox.append((command, message))  # news for a generate() in progress

    # --- generate ---------------------------------------------------------------------

    def generate(self, requests: Iterable[GeometryRequest]) -> Iterator[tuple[int, GeometryResult]]:
        """Yield ``(index, result)`` for every request, in completion order."""
        # Results only: the broker then spares two to four event messages per item.
        for event in self.generate_events(requests, progress_events=False):
            if event.kind == FINAL:
                assert event.result is not None
                yield event.index, event.result

    generate_geometries = generate  # the old client's name

    def generate_events(self, requests: Iterable[GeometryRequest],
                        progress_events: bool = True) -> Iterator[GeometryEvent]:
        """Yield every GeometryEvent of the batch; exactly one ``final`` per request.

        Items failing client-side checks get their final event (stage input)
        without being sent. Leaving the loop early cancels what is outstanding.
        ``progress_events=False`` asks the broker for ``glb_ready`` and
        ``final`` only (no queued / generating / progress / converting /
        retrying events).
        """
        requests = list(requests)
        pulse = Pulse(self._context, self.address, self.identity, self.heartbeat_interval_s, self.keys)
        self._pulses.add(pulse)
        pulse.start()
        try:
            yield from self._events(requests, progress_events)
        finally:
            pulse.stop()
            self._pulses.discard(pulse)

    def _events(self, requests: list, progress_events: bool) -> Iterator[GeometryEvent]:
        call_id = uuid.uuid4().hex[:8]
        items = ItemBuilder(self.health)  # the client-side checks, fresh for each call
        outstanding: dict[str, Item] = {}
        # Items the broker refused as busy, sent again after its retry-after hint;
        # they count against max_in_flight but are not in the heartbeat (the broker
        # does not hold them, and would have them sent again at once).
        deferred: dict[str, Item] = {}
        finished: set[str] = set()
        next_index = 0
        last_heard = next_beat = time.monotonic()
        try:
            while next_index < len(requests) or outstanding or deferred:
                self._resend_deferred(deferred, outstanding)
                while next_index < len(requests) and len(outstanding) + len(deferred) < self.max_in_flight:
                    index, next_index = next_index, next_index + 1
                    try:
                        item = items.build(index, requests[index], f"{call_id}-{index}", progress_events)
                        if not self._send_frames(item.frames):
                            raise TransportError(f"the queue towards the broker at {self.address} is full",
                                                 code="queue_full")
                    except GeomgenError as exc:
                        yield final_event(failure(index, requests[index], exc))
                        continue
                    if not outstanding:
                        last_heard = time.monotonic()  # the silence clock runs only while waiting
                    item.sent_at = time.monotonic()
                    if requests[index].deadline_s is not None:
                        item.deadline_at = item.sent_at + requests[index].deadline_s + 2 * self.heartbeat_interval_s
                    outstanding[item.request_id] = item
                if not outstanding and not deferred:
                    continue
                yield from self._expire_deadlines(outstanding, deferred, finished)
                now = time.monotonic()
                if not outstanding:  # only refused items, waiting for their retry-after
                    received = self._receive(min(i.resend_at for i in deferred.values()) - now)
                    if received is not None:
                        yield from self._handle(*received, outstanding, finished, deferred)
                    continue
                if now >= next_beat:
                    self._send(protocol.ClientHeartbeat(request_ids=list(outstanding)))
                    next_beat = now + self.heartbeat_interval_s
                if now - last_heard >= self.timeout_s:
                    error = TransportError(self._silence(self.timeout_s), code="timeout")
                    for item in [*outstanding.values(), *deferred.values()]:
                        yield final_event(failure(item.index, item.request, error))
                    outstanding.clear()
                    deferred.clear()
                    for index in range(next_index, len(requests)):
                        yield final_event(failure(index, requests[index], error))
                    next_index = len(requests)
                    self._reconnect()
                    break
                wake = min([next_beat, last_heard + self.timeout_s, *(i.resend_at for i in deferred.values()),
                            *(i.deadline_at for i in outstanding.values())])
                received = self._receive(wake - now)
                if received is None:
                    continue
                last_heard = time.monotonic()
                yield from self._handle(*received, outstanding, finished, deferred)
        finally:
            if outstanding and self._socket is not None:
                self._send(protocol.Cancel(request_ids=list(outstanding)))

    def _expire_deadlines(self, outstanding: dict[str, Item], deferred: dict[str, Item],
                          finished: set[str]) -> Iterator[GeometryEvent]:
        """Fail the items past their deadline here, even while the broker keeps
        answering (it fails them too; this is the client's own guard), and
        cancel them at the broker."""
        now = time.monotonic()
        late = [item for item in [*outstanding.values(), *deferred.values()] if item.deadline_at <= now]
        if not late:
            return
        # Cancel first: the caller may stop iterating at the first failure yielded.
        self._send(protocol.Cancel(request_ids=[item.request_id for item in late]))
        for item in late:
            outstanding.pop(item.request_id, None)
            deferred.pop(item.request_id, None)
            finished.add(item.request_id)
        for item in late:
            error = TransportError(f"the request's deadline of {item.request.deadline_s:g} s passed before the "
                                   "broker sent its result", code="timeout")
            yield final_event(failure(item.index, item.request, error))

    def _resend_deferred(self, deferred: dict[str, Item], outstanding: dict[str, Item]) -> None:
        """Send again the refused items whose retry-after has passed."""
        now = time.monotonic()
        for request_id in [r for r, item in deferred.items() if item.resend_at <= now]:
            if not self._send_frames(deferred[request_id].frames):
                return  # the queue towards the broker is full; try on the next turn
            item = deferred.pop(request_id)
            item.sent_at = now
            outstanding[request_id] = item

    def _handle(self, command: Command, message: Any, outstanding: dict[str, Item],
                finished: set[str], deferred: dict[str, Item]) -> Iterator[GeometryEvent]:
        if command == Command.HEARTBEAT:
            for request_id in message.unknown:
                item = outstanding.get(request_id)
                if item is not None:  # the broker restarted and lost it
                    log.info("broker %s does not know request %s; sending it again", message.broker_id, request_id)
                    self._send_frames(item.frames)
        elif command == Command.PARTIAL:
            item = outstanding.get(message.request_id)
            if item is None:
                return
            event = GeometryEvent(item.index, message.event, message.attempt, message.detail,
                                  worker=message.worker, timings=dict(message.timings))
            if message.event == EventKind.GLB_READY.value and message.glb is not None:
                try:
                    item.glb_path = write_file(item.output_dir / f"{item.stem}.glb", message.glb)
                except OSError as exc:
                    del outstanding[item.request_id]
                    finished.add(item.request_id)
                    self._send(protocol.Cancel(request_ids=[item.request_id]))
                    error = InputError(f"cannot write the GLB into {item.output_dir}: {exc}", code="write_failed")
                    yield final_event(failure(item.index, item.request, error))
                    return
                event.glb_path = item.glb_path
            yield event
        elif command == Command.FINAL:
            if message.request_id in finished:
                log.debug("dropped a second result for %s", message.request_id)
                return
            item = outstanding.pop(message.request_id, None)
            if item is None:
                return  # a result for an earlier, abandoned batch
            retry_after_s = busy_retry_after_s(message)
            if retry_after_s is not None:
                # The broker holds as much as it may: not this item's failure. Send it
                # again later (a little jitter, so refused clients do not return in step).
                item.refusals += 1
                item.resend_at = time.monotonic() + retry_after_s * random.uniform(1.0, 1.5)
                deferred[item.request_id] = item
                log.debug("broker busy; request %s again in %.2f s", item.request_id, retry_after_s)
                return
            finished.add(message.request_id)
            yield final_event(self._finish(item, message))

    def _finish(self, item: Item, message: protocol.Result) -> GeometryResult:
        """Write the result's files and build the GeometryResult."""
        info = dict(message.info)
        debug_files = info.pop("debug_files", None)
        result = GeometryResult(
            index=item.index, request=item.request, ok=message.ok, glb_path=item.glb_path,
            timings={**message.timings, "client_s": time.monotonic() - item.sent_at}, info=info,
            backend=message.backend or item.backend, attempts=message.attempts, cached=message.cached,
        )
        try:
            if isinstance(debug_files, dict) and debug_files and item.request.debug_folder is not None:
                write_package(Path(item.request.debug_folder), debug_files)
            if not message.ok:
                error = message.error or {}
                stage = error.get("stage") if error.get("stage") in ERROR_BY_STAGE else "transport"
                raise ERROR_BY_STAGE[stage](
                    str(error.get("message") or "the broker reported a failure without a message"),
                    code=str(error.get("code") or "failed"), stage=stage,
                )
            if result.glb_path is None:
                raise TransportError("the broker reported success but never sent the GLB", code="missing_output")
            if item.request.want_sdf:
                if not message.sdf_file or message.sdf_file not in message.files:
                    raise TransportError("the broker reported success but sent no SDF file", code="missing_output")
                written = write_package(item.output_dir, message.files, replace_folders=True)
                result.sdf_path = written[message.sdf_file]
                result.package_dir = result.sdf_path.parent
        except GeomgenError as exc:
            result.ok, result.stage, result.error_code, result.error = False, exc.stage.value, exc.code, exc.message
        except OSError as exc:
            result.ok, result.stage, result.error_code = False, "input", "write_failed"
            result.error = f"cannot write the SDF package into {item.output_dir}: {exc}"
        return result

"""The broker, the only process that binds: four sockets, one poll loop, and the
decoding of every message before dispatch.py moves the job along.

One loop turn (``run_once``): poll, handle what arrived, then always expire
late workers, leases and waits, send heartbeats and dispatch.
docs/architecture.md explains the design, docs/protocol.md the messages.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import threading
import time
import uuid
from typing import Any, Iterable

import zmq

from geomgen import __version__, defaults, protocol
from geomgen.admission import Limits
from geomgen.broker_auth import BrokerAuth, KeyBinding, user_id
from geomgen.cache import ResultCache
from geomgen.keys import BrokerKeys
from geomgen.dispatch import Dispatcher
from geomgen.endpoints import Endpoints, is_loopback
from geomgen.lifecycle import stop_on_signals
from geomgen.errors import ProtocolError, Stage, TransportError
from geomgen.jobs import peek_request_id
from geomgen.protocol import BrokerHeartbeat, Command, HealthReply, SdfJob
from geomgen.stats import health_report

log = logging.getLogger("geomgen.broker")

DRAIN_BATCH = 256  # messages read from one socket per loop turn, so no socket starves the others
HOUSEKEEPING_MAX_S = 0.05  # housekeeping runs at least this often (and 4 times per heartbeat interval)
TRIM_INTERVAL_S = 10.0  # how often the broker looks whether a drained flood left memory to return
TRIM_AFTER_JOBS = 1000  # ... it returns it when the jobs held fell by this many since the last look
TRIM_AFTER_BYTES = 32 * 1024 * 1024  # ... or the bytes held by this many
UNDELIVERED_LOG_INTERVAL_S = 10.0  # at most one "could not deliver" line per client per this period
CLIENT_YIELD_BATCH = 32  # requests read between two worker / SDF messages: new work goes first, but a
# flood of requests holds each result back for at most this many

# Plain ints: pyzmq's send_multipart / recv_multipart combine its enum flags per
# frame, which costs more than the send itself at thousands of messages a second.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


class Broker:
    """The geomgen broker on the four sockets of ``endpoints``.

    Durations are seconds. ``known_backends`` are the names a request may ask
    for before any worker registered them (default: every registered backend
    plug-in); a name a worker registers becomes known too. ``limits`` bound
    what the broker holds (admission.Limits; default from defaults.py). A
    client holding jobs and silent for ``client_liveness_s`` is gone: its jobs
    are dropped. ``client_send_hwm`` messages wait for a client that does not
    read; more are dropped. Use ``bind()`` then
    ``run(stop)`` (or ``run_once`` in a loop of your own), then ``close()``.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S,
        heartbeat_liveness: int = defaults.HEARTBEAT_LIVENESS,
        max_retries: int = defaults.MAX_RETRIES,
        no_worker_timeout_s: float = defaults.NO_WORKER_TIMEOUT_S,
        sdf_lease_s: float = defaults.SDF_LEASE_S,
        max_message_bytes: int | None = None,
        known_backends: Iterable[str] | None = None,
        limits: Limits | None = None,
        client_liveness_s: float = defaults.CLIENT_LIVENESS_S,
        client_send_hwm: int = defaults.CLIENT_SEND_HWM,
        keys: BrokerKeys | None = None,
        insecure: bool = False,
        context: zmq.Context | None = None,
        cache: ResultCache | None = None,
    ) -> None:
        if known_backends is None:
            from geomgen.backends import backend_names

            known_backends = backend_names()
        self.endpoints = endpoints
        # Per role: what that peer may legitimately send, plus a margin. A larger
        # message (or one announced larger) is cut off by ZeroMQ before it is
        # buffered, so no peer can make the broker hold more than this at once.
        self.max_bytes = {
            "client": max_message_bytes or defaults.MAX_INPUT_BYTES + defaults.MESSAGE_MARGIN_BYTES,
            "worker": max_message_bytes or defaults.MAX_GLB_BYTES + defaults.MESSAGE_MARGIN_BYTES,
            "sdf_jobs": max_message_bytes or defaults.MESSAGE_MARGIN_BYTES,
            "sdf_pull": max_message_bytes or defaults.MAX_PACKAGE_BYTES + defaults.MESSAGE_MARGIN_BYTES,
        }
        self.broker_id = uuid.uuid4().hex
        now = time.monotonic()
        host = endpoints.host if endpoints.host not in ("0.0.0.0", "*", "::") else "HOST"
        self.dispatcher = Dispatcher(
            self,
            broker_id=self.broker_id,
            address=f"{host}:{endpoints.client_port}",
            heartbeat_interval_s=heartbeat_interval_s,
            heartbeat_liveness=heartbeat_liveness,
            max_retries=max_retries,
            no_worker_timeout_s=no_worker_timeout_s,
            sdf_lease_s=sdf_lease_s,
            known_backends=known_backends,
            now=now,
            limits=limits,
            client_liveness_s=client_liveness_s,
            cache=cache,
        )
        self._ctx = context or zmq.Context()
        self._own_context = context is None
        self._sockets: list[zmq.Socket] = []
        self._poller = zmq.Poller()
        self._undelivered_logged: dict[bytes, float] = {}  # client -> when it may be logged again
        self._next_trim = now + TRIM_INTERVAL_S
        self._held_at_trim = (0, 0)  # (jobs, bytes) held at the last look
        self.client_send_hwm = client_send_hwm
        self.keys = keys
        self.insecure = insecure
        self._auth: BrokerAuth | None = None
        self._client_keys = KeyBinding("client")  # a client's routing identity -> its key
        self._tick_s = min(HOUSEKEEPING_MAX_S, heartbeat_interval_s / 4)
        self._next_housekeeping = now

    # --- life cycle ------------------------------------------------------------

    def bind(self) -> None:
        """Bind the four sockets, CURVE servers when the broker has keys; raises
        TransportError naming an address in use, or refusing to face a network
        without keys (unless ``insecure``)."""
        if self._sockets:
            return
        ep = self.endpoints
        host = ep.bind_host()
        if self.keys is None and not is_loopback(host):
            if not self.insecure:
                raise TransportError(
                    f"the broker would listen on {host} without keys: anyone who can reach it could read and "
                    "forge assets; make keys with `geomgen keys init DIR` and start it with --keys DIR, or "
                    "pass --insecure on a network you trust", code="insecure")
            log.warning("INSECURE: listening on %s with no encryption and no authentication (--insecure); "
                        "anyone who can reach these ports can read inputs and forge assets", host)
        if self.keys is not None:
            self._auth = BrokerAuth(self._ctx, self.keys)
            self._auth.start()
        for name, kind, port in (
            ("client", zmq.ROUTER, ep.client_port),
            ("worker", zmq.ROUTER, ep.worker_port),
            ("sdf_jobs", zmq.ROUTER, ep.sdf_job_port),
            ("sdf_pull", zmq.PULL, ep.sdf_result_port),
        ):
            sock = self._ctx.socket(kind)
            self._sockets.append(sock)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_bytes[name])
            if self._auth is not None:
                self._auth.secure(sock, name)
            if ":" in host:
                sock.setsockopt(zmq.IPV6, 1)
            if kind == zmq.ROUTER:
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished peer raises instead of dropping silently
                sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a peer reconnecting under its identity takes over
            if name == "client":
                # A client that stops reading gets this many messages queued, then
                # the rest are dropped (counted, logged): the broker's memory stays
                # bounded. A live client that lost a result asks again by heartbeat.
                sock.setsockopt(zmq.SNDHWM, self.client_send_hwm)
            else:
                # Jobs to a worker are never dropped: a GPU worker gets one at a
                # time, an SDF worker no more than its free slots (the pool's credit).
                sock.setsockopt(zmq.SNDHWM, 0)
            url = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
            try:
                sock.bind(url)
            except zmq.ZMQError as exc:
                self.close()
                raise TransportError(
                    f"cannot bind the broker's {name} socket to {url} ({exc}); "
                    "is another broker running there? stop it or choose other ports",
                    code="bind_failed",
                ) from None
            setattr(self, f"_{name}", sock)
        for sock in (self._client, self._worker, self._sdf_pull, self._sdf_jobs):
            self._poller.register(sock, zmq.POLLIN)
        for monitor in self._auth.monitors if self._auth is not None else ():
            self._poller.register(monitor, zmq.POLLIN)

    def close(self) -> None:
        """Close the sockets (and the context if the broker made it)."""
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets = []
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context:
            self._ctx.term()
            self._own_context = False
        if self.dispatcher.cache is not None:
            self.dispatcher.cache.close()
            self.dispatcher.cache = None

    def __enter__(self) -> "Broker":
        self.bind()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, stop: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set (forever without one)."""
        while stop is None or not stop.is_set():
            self.run_once(defaults.POLL_INTERVAL_S)

    def run_once(self, timeout_s: float) -> None:
        """One turn: wait up to ``timeout_s`` for messages, handle them, then do
        the housekeeping that is due (expiry, heartbeats, dispatch)."""
        if not self._sockets:
            raise TransportError("the broker is not bound; call bind() first")
        wait_s = max(0.0, min(timeout_s, self._next_housekeeping - time.monotonic()))
        ready = dict(self._poller.poll(wait_s * 1000.0))
        if self._client in ready:
            self._drain(self._client, self._on_client, copy=True)
        # Worker and SDF messages carry GLBs: receive them without an extra copy.
        # New requests go first: before each of these messages, the requests that
        # came in (up to CLIENT_YIELD_BATCH) are dispatched, so a backlog of
        # results does not delay a dispatch, and a flood of requests does not
        # hold the results back for long.
        if self._worker in ready:
            self._drain(self._worker, self._on_worker, copy=False, yield_to_clients=True)
        if self._sdf_pull in ready:
            self._drain(self._sdf_pull, self._on_sdf, copy=False, yield_to_clients=True)
        if self._sdf_jobs in ready:
            self._drain(self._sdf_jobs, self._on_sdf_jobs_socket, copy=False)
        if self._auth is not None:
            for monitor in self._auth.monitors:
                if monitor in ready:
                    self._auth.read_monitor(monitor, time.monotonic())
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + self._tick_s
            try:
                self.dispatcher.housekeeping(now)
            except Exception:  # a bug in one expiry must not stop the broker; the next turn retries
                log.exception("error during housekeeping")
            if now >= self._next_trim:
                self._next_trim = now + TRIM_INTERVAL_S
                self._return_memory()
            if self._auth is not None:
                self._auth.maybe_reload(now)  # an allow-list changed on disk takes effect without a restart

    def reload_keys(self) -> None:
        """Read the allow-lists again now (SIGHUP)."""
        if self._auth is not None:
            self._auth.reload()

    def _return_memory(self) -> None:
        """After a flood has drained, hand the freed heap back to the system:
        glibc keeps freed memory for reuse, so without this the broker would
        stay at its peak size for good."""
        usage = self.dispatcher.admission.total
        jobs_before, bytes_before = self._held_at_trim
        self._held_at_trim = (usage.jobs, usage.bytes)
        if jobs_before - usage.jobs < TRIM_AFTER_JOBS and bytes_before - usage.bytes < TRIM_AFTER_BYTES:
            return
        started = time.monotonic()
        if release_free_heap():
            log.debug("returned free heap memory to the system in %.1f ms", (time.monotonic() - started) * 1e3)

    def _drain(self, sock: zmq.Socket, handler, copy: bool, yield_to_clients: bool = False,
               limit: int = DRAIN_BATCH) -> None:
        client = self._client
        for _ in range(limit):
            if yield_to_clients and client.getsockopt(_EVENTS) & _POLLIN:
                self._drain(client, self._on_client, copy=True, limit=CLIENT_YIELD_BATCH)
            key = None
            try:
                if self._auth is None:
                    frames = [sock.recv(_NOBLOCK, copy=copy)]
                else:  # the first frame as a Frame, for the key it came with (ZAP User-Id)
                    first = sock.recv(_NOBLOCK, copy=False)
                    key = user_id(first)
                    frames = [first.bytes if copy else first]
            except zmq.Again:
                return
            while sock.getsockopt(_RCVMORE):  # the rest of a multipart message is already here
                frames.append(sock.recv(_NOBLOCK, copy=copy))
            if self._auth is not None and not self._auth.admits(sock, key):
                self.dispatcher.stats.dropped_messages += 1  # revoked since it connected
                continue
            try:
                handler(frames, key)
            except Exception:  # one message must never stop the broker
                self.dispatcher.stats.dropped_messages += 1
                log.exception("error while handling a message; dropped it")

    def stats(self) -> dict:
        """Health statistics: the fields of docs/protocol.md "Health" and more."""
        d, ep = self.dispatcher, self.endpoints
        header = {
            "version": __version__,
            "protocol_version": protocol.VERSION,
            "broker_id": self.broker_id,
            "endpoints": {"client": ep.client, "worker": ep.worker, "sdf_job": ep.sdf_job, "sdf_result": ep.sdf_result},
            "admission": d.admission.summary(),
            "cache": d.cache_summary(),
        }
        report = health_report(
            d.stats, time.monotonic(), header=header, backend_names=d.available_backends(),
            workers=list(d.workers), sdf=d.sdf, queues=d.queues,
            job_states=[job.state.value for job in d.jobs.values()],
        )
        return redacted(report) if self.keys is not None else report

    # --- receiving -----------------------------------------------------------------

    def _on_client(self, frames: list, key: str | None = None) -> None:
        d = self.dispatcher
        if frames and not self._client_keys.matches(bytes(frames[0]), key):
            d.stats.dropped_messages += 1  # another key's identity: not this peer's to use
            return
        try:
            identity, rest = protocol.split_identity(frames)
            command, msg = protocol.decode(rest, protocol.CLIENT_TO_BROKER, self.max_bytes["client"])
        except ProtocolError as exc:
            d.stats.dropped_messages += 1
            identity = bytes(frames[0]) if frames else b""
            log.warning("dropped a message from client %s: %s", identity.hex(), exc)
            request_id = peek_request_id(frames[1:])
            # Answer only an id not in flight: an accepted request gets exactly one FINAL.
            if request_id is not None and len(frames) > 1 and not d.holds(identity, request_id):
                d.reject(identity, request_id, "", Stage.TRANSPORT, exc.code,
                         f"the broker could not read this request: {exc}")
            return
        now = time.monotonic()
        if command is Command.HEARTBEAT and msg.owner is not None:
            if self._client_keys.matches(bytes(msg.owner), key):
                d.client_seen(bytes(msg.owner), now)  # a client's pulse: liveness only, no answer
            return
        d.client_seen(identity, now)
        if command is Command.REQUEST:
            d.request(identity, msg, now)
        elif command is Command.HEALTH:
            self.to_client(identity, HealthReply(self.stats()))
        elif command is Command.HEARTBEAT:
            self.to_client(identity, BrokerHeartbeat(self.broker_id, d.unknown(identity, msg.request_ids)))
        elif command is Command.CANCEL:
            d.cancel(identity, msg.request_ids, now)

    def _on_worker(self, frames: list, key: str | None = None) -> None:
        try:
            identity, rest = protocol.split_identity(frames)
            command, msg = protocol.decode(rest, protocol.WORKER_TO_BROKER, self.max_bytes["worker"])
        except ProtocolError as exc:
            self.dispatcher.stats.dropped_messages += 1
            identity = bytes(frames[0]) if frames else b""
            log.warning("dropped a message from GPU worker %s: %s", identity.hex(), exc)
            head = bytes(frames[1]) if len(frames) > 1 else b""
            if len(head) == protocol.HEADER_LEN and head[4] == Command.FINAL:
                self.dispatcher.worker_result_unreadable(identity, str(exc), time.monotonic())
            return
        self.dispatcher.worker_message(identity, command, msg, time.monotonic(), key)

    def _on_sdf(self, frames: list, key: str | None = None) -> None:
        try:
            command, msg = protocol.decode(frames, protocol.SDF_TO_BROKER, self.max_bytes["sdf_pull"])
        except ProtocolError as exc:
            self.dispatcher.stats.dropped_messages += 1
            log.warning("dropped a message on the SDF result socket: %s", exc)
            return
        self.dispatcher.sdf_message(command, msg, time.monotonic(), key)

    # --- sending (the dispatcher's Outbox) ----------------------------------------

    def to_client(self, identity: bytes, message: Any) -> None:
        try:
            _send(self._client, [identity, *protocol.encode(message)])
        except zmq.ZMQError as exc:
            # The client left (EHOSTUNREACH) or stopped reading (EAGAIN at the high-water
            # mark); when it comes back its heartbeat asks again. One log line per client
            # per interval, not one per message.
            self.dispatcher.stats.results_undelivered += 1
            now = time.monotonic()
            if now >= self._undelivered_logged.get(identity, 0.0):
                self._undelivered_logged[identity] = now + UNDELIVERED_LOG_INTERVAL_S
                log.info("could not deliver %s to client %s (%s); dropping what it cannot take for %.0f s "
                         "(counted in health: results_undelivered)", type(message).__name__, identity.hex(), exc,
                         UNDELIVERED_LOG_INTERVAL_S)
                if len(self._undelivered_logged) > 1000:
                    self._undelivered_logged = {k: v for k, v in self._undelivered_logged.items() if v > now}

    def to_worker(self, identity: bytes, message: Any) -> bool:
        try:
            _send(self._worker, [identity, *protocol.encode(message)])
            return True
        except zmq.ZMQError as exc:
            log.info("could not reach GPU worker %s: %s", identity.hex(), exc)
            return False

    def to_sdf(self, worker_id: str, job: SdfJob) -> bool:
        try:
            _send(self._sdf_jobs, [worker_id.encode(), *protocol.encode(job)])
            return True
        except zmq.ZMQError as exc:  # not connected on the job socket (yet, or any more)
            log.info("could not reach SDF worker %s on the job socket: %s", worker_id, exc)
            return False

    def _on_sdf_jobs_socket(self, frames: list, key: str | None = None) -> None:
        # SDF workers only receive on this socket; anything sent here is dropped.
        self.dispatcher.stats.dropped_messages += 1
        log.warning("dropped a message sent to the SDF job socket by %s", bytes(frames[0]).hex() if frames else "?")


def redacted(report: dict) -> dict:
    """A health report without what could be used to impersonate a peer or
    address its jobs (worker ids, job ids, client identities in scene keys):
    counts, timings and workers' host names stay."""
    out = dict(report)
    out["workers"] = [{k: v for k, v in w.items() if k not in ("worker_id", "job_id")} for w in report["workers"]]
    out["sdf_workers"] = [{k: v for k, v in w.items() if k != "worker_id"} for w in report["sdf_workers"]]
    out["scenes"] = {name: len(keys) for name, keys in report["scenes"].items()}
    return out


def release_free_heap() -> bool:
    """glibc's malloc_trim(0): return free heap pages to the system. False where
    there is no glibc (the call is then a no-op)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _send(sock: zmq.Socket, frames: list) -> None:
    """send_multipart(frames, NOBLOCK) without per-frame enum arithmetic. A
    multipart message is atomic in ZeroMQ: only its first frame can fail."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _NOBLOCK_MORE if i < last else _NOBLOCK)


def serve(endpoints: Endpoints, **settings: Any) -> int:
    """Run a broker until SIGINT or SIGTERM; returns the process exit status
    (0 after a signal, 1 when it cannot bind). ``settings`` are Broker keyword
    arguments. Signal handlers are installed only from the main thread."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    broker = Broker(endpoints, **settings)
    try:
        broker.bind()
    except TransportError as exc:
        log.error("%s", exc)
        return 1
    log.info("broker %s listening: clients %s, GPU workers %s, SDF jobs %s, SDF results %s%s",
             broker.broker_id, endpoints.client, endpoints.worker, endpoints.sdf_job, endpoints.sdf_result,
             f"; CURVE keys from {broker.keys.folder}" if broker.keys else "")
    if broker.keys is not None and threading.current_thread() is threading.main_thread():
        # SIGHUP re-reads the allow-lists now (they are also re-read when their folders change).
        signal.signal(signal.SIGHUP, lambda *_: broker.reload_keys())
    try:
        with stop_on_signals(log) as stop:
            broker.run(stop)
    finally:
        broker.close()
    log.info("broker stopped")
    return 0

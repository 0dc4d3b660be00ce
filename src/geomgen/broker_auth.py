"""CURVE on the broker's sockets: one ZAP domain per role, each checked against
that role's allow-list (keys.AllowList, reloaded when its folder changes or on
SIGHUP), refusals logged once per key, and every peer's routing identity bound
to the key it authenticated with. See docs/security.md.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from geomgen.keys import ROLES, AllowList, BrokerKeys, apply_server_curve, fingerprint

log = logging.getLogger("geomgen.broker")

# The role whose keys each broker socket admits (its ZAP domain).
SOCKET_ROLES = {"client": "client", "worker": "gpu-worker", "sdf_jobs": "sdf-worker", "sdf_pull": "sdf-worker"}
ZMTP_HEARTBEAT_IVL_MS = 2_000  # ZeroMQ's own connection heartbeat on the broker's ROUTERs with keys, ms
ZMTP_HEARTBEAT_TIMEOUT_MS = 10_000  # a connection silent this long is closed, ms
FAILURE_LOG_INTERVAL_S = 60.0  # failed handshakes on one port are logged once per this period
HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL  # a peer without a key, or with a wrong broker key
MAX_REMEMBERED = 10_000  # refused keys and bound identities kept, at most (strangers cannot grow it further)


class _Gate:
    """The ZAP credentials provider: a key is admitted on a socket only if its
    role's allow-list has it. Runs on the authenticator's thread."""

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow
        self._refused: set[tuple[str, bytes]] = set()
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        if self.allow.allows(domain, key):
            return True
        with self._lock:
            first = (domain, key) not in self._refused
            if first:
                if len(self._refused) >= MAX_REMEMBERED:
                    self._refused.clear()
                self._refused.add((domain, key))
        if first:
            other = self.allow.role_of(key)
            what = f"a {other} key, not a {domain} key" if other else "on no allow-list"
            log.warning("refused a connection on the %s port: key %s is %s", domain, fingerprint(key), what)
        return False


class BrokerAuth:
    """The broker's CURVE server side: start() before binding, secure() each
    socket before its bind(), stop() after closing them."""

    def __init__(self, context: zmq.Context, keys: BrokerKeys) -> None:
        self.keys = keys
        self.allow = AllowList(keys.folder)
        self._authenticator = ThreadAuthenticator(context, log=logging.getLogger("geomgen.auth"))
        self._roles: dict[zmq.Socket, str] = {}
        self.monitors: dict[zmq.Socket, str] = {}  # monitor socket -> the role of the socket it watches
        self._failures_logged: dict[tuple[str, bool], float] = {}
        self._revoked_logged: set[str | None] = set()

    def start(self) -> None:
        self._authenticator.start()
        gate = _Gate(self.allow)
        for role in ROLES:
            self._authenticator.configure_curve_callback(role, credentials_provider=gate)

    def secure(self, sock: zmq.Socket, name: str) -> None:
        """Make the broker socket ``name`` a CURVE server for its role."""
        apply_server_curve(sock, self.keys, SOCKET_ROLES[name])
        self._roles[sock] = SOCKET_ROLES[name]
        # A peer with no key at all never reaches the ZAP handler (its handshake
        # fails first); the socket's monitor is where that shows.
        self.monitors[sock.get_monitor_socket(HANDSHAKE_FAILURES)] = SOCKET_ROLES[name]
        if sock.type == zmq.ROUTER:
            # A peer's routing identity must not be taken over by another connection
            # (which would receive that peer's results): a second connection claiming
            # it is refused while the first is up. ZMTP heartbeats end a dead
            # connection within seconds, so a peer that comes back is not kept out.
            sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
            sock.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_HEARTBEAT_TIMEOUT_MS)

    def admits(self, sock: zmq.Socket, key: str | None) -> bool:
        """Whether a message that came on ``sock`` with ``key`` is still allowed:
        ZAP checks a key when its connection is made, so a key revoked since is
        refused here, message by message (a dictionary look-up)."""
        role = self._roles.get(sock)
        if role is None or (key is not None and self.allow.allows(role, key)):
            return True
        if key not in self._revoked_logged and len(self._revoked_logged) < MAX_REMEMBERED:
            self._revoked_logged.add(key)
            log.warning("dropping messages from %s key %s: no longer on its allow-list", role, (key or "?")[:8])
        return False

    def read_monitor(self, monitor: zmq.Socket, now: float) -> None:
        """Log failed handshakes on a role's port: at most one line per port and
        kind of failure a minute (a scanner must not flood the log)."""
        while monitor.poll(0):
            try:
                event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):
                return
            role, kind, value = self.monitors[monitor], int(event["event"]), int(event["value"])
            if kind != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                continue  # AUTH: the ZAP handler refused a key (_Gate logged it); NO_DETAIL: the peer hung up
            no_key = value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
            if now < self._failures_logged.get((role, no_key), 0.0):
                continue
            self._failures_logged[(role, no_key)] = now + FAILURE_LOG_INTERVAL_S
            why = ("it offered no CURVE key (a peer started without --key?)" if no_key
                   else "its CURVE handshake failed (a wrong --broker-key, or not a geomgen peer)")
            log.warning("refused a connection on the %s port: %s (ZeroMQ event %d, %#x); further such refusals on "
                        "this port are not logged for %.0f s", role, why, kind, value, FAILURE_LOG_INTERVAL_S)

    def maybe_reload(self, now: float) -> None:
        self.allow.maybe_reload(now)

    def reload(self) -> None:
        self.allow.reload()

    def stop(self) -> None:
        for monitor in self.monitors:
            monitor.close(linger=0)
        self.monitors.clear()
        self._authenticator.stop()


class KeyBinding:
    """Which key each peer name (a client's routing identity, a worker id)
    first spoke with. A message under that name from another key is not
    that peer's: the caller drops it. Least recently used names are forgotten
    past MAX_REMEMBERED."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._keys: OrderedDict[bytes | str, str] = OrderedDict()
        self._warned: set[tuple[bytes | str, str]] = set()

    def matches(self, name: bytes | str, key: str | None) -> bool:
        """Bind ``name`` to ``key`` if new; True when ``key`` is the one bound.
        ``key`` None (no CURVE) always matches."""
        if key is None:
            return True
        bound = self._keys.get(name)
        if bound is None:
            self._keys[name] = key
            if len(self._keys) > MAX_REMEMBERED:
                self._keys.popitem(last=False)
            return True
        self._keys.move_to_end(name)
        if bound == key:
            return True
        if (name, key) not in self._warned and len(self._warned) < MAX_REMEMBERED:
            self._warned.add((name, key))
            log.warning("dropped a message for %s %s sent with key %s: it belongs to key %s", self.what,
                        name.hex() if isinstance(name, bytes) else name, key[:8], bound[:8])
        return False

    def forget(self, name: bytes | str) -> None:
        self._keys.pop(name, None)


def user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id (the peer's Z85 public key) of a received frame, or None."""
    try:
        value = frame.get("User-Id")
    except (zmq.ZMQError, KeyError, AttributeError):
        return None
    return value or None

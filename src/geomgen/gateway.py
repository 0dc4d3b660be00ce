"""The HTTP gateway: the old geometry server's HTTP API in front of a broker.

A geomgen client on one side (one GeometryClient per batch, in a bounded
thread pool), HTTP on the other (Starlette under uvicorn, gateway_app.py).
This module holds its settings, the table of finished items that a re-POSTed
batch is answered from, the batch runner, and serve().
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from geomgen import gateway_items as items
from geomgen.client import GeometryClient
from geomgen.endpoints import is_loopback
from geomgen.errors import GeomgenError, InputError
from geomgen.keys import PeerKeys

log = logging.getLogger("geomgen.gateway")

HTTP_PORT = 7000  # the old server's port
KEEPALIVE_S = 10.0  # blank line this often while a batch runs; the old client's read timeout is longer
MAX_ITEMS = 1000  # items in one POST, more: 413
MAX_BODY_BYTES = 4 * 1024 * 1024  # JSON body of one POST, bytes; more: 413
MAX_BATCHES = 64  # batches running at once (threads of the pool); more wait for a thread, still kept alive
CACHE_ENTRIES = 10_000  # finished items remembered for re-POSTed batches
CACHE_TTL_S = 3600.0  # how long a finished item is remembered, seconds
STOP_CHECK_S = 0.25  # how soon a batch thread notices its HTTP client left, seconds


@dataclass
class GatewaySettings:
    """What a gateway serves and how. ``allow_roots=None`` lets items name any
    path the process may access (the compatibility server's default)."""

    broker: str
    keys: PeerKeys | None = None
    default_backend: str = "auto"
    allow_roots: Sequence[str | Path] | None = field(default_factory=lambda: [Path.cwd()])
    token: str | None = None
    keepalive_s: float = KEEPALIVE_S
    max_items: int = MAX_ITEMS
    max_body_bytes: int = MAX_BODY_BYTES
    max_batches: int = MAX_BATCHES
    cache_entries: int = CACHE_ENTRIES
    cache_ttl_s: float = CACHE_TTL_S
    client_timeout_s: float = 60.0  # broker silence after which a batch's items fail


def read_token(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped); InputError if unusable."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise InputError(f"cannot read the token file {path}: {exc.strerror or exc}", code="bad_option") from None
    if len(token) < 16:
        raise InputError(f"the token in {path} is {len(token)} characters; use at least 16 "
                         "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE`)",
                         code="bad_option")
    return token


class Finished:
    """Items completed recently, keyed by gateway_items.Prepared.cache_key:
    an LRU of at most ``max_entries``, each forgotten after ``ttl_s``. Thread-safe."""

    def __init__(self, max_entries: int = CACHE_ENTRIES, ttl_s: float = CACHE_TTL_S) -> None:
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._entries: collections.OrderedDict[str, tuple[float, str, dict]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[str, dict] | None:
        """(geometry path, geomgen fields) of a finished item whose GLB still exists, else None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if time.monotonic() - entry[0] > self.ttl_s or not Path(entry[1]).is_file():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[1], entry[2]

    def put(self, key: str, geometry_path: str, extra: dict) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic(), geometry_path, extra)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class Stopped(Exception):
    """The HTTP client of a batch went away (or the gateway stops)."""


class _StoppableClient(GeometryClient):
    # GeometryClient.generate() waits in _receive() between results; checking the
    # stop flag there lets a batch thread leave within STOP_CHECK_S of its HTTP
    # client leaving, and leaving the generator sends CANCEL for what is outstanding.
    def __init__(self, *args, stop: threading.Event, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stop = stop

    def _receive(self, timeout_s: float):
        if self._stop.is_set():
            raise Stopped()
        return super()._receive(min(timeout_s, STOP_CHECK_S))


@dataclass
class BatchCounts:
    """What one batch did, for the gateway's metrics."""

    success: int = 0
    error: int = 0
    cached: int = 0
    item_seconds: list[float] = field(default_factory=list)


def run_batch(raw_items: list[dict], settings: GatewaySettings, finished: Finished, emit: Callable[[bytes], None],
              stop: threading.Event) -> BatchCounts:
    """Run one batch in the calling thread: ``emit`` gets each item's line as it
    completes; ``stop`` set (its HTTP client left) cancels the rest at the broker."""
    roots = items.Roots(settings.allow_roots)
    counts = BatchCounts()
    answered: set[int] = set()
    started = time.monotonic()

    def answer(index: int, line: bytes, outcome: str) -> None:
        answered.add(index)
        setattr(counts, outcome, getattr(counts, outcome) + 1)
        counts.item_seconds.append(time.monotonic() - started)
        emit(line)

    try:
        claimed: set[tuple[str, str]] = set()
        pending: list[items.Prepared] = []
        for index, raw in enumerate(raw_items):
            prepared = items.prepare(index, raw, roots, settings.default_backend, claimed)
            if prepared.error is not None:
                answer(index, items.error_line(index, prepared.error, {} if prepared.extended else None), "error")
                continue
            hit = finished.get(prepared.cache_key) if prepared.cache_key else None
            if hit is not None:
                extra = {**hit[1], "cached": True} if prepared.extended else None
                answer(index, items.success_line(index, hit[0], extra), "cached")
                continue
            pending.append(prepared)
        if not pending or stop.is_set():
            return counts
        with _StoppableClient(settings.broker, timeout_s=settings.client_timeout_s, keys=settings.keys,
                              stop=stop) as client:
            results = client.generate([p.request for p in pending])
            try:
                for position, result in results:
                    prepared = pending[position]
                    extra = items.result_extra(result)
                    if result.ok and result.glb_path is not None:
                        path = str(Path(result.glb_path).resolve())
                        finished.put(prepared.cache_key or "", path, extra)
                        answer(prepared.index, items.success_line(prepared.index, path,
                                                                  extra if prepared.extended else None), "success")
                    else:
                        message = f"item {prepared.index} ({result.stage}, {result.error_code}): {result.error}"
                        answer(prepared.index, items.error_line(prepared.index, message,
                                                                extra if prepared.extended else None), "error")
            finally:
                results.close()  # leaving early sends CANCEL for the items still outstanding
    except Stopped:
        log.info("a batch's HTTP client left; its %d unfinished item(s) were cancelled at the broker",
                 len(raw_items) - len(answered))
    except (GeomgenError, OSError, ValueError, TypeError) as exc:
        # The gateway's own fault: every item not yet answered gets it as its line.
        log.exception("a batch failed inside the gateway")
        for index in range(len(raw_items)):
            if index not in answered:
                answer(index, items.error_line(index, f"item {index}: the gateway failed: {exc}"), "error")
    return counts


def serve(settings: GatewaySettings, host: str = "127.0.0.1", port: int = HTTP_PORT, insecure: bool = False) -> int:
    """Serve until SIGINT/SIGTERM or POST /shutdown; returns an exit code.

    Binding off loopback needs ``settings.token`` or ``insecure``.
    """
    import uvicorn

    from geomgen.gateway_app import create_app

    if not is_loopback(host):
        if settings.token is None and not insecure:
            raise InputError(f"binding {host} exposes the gateway beyond this machine: give --token-file FILE "
                             "(a bearer token checked on every route but /health), or --insecure", code="bad_option")
        if settings.token is None:
            log.warning("INSECURE: the gateway listens on %s without a token; anyone who reaches it can read and "
                        "write files under %s", host, items.Roots(settings.allow_roots))
    if settings.allow_roots is None:
        log.warning("items may name any path this process can access (no allowed roots)")
    else:
        log.info("items may read and write under: %s", items.Roots(settings.allow_roots))
    config = uvicorn.Config(None, host=host, port=port, log_level="info", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5, loop="asyncio",
                            log_config=None)  # uvicorn's lines go through geomgen's handler (text or json)
    server = uvicorn.Server(config)

    def shutdown() -> None:
        server.should_exit = True

    config.app = create_app(settings, shutdown=shutdown)
    log.info("geomgen gateway on http://%s:%d in front of broker %s (default backend %s)", host, port,
             settings.broker, settings.default_backend)
    server.run()
    return 0

"""The gateway's HTTP routes (Starlette): POST /generate_geometries streaming
NDJSON, GET /health in the old server's shape, GET /metrics for Prometheus,
POST /shutdown. Batches run in gateway.run_batch on a bounded thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from geomgen import gateway_items as items
from geomgen.client import GeometryClient
from geomgen.errors import GeomgenError
from geomgen.gateway import Finished, GatewaySettings, run_batch
from geomgen.gateway_metrics import Metrics

log = logging.getLogger("geomgen.gateway")

HEALTH_TIMEOUT_S = 3.0  # broker silence after which /health answers 503
NDJSON = "application/x-ndjson"
OPEN_ROUTES = ("/health",)  # answered without the bearer token


class Gateway:
    """State shared by the routes of one app."""

    def __init__(self, settings: GatewaySettings, shutdown: Callable[[], None] | None) -> None:
        self.settings = settings
        self.shutdown = shutdown
        self.finished = Finished(settings.cache_entries, settings.cache_ttl_s)
        # Our own pool, sized from the settings: anyio's default limiter (40 threads)
        # is shared with everything else and 32+ long batches would exhaust it.
        self.pool = ThreadPoolExecutor(max_workers=settings.max_batches, thread_name_prefix="gateway-batch")
        self.stops: set[threading.Event] = set()
        self.metrics = Metrics(self)

    def health_stats(self) -> dict:
        """The broker's health stats (blocking; one short-lived client); raises GeomgenError."""
        with GeometryClient(self.settings.broker, timeout_s=HEALTH_TIMEOUT_S, keys=self.settings.keys) as client:
            return client.health(timeout_s=HEALTH_TIMEOUT_S)

    async def health_or_error(self) -> dict | str:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self.health_stats)
        except GeomgenError as exc:
            return str(exc)


def old_health(stats: dict, gateway: Gateway) -> dict:
    """The old server's /health keys from geomgen's stats, with geomgen's own under ``geomgen``."""
    workers = stats.get("workers", [])
    totals = [w.get("completed", 0) + w.get("failed", 0) for w in workers]
    grand_total = sum(totals)
    return {
        "status": "healthy",
        "num_workers": len(workers),
        "scheduler_queue_size": stats.get("queue_size", 0),
        "active_clients": len(gateway.stops),
        "processing_active": stats.get("in_flight", 0) > 0,
        "total_requests": stats.get("accepted", 0) + stats.get("rejected", 0),
        "completed_requests": stats.get("completed", 0),
        "failed_requests": stats.get("failed", 0) + stats.get("rejected", 0),
        "avg_processing_time_seconds": stats.get("avg_generate_s", 0.0),
        "avg_end_to_end_latency_seconds": stats.get("avg_total_s", 0.0),
        "avg_queue_wait_seconds": stats.get("avg_queue_wait_s", 0.0),
        "max_queue_wait_seconds": stats.get("max_queue_wait_s", 0.0),
        "workers": [
            {"gpu_id": _gpu_id(w.get("gpu")), "pid": w.get("pid"), "alive": True,
             "completed_requests": w.get("completed", 0), "failed_requests": w.get("failed", 0),
             "total_requests": total, "proportion": total / grand_total if grand_total else 0.0}
            for w, total in zip(workers, totals)
        ],
        "geomgen": {**stats, "gateway": gateway.metrics.summary()},
    }


def _gpu_id(gpu: object) -> object:
    return int(gpu) if isinstance(gpu, str) and gpu.isdigit() else gpu


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise items.BadBatch(413, f"the body is {int(declared)} bytes, over this gateway's limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise items.BadBatch(413, f"the body is over this gateway's limit of {limit} bytes")
    return bytes(body)


def create_app(settings: GatewaySettings, shutdown: Callable[[], None] | None = None) -> Starlette:
    """The gateway's ASGI app; ``shutdown`` (POST /shutdown) asks the server to exit."""
    gateway = Gateway(settings, shutdown)

    async def generate_geometries(request: Request) -> Response:
        try:
            raw_items = items.parse_batch(await _read_body(request, settings.max_body_bytes), settings.max_items)
        except items.BadBatch as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return StreamingResponse(_stream(gateway, raw_items), media_type=NDJSON)

    async def health(_request: Request) -> Response:
        stats = await gateway.health_or_error()
        if isinstance(stats, str):
            return JSONResponse({"status": "unhealthy", "error": stats}, status_code=503)
        return JSONResponse(old_health(stats, gateway))

    async def metrics(_request: Request) -> Response:
        loop = asyncio.get_running_loop()
        text, content_type = await loop.run_in_executor(None, gateway.metrics.render)
        return Response(text, media_type=content_type)

    async def shutdown_route(_request: Request) -> Response:
        if gateway.shutdown is None:
            return JSONResponse({"error": "this gateway was not started by serve(); it cannot stop itself"},
                                status_code=500)
        log.info("POST /shutdown: stopping")
        for stop in list(gateway.stops):
            stop.set()
        gateway.shutdown()
        return JSONResponse({"status": "shutting down"})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette):
        yield
        for stop in list(gateway.stops):  # batch threads cancel at the broker and return
            stop.set()
        gateway.pool.shutdown(wait=True, cancel_futures=True)

    app = Starlette(routes=[
        Route("/generate_geometries", generate_geometries, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/shutdown", shutdown_route, methods=["POST"]),
    ], lifespan=lifespan)
    app.state.gateway = gateway
    return _Guard(app, gateway)


class _Guard:
    """ASGI wrapper: the bearer token on every route but /health, and request counts by route and status."""

    def __init__(self, app: Starlette, gateway: Gateway) -> None:
        self.app, self.gateway = app, gateway
        self.state = app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ("/generate_geometries", "/health", "/metrics", "/shutdown") else "other"
        status = {"code": 500}

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        started = time.monotonic()
        try:
            token = self.gateway.settings.token
            if token is not None and path not in OPEN_ROUTES and not _authorized(scope, token):
                body = json.dumps({"error": "missing or wrong bearer token (header Authorization: Bearer TOKEN)"})
                await counting_send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await counting_send({"type": "http.response.body", "body": body.encode()})
                return
            await self.app(scope, receive, counting_send)
        finally:
            self.gateway.metrics.request(route, scope.get("method", ""), status["code"], time.monotonic() - started)


def _authorized(scope, token: str) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, given = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
    return False


async def _stream(gateway: Gateway, raw_items: list[dict]):
    """Lines of a batch as they complete, a blank line after each quiet keepalive_s."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()
    stop = threading.Event()
    gateway.stops.add(stop)

    def emit(line: bytes | None) -> None:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        except RuntimeError:  # the event loop closed under us: the gateway is stopping
            stop.set()

    def run() -> None:
        try:
            counts = run_batch(raw_items, gateway.settings, gateway.finished, emit, stop)
            gateway.metrics.batch(counts)
        finally:
            emit(None)

    gateway.metrics.active.inc()
    future = loop.run_in_executor(gateway.pool, run)
    try:
        while True:
            try:
                line = await asyncio.wait_for(lines.get(), gateway.settings.keepalive_s)
            except asyncio.TimeoutError:
                yield b"\n"
                continue
            if line is None:
                break
            yield line
        await future
    finally:
        # Reached also when Starlette cancels the stream because its client left.
        stop.set()
        gateway.stops.discard(stop)
        gateway.metrics.active.dec()

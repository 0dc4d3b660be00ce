"""The old SceneSmith client and its message classes, over geomgen's HTTP gateway.

Same names, fields and behaviour as SceneSmith's ``GeometryGenerationClient``:
a JSON list POSTed to ``/generate_geometries``, NDJSON lines streamed back in
completion order, the batch retried on a connection error with 1 s, 2 s back-off.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import requests as http

log = logging.getLogger("geomgen.compat.scenesmith")

HEALTH_TIMEOUT_S = 5.0  # how long health_check() waits for /health
FIRST_BACKOFF_S = 1.0  # wait before the first retry; doubles each time (1 s, 2 s, ...)


@dataclass
class GeometryGenerationServerRequest:
    """One item of a batch; paths are paths on the server's machine."""

    image_path: str
    output_dir: str
    prompt: str
    debug_folder: str | None = None
    output_filename: str | None = None
    backend: str | None = None  # None: the server's backend
    sam3d_config: dict[str, Any] | None = None
    scene_id: str | None = None


@dataclass
class GeometryGenerationServerResponse:
    """A finished item: the absolute path of the GLB the server wrote."""

    index: int
    geometry_path: str


class GeometryGenerationError(Exception):
    """A failed item: its position in the batch and the server's message."""

    def __init__(self, index: int, error_message: str):
        # The gateway's messages already name their item; others get the prefix.
        named = error_message.lower().startswith(f"item {index}")
        super().__init__(error_message if named else f"item {index}: {error_message}")
        self.index = index
        self.error_message = error_message


Outcome = GeometryGenerationServerResponse | GeometryGenerationError


class GeometryGenerationClient:
    """Client of a geomgen HTTP gateway (or of the old server).

    Args:
        host, port: where the gateway listens.
        token: bearer token for a gateway started with a token file (sent on
            every route); None: none, as the old server needed none.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 7000, *, token: str | None = None):
        self.host = host
        self.port = int(port)
        self.base_url = f"http://{_url_host(host)}:{self.port}"
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def generate_geometries(
        self,
        requests: Iterable[GeometryGenerationServerRequest | Mapping[str, Any]],
        timeout_s: float = 3600,
        max_retries: int = 3,
    ) -> Iterator[tuple[int, Outcome]]:
        """Yield ``(index, response or error)`` for every item, in completion order.

        ``timeout_s``: longest silence on the connection (the gateway sends a
        blank line at least every 15 s while items run). A connection error, a
        timeout or a 5xx answer is tried again up to ``max_retries`` attempts in
        all, waiting 1 s, 2 s, ...; the retry sends only the items without a
        result yet, and a gateway answers work it already finished from what it
        produced. A 4xx answer (a malformed batch) raises ``requests.HTTPError``
        with the gateway's message at once; the last failure is raised as is.
        """
        items = [_item_dict(r) for r in requests]
        pending = set(range(len(items)))  # batch indices still without a result
        attempts = max(1, int(max_retries))
        for attempt in range(attempts):
            sent = sorted(pending)
            try:
                for position, outcome in self._post(sent, [items[i] for i in sent], timeout_s):
                    if position in pending:  # a line repeated by the server is yielded once
                        pending.remove(position)
                        yield position, outcome
                if not pending:
                    return
                raise http.ConnectionError(f"the stream ended with {len(pending)} item(s) unanswered")
            except (http.ConnectionError, http.Timeout, http.exceptions.ChunkedEncodingError, _ServerFault) as exc:
                if attempt + 1 >= attempts:
                    raise
                wait_s = FIRST_BACKOFF_S * 2**attempt
                log.warning("generate_geometries: %s; retrying %d item(s) in %.0f s (attempt %d of %d)",
                            exc, len(pending), wait_s, attempt + 2, attempts)
                time.sleep(wait_s)

    def _post(self, positions: list[int], items: list[dict], timeout_s: float) -> Iterator[tuple[int, Outcome]]:
        """POST one batch; yield (batch index, outcome) per NDJSON line."""
        if not items:
            return
        with http.post(f"{self.base_url}/generate_geometries", json=items, stream=True, timeout=timeout_s,
                       headers=self._headers) as response:
            if response.status_code >= 500:
                raise _ServerFault(f"HTTP {response.status_code}: {_error_text(response)}", response=response)
            if response.status_code != 200:
                raise http.HTTPError(f"HTTP {response.status_code}: {_error_text(response)}", response=response)
            for line in response.iter_lines():
                if not line:  # keep-alive while items run
                    continue
                row = json.loads(line)
                local = int(row["index"])
                if not 0 <= local < len(positions):
                    log.warning("generate_geometries: ignoring a line for unknown item %s", row["index"])
                    continue
                position = positions[local]
                if row.get("status") == "success":
                    yield position, GeometryGenerationServerResponse(position, row["data"]["geometry_path"])
                else:
                    yield position, GeometryGenerationError(position, str(row.get("error") or "unknown error"))

    def health_check(self) -> bool:
        """True when the gateway answers /health with status "healthy"."""
        try:
            response = http.get(f"{self.base_url}/health", timeout=HEALTH_TIMEOUT_S, headers=self._headers)
            return response.status_code == 200 and response.json().get("status") == "healthy"
        except (http.RequestException, ValueError):
            return False


class _ServerFault(http.HTTPError):
    """A 5xx answer: the server's fault, worth trying again."""


def _item_dict(request: GeometryGenerationServerRequest | Mapping[str, Any]) -> dict[str, Any]:
    # All eight keys, nulls included, as the old client sent them; paths as text.
    if dataclasses.is_dataclass(request) and not isinstance(request, type):
        fields = dataclasses.asdict(request)
    else:
        fields = {f.name: None for f in dataclasses.fields(GeometryGenerationServerRequest)} | dict(request)
    return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in fields.items()}


def _error_text(response: http.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:500]


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host

"""The client's items in flight: each request of a generate() call checked and
encoded once (output names claimed once per call, the backend chosen, options
checked where the backend is installed), and the broker's busy retry-after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from geomgen import defaults, protocol
from geomgen.backends import GPU_BACKENDS, find_backend_class
from geomgen.batch import GeometryRequest, check_request
from geomgen.contract import check_backend_options
from geomgen.errors import GeomgenError, InputError


@dataclass
class Item:
    """One request of a generate() call, from its encoded REQUEST to its result."""

    index: int
    request: GeometryRequest
    request_id: str
    output_dir: Path
    stem: str
    backend: str
    frames: list[bytes]
    sent_at: float = 0.0
    glb_path: Path | None = None
    resend_at: float = 0.0  # when an item the broker refused as busy is sent again
    refusals: int = 0
    deadline_at: float = math.inf  # the request's deadline, plus a grace for the broker's own answer


class ItemBuilder:
    """The client-side checks of one generate() call; ``health`` asks the broker
    for its statistics (GeometryClient.health), for ``backend="auto"``."""

    def __init__(self, health: Callable[[], dict]) -> None:
        self._health = health
        self._auto_backend: str | GeomgenError | None = None  # backend=auto for images, once per call
        self._classes: dict[str, type | None] = {}  # backend -> its class here; reading the registry costs ms
        self._claimed: dict[tuple[Path, str], int] = {}  # (output folder, stem) -> index

    def build(self, index: int, request: GeometryRequest, request_id: str, progress_events: bool = True) -> Item:
        """Check one request and build its REQUEST frames; raises InputError or TransportError."""
        checked = check_request(index, request)
        target = (checked.output_dir.resolve(), checked.stem)
        if target in self._claimed:
            raise InputError(f"item {self._claimed[target]} of this batch already writes {checked.stem!r} into "
                             f"{checked.output_dir}; give this one another output_filename", code="duplicate_output")
        backend = self._choose_backend(request.backend, checked.kind, checked.path)
        # The broker checks them too; checked here when the backend is installed
        # on this side, so a misspelt option never leaves the client.
        cls = self._backend_class(backend)
        check_backend_options(backend, cls.options_spec if cls else None, checked.backend_options)
        timeout_s = request.no_worker_timeout_s
        message = protocol.ClientRequest(
            request_id=request_id, backend=backend, input_name=checked.path.name, input_data=checked.data,
            output_name=checked.stem, prompt=request.prompt, scene_id=request.scene_id,
            backend_options=checked.backend_options, convert=checked.convert, want_sdf=request.want_sdf, debug=request.debug_folder is not None,
            no_worker_timeout_s=None if timeout_s is None else float(timeout_s), events=progress_events,
            deadline_s=None if request.deadline_s is None else float(request.deadline_s), fresh=request.fresh,
        )
        self._claimed[target] = index
        return Item(index, request, request_id, checked.output_dir, checked.stem, backend, protocol.encode(message))

    def _choose_backend(self, backend: Any, kind: str, path: Path) -> str:
        if not isinstance(backend, str) or not backend:
            raise InputError(f"backend must be a name such as 'auto', got {backend!r}", code="bad_request")
        if backend == "auto":
            return "mesh" if kind == "mesh" else self._auto_image_backend()
        cls = self._backend_class(backend)
        expected = cls.input_kind if cls is not None else None
        if expected is not None and expected != kind:
            raise InputError(
                f"backend {backend!r} takes {expected} files but {path.name} is {'an' if kind == 'image' else 'a'} "
                f"{kind}; use backend 'auto' or {'mesh' if kind == 'mesh' else 'an image backend'}",
                code="wrong_input_kind",
            )
        return backend

    def _backend_class(self, backend: str) -> type | None:
        if backend not in self._classes:
            self._classes[backend] = find_backend_class(backend)
        return self._classes[backend]

    def _auto_image_backend(self) -> str:
        """The first GPU backend with a live worker at the broker, else silhouette (once per call)."""
        if self._auto_backend is None:
            try:
                alive = self._health().get("backends", {})
                self._auto_backend = next(
                    (name for name in GPU_BACKENDS if alive.get(name, {}).get("alive", 0) > 0), "silhouette"
                )
            except GeomgenError as exc:
                self._auto_backend = exc
        if isinstance(self._auto_backend, GeomgenError):
            raise self._auto_backend
        return self._auto_backend


def busy_retry_after_s(result: protocol.Result) -> float | None:
    """The retry-after of a broker's ``busy`` refusal, else None."""
    error = result.error if isinstance(result.error, dict) else {}
    if result.ok or error.get("code") != "busy" or result.attempts:
        return None
    value = error.get("retry_after_s")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= defaults.BUSY_RETRY_MAX_S:
        return defaults.BUSY_RETRY_MIN_S
    return float(value)

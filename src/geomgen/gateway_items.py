"""The old geometry server's wire contract, item by item: the batch's JSON
checked (400 cases), each item's paths kept under the allowed roots, the
GeometryRequest built from it, and the exact NDJSON line of its result.

No sockets and no HTTP here: gateway_app.py calls these.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from geomgen.batch import GeometryRequest, GeometryResult, read_input
from geomgen.errors import GeomgenError, InputError
from geomgen.files import resolved_within

REQUIRED_KEYS = ("image_path", "output_dir", "prompt")
OPTIONAL_KEYS = ("debug_folder", "output_filename", "backend", "sam3d_config", "scene_id")
EXTENSION_KEY = "geomgen"  # geomgen's own per-item options; asking for them adds a "geomgen" key to the line
EXTENSION_FIELDS = ("want_sdf", "backend_options", "convert", "deadline_s", "fresh")


class BadBatch(Exception):
    """A body the gateway refuses whole: HTTP ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_batch(body: bytes, max_items: int) -> list[dict]:
    """The items of a POST /generate_geometries body; raises BadBatch (400, 413)
    naming the item and the key at fault."""
    if not body.strip():
        raise BadBatch(400, "the body is empty; send a JSON list of items")
    try:
        items = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadBatch(400, f"the body is not JSON ({exc})") from None
    if not isinstance(items, list):
        raise BadBatch(400, f"the body must be a JSON list of items, got a JSON {_json_type(items)}")
    if not items:
        raise BadBatch(400, "the list of items is empty")
    if len(items) > max_items:
        raise BadBatch(413, f"the batch has {len(items)} items, over this gateway's limit of {max_items}; "
                            "split it into smaller batches")
    for index, item in enumerate(items):
        _check_item(index, item)
    return items


def _check_item(index: int, item: Any) -> None:
    if not isinstance(item, dict):
        raise BadBatch(400, f"item {index} must be a JSON object, got a JSON {_json_type(item)}")
    missing = [key for key in REQUIRED_KEYS if key not in item]
    if missing:
        raise BadBatch(400, f"item {index} is missing the required key(s) {', '.join(missing)}")
    unknown = sorted(set(item) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS) - {EXTENSION_KEY})
    if unknown:
        raise BadBatch(400, f"item {index} has unknown key(s) {', '.join(unknown)}; known: "
                            f"{', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)} and {EXTENSION_KEY!r} for geomgen's options")
    for key in ("image_path", "output_dir", "prompt"):
        if not isinstance(item[key], str) or (key != "prompt" and not item[key]):
            raise BadBatch(400, f"item {index}: {key} must be a non-empty string" if key != "prompt"
                           else f"item {index}: prompt must be a string")
    for key in ("debug_folder", "output_filename", "backend", "scene_id"):
        if item.get(key) is not None and not isinstance(item[key], str):
            raise BadBatch(400, f"item {index}: {key} must be a string or null, got a JSON {_json_type(item[key])}")
    if item.get("sam3d_config") is not None and not isinstance(item["sam3d_config"], dict):
        raise BadBatch(400, f"item {index}: sam3d_config must be an object or null")
    extension = item.get(EXTENSION_KEY)
    if extension is None:
        return
    if not isinstance(extension, dict):
        raise BadBatch(400, f"item {index}: {EXTENSION_KEY} must be an object with any of {', '.join(EXTENSION_FIELDS)}")
    unknown = sorted(set(extension) - set(EXTENSION_FIELDS))
    if unknown:
        raise BadBatch(400, f"item {index}: {EXTENSION_KEY} has unknown key(s) {', '.join(unknown)}; "
                            f"known: {', '.join(EXTENSION_FIELDS)}")
    if "want_sdf" in extension and not isinstance(extension["want_sdf"], bool):
        raise BadBatch(400, f"item {index}: {EXTENSION_KEY}.want_sdf must be true or false")
    if "fresh" in extension and not isinstance(extension["fresh"], bool):
        raise BadBatch(400, f"item {index}: {EXTENSION_KEY}.fresh must be true or false")
    for key in ("backend_options", "convert"):
        if extension.get(key) is not None and not isinstance(extension[key], dict):
            raise BadBatch(400, f"item {index}: {EXTENSION_KEY}.{key} must be an object")
    deadline = extension.get("deadline_s")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or deadline <= 0):
        raise BadBatch(400, f"item {index}: {EXTENSION_KEY}.deadline_s must be a number of seconds > 0")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


# --- allowed roots ----------------------------------------------------------------


class Roots:
    """The folders items may read from and write under; ``None``: any path."""

    def __init__(self, roots: Sequence[str | os.PathLike] | None) -> None:
        self.roots = None if roots is None else [Path(os.path.realpath(r)) for r in roots]

    def __str__(self) -> str:
        return "any path" if self.roots is None else ", ".join(str(r) for r in self.roots)

    def check(self, field_name: str, value: str) -> Path:
        """``value`` resolved (symlinks and ``..``); InputError ``outside_roots`` if it leaves every root."""
        resolved = Path(os.path.realpath(os.path.expanduser(value)))
        if self.roots is None or any(resolved_within(resolved, root) for root in self.roots):
            return resolved
        raise InputError(f"{field_name} {value} resolves to {resolved}, outside this gateway's allowed roots "
                         f"({self}); start the gateway with --allow-root covering it", code="outside_roots")


# --- one item ----------------------------------------------------------------------


@dataclass
class Prepared:
    """One item after the gateway's own checks: a request to send, or its error."""

    index: int
    request: GeometryRequest | None = None
    error: str | None = None
    cache_key: str | None = None
    extended: bool = False  # the item asked for geomgen's fields in its line
    options: dict = field(default_factory=dict)


def old_output_name(prompt: str, now_s: float | None = None) -> str:
    """The old server's name for an item without output_filename."""
    digest = hashlib.md5(prompt.encode("utf-8")).hexdigest()[:8]
    return f"geometry_{digest}_{int(time.time() if now_s is None else now_s)}"


def prepare(index: int, item: dict, roots: Roots, default_backend: str, claimed: set[tuple[str, str]]) -> Prepared:
    """Check one (already shape-checked) item's paths and build its request.

    ``claimed`` holds the (output folder, stem) pairs of this batch: two items
    named by the old rule in the same second get distinct names (``_<index>``),
    where the old server overwrote one with the other.
    """
    extension = item.get(EXTENSION_KEY) or {}
    prepared = Prepared(index, extended=EXTENSION_KEY in item)
    try:
        image = roots.check("image_path", item["image_path"])
        output_dir = roots.check("output_dir", item["output_dir"])
        debug = roots.check("debug_folder", item["debug_folder"]) if item.get("debug_folder") else None
        name = item.get("output_filename")
        if name and name.lower().endswith(".glb"):
            name = name[:-4]
        # The cache key names the item as sent: a retried batch of unnamed items
        # gets new time-stamped names, yet is the same work.
        named_as = name or "geometry_" + hashlib.md5(item["prompt"].encode("utf-8")).hexdigest()[:8]
        if not name:
            name = old_output_name(item["prompt"])
            if (str(output_dir), name) in claimed:
                name = f"{name}_{index}"
        claimed.add((str(output_dir), name))
        want_sdf = bool(extension.get("want_sdf", False))
        if want_sdf:
            roots.check("output_dir", str(output_dir / name))  # the SDF package folder, if a symlink leads out
        request = GeometryRequest(
            image_path=str(image), output_dir=str(output_dir), prompt=item["prompt"],
            debug_folder=None if debug is None else str(debug), output_filename=name,
            backend=item.get("backend") or default_backend, sam3d_config=item.get("sam3d_config"),
            scene_id=item.get("scene_id"), backend_options=dict(extension.get("backend_options") or {}),
            convert_options=dict(extension.get("convert") or {}), want_sdf=want_sdf,
            deadline_s=extension.get("deadline_s"), fresh=bool(extension.get("fresh", False)),
        )
        digest = hashlib.sha256(read_input(image)).hexdigest()
    except GeomgenError as exc:
        prepared.error = f"item {index}: {exc.message}"
        return prepared
    prepared.request = request
    options = {"backend_options": request.backend_options, "sam3d_config": request.sam3d_config,
               "geomgen": extension, "debug": request.debug_folder}
    prepared.cache_key = None if request.fresh else json.dumps(  # fresh: computed anew, not the gateway's copy
        [digest, request.backend, options, str(output_dir), named_as], sort_keys=True, default=str)
    return prepared


# --- result lines -------------------------------------------------------------------


def success_line(index: int, geometry_path: str, extra: dict | None = None) -> bytes:
    """The old contract's success line; ``extra`` (geomgen's fields) only when the item asked."""
    line: dict[str, Any] = {"index": index, "status": "success", "data": {"geometry_path": geometry_path},
                            "error": None}
    if extra is not None:
        line[EXTENSION_KEY] = extra
    return json.dumps(line).encode() + b"\n"


def error_line(index: int, message: str, extra: dict | None = None) -> bytes:
    """The old contract's error line."""
    line: dict[str, Any] = {"index": index, "status": "error", "data": None, "error": message}
    if extra is not None:
        line[EXTENSION_KEY] = extra
    return json.dumps(line).encode() + b"\n"


def result_extra(result: GeometryResult, cached: bool = False) -> dict:
    """geomgen's fields of a result, for an item that asked for them."""
    return {"sdf_path": None if result.sdf_path is None else str(result.sdf_path), "stage": result.stage,
            "code": result.error_code, "backend": result.backend, "timings": result.timings,
            "cached": cached or result.cached}  # the gateway's own cache, or the broker's result cache

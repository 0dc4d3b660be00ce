"""The visual mesh of a package: a GLB rewritten as ``<name>.gltf`` with one
``<name>.bin`` buffer and its texture images as separate files, which is what
Drake loads. Meshes, materials, UVs and extensions are copied as they are.

The file stays in glTF's +Y up (Drake turns it to +Z up on load); a transform
(up-axis turn, scaling) is applied as a root node, never by editing vertex data.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from geomgen.errors import InputError
from geomgen.inputs import format_from_magic, local_reference

_GLB_MAGIC = b"glTF"
_CHUNK_JSON = 0x4E4F534A
_CHUNK_BIN = 0x004E4942
_IMAGE_SUFFIXES = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/ktx2": ".ktx2",
}
_MIME_OF_SUFFIX = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".ktx2": "image/ktx2"}


def split_glb(glb: bytes) -> tuple[dict, bytes]:
    """The JSON tree and the BIN chunk (b"" if none) of a GLB. Raises InputError ``bad_mesh``."""
    if len(glb) < 20 or glb[:4] != _GLB_MAGIC:
        raise InputError("not a GLB file (wrong magic bytes)", code="bad_mesh")
    _, version, length = struct.unpack_from("<III", glb, 0)
    if version != 2 or length > len(glb):
        raise InputError(f"unsupported or truncated GLB (version {version}, {length} of {len(glb)} bytes)", code="bad_mesh")
    tree, binary, offset = None, b"", 12
    while offset + 8 <= length:
        chunk_length, chunk_type = struct.unpack_from("<II", glb, offset)
        chunk = glb[offset + 8 : offset + 8 + chunk_length]
        if len(chunk) != chunk_length:
            raise InputError("the GLB is truncated inside a chunk", code="bad_mesh")
        if chunk_type == _CHUNK_JSON and tree is None:
            try:
                tree = json.loads(chunk.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise InputError(f"the GLB's JSON is not valid ({exc})", code="bad_mesh") from None
        elif chunk_type == _CHUNK_BIN and not binary:
            binary = chunk
        offset += 8 + chunk_length + (-chunk_length % 4)
    if not isinstance(tree, dict):
        raise InputError("the GLB has no JSON chunk", code="bad_mesh")
    return tree, binary


def write_visual(glb: bytes, out_dir: Path, name: str, transform: np.ndarray | None = None) -> list[Path]:
    """Write ``glb`` as ``out_dir/<name>.gltf``, ``<name>.bin`` and ``<name>_texture_<i>.<ext>``.

    ``transform`` (4, 4), when not the identity, is applied to the whole scene
    through a new root node. Returns the paths written, the .gltf first.
    """
    tree, binary = split_glb(glb)
    buffers = [_buffer_bytes(entry, index, binary) for index, entry in enumerate(tree.get("buffers") or [])]
    views = tree.get("bufferViews") or []
    out_dir = Path(out_dir)
    written: list[Path] = [out_dir / f"{name}.gltf"]

    image_views: set[int] = set()
    for index, image in enumerate(tree.get("images") or []):
        data, mime = _image_bytes(image, index, views, buffers)
        if "bufferView" in image:
            image_views.add(int(image.pop("bufferView")))
        suffix = _IMAGE_SUFFIXES.get(mime or "", "") or _sniff_suffix(data)
        path = out_dir / f"{name}_texture_{index}{suffix}"
        path.write_bytes(data)
        written.append(path)
        image["uri"] = path.name
        image.pop("mimeType", None)

    # Repack every view that is not an image into one buffer, 4-byte aligned as glTF asks.
    packed = bytearray()
    new_index: dict[int, int] = {}
    new_views = []
    for index, view in enumerate(views):
        if index in image_views:
            continue
        start = int(view.get("byteOffset", 0))
        source = buffers[int(view["buffer"])]
        chunk = source[start : start + int(view["byteLength"])]
        packed.extend(b"\0" * (-len(packed) % 4))
        new_index[index] = len(new_views)
        new_views.append({**view, "buffer": 0, "byteOffset": len(packed)})
        packed.extend(chunk)
    _renumber_views(tree, new_index)
    if new_views:
        tree["bufferViews"] = new_views
        tree["buffers"] = [{"uri": f"{name}.bin", "byteLength": len(packed)}]
        bin_path = out_dir / f"{name}.bin"
        bin_path.write_bytes(bytes(packed))
        written.insert(1, bin_path)
    else:
        tree.pop("bufferViews", None)
        tree.pop("buffers", None)

    if transform is not None and not np.allclose(transform, np.eye(4)):
        _add_root(tree, transform)
    written[0].write_text(json.dumps(tree, separators=(",", ":")))
    return written


def pack_gltf(gltf: bytes, folder: Path) -> bytes:
    """A self-contained GLB from a .gltf file's bytes and the ``folder`` holding the
    buffers and images it references (files or data: URIs), copied byte for byte.
    Raises InputError ``bad_mesh`` for invalid JSON or a missing file, and
    ``unsafe_reference`` for a reference to a file outside ``folder`` (none is read)."""
    try:
        tree = json.loads(gltf.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"the glTF JSON is not valid ({exc})", code="bad_mesh") from None
    if not isinstance(tree, dict):
        raise InputError("the glTF JSON is not an object", code="bad_mesh")
    buffers = [_resource(entry.get("uri"), folder, f"buffer {i}")[0] for i, entry in enumerate(tree.get("buffers") or [])]
    packed = bytearray()

    def append(chunk: bytes) -> int:
        packed.extend(b"\0" * (-len(packed) % 4))
        offset = len(packed)
        packed.extend(chunk)
        return offset

    views = tree.get("bufferViews") or []
    for view in views:
        start = int(view.get("byteOffset", 0))
        chunk = buffers[int(view["buffer"])][start : start + int(view["byteLength"])]
        view.update(buffer=0, byteOffset=append(chunk))
    for index, image in enumerate(tree.get("images") or []):
        if "uri" not in image:
            continue
        data, mime = _resource(image.pop("uri"), folder, f"image {index}")
        views.append({"buffer": 0, "byteOffset": append(data), "byteLength": len(data)})
        image["bufferView"] = len(views) - 1
        image["mimeType"] = image.get("mimeType") or mime or _MIME_OF_SUFFIX.get(_sniff_suffix(data), "image/png")
    if views:
        tree["bufferViews"] = views
    tree["buffers"] = [{"byteLength": len(packed)}] if packed else []
    if not tree["buffers"]:
        tree.pop("buffers")
    text = json.dumps(tree, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 4)
    binary = bytes(packed) + b"\0" * (-len(packed) % 4)
    body = struct.pack("<II", len(text), _CHUNK_JSON) + text
    if binary:
        body += struct.pack("<II", len(binary), _CHUNK_BIN) + binary
    return struct.pack("<4sII", _GLB_MAGIC, 2, 12 + len(body)) + body


def _resource(uri: object, folder: Path, what: str) -> tuple[bytes, str | None]:
    """Bytes (and media type, if known) of a glTF buffer or image URI: data: or a file inside ``folder``."""
    if not isinstance(uri, str):
        raise InputError(f"the glTF's {what} has no uri", code="bad_mesh")
    if uri.startswith("data:"):
        return _data_uri(uri, what)
    path = local_reference(folder, unquote(uri), f"the glTF's {what}")
    try:
        data = path.read_bytes()
    except OSError:
        raise InputError(f"the glTF's {what} references {uri!r}, which is not in {folder}", code="bad_mesh") from None
    return data, _MIME_OF_SUFFIX.get(path.suffix.lower())


def _buffer_bytes(entry: dict, index: int, binary: bytes) -> bytes:
    uri = entry.get("uri")
    if uri is None:
        if index != 0:
            raise InputError(f"the GLB's buffer {index} has no data", code="bad_mesh")
        return binary
    return _data_uri(uri, f"buffer {index}")[0]


def _image_bytes(image: dict, index: int, views: list, buffers: list[bytes]) -> tuple[bytes, str | None]:
    if "bufferView" in image:
        view = views[int(image["bufferView"])]
        start = int(view.get("byteOffset", 0))
        return buffers[int(view["buffer"])][start : start + int(view["byteLength"])], image.get("mimeType")
    uri = image.get("uri")
    if uri is None:
        raise InputError(f"the GLB's image {index} has neither data nor a buffer view", code="bad_mesh")
    data, mime = _data_uri(uri, f"image {index}")
    return data, image.get("mimeType") or mime


def _data_uri(uri: str, what: str) -> tuple[bytes, str]:
    """Bytes and media type of a base64 data: URI; anything else is an external file we were not sent."""
    if not uri.startswith("data:") or ";base64," not in uri:
        raise InputError(
            f"the GLB's {what} references an external file ({uri[:60]!r}); send a self-contained GLB", code="bad_mesh"
        )
    header, payload = uri.split(",", 1)
    try:
        return base64.b64decode(payload, validate=True), header[5:].split(";")[0]
    except (binascii.Error, ValueError):
        raise InputError(f"the GLB's {what} has a corrupt base64 data URI", code="bad_mesh") from None


_SUFFIX_OF_FORMAT = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def _sniff_suffix(data: bytes) -> str:
    return _SUFFIX_OF_FORMAT.get(format_from_magic(data) or "", ".bin")


def _renumber_views(node: Any, new_index: dict[int, int]) -> None:
    """Point every "bufferView" reference (accessors, sparse accessors, extensions) at its repacked view."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "bufferView" and isinstance(value, int) and value in new_index:
                node[key] = new_index[value]
            else:
                _renumber_views(value, new_index)
    elif isinstance(node, list):
        for item in node:
            _renumber_views(item, new_index)


def _add_root(tree: dict, transform: np.ndarray) -> None:
    """Parent the default scene's root nodes under one node carrying ``transform``."""
    nodes = tree.setdefault("nodes", [])
    children = {child for node in nodes for child in node.get("children", [])}
    scenes = tree.get("scenes") or [{"nodes": [i for i in range(len(nodes)) if i not in children]}]
    default = int(tree.get("scene", 0))
    scene = scenes[default] if default < len(scenes) else scenes[0]
    nodes.append(
        {
            "name": "geomgen_root",
            # glTF matrices are column-major.
            "matrix": [float(x) for x in np.asarray(transform, dtype=float).T.reshape(-1)],
            "children": list(scene.get("nodes") or []),
        }
    )
    # Other scenes would share nodes with the transformed one; only the default scene is kept.
    tree["scenes"] = [{**scene, "nodes": [len(nodes) - 1]}]
    tree["scene"] = 0

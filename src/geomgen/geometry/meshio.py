"""Mesh files in and out: load GLB/glTF/OBJ/PLY/STL bytes into a trimesh Scene,
bring it to geomgen's output conventions (+Y up, metres, resting on y = 0,
centred in x/z) and write GLB. Pure functions: bytes and scenes, no sockets.
"""

from __future__ import annotations

import io
import json
import logging
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np

from geomgen import defaults
from geomgen.errors import GenerateError, InputError
from geomgen.inputs import IMAGE_FORMATS, local_reference, sniff_format

if TYPE_CHECKING:
    import trimesh

log = logging.getLogger(__name__)

MAX_MESH_FACES = 20_000_000  # faces in one input; more is a scan of a building, not an object
MAX_ABS_COORDINATE = 1.0e7  # largest |coordinate| in file units (10 km in metres, 10 m in um)
UP_AXES = ("y", "z")
# Mesh compression extensions trimesh cannot decode: without this check their
# accessors would load as zeros and the error would be a confusing one.
_UNSUPPORTED_EXTENSIONS = ("KHR_draco_mesh_compression", "EXT_meshopt_compression", "KHR_meshopt_compression")
_GLB_MAGIC = 0x46546C67  # b"glTF" little-endian
_GLB_JSON_CHUNK = 0x4E4F534A  # b"JSON"

# glTF +Y up from a +Z-up file: y' = z, z' = -y (a -90 degree turn about x),
# the rotation Blender's glTF exporter applies, so a model's front (-Y in a
# Z-up tool) becomes glTF's front (+Z).
Z_UP_TO_Y_UP = np.array(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


def _bad(name: str, sentence: str) -> InputError:
    return InputError(f"{name}: {sentence}", code="bad_mesh")


# --- loading --------------------------------------------------------------------


def load_mesh(data: bytes, name: str) -> "trimesh.Scene":
    """Load a mesh file's bytes (GLB, glTF with data: URIs, OBJ, PLY, STL).

    Returns a Scene holding only triangle meshes with faces, in the file's own
    units and axes, vertices as written (not merged or cleaned), textures and
    UVs kept. Raises InputError ``empty_input``,
    ``unknown_format`` or ``bad_mesh`` (not parseable, no faces, non-finite or
    absurd coordinates, too many faces, or a glTF/GLB that references external
    files, which cannot be resolved from bytes alone).
    """
    import trimesh

    if len(data) > defaults.MAX_INPUT_BYTES:
        raise _bad(name, f"{len(data):,} bytes is over the {defaults.MAX_INPUT_BYTES:,}-byte input limit")
    fmt = sniff_format(name, data)
    if fmt in IMAGE_FORMATS:
        raise _bad(name, f"this is a {fmt.upper()} image, not a mesh; use an image backend such as silhouette")
    warnings: list[str] = []
    if fmt in ("glb", "gltf"):
        tree = _glb_json(data, name) if fmt == "glb" else _gltf_json(data, name)
        _check_gltf_tree(tree, name, fmt, allow_external=False)
    elif fmt == "stl":
        _check_binary_stl(data, name)
    elif fmt == "obj" and b"mtllib" in data:
        warnings.append(
            "the OBJ names a material library that was not sent with it, so it has no materials; "
            "send a GLB to keep textures"
        )
    try:
        # process=False: trimesh's clean-up would silently drop faces with NaN
        # vertices, hiding a broken file; the mesh stays exactly as written.
        scene = trimesh.load_scene(io.BytesIO(data), file_type=fmt, resolver=None, process=False)
    except InputError:
        raise
    except Exception as exc:  # trimesh raises many types (ValueError, KeyError, AssertionError...)
        raise _bad(name, f"cannot parse this {fmt.upper()} file ({type(exc).__name__}: {exc})") from None
    return _checked(scene, name, warnings)


def load_mesh_file(path: Path) -> "trimesh.Scene":
    """Load a mesh file from disk, resolving files next to it.

    Like load_mesh, but a glTF's external buffers and images and an OBJ's
    material library and textures are read from the file's folder (the way
    tools export them), and only from there. Raises InputError
    ``unreadable_input`` when the file cannot be read, ``unsafe_reference``
    (inputs.local_reference) when it names a file outside its folder, before
    any byte of that file is read, and the codes of load_mesh otherwise.
    """
    import trimesh

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}", code="unreadable_input") from None
    fmt = sniff_format(path.name, data)
    if fmt not in ("glb", "gltf", "obj"):
        return load_mesh(data, path.name)
    if fmt in ("glb", "gltf"):
        tree = _glb_json(data, path.name) if fmt == "glb" else _gltf_json(data, path.name)
        for uri in _check_gltf_tree(tree, path.name, fmt, allow_external=True):
            if not local_reference(path.parent, unquote(uri), path.name).is_file():
                raise _bad(path.name, f"it references {uri!r}, which is not in {path.parent}")
    else:
        _check_obj_references(data, path)
    try:
        scene = trimesh.load_scene(str(path), file_type=fmt, process=False,
                                   resolver=_folder_resolver(path))
    except InputError:
        raise
    except Exception as exc:
        raise _bad(path.name, f"cannot parse this {fmt.upper()} file ({type(exc).__name__}: {exc})") from None
    return _checked(scene, path.name, [])


# MTL statements whose last word is a texture file.
_MTL_TEXTURE_KEYS = ("map_", "bump", "disp", "decal", "refl", "norm")


def _check_obj_references(data: bytes, path: Path) -> None:
    """Every material library an OBJ names, and every texture those libraries
    name, must lie inside the OBJ's folder (inputs.local_reference)."""
    for library in _statement_values(data, ("mtllib",)):
        target = local_reference(path.parent, library, path.name)
        try:
            text = target.read_bytes()
        except OSError:
            continue  # a missing library leaves the mesh without materials, as trimesh does
        for texture in _statement_values(text, _MTL_TEXTURE_KEYS):
            local_reference(path.parent, texture, f"{path.name}'s material library {library!r}")


def _statement_values(text: bytes, keys: tuple[str, ...]) -> list[str]:
    """The file names of the OBJ/MTL statements starting with one of ``keys``:
    the whole rest of the line and its last word (readers differ on names with spaces)."""
    values = []
    for line in text.decode("utf-8", "replace").splitlines():
        words = line.split(None, 1)
        if len(words) == 2 and words[0].lower().startswith(keys):
            rest = words[1].strip()
            values += [rest, rest.split()[-1]] if rest else []
    return values


def _folder_resolver(path: Path) -> Any:
    """trimesh's file resolver for ``path``, held to inputs.local_reference: a
    file trimesh looks up outside the mesh's folder is refused, never read."""
    import trimesh

    class FolderResolver(trimesh.resolvers.FilePathResolver):
        def get(self, name: str) -> bytes:
            local_reference(path.parent, name, path.name)
            return super().get(name)

    return FolderResolver(str(path))


def _check_binary_stl(data: bytes, name: str) -> None:
    """A binary STL shorter than its triangle count says is truncated."""
    if len(data) < 84 or b"facet" in data[:1024]:  # too short to tell, or ASCII
        return
    (count,) = struct.unpack_from("<I", data, 80)
    if len(data) < 84 + 50 * count:
        raise _bad(name, f"the binary STL is truncated: it declares {count:,} triangles but has bytes for {(len(data) - 84) // 50:,}")


def _glb_json(data: bytes, name: str) -> dict:
    """The JSON chunk of a GLB, checked enough that trimesh will not misread it."""
    if len(data) < 20:
        raise _bad(name, f"a GLB needs at least a 20-byte header, this has {len(data)} bytes")
    magic, version, length, chunk_length, chunk_type = struct.unpack_from("<5I", data, 0)
    if magic != _GLB_MAGIC:
        raise _bad(name, "not a GLB file (wrong magic bytes)")
    if version != 2:
        raise _bad(name, f"GLB version {version} is not supported; export glTF 2.0")
    if length > len(data):
        raise _bad(name, f"the GLB is truncated: it declares {length:,} bytes but has {len(data):,}")
    if chunk_type != _GLB_JSON_CHUNK or 20 + chunk_length > len(data):
        raise _bad(name, "the GLB's first chunk is not a complete JSON chunk")
    return _parse_json(data[20 : 20 + chunk_length], name)


def _gltf_json(data: bytes, name: str) -> dict:
    return _parse_json(data, name)


def _parse_json(raw: bytes, name: str) -> dict:
    try:
        tree = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(name, f"its glTF JSON is not valid ({exc})") from None
    if not isinstance(tree, dict):
        raise _bad(name, "its glTF JSON is not an object")
    return tree


def _check_gltf_tree(tree: dict, name: str, fmt: str, allow_external: bool) -> list[str]:
    """Reject what trimesh cannot read from a glTF tree; return its external URIs.

    With ``allow_external`` False, a buffer or image referenced by anything
    other than a data: URI raises, before trimesh would try to open a file.
    """
    version = str((tree.get("asset") or {}).get("version", "2.0"))
    if not version.startswith("2"):
        raise _bad(name, f"glTF version {version} is not supported; export glTF 2.0")
    required = tree.get("extensionsRequired") or []
    for ext in _UNSUPPORTED_EXTENSIONS:
        if ext in required:
            raise _bad(name, f"its meshes are compressed with {ext}, which geomgen cannot read; export without mesh compression")
    external: list[str] = []
    for kind in ("buffers", "images"):
        entries = tree.get(kind) or []
        if not isinstance(entries, list):
            raise _bad(name, f"its glTF {kind!r} is not a list")
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise _bad(name, f"its glTF {kind}[{index}] is not an object")
            uri = entry.get("uri")
            if uri is None:
                # A GLB's first buffer is its BIN chunk; images may sit in buffer views.
                if kind == "buffers" and not (fmt == "glb" and index == 0):
                    raise _bad(name, f"its buffer {index} has no uri and no data")
                continue
            if not isinstance(uri, str):
                raise _bad(name, f"its {kind}[{index}].uri is not a string")
            if not uri.startswith("data:"):
                external.append(uri)
    if external and not allow_external:
        shown = ", ".join(repr(u) for u in external[:3]) + (" ..." if len(external) > 3 else "")
        raise _bad(
            name,
            f"it references external files ({shown}) that were not sent; only the file's bytes travel, "
            "so export a self-contained GLB (or run 'geomgen convert' on the file where its files are)",
        )
    return external


def _checked(scene: "trimesh.Scene", name: str, warnings: list[str]) -> "trimesh.Scene":
    """Keep triangle meshes with faces; reject empty, non-finite or absurd scenes."""
    import trimesh

    dropped = [key for key, geom in scene.geometry.items() if not _has_faces(geom)]
    kinds = sorted({_KIND_WORDS.get(type(scene.geometry[key]).__name__, "other geometry") for key in dropped})
    for key in dropped:
        scene.delete_geometry(key)
    if not scene.geometry:
        what = f" (only {', '.join(kinds)})" if kinds else ""
        raise _bad(name, f"it contains no triangle faces{what}; a point cloud or a line drawing cannot become a solid")
    if dropped:
        warnings.append(f"{len(dropped)} part(s) without faces ({', '.join(kinds)}) were left out")
    # Counted per placed node: instancing can multiply a small file's faces,
    # and to_output_conventions bakes every instance.
    faces = sum(len(scene.geometry[scene.graph[node][1]].faces) for node in scene.graph.nodes_geometry)
    if faces > MAX_MESH_FACES:
        raise _bad(name, f"{faces:,} faces is over the {MAX_MESH_FACES:,}-face limit; decimate it first")
    for geom in scene.geometry.values():
        if not np.isfinite(geom.vertices).all():
            raise _bad(name, "some vertices are NaN or infinite; repair or re-export the mesh")
    for node in scene.graph.nodes_geometry:
        if not np.isfinite(scene.graph[node][0]).all():
            raise _bad(name, f"the transform of node {node!r} is NaN or infinite")
    bounds = scene_bounds(scene)
    largest = float(np.abs(bounds).max())
    if largest > MAX_ABS_COORDINATE:
        raise _bad(name, f"a coordinate of {largest:.3g} is absurd for an object (limit {MAX_ABS_COORDINATE:.0g}); check its units")
    if float((bounds[1] - bounds[0]).max()) <= 0.0:
        raise _bad(name, "all its vertices are at one point")
    for geom in scene.geometry.values():
        _check_texture(geom, name)
    if isinstance(scene, trimesh.Scene):
        scene.metadata.setdefault("warnings", []).extend(warnings)
    return scene


_KIND_WORDS = {"PointCloud": "points", "Path3D": "lines", "Path2D": "lines", "Trimesh": "meshes with no faces"}


def _has_faces(geom: Any) -> bool:
    import trimesh

    return isinstance(geom, trimesh.Trimesh) and len(geom.faces) > 0


def _check_texture(geom: "trimesh.Trimesh", name: str) -> None:
    """Decode embedded textures now, so a corrupt or huge one fails as this input's error."""
    material = getattr(geom.visual, "material", None)
    if material is None:
        return
    for attr in ("image", "baseColorTexture", "metallicRoughnessTexture", "normalTexture", "emissiveTexture", "occlusionTexture"):
        image = getattr(material, attr, None)
        if image is None or not hasattr(image, "size"):
            continue
        width, height = image.size
        if width * height > defaults.MAX_IMAGE_PIXELS:
            raise _bad(name, f"its texture of {width}x{height} pixels is over the {defaults.MAX_IMAGE_PIXELS:,}-pixel limit")
        try:
            image.load()
        except Exception as exc:
            raise _bad(name, f"its texture image is truncated or corrupt ({exc})") from None


# --- conventions ----------------------------------------------------------------


def scene_bounds(scene: "trimesh.Scene") -> np.ndarray:
    """Exact axis-aligned bounds of every placed mesh vertex, shape (2, 3): [min, max].

    Computed from transformed vertices rather than transformed boxes, so a
    rotated node does not inflate the box and "resting on y = 0" is exact.
    """
    import trimesh

    lows, highs = [], []
    for node in scene.graph.nodes_geometry:
        transform, geom_name = scene.graph[node]
        geom = scene.geometry.get(geom_name)
        if geom is None or len(getattr(geom, "vertices", ())) == 0:
            continue
        points = trimesh.transformations.transform_points(geom.vertices, transform)
        lows.append(points.min(axis=0))
        highs.append(points.max(axis=0))
    if not lows:
        raise GenerateError("the scene has no vertices to bound", code="empty_scene")
    return np.array([np.min(lows, axis=0), np.max(highs, axis=0)])


def to_output_conventions(scene: "trimesh.Scene", up_axis: str = "y", scale: float | None = None) -> "trimesh.Scene":
    """A copy of ``scene`` in geomgen's GLB conventions.

    ``up_axis`` is the input's up axis ("y" as glTF, or "z" as many CAD, OBJ
    and STL files); ``scale`` multiplies every coordinate (file units -> metres).
    The result is +Y up, resting on y = 0 and centred on its bounding box in x
    and z. Node transforms are baked into the vertices (one mesh per placed
    node), so consumers need not apply a scene graph; materials and UVs are kept.
    Raises InputError ``bad_option`` for an unknown axis or a bad scale.
    """
    import trimesh

    if up_axis not in UP_AXES:
        raise InputError(f"up_axis must be 'y' or 'z', got {up_axis!r}", code="bad_option")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        raise InputError(f"scale must be a finite number > 0, got {scale!r}", code="bad_option")
    transform = np.eye(4)
    if up_axis == "z":
        transform = Z_UP_TO_Y_UP @ transform
    if scale is not None:
        transform = np.diag([scale, scale, scale, 1.0]) @ transform

    baked = trimesh.Scene(metadata=dict(scene.metadata))
    for node in scene.graph.nodes_geometry:
        node_transform, geom_name = scene.graph[node]
        geom = scene.geometry[geom_name].copy()
        geom.apply_transform(transform @ node_transform)
        baked.add_geometry(geom, node_name=node, geom_name=node)
    bounds = scene_bounds(baked)
    centre = (bounds[0] + bounds[1]) / 2.0
    offset = np.array([-centre[0], -bounds[0][1], -centre[2]])
    for geom in baked.geometry.values():
        geom.apply_translation(offset)
    return baked


def export_glb(scene: "trimesh.Scene") -> bytes:
    """Binary glTF of ``scene`` with embedded textures. Raises GenerateError
    ``export_failed`` if trimesh cannot write it."""
    try:
        return scene.export(file_type="glb")
    except Exception as exc:
        raise GenerateError(f"cannot write the GLB ({type(exc).__name__}: {exc})", code="export_failed") from None

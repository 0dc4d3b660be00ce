"""Input files as bytes: tell images from meshes, and decode images safely.

Requests carry their input as bytes plus the original file name, so the kind
and format are read from the bytes first and from the name's suffix second.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from geomgen import defaults
from geomgen.errors import InputError
from geomgen.files import resolved_within

if TYPE_CHECKING:  # PIL is a core dependency, but only decode_image needs it
    import PIL.Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl")

# suffix -> format name used by sniff_format
_SUFFIX_FORMAT = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".webp": "webp",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".gif": "gif",
    ".glb": "glb",
    ".gltf": "gltf",
    ".obj": "obj",
    ".ply": "ply",
    ".stl": "stl",
}
IMAGE_FORMATS = ("png", "jpeg", "webp", "bmp", "tiff", "gif")
MESH_FORMATS = ("glb", "gltf", "obj", "ply", "stl")

# Common files people send by mistake; naming them beats "unknown format".
_FOREIGN_MAGIC = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"\x00\x00\x00\x18ftyp", "an MP4/HEIC file"),
    (b"\x00\x00\x00\x1cftyp", "an MP4/HEIC file"),
    (b"\x00\x00\x00\x20ftyp", "an MP4/HEIC file"),
    (b"\x7fELF", "an executable"),
    (b"<?xml", "an XML document"),
    (b"<svg", "an SVG drawing (vector images are not supported; export a PNG)"),
)

_OBJ_KEYWORDS = frozenset(
    {"v", "vt", "vn", "vp", "f", "l", "p", "o", "g", "s", "usemtl", "mtllib", "cstype", "deg", "curv", "surf"}
)
_SNIFF_TEXT_BYTES = 65536  # how much of a text file is inspected to call it OBJ
_WEAK_SIGNATURE_FORMATS = ("obj", "stl", "gltf")
_BMP_DIB_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)


def sniff_format(name: str, data: bytes) -> str:
    """The input's format: one of IMAGE_FORMATS or MESH_FORMATS.

    Magic bytes decide first; the suffix of ``name`` is used only when the
    bytes match no signature, and only for OBJ, STL and glTF, whose signatures
    are weak (a damaged one is then reported by the mesh loader). Raises
    InputError ``empty_input`` for zero bytes and ``unknown_format`` for
    anything else.
    """
    if not data:
        raise InputError(f"{name}: the file is empty (0 bytes)", code="empty_input")
    fmt = format_from_magic(data)
    if fmt is not None:
        return fmt
    for magic, what in _FOREIGN_MAGIC:
        if data.startswith(magic):
            raise InputError(
                f"{name}: this is {what}, not an image or a mesh; send a PNG/JPEG/WebP image "
                f"or a {'/'.join(f.upper() for f in MESH_FORMATS)} mesh",
                code="unknown_format",
            )
    fmt = _SUFFIX_FORMAT.get(PurePath(name).suffix.lower())
    # The suffix is trusted only for formats without a strong signature: an OBJ
    # text the sniffer did not recognise, an STL or a glTF that is damaged (the
    # mesh loader then says what is wrong). Images, GLB and PLY always start
    # with their magic bytes, so without them the name is wrong.
    if fmt in _WEAK_SIGNATURE_FORMATS and not (fmt == "obj" and b"\x00" in data[:_SNIFF_TEXT_BYTES]):
        return fmt
    named = f" (its name ends in {PurePath(name).suffix}, but its bytes are not that format)" if fmt else ""
    raise InputError(
        f"{name}: not a recognised image (PNG, JPEG, WebP, BMP, TIFF) or mesh "
        f"(GLB, glTF, OBJ, PLY, STL) file{named}",
        code="unknown_format",
    )


def sniff_kind(name: str, data: bytes) -> str:
    """``"image"`` or ``"mesh"`` for an input's bytes (see sniff_format)."""
    return "image" if sniff_format(name, data) in IMAGE_FORMATS else "mesh"


def format_from_magic(data: bytes) -> str | None:
    """The format name ("png", "jpeg", "glb", ...) its first bytes announce, or None."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"glTF"):
        return "glb"
    if head.startswith((b"ply\n", b"ply\r\n", b"ply\r")):
        return "ply"
    # A binary STL's size is fixed by its triangle count; checked before BMP
    # and text because an STL header is free-form (it may start with "BM" or "solid").
    if len(data) >= 84:
        (count,) = struct.unpack_from("<I", data, 80)
        if len(data) == 84 + 50 * count and count > 0:
            return "stl"
    if head.startswith(b"BM") and len(data) >= 18 and struct.unpack_from("<I", data, 14)[0] in _BMP_DIB_HEADER_SIZES:
        return "bmp"
    return _text_format(data)


def _text_format(data: bytes) -> str | None:
    sample = data[:_SNIFF_TEXT_BYTES]
    if b"\x00" in sample:
        return None
    text = sample.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if text.startswith("{"):
        try:
            tree = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError):
            return None
        if isinstance(tree, dict) and isinstance(tree.get("asset"), dict):
            return "gltf"
        return None
    if text.startswith("solid") and "facet" in text and "vertex" in text:
        return "stl"
    has_vertex = False
    for line in text.splitlines():
        tokens = line.split(None, 1)
        if not tokens or tokens[0].startswith("#"):
            continue
        if tokens[0] not in _OBJ_KEYWORDS:
            return None
        has_vertex = has_vertex or tokens[0] == "v"
        if has_vertex:
            return "obj"
    return None


def local_reference(folder: Path, reference: str, what: str) -> Path:
    """The file that ``reference`` (a glTF buffer or image URI, percent-decoded;
    an OBJ's material library or texture path) names inside ``folder``.

    A file on disk may name other files, and only the files inside its own
    folder are read: the reference is resolved ('..' and symlinks followed) and
    refused with InputError ``unsafe_reference``, naming it, when it lands
    anywhere else (an absolute path, ``../../etc/passwd``, a link pointing out,
    a ``file:`` URI). Nothing is read here, so nothing outside is ever read.
    """
    base = Path(os.path.realpath(folder))
    if not reference or "\0" in reference or "://" in reference or reference.lower().startswith("file:"):
        raise InputError(f"{what} references {reference!r}, which is not a file beside it; only files inside "
                         f"{folder} are read", code="unsafe_reference")
    target = resolved_within(base / reference, base)
    if target is None:
        target = Path(os.path.realpath(base / reference))
        raise InputError(f"{what} references {reference!r}, which resolves to {target}, outside {folder}; only "
                         "files inside the input's folder are read", code="unsafe_reference")
    return target


def decode_image(
    data: bytes, name: str, max_pixels: int = defaults.MAX_IMAGE_PIXELS
) -> "PIL.Image.Image":
    """Decode an image file's bytes into an RGBA PIL image (fully loaded).

    The declared width x height is checked against ``max_pixels`` before any
    pixel is decoded. EXIF orientation is applied, so a phone photo stands the
    way it was taken; multi-frame files give their first frame.

    Raises InputError with code ``empty_input``, ``unknown_format`` (not an
    image), ``image_too_large`` (over ``max_pixels``; PIL's own bomb limit,
    2 x PIL.Image.MAX_IMAGE_PIXELS, also reports this) or ``bad_image``
    (truncated or corrupt).
    """
    import PIL.Image
    import PIL.ImageOps

    fmt = sniff_format(name, data)
    if fmt not in IMAGE_FORMATS:
        raise InputError(f"{name}: this is a {fmt.upper()} mesh, not an image", code="unknown_format")
    with warnings.catch_warnings():
        # The pixel limit is ours (max_pixels); PIL's global warning is not relied on.
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        try:
            image = PIL.Image.open(io.BytesIO(data))  # reads the header only
        except PIL.Image.DecompressionBombError as exc:
            raise InputError(f"{name}: {exc}; refusing to decode it", code="image_too_large") from None
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
            raise InputError(f"{name}: cannot read this {fmt.upper()} image ({exc})", code="bad_image") from None
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InputError(f"{name}: the image declares a size of {width}x{height} pixels", code="bad_image")
        if width * height > max_pixels:
            raise InputError(
                f"{name}: the image declares {width}x{height} = {width * height:,} pixels, over the "
                f"{max_pixels:,}-pixel limit; resize it (a few megapixels is plenty)",
                code="image_too_large",
            )
        try:
            image.load()
            image = PIL.ImageOps.exif_transpose(image)
            rgba = _to_rgba(image)
        except Exception as exc:  # truncated data, bad CRCs, broken compression streams
            raise InputError(
                f"{name}: the {fmt.upper()} image is truncated or corrupt ({exc}); export it again",
                code="bad_image",
            ) from None
    return rgba


def _to_rgba(image: "PIL.Image.Image") -> "PIL.Image.Image":
    import numpy as np
    import PIL.Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float greyscale: PIL's convert("RGBA") clips instead of scaling.
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        span = high - low if high > low else 1.0
        grey = np.nan_to_num((values - low) / span * 255.0).clip(0, 255).astype(np.uint8)
        image = PIL.Image.fromarray(grey)  # uint8 2-D -> mode L
    return image.convert("RGBA")

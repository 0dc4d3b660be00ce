"""Input sniffing and image decoding on real encoded files (PIL, trimesh writers)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import trimesh
from PIL import Image

from geomgen.errors import InputError
from geomgen.inputs import IMAGE_SUFFIXES, MESH_SUFFIXES, decode_image, sniff_format, sniff_kind


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def picture(mode: str = "RGB", size: tuple[int, int] = (48, 32)) -> Image.Image:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA").convert(mode)


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGBA pixels, with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


BOX = trimesh.creation.box(extents=(1.0, 2.0, 3.0))


@pytest.mark.parametrize(
    "fmt, pil_format, kwargs",
    [
        ("png", "PNG", {}),
        ("jpeg", "JPEG", {}),
        ("webp", "WEBP", {}),
        ("bmp", "BMP", {}),
        ("tiff", "TIFF", {}),
        ("gif", "GIF", {}),
    ],
)
def test_image_formats_by_magic_even_with_a_wrong_name(fmt, pil_format, kwargs):
    data = encode(picture(), pil_format, **kwargs)
    for name in (f"photo.{fmt}", "photo", "photo.obj"):
        assert sniff_format(name, data) == fmt
        assert sniff_kind(name, data) == "image"


@pytest.mark.parametrize(
    "fmt, data",
    [
        ("glb", BOX.export(file_type="glb")),
        ("gltf", trimesh.Scene(BOX).export(file_type="gltf", embed_buffers=True)["model.gltf"]),
        ("ply", BOX.export(file_type="ply")),
        ("ply", BOX.export(file_type="ply", encoding="ascii")),
        ("stl", BOX.export(file_type="stl")),
        ("stl", BOX.export(file_type="stl_ascii").encode()),
        ("obj", BOX.export(file_type="obj").encode()),
    ],
)
def test_mesh_formats_by_content(fmt, data):
    assert sniff_format("upload", data) == fmt  # no suffix at all
    assert sniff_format("upload.png", data) == fmt  # a misleading suffix loses to the bytes
    assert sniff_kind("upload", data) == "mesh"


def test_suffix_decides_only_for_weak_signatures():
    odd_obj = b"# exported\n\nvn 0 0 1\nv 0 0 0\n"
    assert sniff_format("part.obj", b"o part\r\n" + odd_obj) == "obj"
    assert sniff_format("broken.gltf", b"{ not json") == "gltf"  # the mesh loader explains what is wrong
    assert set(IMAGE_SUFFIXES) >= {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
    assert set(MESH_SUFFIXES) == {".glb", ".gltf", ".obj", ".ply", ".stl"}


def test_empty_input():
    with pytest.raises(InputError) as info:
        sniff_kind("empty.png", b"")
    assert info.value.code == "empty_input" and info.value.stage.value == "input"
    with pytest.raises(InputError) as info:
        decode_image(b"", "empty.png")
    assert info.value.code == "empty_input"


@pytest.mark.parametrize(
    "name, data, words",
    [
        ("manual.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\n", "PDF"),
        ("manual.png", b"%PDF-1.7\n1 0 obj <<>> endobj\n", "PDF"),
        ("noise.bin", np.random.default_rng(1).bytes(4096), "not a recognised"),
        ("noise.png", np.random.default_rng(2).bytes(4096), "not that format"),
        ("noise.glb", np.random.default_rng(3).bytes(4096), "not that format"),
        ("noise.obj", b"\x00\x01" + np.random.default_rng(4).bytes(4096), "not that format"),
        ("data.json", b'{"rows": [1, 2, 3]}', "not a recognised"),
        ("notes.txt", b"shopping list\nmilk\n", "not a recognised"),
    ],
)
def test_unknown_formats(name, data, words):
    with pytest.raises(InputError) as info:
        sniff_kind(name, data)
    assert info.value.code == "unknown_format"
    assert words in info.value.message and name in info.value.message


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16"])
def test_decode_gives_rgba(mode):
    image = picture("RGB")
    if mode == "I;16":
        grey = (np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        image = Image.fromarray(grey)  # uint16 -> mode I;16
        data = encode(image, "PNG")
    else:
        image = image.convert(mode)
        data = encode(image, "TIFF" if mode == "CMYK" else "PNG")
    decoded = decode_image(data, f"x.{mode}")
    assert decoded.mode == "RGBA" and decoded.size == (48, 32)
    if mode == "I;16":  # 16-bit values are scaled into 8 bits, not clipped to white
        assert 0 < np.asarray(decoded)[..., 0].mean() < 255


def test_decode_keeps_alpha_values():
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    rgba[2:8, 3:9] = (200, 10, 10, 255)
    decoded = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), "a.png"))
    assert (decoded[..., 3] == rgba[..., 3]).all()
    assert tuple(decoded[5, 5]) == (200, 10, 10, 255)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(picture("RGB", (40, 20)), "JPEG", exif=exif)
    assert decode_image(data, "phone.jpg").size == (20, 40)


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_truncated_png_is_bad_image(cut):
    data = encode(picture("RGB", (64, 64)), "PNG")
    with pytest.raises(InputError) as info:
        decode_image(data[: int(len(data) * cut)], "cut.png")
    assert info.value.code == "bad_image"
    assert "truncated or corrupt" in info.value.message or "cannot read" in info.value.message


def test_corrupt_png_and_jpeg_are_bad_image():
    png = bytearray(encode(picture("RGB", (64, 64)), "PNG"))
    idat = png.index(b"IDAT")
    png[idat + 20 : idat + 60] = bytes(40)  # breaks the chunk's CRC and its zlib stream
    jpeg = encode(picture("RGB", (64, 64)), "JPEG")
    for name, data in (("broken.png", bytes(png)), ("cut.jpg", jpeg[: len(jpeg) // 2])):
        with pytest.raises(InputError) as info:
            decode_image(data, name)
        assert info.value.code == "bad_image", name


@pytest.mark.parametrize("side", [9000, 20000, 100000])
def test_declared_size_over_the_limit_is_refused_before_decoding(side):
    # 9000^2 is over geomgen's 64 Mpx limit but under PIL's own bomb limits;
    # 20000^2 and 100000^2 are over PIL's error limit. All say image_too_large.
    with pytest.raises(InputError) as info:
        decode_image(png_declaring(side, side), "bomb.png")
    assert info.value.code == "image_too_large"
    assert "pixel" in info.value.message


def test_max_pixels_is_the_callers_limit():
    data = encode(picture("RGB", (48, 32)), "PNG")
    assert decode_image(data, "ok.png", max_pixels=48 * 32).size == (48, 32)
    with pytest.raises(InputError) as info:
        decode_image(data, "small-limit.png", max_pixels=48 * 32 - 1)
    assert info.value.code == "image_too_large" and "48x32" in info.value.message


def test_decode_refuses_a_mesh():
    with pytest.raises(InputError) as info:
        decode_image(BOX.export(file_type="glb"), "box.glb")
    assert info.value.code == "unknown_format" and "mesh" in info.value.message

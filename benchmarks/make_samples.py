"""Draw the sample inputs shipped in src/geomgen/samples/ for ``geomgen demo``.

Procedural and deterministic: shapes are drawn at 4x and downsampled so their
edges are anti-aliased, shaded with numpy gradients. Run from the repository
root: ``python benchmarks/make_samples.py`` (rewrites the files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "geomgen" / "samples"
SUPERSAMPLE = 4  # shapes are drawn at this factor, then downsampled for smooth edges


def _mask(size: tuple[int, int], draw_fn) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], shape (height, width), from PIL drawing
    calls made on a canvas SUPERSAMPLE times larger (coordinates in output pixels)."""
    width, height = size
    big = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    draw_fn(draw, SUPERSAMPLE)
    small = big.resize((width, height), Image.LANCZOS)
    return np.asarray(small, dtype=np.float64) / 255.0


def _cylinder_shade(width: int, height: int, left: float, right: float) -> np.ndarray:
    """Lambert-like shading across a vertical cylinder spanning [left, right] px,
    light from the front-left; shape (height, width), values about 0.45-1.05."""
    x = (np.arange(width) + 0.5 - left) / max(right - left, 1.0) * 2.0 - 1.0
    x = np.clip(x, -1.0, 1.0)
    normal_z = np.sqrt(1.0 - x**2)
    shade = 0.45 + 0.6 * np.clip(normal_z * 0.8 - x * 0.35, 0.0, 1.0)
    return np.broadcast_to(shade, (height, width))


def _compose(colour: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    return np.concatenate([colour, coverage[..., None]], axis=-1)


def _to_image(rgba: np.ndarray, background: tuple[int, int, int] | None) -> Image.Image:
    """RGBA floats in [0, 1] -> a PIL image; flattened onto ``background`` if given."""
    rgba = np.clip(rgba, 0.0, 1.0)
    if background is None:
        return Image.fromarray((rgba * 255.0 + 0.5).astype(np.uint8), "RGBA")
    bg = np.array(background, dtype=np.float64) / 255.0
    alpha = rgba[..., 3:4]
    rgb = rgba[..., :3] * alpha + bg * (1.0 - alpha)
    return Image.fromarray((rgb * 255.0 + 0.5).astype(np.uint8), "RGB")


def mug() -> Image.Image:
    """A blue mug with a white band and a handle, side view, RGBA (transparent background)."""
    w, h = 320, 320
    body = _mask((w, h), lambda d, s: d.rounded_rectangle([70 * s, 60 * s, 220 * s, 270 * s], radius=18 * s, fill=255))
    handle = _mask(
        (w, h),
        lambda d, s: (
            d.ellipse([180 * s, 100 * s, 275 * s, 230 * s], fill=255),
            d.ellipse([205 * s, 125 * s, 250 * s, 205 * s], fill=0),
        ),
    )
    coverage = np.maximum(body, handle)
    shade = _cylinder_shade(w, h, 70, 220)
    colour = np.empty((h, w, 3))
    colour[:] = (0.16, 0.36, 0.72)
    rows = np.arange(h)[:, None]
    band = (rows > 150) & (rows < 180)
    colour[np.broadcast_to(band, (h, w))] = (0.93, 0.93, 0.9)
    colour *= shade[..., None]
    colour[(handle > 0) & (body < 0.5)] = np.array((0.13, 0.3, 0.62))
    return _to_image(_compose(colour, coverage), None)


def vase() -> Image.Image:
    """A terracotta vase turned on a lathe, front view, RGBA."""
    w, h = 256, 384
    ys = np.linspace(0.0, 1.0, 64)
    # radius profile in px from the top (y = 0) to the foot (y = 1): lip, neck, belly, foot
    radius = 34 + 58 * np.sin(np.pi * np.clip((ys - 0.18) / 0.8, 0, 1)) ** 1.5 - 10 * np.exp(-((ys - 0.12) / 0.06) ** 2)
    top, bottom, cx = 30, 360, w / 2

    def outline(d, s):
        left = [((cx - r) * s, (top + y * (bottom - top)) * s) for y, r in zip(ys, radius)]
        right = [((cx + r) * s, (top + y * (bottom - top)) * s) for y, r in zip(ys[::-1], radius[::-1])]
        d.polygon(left + right, fill=255)

    coverage = _mask((w, h), outline)
    rows = (np.arange(h)[:, None] - top) / (bottom - top)
    shade = _cylinder_shade(w, h, cx - radius.max(), cx + radius.max())
    colour = np.empty((h, w, 3))
    colour[:] = (0.78, 0.42, 0.26)
    stripes = (np.abs(rows - 0.55) < 0.025) | (np.abs(rows - 0.65) < 0.012)
    colour[np.broadcast_to(stripes, (h, w))] = (0.25, 0.16, 0.1)
    colour *= shade[..., None]
    return _to_image(_compose(colour, coverage), None)


def chair() -> Image.Image:
    """A wooden chair seen from the front, RGB on a plain light background."""
    w, h = 320, 384

    def outline(d, s):
        d.rounded_rectangle([88 * s, 24 * s, 232 * s, 176 * s], radius=16 * s, fill=255)  # back rest
        d.rectangle([96 * s, 176 * s, 112 * s, 200 * s], fill=255)  # back posts
        d.rectangle([208 * s, 176 * s, 224 * s, 200 * s], fill=255)
        d.polygon([(72 * s, 200 * s), (248 * s, 200 * s), (256 * s, 232 * s), (64 * s, 232 * s)], fill=255)  # seat
        d.rectangle([76 * s, 232 * s, 96 * s, 364 * s], fill=255)  # legs
        d.rectangle([224 * s, 232 * s, 244 * s, 364 * s], fill=255)
        d.rectangle([96 * s, 300 * s, 224 * s, 310 * s], fill=255)  # stretcher

    coverage = _mask((w, h), outline)
    xs = np.arange(w)[None, :]
    rows = np.arange(h)[:, None]
    grain = 0.92 + 0.08 * np.sin(xs / 5.0 + 0.6 * np.sin(rows / 23.0))
    colour = np.empty((h, w, 3))
    colour[:] = (0.62, 0.4, 0.22)
    colour *= grain[..., None]
    seat = (rows >= 200) & (rows < 232)
    colour[np.broadcast_to(seat, (h, w))] *= 1.15
    return _to_image(_compose(colour, coverage), (242, 242, 238))


def lamp() -> Image.Image:
    """A table lamp with a fabric shade, RGB on a plain light background."""
    w, h = 256, 384

    def outline(d, s):
        d.polygon([(84 * s, 40 * s), (172 * s, 40 * s), (212 * s, 160 * s), (44 * s, 160 * s)], fill=255)  # shade
        d.rectangle([122 * s, 160 * s, 134 * s, 330 * s], fill=255)  # stem
        d.ellipse([72 * s, 318 * s, 184 * s, 362 * s], fill=255)  # base

    coverage = _mask((w, h), outline)
    rows = np.arange(h)[:, None]
    colour = np.empty((h, w, 3))
    shade_part = np.broadcast_to(rows < 161, (h, w))
    colour[:] = (0.32, 0.33, 0.36)  # metal stem and base
    colour *= _cylinder_shade(w, h, 72, 184)[..., None]
    fabric = np.array((0.95, 0.82, 0.55)) * (0.85 + 0.15 * (rows / 160.0))[..., None]
    colour[shade_part] = np.broadcast_to(fabric, (h, w, 3))[shade_part]
    return _to_image(_compose(colour, coverage), (226, 232, 238))


def table_glb() -> bytes:
    """A small wooden table (top and four legs, 0.8 x 0.45 x 0.5 m), textured,
    as a GLB already in geomgen's conventions (+Y up, resting on y = 0)."""
    import trimesh

    parts = [((0.8, 0.04, 0.5), (0.0, 0.43, 0.0))]  # top: extents (x, y, z) m, centre
    for sx in (-1, 1):
        for sz in (-1, 1):
            parts.append(((0.05, 0.41, 0.05), (sx * 0.35, 0.205, sz * 0.2)))
    vertices, faces, uvs = [], [], []
    for extents, centre in parts:
        box = trimesh.creation.box(extents=extents)
        box.apply_translation(centre)
        # one vertex per face corner so each face gets its own planar UVs
        corners = box.vertices[box.faces].reshape(-1, 3)
        axis = np.abs(box.face_normals).argmax(axis=1).repeat(3)
        planes = np.array([[2, 1], [0, 2], [0, 1]])[axis]  # drop the axis the face looks along
        uv = np.take_along_axis(corners, planes, axis=1) * 1.6 + 0.5
        faces.append(np.arange(len(corners)).reshape(-1, 3) + sum(len(v) for v in vertices))
        vertices.append(corners)
        uvs.append(uv)
    size = 128
    xs = np.arange(size)[None, :]
    rows = np.arange(size)[:, None]
    grain = 0.85 + 0.15 * np.sin(rows / 3.0 + 2.0 * np.sin(xs / 17.0))
    wood = (np.array((0.66, 0.45, 0.27)) * grain[..., None] * 255).astype(np.uint8)
    texture = Image.fromarray(wood, "RGB")
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=texture, roughnessFactor=0.8, metallicFactor=0.0)
    mesh = trimesh.Trimesh(
        vertices=np.concatenate(vertices),
        faces=np.concatenate(faces),
        visual=trimesh.visual.TextureVisuals(uv=np.concatenate(uvs) % 1.0, material=material),
        process=False,
    )
    return trimesh.Scene(mesh).export(file_type="glb")


def main() -> None:
    SAMPLES.mkdir(parents=True, exist_ok=True)
    for name, draw in (("mug", mug), ("vase", vase), ("chair", chair), ("lamp", lamp)):
        path = SAMPLES / f"{name}.png"
        draw().save(path, optimize=True)
        print(f"{path.relative_to(SAMPLES.parents[2])}: {path.stat().st_size:,} bytes")
    path = SAMPLES / "table.glb"
    path.write_bytes(table_glb())
    print(f"{path.relative_to(SAMPLES.parents[2])}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()

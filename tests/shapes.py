"""Furniture-like test shapes built with trimesh, as GLB bytes in glTF conventions
(+Y up, metres, resting on y = 0, centred in x/z): a table on four legs, a stool,
a mug with a handle, a bookshelf and a chair. Each is one closed solid (a
boolean union), optionally textured with a small checker image.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import trimesh


def _box(extents_m: tuple[float, float, float], centre_m: tuple[float, float, float]) -> trimesh.Trimesh:
    return trimesh.creation.box(extents=extents_m, transform=trimesh.transformations.translation_matrix(centre_m))


def _upright_cylinder(radius_m: float, height_m: float, base_m: tuple[float, float, float], sections: int = 32) -> trimesh.Trimesh:
    """A cylinder along +Y standing on ``base_m`` (the centre of its bottom disc)."""
    cylinder = trimesh.creation.cylinder(radius=radius_m, height=height_m, sections=sections)  # along z, centred
    cylinder.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))
    cylinder.apply_translation(np.asarray(base_m) + [0.0, height_m / 2, 0.0])
    return cylinder


def _union(parts: list[trimesh.Trimesh]) -> trimesh.Trimesh:
    solid = trimesh.boolean.union(parts, engine="manifold")
    return _rest_on_floor(solid)


def _rest_on_floor(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Centre in x/z and put the lowest point on y = 0, as geomgen's GLBs are."""
    lo, hi = mesh.bounds
    mesh.apply_translation([-(lo[0] + hi[0]) / 2, -lo[1], -(lo[2] + hi[2]) / 2])
    return mesh


def table_mesh() -> trimesh.Trimesh:
    """1.2 x 0.76 (tall) x 0.8 m table: a 4 cm top on four 5 cm square legs."""
    width, height, depth, top, leg = 1.2, 0.76, 0.8, 0.04, 0.05
    parts = [_box((width, top, depth), (0, height - top / 2, 0))]
    for sx in (-1, 1):
        for sz in (-1, 1):
            x, z = sx * (width / 2 - 0.05 - leg / 2), sz * (depth / 2 - 0.05 - leg / 2)
            # Legs reach 5 mm into the top so the union is one solid.
            length = height - top + 0.005
            parts.append(_box((leg, length, leg), (x, length / 2, z)))
    return _union(parts)


def stool_mesh() -> trimesh.Trimesh:
    """A round stool: 0.36 m seat disc at 0.45 m on four round legs."""
    seat_r, height, seat_t, leg_r = 0.18, 0.45, 0.04, 0.018
    parts = [_upright_cylinder(seat_r, seat_t, (0, height - seat_t, 0))]
    for angle in np.arange(4) * np.pi / 2 + np.pi / 4:
        x, z = 0.12 * np.cos(angle), 0.12 * np.sin(angle)
        parts.append(_upright_cylinder(leg_r, height - seat_t + 0.005, (x, 0, z), sections=16))
    return _union(parts)


def mug_mesh() -> trimesh.Trimesh:
    """An open mug 10 cm tall, 8 cm across, 5 mm walls, with a ring handle."""
    radius, height, wall, bottom = 0.04, 0.10, 0.005, 0.008
    outer = _upright_cylinder(radius, height, (0, 0, 0), sections=48)
    # The cavity pokes out of the top so the difference leaves the mug open.
    cavity = _upright_cylinder(radius - wall, height, (0, bottom, 0), sections=48)
    cup = trimesh.boolean.difference([outer, cavity], engine="manifold")
    handle = trimesh.creation.torus(major_radius=0.028, minor_radius=0.007, major_sections=32, minor_sections=12)
    # The torus lies in the xy plane already (axis z): its ring stands beside the cup.
    handle.apply_translation([radius + 0.018, height / 2, 0.0])
    return _union([cup, handle])


def bookshelf_mesh() -> trimesh.Trimesh:
    """A 0.8 x 1.8 (tall) x 0.3 m bookshelf: two sides, a back, five shelves, open front."""
    width, height, depth, board, back = 0.8, 1.8, 0.3, 0.02, 0.01
    parts = [
        _box((board, height, depth), (sx * (width - board) / 2, height / 2, 0)) for sx in (-1, 1)
    ]
    parts.append(_box((width, height, back), (0, height / 2, -(depth - back) / 2)))
    for y in np.linspace(board / 2, height - board / 2, 5):
        parts.append(_box((width, board, depth), (0, y, 0)))
    return _union(parts)


def chair_mesh() -> trimesh.Trimesh:
    """A chair: 0.45 m square seat at 0.45 m, four legs, a backrest up to 0.95 m."""
    seat, seat_y, seat_t, leg, back_t, top_y = 0.45, 0.45, 0.04, 0.04, 0.03, 0.95
    parts = [_box((seat, seat_t, seat), (0, seat_y - seat_t / 2, 0))]
    for sx in (-1, 1):
        for sz in (-1, 1):
            x, z = sx * (seat - leg) / 2, sz * (seat - leg) / 2
            length = seat_y - seat_t + 0.005
            parts.append(_box((leg, length, leg), (x, length / 2, z)))
    parts.append(_box((seat, top_y - seat_y + 0.005, back_t), (0, (top_y + seat_y) / 2, -(seat - back_t) / 2)))
    return _union(parts)


def box_mesh(extents_m: tuple[float, float, float] = (0.3, 0.2, 0.1)) -> trimesh.Trimesh:
    """A plain box (x, y, z extents in metres, y up) resting on y = 0."""
    return _rest_on_floor(trimesh.creation.box(extents=extents_m))


def to_glb(mesh: trimesh.Trimesh, textured: bool = False) -> bytes:
    """GLB bytes of ``mesh``; textured adds planar UVs and a 64 x 64 checker image."""
    mesh = mesh.copy()
    if textured:
        from PIL import Image

        checker = (np.indices((64, 64)).sum(axis=0) // 8 % 2).astype(np.uint8)
        pixels = np.stack([60 + 150 * checker, 90 + 100 * checker, 140 + 60 * checker], axis=-1).astype(np.uint8)
        lo, hi = mesh.bounds
        uv = (mesh.vertices[:, [0, 2]] - lo[[0, 2]]) / np.maximum(hi - lo, 1e-9)[[0, 2]]
        material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(pixels), name="checker")
        mesh.visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    buffer = io.BytesIO()
    trimesh.Scene(mesh).export(buffer, file_type="glb")
    return buffer.getvalue()


SHAPES: dict[str, Callable[[], trimesh.Trimesh]] = {
    "table": table_mesh,
    "stool": stool_mesh,
    "mug": mug_mesh,
    "bookshelf": bookshelf_mesh,
    "chair": chair_mesh,
}


def shape_glb(name: str, textured: bool = False) -> bytes:
    """GLB bytes of the test shape ``name`` (a key of SHAPES)."""
    return to_glb(SHAPES[name](), textured=textured)

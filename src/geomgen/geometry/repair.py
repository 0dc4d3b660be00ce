"""Repair of generated meshes into a "solid": the triangle soup used for volume,
inertia and convex decomposition, built beside the textured visual mesh (which
is kept exactly as it came).

Generated meshes split vertices at UV seams, carry degenerate triangles and
small disconnected floaters, and sometimes inverted or inconsistent winding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from geomgen.errors import InputError

if TYPE_CHECKING:
    import trimesh

# A connected piece with less than this fraction of the total surface area, and
# less than FLOATER_FACE_FRACTION of the faces, is a floater (generation noise).
FLOATER_AREA_FRACTION = 0.005
FLOATER_FACE_FRACTION = 0.01
# A closed piece enclosing less than this fraction of its bounding box is a
# double-sided sheet (two coincident surfaces), not a solid.
SHEET_VOLUME_FRACTION = 1e-3


@dataclass
class Solid:
    """A repaired triangle mesh.

    vertices: (N, 3) float, in the frame of the input to make_solid.
    faces: (M, 3) int indices into vertices, wound outwards where the mesh is closed.
    watertight: every edge is shared by exactly two faces (the mesh encloses a volume).
    """

    vertices: np.ndarray
    faces: np.ndarray
    watertight: bool
    warnings: list[str] = field(default_factory=list)


def scene_triangles(scene: trimesh.Scene) -> tuple[np.ndarray, np.ndarray]:
    """Every placed mesh of ``scene`` as one triangle soup: vertices (N, 3) in scene
    coordinates (node transforms applied) and faces (M, 3)."""
    import trimesh

    vertices, faces, offset = [], [], 0
    for node in scene.graph.nodes_geometry:
        transform, geom_name = scene.graph[node]
        geom = scene.geometry.get(geom_name)
        if not isinstance(geom, trimesh.Trimesh) or len(geom.faces) == 0:
            continue
        vertices.append(trimesh.transformations.transform_points(np.asarray(geom.vertices, dtype=float), transform))
        faces.append(np.asarray(geom.faces, dtype=np.int64) + offset)
        offset += len(geom.vertices)
    if not faces:
        raise InputError("the mesh has no triangle faces", code="bad_mesh")
    return np.concatenate(vertices), np.concatenate(faces)


def make_solid(vertices: np.ndarray, faces: np.ndarray, remove_floaters: bool = True) -> Solid:
    """Repair a triangle soup into a solid.

    Merges vertices at equal positions (closing UV seams), drops degenerate and
    duplicate faces, optionally drops floaters, and makes the winding consistent
    and outward per connected body. ``vertices`` (N, 3), ``faces`` (M, 3).
    Raises InputError ``bad_mesh`` for non-finite vertices or when no face is left.
    """
    import trimesh

    vertices = np.asarray(vertices, dtype=float)
    faces = np.asarray(faces, dtype=np.int64)
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise InputError("the mesh has no triangle faces", code="bad_mesh")
    if not np.isfinite(vertices).all():
        raise InputError("some vertices are NaN or infinite; repair or re-export the mesh", code="bad_mesh")
    warnings: list[str] = []
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    # No visual attached, so vertices merge by position alone: the seam copies close up.
    mesh.merge_vertices()
    before = len(mesh.faces)
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.remove_unreferenced_vertices()
    if len(mesh.faces) == 0:
        raise InputError("every triangle of the mesh is degenerate (zero area)", code="bad_mesh")
    # Winding first: a piece's enclosed volume is only meaningful once it is consistent.
    trimesh.repair.fix_normals(mesh, multibody=True)
    # Before de-duplication, which would open a double-sided sheet and with it the whole solid.
    warnings += _drop_components(mesh, remove_floaters)
    mesh.update_faces(mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    if len(mesh.faces) < before:
        warnings.append(f"dropped {before - len(mesh.faces)} degenerate or duplicate triangle(s)")
    return Solid(
        vertices=np.asarray(mesh.vertices, dtype=float),
        faces=np.asarray(mesh.faces, dtype=np.int64),
        watertight=bool(mesh.is_watertight),
        warnings=warnings,
    )


def _drop_components(mesh: trimesh.Trimesh, remove_floaters: bool) -> list[str]:
    """Drop, in place, closed pieces that enclose no volume (double-sided sheets: they
    add no mass and make convex decomposition bridge across the object) and, when
    ``remove_floaters``, pieces small in both area and face count. Returns notes."""
    import trimesh

    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    count = int(labels.max(initial=0)) + 1
    if count == 1:
        return []
    areas = np.bincount(labels, weights=mesh.area_faces, minlength=count)
    faces_per = np.bincount(labels, minlength=count)
    drop = np.zeros(count, dtype=bool)
    notes = []
    if remove_floaters:
        drop |= (areas < FLOATER_AREA_FRACTION * areas.sum()) & (faces_per < FLOATER_FACE_FRACTION * faces_per.sum())
    sheets = _flat_closed(mesh, labels, count) & ~drop
    if (drop | sheets).all():
        return []  # nothing would be left; the caller's volume checks explain why
    if drop.any():
        notes.append(
            f"removed {int(drop.sum())} small disconnected piece(s) ({areas[drop].sum() / areas.sum():.2%} of the surface) "
            "from the solid; set remove_floaters=false to keep them"
        )
    if sheets.any():
        notes.append(
            f"left {int(sheets.sum())} closed piece(s) that enclose no volume (double-sided sheets, "
            f"{areas[sheets].sum() / areas.sum():.2%} of the surface) out of the solid and its collision geometry"
        )
    mesh.update_faces(~(drop | sheets)[labels])
    mesh.remove_unreferenced_vertices()
    return notes


def _flat_closed(mesh: trimesh.Trimesh, labels: np.ndarray, count: int) -> np.ndarray:
    """(count,) bool: connected pieces that are closed yet enclose (almost) no volume."""
    # Edges counted per piece: a piece is closed when each of its edges bounds two of its faces.
    edge_piece = labels[mesh.edges_face]
    keyed = np.column_stack([edge_piece, mesh.edges_sorted])
    _, inverse, uses = np.unique(keyed, axis=0, return_inverse=True, return_counts=True)
    open_piece = np.zeros(count, dtype=bool)
    open_piece[edge_piece[uses[inverse.reshape(-1)] != 2]] = True
    tri = mesh.triangles - mesh.bounds.mean(axis=0)
    six_v = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2]))
    volumes = np.abs(np.bincount(labels, weights=six_v, minlength=count)) / 6.0
    flat = np.zeros(count, dtype=bool)
    for piece in np.flatnonzero(~open_piece):
        corners = tri[labels == piece].reshape(-1, 3)
        box = float(np.prod(np.ptp(corners, axis=0)))
        flat[piece] = volumes[piece] <= SHEET_VOLUME_FRACTION * box
    return flat

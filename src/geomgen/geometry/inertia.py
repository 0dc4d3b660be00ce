"""Mass properties of a solid in the Drake body frame: volume, mass, centre of
mass and the rotational inertia about it, with the guards a simulator needs
(inverted winding, zero volume, tensors that are not physically valid).

Inertia comes from the closed mesh when there is one, else from a solid proxy:
the union of the collision pieces, or a voxel fill of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from geomgen import defaults
from geomgen.errors import ConvertError, InputError

# A solid whose volume is below this fraction of its bounding box's, or whose
# thinnest extent is below this fraction of its largest, is flat: no volume.
FLAT_FRACTION = 1e-6
VOXEL_CELLS = 64  # voxel fill: cells along the largest extent
# Relative size of a change to the inertia tensor that is worth a warning;
# smaller fixes are floating-point noise.
PROJECTION_NOTE_TOL = 1e-6

SOURCE_MESH = "mesh"  # the closed, merged visual mesh
SOURCE_UNION = "collision_union"  # the boolean union of the collision pieces
SOURCE_VOXELS = "voxel_fill"  # voxels inside any collision piece


@dataclass
class MassProperties:
    """Mass properties in the Drake body frame (+Z up), SI units.

    com_m: (3,) centre of mass, metres. inertia_kg_m2: (3, 3) rotational inertia
    about the centre of mass, axes of the body frame, kg m^2. source: where the
    volume came from (SOURCE_MESH, SOURCE_UNION or SOURCE_VOXELS).
    """

    mass_kg: float
    volume_m3: float
    density_kg_m3: float
    com_m: np.ndarray
    inertia_kg_m2: np.ndarray
    source: str
    warnings: list[str] = field(default_factory=list)


def check_not_flat(vertices: np.ndarray) -> None:
    """Raise InputError ``zero_volume`` when the points (N, 3) span no volume (a plane, a line)."""
    extents = np.ptp(np.asarray(vertices, dtype=float), axis=0)
    if extents.max() <= 0 or extents.min() <= FLAT_FRACTION * extents.max():
        raise InputError(
            f"the mesh is flat (extents {np.round(extents, 6).tolist()} m), so it has no volume, mass or "
            "inertia; give the object some thickness",
            code="zero_volume",
        )


def unit_mass_properties(vertices: np.ndarray, faces: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Volume (m^3), centroid (3,) and inertia about the centroid at unit density (3, 3)
    of the closed triangle mesh ``vertices`` (N, 3), ``faces`` (M, 3).

    Integrates over the signed tetrahedra each triangle makes with a reference
    point (divergence theorem), so the volume is negative when the faces are
    wound inwards.
    """
    vertices = np.asarray(vertices, dtype=float)
    # Integrating about a point near the middle keeps the round-off small far from the origin.
    origin = (vertices.min(axis=0) + vertices.max(axis=0)) / 2.0
    tri = vertices[np.asarray(faces)] - origin  # (M, 3 corners, 3)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    six_v = np.einsum("ij,ij->i", a, np.cross(b, c))  # 6 x signed tetrahedron volumes (M,)
    volume = float(six_v.sum() / 6.0)
    if volume == 0.0:
        return 0.0, origin, np.zeros((3, 3))
    s = a + b + c
    centroid = (six_v[:, None] * s).sum(axis=0) / (24.0 * volume)
    # Second moment of a tetrahedron (0, a, b, c): det/120 * (a a' + b b' + c c' + s s').
    second = np.einsum("i,ij,ik->jk", six_v, a, a) + np.einsum("i,ij,ik->jk", six_v, b, b)
    second += np.einsum("i,ij,ik->jk", six_v, c, c) + np.einsum("i,ij,ik->jk", six_v, s, s)
    second /= 120.0
    second -= volume * np.outer(centroid, centroid)  # about the centroid
    inertia = np.trace(second) * np.eye(3) - second
    return volume, centroid + origin, inertia


def nearest_valid_inertia(inertia: np.ndarray) -> tuple[np.ndarray, bool]:
    """The nearest physically valid rotational inertia (3, 3) to ``inertia``.

    Valid: symmetric, principal moments > 0 and each no larger than the sum of
    the other two (triangle inequality). Returns (tensor, changed), where changed
    says the input was off by more than floating-point noise.
    """
    inertia = np.asarray(inertia, dtype=float)
    sym = (inertia + inertia.T) / 2.0
    moments, axes = np.linalg.eigh(sym)
    scale = max(float(np.abs(moments).max()), np.finfo(float).tiny)
    fixed = np.maximum(moments, 1e-9 * scale)
    order = np.argsort(fixed)
    a, b, c = fixed[order]
    excess = c - (a + b)
    if excess > 0:
        # Closest point on the plane a + b = c, moving along its normal (1, 1, -1).
        a, b, c = a + excess / 3.0, b + excess / 3.0, c - excess / 3.0
        fixed[order] = (a, b, c)
    result = (axes * fixed) @ axes.T
    changed = float(np.abs(result - inertia).max()) > PROJECTION_NOTE_TOL * scale
    return (result + result.T) / 2.0, changed


def union_of_pieces(pieces: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The boolean union of convex pieces (vertices (N, 3), faces (M, 3)) as one closed mesh."""
    import manifold3d

    hulls = [manifold3d.Manifold.hull_points(np.asarray(v, dtype=float)) for v, _ in pieces]
    union = manifold3d.Manifold.batch_boolean(hulls, manifold3d.OpType.Add)
    mesh = union.to_mesh64() if hasattr(union, "to_mesh64") else union.to_mesh()
    vertices = np.asarray(mesh.vert_properties, dtype=float)[:, :3]
    faces = np.asarray(mesh.tri_verts, dtype=np.int64)
    if len(faces) == 0:
        raise ValueError("the union is empty")
    return vertices, faces


def voxel_mass_properties(
    pieces: list[tuple[np.ndarray, np.ndarray]], cells: int = VOXEL_CELLS
) -> tuple[float, np.ndarray, np.ndarray]:
    """Volume (m^3), centroid (3,) and unit-density inertia (3, 3) of the voxels whose
    centres lie inside any convex piece; ``cells`` voxels along the largest extent."""
    from scipy.spatial import ConvexHull

    points = np.concatenate([np.asarray(v, dtype=float) for v, _ in pieces])
    lo, hi = points.min(axis=0), points.max(axis=0)
    pitch = float((hi - lo).max()) / cells
    axes = [lo[i] + pitch * (np.arange(max(1, math.ceil((hi[i] - lo[i]) / pitch))) + 0.5) for i in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    inside = np.zeros(len(grid), dtype=bool)
    for vertices, _ in pieces:
        # Facet planes n.x + d <= 0 inside; the tolerance keeps voxels on a face.
        planes = ConvexHull(np.asarray(vertices, dtype=float)).equations
        inside |= (grid @ planes[:, :3].T + planes[:, 3] <= 1e-12).all(axis=1)
    centres = grid[inside]
    if len(centres) == 0:
        return 0.0, (lo + hi) / 2.0, np.zeros((3, 3))
    cell_volume = pitch**3
    volume = cell_volume * len(centres)
    centroid = centres.mean(axis=0)
    r = centres - centroid
    second = cell_volume * (r.T @ r) + volume * pitch**2 / 12.0 * np.eye(3)  # each cube's own spread
    inertia = np.trace(second) * np.eye(3) - second
    return volume, centroid, inertia


def mass_properties(
    vertices: np.ndarray,
    faces: np.ndarray,
    watertight: bool,
    pieces: list[tuple[np.ndarray, np.ndarray]],
    mass_kg: float | None = None,
    density_kg_m3: float | None = None,
) -> MassProperties:
    """Mass properties of a solid in the frame of its vertices (the Drake body frame).

    ``vertices`` (N, 3), ``faces`` (M, 3): the repaired solid; used when
    ``watertight``. Otherwise the convex collision ``pieces`` [(vertices (K, 3),
    faces (L, 3)), ...] stand in: their union, or failing that a voxel fill.
    Mass is ``mass_kg`` when given, else ``density_kg_m3`` x volume, else
    defaults.DENSITY_KG_M3 x volume. Raises InputError ``zero_volume`` for a
    solid without volume and ConvertError when no proxy can be built.
    """
    warnings: list[str] = []
    check_not_flat(vertices)
    if watertight:
        source = SOURCE_MESH
        volume, com, unit_inertia = unit_mass_properties(vertices, faces)
        if volume < 0:
            # make_solid orients closed bodies outwards; a negative total means nested or
            # self-intersecting shells wound against each other.
            warnings.append("the mesh encloses a negative volume (faces wound inwards); used its mirror sign")
            volume, unit_inertia = -volume, -unit_inertia
    else:
        volume, com, unit_inertia, source = _proxy(pieces, warnings)
    bbox_volume = float(np.prod(np.ptp(np.asarray(vertices, dtype=float), axis=0)))
    if not volume > FLAT_FRACTION * bbox_volume:
        raise InputError(
            f"the mesh encloses no volume ({volume:.3g} m^3 inside a {bbox_volume:.3g} m^3 bounding box); "
            "it is a surface, not a solid",
            code="zero_volume",
        )
    if mass_kg is not None:
        density = float(mass_kg) / volume
        mass = float(mass_kg)
    else:
        density = float(density_kg_m3 if density_kg_m3 is not None else defaults.DENSITY_KG_M3)
        mass = density * volume
    inertia, changed = nearest_valid_inertia(density * unit_inertia)
    if changed:
        warnings.append(
            "the inertia tensor was not physically valid (non-positive moment or triangle inequality broken); "
            "projected it to the nearest valid tensor"
        )
    if not (math.isfinite(mass) and mass > 0 and np.isfinite(inertia).all() and np.isfinite(com).all()):
        raise ConvertError(f"mass properties are not finite (mass {mass} kg)", code="bad_inertia")
    return MassProperties(
        mass_kg=mass,
        volume_m3=volume,
        density_kg_m3=density,
        com_m=np.asarray(com, dtype=float),
        inertia_kg_m2=inertia,
        source=source,
        warnings=warnings,
    )


def _proxy(pieces, warnings: list[str]) -> tuple[float, np.ndarray, np.ndarray, str]:
    """Volume, centroid and unit inertia of a solid standing in for an open mesh."""
    if not pieces:
        raise ConvertError("the mesh is not closed and there are no collision pieces to measure", code="bad_inertia")
    try:
        union_vertices, union_faces = union_of_pieces(pieces)
        volume, com, unit_inertia = unit_mass_properties(union_vertices, union_faces)
        if volume > 0:
            warnings.append("the mesh is not closed; mass and inertia come from the union of the collision pieces")
            return volume, com, unit_inertia, SOURCE_UNION
        reason = "the union has no volume"
    except Exception as exc:  # manifold3d missing or a degenerate piece
        reason = f"{type(exc).__name__}: {exc}"
    volume, com, unit_inertia = voxel_mass_properties(pieces)
    warnings.append(
        f"the mesh is not closed and the union of the collision pieces failed ({reason}); "
        "mass and inertia come from a voxel fill of the pieces"
    )
    return volume, com, unit_inertia, SOURCE_VOXELS

"""Solids sampled on a voxel grid: which voxel centres lie inside a triangle
mesh or a convex hull. Pure numpy / scipy; used to compare collision geometry
with visual meshes (voxel IoU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Grid:
    """Voxel centres ``origin + index * pitch_m`` for index in [0, shape), metres."""

    origin: np.ndarray  # (3,) centre of voxel (0, 0, 0), metres
    pitch_m: float
    shape: tuple[int, int, int]

    @classmethod
    def around(cls, lo: np.ndarray, hi: np.ndarray, pitch_m: float) -> Grid:
        """A grid whose voxels cover the box ``lo`` .. ``hi`` (each (3,), metres)."""
        # The tiny irrational shift keeps voxel centres off the edges and
        # vertices of axis-aligned meshes, where a ray would cross two triangles.
        shift = pitch_m * 1e-3 * np.array([math.sqrt(2), math.sqrt(3), math.sqrt(5)])
        origin = np.asarray(lo, dtype=float) - 0.5 * pitch_m + shift
        shape = tuple(int(n) for n in np.ceil((np.asarray(hi) - origin) / pitch_m) + 1)
        return cls(origin, float(pitch_m), shape)  # type: ignore[arg-type]


def inside_mesh(vertices: np.ndarray, faces: np.ndarray, grid: Grid) -> np.ndarray:
    """Boolean grid.shape: voxel centres inside the mesh by a 2-of-3 vote of
    ray-parity tests along x, y and z (a hole only spoils the rays through it)."""
    votes = sum(parity_along(vertices, faces, grid, axis).astype(np.uint8) for axis in range(3))
    return votes >= 2


def parity_along(vertices: np.ndarray, faces: np.ndarray, grid: Grid, axis: int) -> np.ndarray:
    """Voxel centres with an odd number of triangle crossings below them along ``axis``."""
    u, v = [a for a in range(3) if a != axis]
    tri = vertices[faces]  # (F, 3 corners, 3)
    n_u, n_v, n_w = grid.shape[u], grid.shape[v], grid.shape[axis]
    # Columns (i, j) whose centre lies in each triangle's projected bounding box.
    lo_i = np.clip(np.ceil((tri[:, :, u].min(1) - grid.origin[u]) / grid.pitch_m), 0, n_u).astype(np.int64)
    hi_i = np.clip(np.floor((tri[:, :, u].max(1) - grid.origin[u]) / grid.pitch_m), -1, n_u - 1).astype(np.int64)
    lo_j = np.clip(np.ceil((tri[:, :, v].min(1) - grid.origin[v]) / grid.pitch_m), 0, n_v).astype(np.int64)
    hi_j = np.clip(np.floor((tri[:, :, v].max(1) - grid.origin[v]) / grid.pitch_m), -1, n_v - 1).astype(np.int64)
    width_j = np.maximum(hi_j - lo_j + 1, 0)
    counts = np.maximum(hi_i - lo_i + 1, 0) * width_j
    t = np.repeat(np.arange(len(tri)), counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    i = lo_i[t] + k // np.maximum(width_j[t], 1)
    j = lo_j[t] + k % np.maximum(width_j[t], 1)
    pu = grid.origin[u] + i * grid.pitch_m
    pv = grid.origin[v] + j * grid.pitch_m
    a, b, c = tri[t, 0], tri[t, 1], tri[t, 2]
    area = (b[:, u] - a[:, u]) * (c[:, v] - a[:, v]) - (b[:, v] - a[:, v]) * (c[:, u] - a[:, u])
    with np.errstate(divide="ignore", invalid="ignore"):
        l0 = ((b[:, u] - pu) * (c[:, v] - pv) - (b[:, v] - pv) * (c[:, u] - pu)) / area
        l1 = ((c[:, u] - pu) * (a[:, v] - pv) - (c[:, v] - pv) * (a[:, u] - pu)) / area
        l2 = 1.0 - l0 - l1
    hit = (area != 0) & (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
    w = l0[hit] * a[hit, axis] + l1[hit] * b[hit, axis] + l2[hit] * c[hit, axis]
    # Each crossing toggles every voxel centre above it: count toggles per
    # (column, first voxel above), then a running sum along the column.
    first = np.clip(np.ceil((w - grid.origin[axis]) / grid.pitch_m), 0, n_w).astype(np.int64)
    flat = (i[hit] * n_v + j[hit]) * (n_w + 1) + first
    toggles = np.bincount(flat, minlength=n_u * n_v * (n_w + 1)).reshape(n_u, n_v, n_w + 1)
    odd = (np.cumsum(toggles[:, :, :-1], axis=2) % 2).astype(bool)
    order = np.argsort([u, v, axis])
    return np.transpose(odd, order)


def inside_convex_hull(points: np.ndarray, grid: Grid) -> np.ndarray:
    """Boolean grid.shape: voxel centres inside the convex hull of ``points`` (N, 3)."""
    from scipy.spatial import ConvexHull, QhullError

    inside = np.zeros(grid.shape, dtype=bool)
    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):
        return inside  # a flat or degenerate piece holds no volume
    lo = np.clip(np.ceil((points.min(0) - grid.origin) / grid.pitch_m), 0, None).astype(int)
    hi = np.minimum(np.floor((points.max(0) - grid.origin) / grid.pitch_m).astype(int) + 1, grid.shape)
    if np.any(hi <= lo):
        return inside
    x, y, z = (grid.origin[a] + np.arange(lo[a], hi[a]) * grid.pitch_m for a in range(3))
    # Facets n . p + d <= 0 bound each (x, y) column to one z interval: facets
    # facing up give upper bounds, facing down lower bounds, vertical ones
    # either admit the whole column or none of it.
    normal, offset = hull.equations[:, :3], hull.equations[:, 3]
    side = x[:, None, None] * normal[:, 0] + y[None, :, None] * normal[:, 1] + offset  # (nx, ny, F)
    up, down, vertical = normal[:, 2] > 1e-12, normal[:, 2] < -1e-12, np.abs(normal[:, 2]) <= 1e-12
    top = np.min(-side[..., up] / normal[up, 2], axis=-1, initial=np.inf)
    bottom = np.max(-side[..., down] / normal[down, 2], axis=-1, initial=-np.inf)
    open_column = np.all(side[..., vertical] <= 1e-12, axis=-1)
    column = (z >= bottom[..., None]) & (z <= top[..., None]) & open_column[..., None]
    inside[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = column
    return inside


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean grids of one shape; 0 when both are empty."""
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0

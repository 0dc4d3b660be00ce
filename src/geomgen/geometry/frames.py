"""Frames and sizing: the input's up axis, glTF +Y up versus Drake +Z up, and
the uniform scale that brings a mesh to the requested size.

The glTF frame of a package is the frame its visual file is written in; the
Drake body frame is that frame turned +90 degrees about x, as Drake turns it.
"""

from __future__ import annotations

import math

import numpy as np

from geomgen.errors import InputError

# Drake loads glTF (+Y up) into its +Z-up frames: (x, y, z)_gltf -> (x, -z, y)_drake.
GLTF_TO_DRAKE = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
# A +Z-up input into glTF +Y up: (x, y, z) -> (x, z, -y), a -90 degree turn about
# x (what Blender's glTF exporter does), so a Z-up model's front ends up facing +Z.
Z_UP_TO_GLTF = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def gltf_to_drake(points: np.ndarray) -> np.ndarray:
    """Points (N, 3) in the glTF frame -> the same points (N, 3) in the Drake body frame."""
    return np.asarray(points, dtype=float) @ GLTF_TO_DRAKE.T


def drake_to_gltf(points: np.ndarray) -> np.ndarray:
    """Points (N, 3) in the Drake body frame -> the glTF frame (inverse of gltf_to_drake)."""
    return np.asarray(points, dtype=float) @ GLTF_TO_DRAKE


def input_transform(
    points: np.ndarray,
    up_axis: str = "y",
    dimensions: list[float] | None = None,
    scale: float | None = None,
    height_m: float | None = None,
) -> tuple[np.ndarray, list[str]]:
    """The 4x4 transform taking the input mesh's coordinates into the glTF frame of the package.

    ``points`` (N, 3) are the input's vertices as placed by its scene graph.
    ``up_axis`` "z" turns the input +Z up into +Y up first. ``dimensions`` is the
    target bounding box x, y, z of the Drake body frame in metres: one uniform
    scale makes the mesh fit inside it (the tightest axis decides). Without
    dimensions, ``height_m`` scales uniformly to that height (the Drake frame's
    z extent), else ``scale`` multiplies every coordinate; with none the size is
    kept. Returns (transform (4, 4), warnings).
    """
    if up_axis not in ("y", "z"):
        raise InputError(f"up_axis must be 'y' or 'z', got {up_axis!r}", code="bad_option")
    rotation = Z_UP_TO_GLTF if up_axis == "z" else np.eye(3)
    warnings: list[str] = []
    factor = 1.0
    if dimensions is not None:
        extents_drake = np.ptp(gltf_to_drake(np.asarray(points, dtype=float) @ rotation.T), axis=0)
        target = np.asarray(dimensions, dtype=float)
        usable = extents_drake > 0
        if not usable.any():
            raise InputError("the mesh has no extent to scale to the requested dimensions", code="zero_volume")
        ratios = target[usable] / extents_drake[usable]
        factor = float(ratios.min())
        reached = extents_drake * factor
        # A uniform scale cannot match a box of other proportions; say which axes came out smaller.
        off = [
            f"{axis} {got:.4g} m (asked {want:.4g} m)"
            for axis, got, want in zip("xyz", reached, target)
            if not math.isclose(got, want, rel_tol=0.01)
        ]
        if off:
            warnings.append(
                "kept the mesh's proportions, so it fits the requested dimensions without filling them: " + ", ".join(off)
            )
    elif height_m is not None:
        height_now = float(np.ptp(gltf_to_drake(np.asarray(points, dtype=float) @ rotation.T)[:, 2]))
        if height_now <= 0:
            raise InputError("the mesh has no height to scale to the requested height", code="zero_volume")
        factor = float(height_m) / height_now
    elif scale is not None:
        factor = float(scale)
    transform = np.eye(4)
    transform[:3, :3] = factor * rotation
    return transform, warnings


def apply_transform(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Points (N, 3) moved by a 4x4 homogeneous ``transform``."""
    points = np.asarray(points, dtype=float)
    return points @ transform[:3, :3].T + transform[:3, 3]

"""Convex decomposition of a solid into collision pieces: CoACD, V-HACD or one
convex hull, behind a fallback ladder.

CoACD and V-HACD are native code that can crash or run for very long, so each
runs in a child process with a time limit; a crash, a hang or an empty result
falls down the ladder coacd -> vhacd -> hull, and the result says why.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from geomgen.errors import ConvertError, InputError
from geomgen.geometry.child_process import ChildFailed, run_in_child

LADDER = ("coacd", "vhacd", "hull")

# Faces the solid is simplified to before CoACD or V-HACD when
# options.simplify_faces is not given. CoACD's time grows with the faces it cuts;
# at this budget the five reference meshes keep their collision IoU.
DEFAULT_DECOMPOSITION_FACES = 4000

# geomgen's CoACD defaults, chosen for speed at unchanged fidelity on the
# reference meshes (see BENCHMARKS.md): a shallower, shorter tree search and a
# coarser concavity sampling than CoACD's own defaults, and a fixed seed so a
# mesh always gives the same pieces.
COACD_DEFAULTS: dict[str, Any] = {
    "threshold": 0.03,  # concavity allowed per piece, fraction of the bounding-box diagonal
    "max_convex_hull": -1,  # cap on pieces (-1: no cap)
    "resolution": 1000,  # surface samples for the concavity metric
    "mcts_nodes": 10,  # children explored per tree-search node
    "mcts_iterations": 60,  # tree-search iterations per cut
    "mcts_max_depth": 2,  # cuts looked ahead
    "merge": True,  # merge neighbouring pieces whose union stays within threshold
    "decimate": False,  # cap each hull at max_ch_vertex vertices
    "max_ch_vertex": 128,  # vertices per hull when decimate is on
    # Remesh to a manifold first: auto (when CoACD finds it is not one) | on | off. For a
    # closed solid geomgen passes "off" unless told otherwise: a self-intersection would
    # make "auto" remesh it to ~50,000 faces, and cutting those is what takes the time.
    "preprocess_mode": "auto",
    "preprocess_resolution": 50,  # voxel grid of that remeshing
    "seed": 0,  # random seed of the tree search
}
_COACD_CHOICES = {"preprocess_mode": ("auto", "on", "off")}
# Values that make CoACD search forever are refused up front; values it rejects
# itself abort its child at once, and the ladder reports CoACD's message.
_POSITIVE = {"threshold", "resolution", "max_convex_hulls", "max_recursion_depth", "max_num_vertices_per_ch", "min_volume_percent_error"}

VHACD_DEFAULTS: dict[str, Any] = {
    "max_convex_hulls": 32,  # cap on pieces
    "resolution": 100_000,  # voxels in the volume grid
    "max_recursion_depth": 10,  # splits of a piece at most
    "max_num_vertices_per_ch": 64,  # vertices per hull
    "min_volume_percent_error": 1.0,  # stop splitting below this volume error, percent
}

PARAMETERS = {"coacd": COACD_DEFAULTS, "vhacd": VHACD_DEFAULTS, "hull": {}}


@dataclass
class Decomposition:
    """Convex pieces of a solid, in the frame of the vertices given.

    pieces: [(vertices (K, 3), faces (L, 3)), ...], each a closed convex hull wound outwards.
    method: the method that produced them; fallbacks: "method: why it failed" for each method tried before.
    faces_in: faces of the mesh given to the method (after any simplification).
    """

    pieces: list[tuple[np.ndarray, np.ndarray]]
    method: str
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    faces_in: int = 0
    params: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def method_params(method: str, params: dict | None) -> dict[str, Any]:
    """The method's defaults updated with ``params``; InputError ``bad_option`` for
    an unknown method, an unknown parameter or a value of the wrong type."""
    if method not in PARAMETERS:
        raise InputError(f"collision must be one of {', '.join(LADDER)}, got {method!r}", code="bad_option")
    defaults = PARAMETERS[method]
    merged = dict(defaults)
    for key, value in (params or {}).items():
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise InputError(
                f"unknown collision parameter {key!r} for {method}; its parameters are: {known}", code="bad_option"
            )
        merged[key] = _typed(method, key, value, defaults[key])
        if key in _POSITIVE and merged[key] <= 0:
            raise InputError(f"collision parameter {key} ({method}) must be > 0, got {value!r}", code="bad_option")
    return merged


def _typed(method: str, key: str, value: Any, default: Any) -> Any:
    where = f"collision parameter {key} ({method})"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"{where} must be true or false, got {value!r}", code="bad_option")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where} must be an integer, got {value!r}", code="bad_option")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{where} must be a finite number, got {value!r}", code="bad_option")
        return float(value)
    choices = _COACD_CHOICES.get(key, ())
    if value not in choices:
        raise InputError(f"{where} must be one of {', '.join(choices)}, got {value!r}", code="bad_option")
    return value


def simplify(vertices: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Simplify a closed mesh to at most ``target_faces`` faces, keeping it closed.

    Collapses edges within a tolerance that grows until the budget is met
    (manifold3d's simplification, which never opens the surface). A mesh that is
    not a valid manifold is returned unchanged with a note. Returns (vertices
    (N, 3), faces (M, 3), note or None).
    """
    if len(faces) <= target_faces:
        return vertices, faces, None
    import manifold3d

    solid = manifold3d.Manifold(
        manifold3d.Mesh(np.asarray(vertices, dtype=np.float32), np.asarray(faces, dtype=np.uint32))
    )
    if solid.status() != manifold3d.Error.NoError or solid.is_empty():
        return vertices, faces, f"not simplified before decomposition: the solid is not a closed manifold ({solid.status().name})"
    # Re-simplifying the previous result with a growing tolerance is much cheaper than
    # a bisection from the full mesh; the deviation stays within about 4x the last tolerance.
    tolerance_m = 1e-4 * float(np.linalg.norm(np.ptp(vertices, axis=0)))
    simplified = solid
    for _ in range(60):
        if simplified.num_tri() <= target_faces:
            break
        simplified = simplified.simplify(tolerance_m)
        tolerance_m *= 1.3
    mesh = simplified.to_mesh()
    out_vertices = np.asarray(mesh.vert_properties, dtype=float)[:, :3]
    out_faces = np.asarray(mesh.tri_verts, dtype=np.int64)
    if len(out_faces) < 4:
        return vertices, faces, "not simplified before decomposition: the budget left no solid"
    return out_vertices, out_faces, None


def decompose(
    vertices: np.ndarray,
    faces: np.ndarray,
    method: str = "coacd",
    params: dict | None = None,
    timeout_s: float = 300.0,
    simplify_faces: int | None = None,
) -> Decomposition:
    """Convex pieces of the solid ``vertices`` (N, 3), ``faces`` (M, 3).

    ``method`` starts the ladder coacd -> vhacd -> hull at that rung; ``params``
    are that method's parameters (method_params); the methods it falls back to
    use their defaults. CoACD and V-HACD each run in a child process limited to
    ``timeout_s`` seconds, on the solid simplified to ``simplify_faces`` faces
    (default DEFAULT_DECOMPOSITION_FACES). Raises InputError for bad parameters
    and ConvertError ``decomposition_failed`` when even the hull fails.
    """
    start = time.monotonic()
    chosen = method_params(method, params)
    budget = DEFAULT_DECOMPOSITION_FACES if simplify_faces is None else int(simplify_faces)
    warnings: list[str] = []
    fallbacks: list[str] = []
    used_vertices, used_faces = vertices, faces
    if method != "hull":
        used_vertices, used_faces, note = simplify(vertices, faces, budget)
        if note:
            warnings.append(note)
    for rung in LADDER[LADDER.index(method) :]:
        rung_params = chosen if rung == method else dict(PARAMETERS[rung])
        if rung == "coacd" and "preprocess_mode" not in (params or {}) and _closed(used_faces):
            rung_params = {**rung_params, "preprocess_mode": "off"}
        try:
            if rung == "hull":
                raw = _hull_pieces(np.asarray(vertices, dtype=float))
            else:
                target = _coacd_pieces if rung == "coacd" else _vhacd_pieces
                raw = run_in_child(
                    target,
                    (np.ascontiguousarray(used_vertices, dtype=float), np.ascontiguousarray(used_faces, dtype=np.int64), rung_params),
                    timeout_s,
                )
            pieces = clean_pieces(raw)
            if not pieces:
                raise ChildFailed("returned no usable convex piece")
        except ChildFailed as exc:
            fallbacks.append(f"{rung}: {exc}")
            continue
        return Decomposition(
            pieces=pieces,
            method=rung,
            fallbacks=fallbacks,
            seconds=time.monotonic() - start,
            faces_in=len(faces) if rung == "hull" else len(used_faces),
            params=rung_params,
            warnings=warnings,
        )
    raise ConvertError(
        "convex decomposition failed with every method (" + "; ".join(fallbacks) + ")", code="decomposition_failed"
    )


def _closed(faces: np.ndarray) -> bool:
    """Every edge of the triangles (M, 3) bounds exactly two of them."""
    faces = np.asarray(faces, dtype=np.int64)
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, uses = np.unique(edges, axis=0, return_counts=True)
    return bool(len(faces) > 0 and (uses == 2).all())


def clean_pieces(raw: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each raw piece (vertices, faces) replaced by the convex hull of its vertices;
    pieces that are not finite or have no volume are dropped."""
    import trimesh

    pieces = []
    for item in raw or []:
        points = np.asarray(item[0], dtype=float).reshape(-1, 3)
        if len(points) < 4 or not np.isfinite(points).all():
            continue
        # A flat piece's centroid divides by zero inside trimesh; it is dropped below anyway.
        with np.errstate(divide="ignore", invalid="ignore"):
            try:
                hull = trimesh.convex.convex_hull(points)
            except Exception:  # qhull refuses flat or collinear point sets
                continue
            volume = float(hull.volume)
        extents = hull.extents
        if len(hull.faces) < 4 or not volume > 1e-9 * float(np.prod(extents)) or extents.min() <= 0:
            continue
        pieces.append((np.asarray(hull.vertices, dtype=float), np.asarray(hull.faces, dtype=np.int64)))
    return pieces


def _hull_pieces(vertices: np.ndarray) -> list:
    """One convex hull of every vertex, computed in this process (qhull does not hang)."""
    import trimesh

    try:
        hull = trimesh.convex.convex_hull(vertices)
    except Exception as exc:
        raise ChildFailed(f"no convex hull ({type(exc).__name__}: {exc})") from None
    return [(hull.vertices, hull.faces)]


def _coacd_pieces(vertices: np.ndarray, faces: np.ndarray, params: dict) -> list:
    """CoACD's pieces; runs in the child process."""
    import coacd

    coacd.set_log_level("error")
    parts = coacd.run_coacd(coacd.Mesh(vertices, faces.astype(np.int32)), **params)
    return [(np.asarray(v, dtype=float), np.asarray(f, dtype=np.int64)) for v, f in parts]


def _vhacd_pieces(vertices: np.ndarray, faces: np.ndarray, params: dict) -> list:
    """V-HACD's pieces (vhacdx); runs in the child process."""
    import vhacdx

    # vhacdx takes faces in VTK's polydata layout: a flat [3, a, b, c, 3, ...].
    polys = np.column_stack([np.full(len(faces), 3), faces]).ravel().astype(np.uint32)
    hulls = vhacdx.compute_vhacd(
        vertices,
        polys,
        maxConvexHulls=params["max_convex_hulls"],
        resolution=params["resolution"],
        minimumVolumePercentErrorAllowed=params["min_volume_percent_error"],
        maxRecursionDepth=params["max_recursion_depth"],
        maxNumVerticesPerCH=params["max_num_vertices_per_ch"],
    )
    return [(np.asarray(v, dtype=float), np.asarray(f, dtype=np.int64)) for v, f in hulls]

"""Convex decomposition of a solid into collision pieces: CoACD, V-HACD or one
convex hull, behind a fallback ladder.

The methods run in this process: a whole conversion runs in one child process
(geomgen.convert_child), which is the only isolation layer. An error or an
empty result falls down the ladder coacd -> vhacd -> hull here; a crash or a
method running past its share of the time is seen by the parent, which starts
a new child at the next rung (see :func:`resumed`), and the result says why.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from geomgen.contract import collision_params
from geomgen.errors import ConvertError

LADDER = ("coacd", "vhacd", "hull")

# Faces the solid is simplified to before CoACD or V-HACD when
# options.simplify_faces is not given. CoACD's time grows with the faces it cuts;
# at this budget the five reference meshes keep their collision IoU.
DEFAULT_DECOMPOSITION_FACES = 4000


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
    simplify_s: float = 0.0  # of seconds, those spent simplifying the solid before the method


class RungFailed(Exception):
    """A method raised or gave no usable piece; the message says why, in a few words."""


@dataclass(frozen=True)
class Resume:
    """What a conversion child is told by its parent about the ladder.

    start: the rung to begin at (None: the requested method); fallbacks: why the
    rungs before it failed in earlier children; on_rung: called with each rung's
    name as it starts, and with None once the decomposition is over.
    """

    start: str | None = None
    fallbacks: tuple[str, ...] = ()
    on_rung: Callable[[str | None], None] | None = None


_resume: contextvars.ContextVar[Resume] = contextvars.ContextVar("geomgen_ladder_resume", default=Resume())


@contextlib.contextmanager
def resumed(resume: Resume) -> Iterator[None]:
    """Every decompose() inside the block follows ``resume``: the conversion
    function's signature stays (data, name, out_dir, name, options) while the
    child running it tells decompose where the ladder stands."""
    token = _resume.set(resume)
    try:
        yield
    finally:
        _resume.reset(token)


def next_rung(rung: str) -> str | None:
    """The rung after ``rung`` on the ladder, None after the hull."""
    index = LADDER.index(rung) + 1
    return LADDER[index] if index < len(LADDER) else None


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
    simplify_faces: int | None = None,
) -> Decomposition:
    """Convex pieces of the solid ``vertices`` (N, 3), ``faces`` (M, 3).

    ``method`` starts the ladder coacd -> vhacd -> hull at that rung; ``params``
    are that method's parameters (contract.collision_params); the methods it
    falls back to use their defaults. CoACD and V-HACD run on the solid
    simplified to ``simplify_faces`` faces (default DEFAULT_DECOMPOSITION_FACES).
    Inside :func:`resumed` the ladder starts at the rung the parent says.
    Raises InputError ``bad_option`` for bad parameters and ConvertError
    ``decomposition_failed`` when even the hull fails.
    """
    start = time.monotonic()
    resume = _resume.get()
    chosen = collision_params(method, params, resolve=True)
    first = resume.start or method
    if first not in LADDER[LADDER.index(method):]:
        raise ConvertError(f"the ladder cannot resume at {first!r} for collision={method!r}", code="convert_failed")
    budget = DEFAULT_DECOMPOSITION_FACES if simplify_faces is None else int(simplify_faces)
    warnings: list[str] = []
    fallbacks = list(resume.fallbacks)
    used_vertices, used_faces = vertices, faces
    if first != "hull":
        used_vertices, used_faces, note = simplify(vertices, faces, budget)
        if note:
            warnings.append(note)
    simplify_s = time.monotonic() - start
    try:
        for rung in LADDER[LADDER.index(first):]:
            rung_params = chosen if rung == method else collision_params(rung, {}, resolve=True)
            if rung == "coacd" and "preprocess_mode" not in (params or {}) and _closed(used_faces):
                rung_params = {**rung_params, "preprocess_mode": "off"}
            if resume.on_rung is not None:
                resume.on_rung(rung)
            # The hull needs no simplified solid: it takes every vertex given.
            rung_vertices, rung_faces = (vertices, faces) if rung == "hull" else (used_vertices, used_faces)
            try:
                raw = RUNGS[rung](np.ascontiguousarray(rung_vertices, dtype=float),
                                  np.ascontiguousarray(rung_faces, dtype=np.int64), rung_params)
                pieces = clean_pieces(raw)
                if not pieces:
                    raise RungFailed("returned no usable convex piece")
            except RungFailed as exc:
                fallbacks.append(f"{rung}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - a method's own error falls down the ladder
                fallbacks.append(f"{rung}: raised {type(exc).__name__}: {exc}")
                continue
            return Decomposition(pieces=pieces, method=rung, fallbacks=fallbacks, seconds=time.monotonic() - start,
                                 faces_in=len(rung_faces), params=rung_params, warnings=warnings,
                                 simplify_s=simplify_s)
    finally:
        if resume.on_rung is not None:
            resume.on_rung(None)
    raise ConvertError(
        "convex decomposition failed with every method (" + "; ".join(fallbacks) + ")", code="decomposition_failed"
    )


def processes_ahead(method: str, params: dict | None) -> int:
    """How many decomposition worker processes to start ahead of a conversion
    with these options (coacd_parts.workers_ahead): none unless CoACD will cut
    the solid into parts in parallel."""
    resume = _resume.get()
    if method != "coacd" or resume.start not in (None, "coacd"):
        return 0
    _, part_faces, _ = coacd_plan(collision_params(method, params, resolve=True))
    if part_faces <= 0:
        return 0
    from geomgen.geometry.coacd_parts import decomposition_processes

    return decomposition_processes()


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
                if not hull.is_watertight:  # many coplanar points can leave qhull's triangles open
                    hull = trimesh.convex.convex_hull(points, qhull_options="QJ Pp")
            except Exception:  # qhull refuses flat or collinear point sets
                continue
            volume = float(hull.volume)
        extents = hull.extents
        if len(hull.faces) < 4 or not volume > 1e-9 * float(np.prod(extents)) or extents.min() <= 0:
            continue
        pieces.append((np.asarray(hull.vertices, dtype=float), np.asarray(hull.faces, dtype=np.int64)))
    return pieces


def _hull_pieces(vertices: np.ndarray, faces: np.ndarray, params: dict) -> list:
    """One convex hull of every vertex (qhull does not hang)."""
    import trimesh

    try:
        hull = trimesh.convex.convex_hull(vertices)
    except Exception as exc:
        raise RungFailed(f"no convex hull ({type(exc).__name__}: {exc})") from None
    return [(hull.vertices, hull.faces)]


def coacd_plan(params: dict) -> tuple[dict, int, float]:
    """CoACD's own parameters, the part budget (``part_faces``, 0: the whole
    solid) and the merge budget (``merge_volume``, 0: none) of the resolved
    coacd ``params``. A cap on the pieces (``max_convex_hull``) is CoACD's to
    keep: the whole solid, with CoACD's merge."""
    coacd_params = dict(params)
    part_faces = int(coacd_params.pop("part_faces", 0))
    merge_volume = float(coacd_params.pop("merge_volume", 0.0))
    if coacd_params.get("max_convex_hull", -1) > 0:  # only CoACD's merge keeps the cap
        part_faces, merge_volume, coacd_params["merge"] = 0, 0.0, True
    return coacd_params, part_faces, merge_volume


def _coacd_pieces(vertices: np.ndarray, faces: np.ndarray, params: dict) -> list:
    """CoACD's pieces of the solid (N, 3), (M, 3), as :func:`coacd_plan` says:
    the solid cut into parts of at most ``part_faces`` faces, decomposed in
    parallel (coacd_parts), then neighbouring pieces merged within
    ``merge_volume`` (hull_merge)."""
    from geomgen.geometry import coacd_parts, hull_merge
    from geomgen.geometry.inertia import unit_mass_properties

    coacd_params, part_faces, merge_volume = coacd_plan(params)
    parts = coacd_parts.split_solid(vertices, faces, part_faces)
    pieces = coacd_parts.decompose_parts(parts, coacd_params, coacd_parts.decomposition_processes())
    if merge_volume > 0:
        volume_m3 = abs(unit_mass_properties(vertices, faces)[0])
        pieces = hull_merge.merge_hulls(pieces, volume_m3, merge_volume)
    return [(piece, np.empty((0, 3), dtype=np.int64)) for piece in pieces]


def _vhacd_pieces(vertices: np.ndarray, faces: np.ndarray, params: dict) -> list:
    """V-HACD's pieces (vhacdx) of the solid (N, 3), (M, 3)."""
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


# Each rung's function: (vertices (N, 3), faces (M, 3), params) -> raw pieces.
# A table, so that a test converter can stand in a method that crashes or hangs.
RUNGS: dict[str, Callable[..., list]] = {"coacd": _coacd_pieces, "vhacd": _vhacd_pieces, "hull": _hull_pieces}

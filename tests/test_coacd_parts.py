"""CoACD on a solid cut into parts (geometry/coacd_parts.py) and the merge of
neighbouring pieces by added volume (geometry/hull_merge.py): the split gives
closed parts that add up to the solid, the threshold keeps its meaning in
metres, worker processes give the pieces this process gives, a crashed worker
fails the rung and the ladder goes on, and the merge keeps within its budget."""

from __future__ import annotations

import manifold3d
import numpy as np
import pytest
import trimesh

from geomgen.contract import collision_params
from geomgen.geometry import coacd_parts, decomposition, hull_merge
from geomgen.geometry.decomposition import RungFailed
from tests.shapes import mug_mesh


def coacd_only_params(**overrides) -> dict:
    """geomgen's default CoACD parameters less geomgen's own (as _coacd_pieces passes them on)."""
    params = collision_params("coacd", overrides, resolve=True)
    params.pop("part_faces")
    params.pop("merge_volume")
    return {**params, "preprocess_mode": "off"}


@pytest.fixture(scope="module")
def mug() -> trimesh.Trimesh:
    mesh = mug_mesh()
    assert mesh.is_watertight and len(mesh.faces) > 1000
    return mesh


def cube(side_m: float, corner_m: tuple[float, float, float]) -> np.ndarray:
    return trimesh.creation.box([side_m] * 3).vertices + np.asarray(corner_m) + side_m / 2


# --- the split -------------------------------------------------------------------


def test_the_split_gives_closed_parts_within_the_budget_that_add_up_to_the_solid(mug):
    parts = coacd_parts.split_solid(mug.vertices, mug.faces, 400)

    assert len(parts) >= 4
    for vertices, faces in parts:
        part = trimesh.Trimesh(vertices, faces, process=False)
        assert len(faces) <= 400
        assert part.is_watertight and part.volume > 0
    assert sum(trimesh.Trimesh(v, f).volume for v, f in parts) == pytest.approx(mug.volume, rel=1e-4)
    again = coacd_parts.split_solid(mug.vertices, mug.faces, 400)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(parts, again))


def test_a_solid_within_the_budget_or_not_closed_stays_whole(mug):
    assert len(coacd_parts.split_solid(mug.vertices, mug.faces, len(mug.faces))) == 1
    assert len(coacd_parts.split_solid(mug.vertices, mug.faces, 0)) == 1
    open_faces = mug.faces[1:]  # one triangle gone: not a manifold, so not cut
    (vertices, faces), = coacd_parts.split_solid(mug.vertices, open_faces, 100)
    assert len(faces) == len(open_faces)


def test_a_parts_threshold_keeps_the_concavity_in_metres():
    params = {"threshold": 0.03, "resolution": 1000}

    assert coacd_parts.part_params(params, 1.0, 0.25)["threshold"] == pytest.approx(0.12)
    assert coacd_parts.part_params(params, 1.0, 1.0)["threshold"] == pytest.approx(0.03)
    assert coacd_parts.part_params(params, 1.0, 0.001)["threshold"] == 1.0  # CoACD's upper bound
    assert coacd_parts.part_params(params, 1.0, 0.25)["resolution"] == 1000


def test_processes_follow_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert coacd_parts.decomposition_processes() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert coacd_parts.decomposition_processes() >= 1


# --- workers ---------------------------------------------------------------------


def test_worker_processes_give_the_pieces_this_process_gives(mug):
    parts = coacd_parts.split_solid(mug.vertices, mug.faces, 400)
    params = coacd_only_params()

    here = coacd_parts.decompose_parts(parts, params, processes=1)
    in_workers = coacd_parts.decompose_parts(parts, params, processes=2)

    assert len(here) == len(in_workers) >= len(parts)
    assert all(np.allclose(a, b) for a, b in zip(here, in_workers))


def test_a_crashed_worker_fails_the_rung(mug):
    (vertices, faces), *_ = coacd_parts.split_solid(mug.vertices, mug.faces, 400)
    # CoACD aborts (SIGABRT) on a threshold above 1; part_params never sends one.
    bad = (vertices, faces, {**coacd_only_params(), "threshold": 2.0})
    good = (vertices, faces, coacd_only_params())

    with pytest.raises(RungFailed, match="crashed .*SIGABRT"):
        coacd_parts._run_in_workers([good, bad, good], 2)


def test_a_crash_in_a_part_falls_down_the_ladder(mug, monkeypatch):
    real = coacd_parts.part_params
    monkeypatch.setattr(coacd_parts, "part_params", lambda *args: {**real(*args), "threshold": 2.0})
    monkeypatch.setenv("OMP_NUM_THREADS", "2")

    result = decomposition.decompose(mug.vertices, mug.faces, params={"part_faces": 400})

    assert result.method == "vhacd"
    assert "coacd: a decomposition process crashed" in result.fallbacks[0]


def test_default_decomposition_of_a_concave_solid(mug):
    result = decomposition.decompose(mug.vertices, mug.faces, params={"part_faces": 400})

    assert result.method == "coacd" and result.params["part_faces"] == 400
    for vertices, faces in result.pieces:
        piece = trimesh.Trimesh(vertices, faces)
        assert piece.is_watertight and piece.is_convex
    hulls = [manifold3d.Manifold.hull_points(v) for v, _ in result.pieces]
    union = manifold3d.Manifold.batch_boolean(hulls, manifold3d.OpType.Add)
    solid = manifold3d.Manifold(manifold3d.Mesh(np.asarray(mug.vertices, np.float32), np.asarray(mug.faces, np.uint32)))
    assert (union ^ solid).volume() / (union + solid).volume() > 0.85
    # The cup stays open: no piece fills its cavity (the cup, 4 cm in radius, is at the low-x end).
    cavity = np.array([mug.bounds[0][0] + 0.04, 0.06, 0.0])
    assert inside_convex(mug.convex_hull, cavity)  # what one piece over the whole cup would cover
    assert not any(inside_convex(trimesh.Trimesh(v, f), cavity) for v, f in result.pieces)


def inside_convex(piece: trimesh.Trimesh, point: np.ndarray) -> bool:
    """``point`` is inside the convex, outward-wound ``piece``: behind every face's plane."""
    return bool(np.all(np.einsum("ij,ij->i", piece.face_normals, point - piece.triangles[:, 0]) < 0))


def test_a_cap_on_pieces_decomposes_the_whole_solid(mug):
    result = decomposition.decompose(mug.vertices, mug.faces, params={"part_faces": 400, "max_convex_hull": 6})

    assert result.method == "coacd" and len(result.pieces) <= 6


# --- the merge ---------------------------------------------------------------------


def test_touching_pieces_that_make_a_box_merge_for_nothing():
    left, right = cube(1.0, (0, 0, 0)), cube(1.0, (1, 0, 0))

    merged = hull_merge.merge_hulls([left, right], volume_m3=2.0, budget=1e-6)

    assert len(merged) == 1
    assert hull_merge._hull(merged[0])[1] == pytest.approx(2.0)


def test_a_merge_that_adds_volume_waits_for_the_budget():
    # An L of three unit cubes: joining the corner cube with either arm adds nothing,
    # joining the two arms' ends would fill the missing corner (0.5 m^3 of hull).
    corner, arm_x, arm_y = cube(1.0, (0, 0, 0)), cube(1.0, (1, 0, 0)), cube(1.0, (0, 1, 0))

    tight = hull_merge.merge_hulls([corner, arm_x, arm_y], volume_m3=3.0, budget=0.01)
    loose = hull_merge.merge_hulls([corner, arm_x, arm_y], volume_m3=3.0, budget=0.2)
    off = hull_merge.merge_hulls([corner, arm_x, arm_y], volume_m3=3.0, budget=0.0)

    assert len(tight) == 2 and sum(hull_merge._hull(p)[1] for p in tight) == pytest.approx(3.0)
    assert len(loose) == 1 and hull_merge._hull(loose[0])[1] == pytest.approx(3.5)
    assert len(off) == 3


def test_pieces_far_apart_are_never_bridged():
    merged = hull_merge.merge_hulls([cube(0.1, (0, 0, 0)), cube(0.1, (5, 0, 0))], volume_m3=0.002, budget=1.0)

    assert len(merged) == 2


def test_the_merge_budget_is_measured_on_the_solids_volume(mug):
    # _coacd_pieces takes the solid's volume from inertia.unit_mass_properties.
    from geomgen.geometry.inertia import unit_mass_properties

    assert abs(unit_mass_properties(mug.vertices, mug.faces)[0]) == pytest.approx(mug.volume, rel=1e-9)


def test_the_plan_keeps_a_cap_on_pieces_for_coacds_merge():
    params = collision_params("coacd", {}, resolve=True)
    coacd_params, part_faces, merge_volume = decomposition.coacd_plan(params)
    assert (part_faces, merge_volume) == (1000, 0.002) and "part_faces" not in coacd_params
    assert not coacd_params["merge"]
    capped = decomposition.coacd_plan({**params, "max_convex_hull": 6})
    assert capped[1:] == (0, 0.0) and capped[0]["merge"]
    assert decomposition.processes_ahead("coacd", {"max_convex_hull": 6}) == 0
    assert decomposition.processes_ahead("hull", {}) == 0


def test_workers_started_ahead_are_taken_by_the_decomposition_or_stopped(mug):
    parts = coacd_parts.split_solid(mug.vertices, mug.faces, 400)

    with coacd_parts.workers_ahead(2):
        ahead = list(coacd_parts._ahead.get())
        assert len(ahead) == 2 and all(worker.poll() is None for worker in ahead)
        coacd_parts.decompose_parts(parts, coacd_only_params(), processes=2)
        assert coacd_parts._ahead.get() == []  # both taken, used, and stopped by the decomposition
    assert all(worker.returncode == 0 for worker in ahead)

    with coacd_parts.workers_ahead(2):
        unused = list(coacd_parts._ahead.get())
    assert all(worker.returncode == 0 for worker in unused)  # stopped, not left behind
    with coacd_parts.workers_ahead(1):
        assert coacd_parts._ahead.get() == []  # one process decomposes in this one

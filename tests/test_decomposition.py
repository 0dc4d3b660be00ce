"""Convex decomposition: parameters, each method on a concave solid, the
fallback ladder in one process, and the parent's decisions across conversion
children (conversion.next_step: crash, rung overrun, deadline)."""

from __future__ import annotations

import manifold3d
import numpy as np
import pytest
import trimesh

from geomgen.contract import COACD_PARAMS
from geomgen.conversion import RUNG_SHARE, Action, next_step
from geomgen.errors import ConvertError, InputError
from geomgen.geometry import decomposition
from geomgen.geometry.decomposition import Resume


def l_shape() -> trimesh.Trimesh:
    """A closed, concave L: a 0.4 x 0.1 x 0.1 m bar with a 0.1 x 0.3 x 0.1 m post on one end."""
    bar = manifold3d.Manifold.cube([0.4, 0.1, 0.1])
    post = manifold3d.Manifold.cube([0.1, 0.3, 0.1])
    mesh = (bar + post).to_mesh()
    return trimesh.Trimesh(np.asarray(mesh.vert_properties)[:, :3], np.asarray(mesh.tri_verts))


def pieces_iou(pieces, mesh: trimesh.Trimesh) -> float:
    hulls = [manifold3d.Manifold.hull_points(v) for v, _ in pieces]
    union = manifold3d.Manifold.batch_boolean(hulls, manifold3d.OpType.Add)
    solid = manifold3d.Manifold(
        manifold3d.Mesh(np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.uint32))
    )
    return (union ^ solid).volume() / (union + solid).volume()


def assert_convex_and_closed(pieces):
    assert pieces
    for vertices, faces in pieces:
        piece = trimesh.Trimesh(vertices, faces)
        assert piece.is_watertight and piece.is_convex and piece.volume > 0


# --- parameters -------------------------------------------------------------


@pytest.mark.parametrize(
    "method, params, words",
    [
        ("coacd", {"max_hulls": 3}, "max_hulls"),
        ("vhacd", {"threshold": 0.1}, "threshold"),
        ("hull", {"threshold": 0.1}, "threshold"),
        ("octree", {}, "collision must be one of"),
    ],
)
def test_bad_params_are_refused_by_the_contract(method, params, words):
    mesh = l_shape()
    with pytest.raises(InputError) as info:
        decomposition.decompose(mesh.vertices, mesh.faces, method, params)
    assert info.value.code == "bad_option"
    assert words in info.value.message


# --- methods ----------------------------------------------------------------


def test_coacd_splits_a_concave_solid():
    mesh = l_shape()
    result = decomposition.decompose(mesh.vertices, mesh.faces, "coacd")
    assert result.method == "coacd" and result.fallbacks == []
    assert len(result.pieces) >= 2
    assert_convex_and_closed(result.pieces)
    assert pieces_iou(result.pieces, mesh) > 0.9
    assert result.params["seed"] == next(p.default for p in COACD_PARAMS if p.name == "seed")


def test_coacd_is_deterministic():
    mesh = l_shape()
    first = decomposition.decompose(mesh.vertices, mesh.faces, "coacd")
    second = decomposition.decompose(mesh.vertices, mesh.faces, "coacd")
    assert len(first.pieces) == len(second.pieces)
    for (a, _), (b, _) in zip(first.pieces, second.pieces):
        np.testing.assert_allclose(np.sort(a, axis=0), np.sort(b, axis=0))


def test_vhacd_splits_a_concave_solid():
    mesh = l_shape()
    result = decomposition.decompose(mesh.vertices, mesh.faces, "vhacd", {"max_convex_hulls": 4})
    assert result.method == "vhacd"
    assert 2 <= len(result.pieces) <= 4
    assert_convex_and_closed(result.pieces)
    assert pieces_iou(result.pieces, mesh) > 0.8


def test_hull_is_one_piece():
    mesh = l_shape()
    result = decomposition.decompose(mesh.vertices, mesh.faces, "hull")
    assert result.method == "hull" and len(result.pieces) == 1
    assert_convex_and_closed(result.pieces)
    assert trimesh.Trimesh(*result.pieces[0]).volume == pytest.approx(mesh.convex_hull.volume)


# --- the ladder in one process -----------------------------------------------


def _raises(*_args):
    raise RuntimeError("synthetic CoACD error")


def _empty(*_args):
    return []


def test_an_error_or_no_piece_falls_down_in_process(monkeypatch):
    monkeypatch.setitem(decomposition.RUNGS, "coacd", _raises)
    monkeypatch.setitem(decomposition.RUNGS, "vhacd", _empty)
    mesh = l_shape()
    seen: list = []
    with decomposition.resumed(Resume(on_rung=seen.append)):
        result = decomposition.decompose(mesh.vertices, mesh.faces, "coacd")
    assert result.method == "hull" and len(result.pieces) == 1
    assert result.fallbacks == ["coacd: raised RuntimeError: synthetic CoACD error",
                                "vhacd: returned no usable convex piece"]
    assert seen == ["coacd", "vhacd", "hull", None]  # each rung announced, then the end


def test_ladder_starts_at_the_requested_method(monkeypatch):
    monkeypatch.setitem(decomposition.RUNGS, "coacd", _raises)  # never reached
    monkeypatch.setitem(decomposition.RUNGS, "vhacd", _empty)
    mesh = l_shape()
    result = decomposition.decompose(mesh.vertices, mesh.faces, "vhacd")
    assert result.method == "hull"
    assert result.fallbacks == ["vhacd: returned no usable convex piece"]


def test_a_resumed_ladder_starts_at_the_parents_rung_with_its_reasons():
    mesh = l_shape()
    seen: list = []
    earlier = ("coacd: crashed (killed by SIGSEGV)",)
    with decomposition.resumed(Resume(start="vhacd", fallbacks=earlier, on_rung=seen.append)):
        result = decomposition.decompose(mesh.vertices, mesh.faces, "coacd", {"threshold": 0.1})
    assert result.method == "vhacd" and result.fallbacks == list(earlier)
    assert result.params["max_convex_hulls"] == 32  # the fallback runs with its own defaults
    assert seen == ["vhacd", None]
    with pytest.raises(ConvertError):  # a rung above the requested one is never resumed at
        with decomposition.resumed(Resume(start="coacd")):
            decomposition.decompose(mesh.vertices, mesh.faces, "vhacd")


# --- the parent's decisions across children ------------------------------------


def test_next_step_waits_for_the_rung_limit_or_the_deadline():
    running = dict(exitcode=None, has_result=False, now_s=10.0, deadline_s=100.0)
    assert next_step(rung=None, rung_started_s=None, **running).wake_s == 100.0  # loading: the deadline
    step = next_step(rung="coacd", rung_started_s=4.0, **running)
    assert step.action is Action.WAIT and step.wake_s == pytest.approx(4.0 + RUNG_SHARE * 96.0)
    step = next_step(rung="hull", rung_started_s=4.0, **running)  # the hull has no share: the deadline
    assert step.action is Action.WAIT and step.wake_s == 100.0


def test_next_step_moves_an_overrunning_rung_down_the_ladder():
    step = next_step(exitcode=None, has_result=False, rung="coacd", rung_started_s=0.0, now_s=50.0, deadline_s=100.0)
    assert (step.action, step.rung) == (Action.RETRY, "vhacd")
    assert step.reason == "coacd: timed out after 50 s (50% of the 100 s left)"
    step = next_step(exitcode=None, has_result=False, rung="vhacd", rung_started_s=60.0, now_s=80.0, deadline_s=100.0)
    assert (step.action, step.rung) == (Action.RETRY, "hull")


def test_next_step_retries_a_crash_only_inside_coacd_or_vhacd():
    ended = dict(has_result=False, rung_started_s=1.0, now_s=2.0, deadline_s=100.0)
    step = next_step(exitcode=-11, rung="coacd", **ended)
    assert (step.action, step.rung, step.reason) == (Action.RETRY, "vhacd", "coacd: crashed (killed by SIGSEGV)")
    assert next_step(exitcode=-11, rung="hull", **ended).action is Action.FINISH
    assert next_step(exitcode=-11, rung=None, **ended).action is Action.FINISH  # outside decomposition
    assert next_step(exitcode=-11, rung="coacd", **{**ended, "now_s": 100.0}).action is Action.FINISH  # no time
    assert next_step(exitcode=0, rung="coacd", **{**ended, "has_result": True}).action is Action.FINISH


def test_next_step_times_out_at_the_one_deadline():
    for rung in (None, "coacd", "hull"):
        step = next_step(exitcode=None, has_result=False, rung=rung, rung_started_s=99.0, now_s=100.0,
                         deadline_s=100.0)
        assert step.action is Action.TIMEOUT


# --- pieces and simplification ----------------------------------------------


def test_clean_pieces_drops_flat_and_broken_pieces():
    cube = trimesh.creation.box([1.0, 1.0, 1.0])
    flat = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=float)
    nan = cube.vertices.copy()
    nan[0, 0] = np.nan
    kept = decomposition.clean_pieces([(cube.vertices, cube.faces), (flat, []), (nan, cube.faces), (cube.vertices[:3], [])])
    assert len(kept) == 1
    assert_convex_and_closed(kept)


def test_simplify_meets_the_budget_and_keeps_the_shape():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.1)  # 20,480 faces
    vertices, faces, note = decomposition.simplify(sphere.vertices, sphere.faces, 2000)
    assert note is None
    assert 100 < len(faces) <= 2000
    small = trimesh.Trimesh(vertices, faces)
    assert small.is_watertight
    assert small.volume == pytest.approx(sphere.volume, rel=0.03)


def test_simplify_leaves_open_meshes_alone():
    box = trimesh.creation.box([1.0, 1.0, 1.0]).subdivide().subdivide()
    _, faces, note = decomposition.simplify(box.vertices, box.faces[3:], 20)
    assert len(faces) == len(box.faces) - 3
    assert "not a closed manifold" in note

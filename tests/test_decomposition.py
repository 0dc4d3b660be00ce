"""Convex decomposition: parameters, the child-process runner (crash, hang,
exception), each method on a concave solid, and the fallback ladder."""

from __future__ import annotations

import os
import time

import manifold3d
import numpy as np
import pytest
import trimesh

from geomgen.errors import InputError
from geomgen.geometry import decomposition
from geomgen.geometry.child_process import ChildFailed, run_in_child


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


def test_params_merge_over_the_defaults():
    params = decomposition.method_params("coacd", {"threshold": 0.1, "seed": 7})
    assert params["threshold"] == 0.1 and params["seed"] == 7
    assert params["resolution"] == decomposition.COACD_DEFAULTS["resolution"]
    assert decomposition.method_params("vhacd", None) == decomposition.VHACD_DEFAULTS
    assert decomposition.method_params("hull", {}) == {}


@pytest.mark.parametrize(
    "method, params, words",
    [
        ("coacd", {"max_hulls": 3}, "unknown collision parameter 'max_hulls'"),
        ("coacd", {"merge": "yes"}, "true or false"),
        ("coacd", {"resolution": 2.5}, "integer"),
        ("coacd", {"threshold": 0.0}, "> 0"),
        ("coacd", {"preprocess_mode": "sometimes"}, "auto, on, off"),
        ("vhacd", {"threshold": 0.1}, "its parameters are"),
        ("hull", {"threshold": 0.1}, "its parameters are: none"),
        ("octree", {}, "collision must be one of"),
    ],
)
def test_bad_params_are_input_errors(method, params, words):
    with pytest.raises(InputError) as info:
        decomposition.method_params(method, params)
    assert info.value.code == "bad_option"
    assert words in info.value.message


# --- the child-process runner -----------------------------------------------


def test_child_returns_the_result():
    assert run_in_child(divmod, (17, 5), timeout_s=30) == (3, 2)


def test_child_exception_is_reported():
    with pytest.raises(ChildFailed, match="raised ValueError"):
        run_in_child(int, ("not a number",), timeout_s=30)


def test_child_crash_is_reported():
    with pytest.raises(ChildFailed, match="crashed .*SIGABRT"):
        run_in_child(os.abort, (), timeout_s=30)


def test_child_past_its_time_limit_is_killed():
    start = time.monotonic()
    with pytest.raises(ChildFailed, match="timed out after 0.5 s"):
        run_in_child(time.sleep, (60,), timeout_s=0.5)
    assert time.monotonic() - start < 10


# --- methods ----------------------------------------------------------------


def test_coacd_splits_a_concave_solid():
    mesh = l_shape()
    result = decomposition.decompose(mesh.vertices, mesh.faces, "coacd")
    assert result.method == "coacd" and result.fallbacks == []
    assert len(result.pieces) >= 2
    assert_convex_and_closed(result.pieces)
    assert pieces_iou(result.pieces, mesh) > 0.9
    assert result.params["seed"] == decomposition.COACD_DEFAULTS["seed"]


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


# --- the ladder -------------------------------------------------------------


def test_coacd_crash_falls_back_to_vhacd():
    mesh = l_shape()
    # CoACD aborts on a preprocessing resolution below 5 (a C++ exception that kills its process).
    result = decomposition.decompose(mesh.vertices, mesh.faces, "coacd", {"preprocess_resolution": 0})
    assert result.method == "vhacd"
    assert len(result.fallbacks) == 1
    assert result.fallbacks[0].startswith("coacd: crashed")
    assert "prep resolution" in result.fallbacks[0]  # CoACD's own last words are kept
    assert_convex_and_closed(result.pieces)


def test_timeouts_fall_down_to_the_hull():
    mesh = l_shape()
    result = decomposition.decompose(mesh.vertices, mesh.faces, "coacd", timeout_s=0.001)
    assert result.method == "hull"
    assert result.fallbacks == ["coacd: timed out after 0.001 s", "vhacd: timed out after 0.001 s"]
    assert len(result.pieces) == 1


def test_ladder_starts_at_the_requested_method():
    mesh = l_shape()
    result = decomposition.decompose(mesh.vertices, mesh.faces, "vhacd", timeout_s=0.001)
    assert result.method == "hull"
    assert result.fallbacks == ["vhacd: timed out after 0.001 s"]


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

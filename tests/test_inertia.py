"""Mass properties, frames and mesh repair against closed forms: pure functions, fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from geomgen import defaults
from geomgen.errors import InputError
from geomgen.geometry import frames, inertia, repair


def box_mesh(extents, centre=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    mesh = trimesh.creation.box(extents)
    mesh.apply_translation(centre)
    return mesh


def box_inertia(mass_kg: float, x: float, y: float, z: float) -> np.ndarray:
    return mass_kg / 12.0 * np.diag([y * y + z * z, x * x + z * z, x * x + y * y])


def test_box_mass_properties_match_closed_form():
    mesh = box_mesh([0.2, 0.4, 0.6], centre=[3.0, -2.0, 5.0])
    props = inertia.mass_properties(mesh.vertices, mesh.faces, True, [], mass_kg=2.5)
    assert props.source == inertia.SOURCE_MESH
    assert props.volume_m3 == pytest.approx(0.048, rel=1e-9)
    assert props.mass_kg == 2.5
    assert props.density_kg_m3 == pytest.approx(2.5 / 0.048)
    np.testing.assert_allclose(props.com_m, [3.0, -2.0, 5.0], atol=1e-9)
    np.testing.assert_allclose(props.inertia_kg_m2, box_inertia(2.5, 0.2, 0.4, 0.6), atol=1e-9)
    assert props.warnings == []


def test_cylinder_with_density_matches_closed_form():
    radius_m, height_m, density = 0.05, 0.3, 1200.0
    mesh = trimesh.creation.cylinder(radius=radius_m, height=height_m, sections=256)
    props = inertia.mass_properties(mesh.vertices, mesh.faces, True, [], density_kg_m3=density)
    mass = density * math.pi * radius_m**2 * height_m
    assert props.mass_kg == pytest.approx(mass, rel=1e-3)  # a 256-gon is 0.01% short of a circle
    side = mass * (3 * radius_m**2 + height_m**2) / 12.0
    np.testing.assert_allclose(np.diag(props.inertia_kg_m2), [side, side, mass * radius_m**2 / 2.0], rtol=1e-3)
    np.testing.assert_allclose(props.inertia_kg_m2 - np.diag(np.diag(props.inertia_kg_m2)), 0.0, atol=1e-12)


def test_default_density_is_used_without_mass_or_density():
    mesh = box_mesh([1.0, 1.0, 1.0])
    props = inertia.mass_properties(mesh.vertices, mesh.faces, True, [])
    assert props.density_kg_m3 == defaults.DENSITY_KG_M3
    assert props.mass_kg == pytest.approx(defaults.DENSITY_KG_M3)


def test_inverted_winding_gives_positive_volume_and_says_so():
    mesh = box_mesh([0.1, 0.2, 0.3])
    props = inertia.mass_properties(mesh.vertices, mesh.faces[:, ::-1], True, [], mass_kg=1.0)
    assert props.volume_m3 == pytest.approx(0.006)
    np.testing.assert_allclose(props.inertia_kg_m2, box_inertia(1.0, 0.1, 0.2, 0.3), atol=1e-12)
    assert any("negative volume" in w for w in props.warnings)


def test_flat_plane_has_zero_volume():
    plane = trimesh.creation.box([1.0, 1.0, 1.0])
    plane.vertices[:, 2] = 0.0
    with pytest.raises(InputError) as info:
        inertia.mass_properties(plane.vertices, plane.faces, True, [])
    assert info.value.code == "zero_volume"
    assert "flat" in info.value.message


def test_closed_surface_enclosing_nothing_has_zero_volume():
    # Two coincident copies of a box surface wound against each other: closed, extents fine, volume 0.
    mesh = box_mesh([1.0, 1.0, 1.0])
    faces = np.concatenate([mesh.faces, mesh.faces[:, ::-1] + len(mesh.vertices)])
    vertices = np.concatenate([mesh.vertices, mesh.vertices])
    with pytest.raises(InputError) as info:
        inertia.mass_properties(vertices, faces, True, [])
    assert info.value.code == "zero_volume"


def test_open_mesh_uses_the_union_of_collision_pieces():
    mesh = box_mesh([0.2, 0.2, 0.4])
    open_faces = mesh.faces[2:]  # one side removed: no longer encloses a volume
    left = box_mesh([0.1, 0.2, 0.4], centre=[-0.05, 0, 0])
    right = box_mesh([0.12, 0.2, 0.4], centre=[0.04, 0, 0])  # overlaps left by 0.02 m
    pieces = [(left.vertices, left.faces), (right.vertices, right.faces)]
    props = inertia.mass_properties(mesh.vertices, open_faces, False, pieces, mass_kg=1.0)
    assert props.source == inertia.SOURCE_UNION
    assert props.volume_m3 == pytest.approx(0.2 * 0.2 * 0.4, rel=1e-6)  # the overlap counted once
    np.testing.assert_allclose(props.inertia_kg_m2, box_inertia(1.0, 0.2, 0.2, 0.4), atol=1e-9)
    assert any("not closed" in w for w in props.warnings)


def test_voxel_fill_approximates_a_box():
    mesh = box_mesh([0.3, 0.2, 0.1], centre=[1.0, 0.0, 0.0])
    volume, centroid, unit_inertia = inertia.voxel_mass_properties([(mesh.vertices, mesh.faces)], cells=60)
    assert volume == pytest.approx(0.006, rel=0.05)
    np.testing.assert_allclose(centroid, [1.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(np.diag(unit_inertia), np.diag(box_inertia(0.006, 0.3, 0.2, 0.1)), rtol=0.1)


def _is_valid(tensor: np.ndarray) -> bool:
    moments = np.sort(np.linalg.eigvalsh(tensor))
    return bool(moments[0] > 0 and moments[0] + moments[1] >= moments[2] * (1 - 1e-12))


@pytest.mark.parametrize(
    "tensor",
    [np.diag([1.0, 1.0, 3.0]), np.diag([-0.5, 2.0, 2.0]), np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 4.0]])],
)
def test_invalid_tensors_are_projected_to_valid_ones(tensor):
    fixed, changed = inertia.nearest_valid_inertia(tensor)
    assert changed
    assert _is_valid(fixed)
    np.testing.assert_allclose(fixed, fixed.T)


def test_valid_tensor_is_left_alone():
    tensor = box_inertia(3.0, 0.1, 0.5, 0.2)
    fixed, changed = inertia.nearest_valid_inertia(tensor)
    assert not changed
    np.testing.assert_allclose(fixed, tensor, atol=1e-15)


def test_gltf_to_drake_turns_y_up_into_z_up():
    np.testing.assert_allclose(frames.gltf_to_drake([[0.0, 1.0, 0.0]]), [[0.0, 0.0, 1.0]])
    np.testing.assert_allclose(frames.gltf_to_drake([[1.0, 2.0, 3.0]]), [[1.0, -3.0, 2.0]])
    points = np.random.default_rng(0).normal(size=(10, 3))
    np.testing.assert_allclose(frames.drake_to_gltf(frames.gltf_to_drake(points)), points)


def test_z_up_input_is_turned_to_y_up():
    transform, warnings = frames.input_transform(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]), up_axis="z")
    np.testing.assert_allclose(frames.apply_transform([[0.0, 0.0, 2.0]], transform), [[0.0, 2.0, 0.0]])
    assert warnings == []


def test_dimensions_scale_uniformly_to_fit_the_drake_box():
    mesh = box_mesh([0.2, 0.5, 0.3])  # glTF: x 0.2, height (y) 0.5, depth (z) 0.3 -> Drake x 0.2, y 0.3, z 0.5
    transform, warnings = frames.input_transform(mesh.vertices, dimensions=[0.4, 0.6, 1.0])
    extents = np.ptp(frames.gltf_to_drake(frames.apply_transform(mesh.vertices, transform)), axis=0)
    np.testing.assert_allclose(extents, [0.4, 0.6, 1.0])
    assert warnings == []
    transform, warnings = frames.input_transform(mesh.vertices, dimensions=[0.4, 0.3, 1.0])
    extents = np.ptp(frames.gltf_to_drake(frames.apply_transform(mesh.vertices, transform)), axis=0)
    np.testing.assert_allclose(extents, [0.2, 0.3, 0.5])  # y is the tightest axis
    assert "proportions" in warnings[0] and "x 0.2" in warnings[0]


def test_scale_multiplies_coordinates():
    transform, _ = frames.input_transform(np.eye(3), scale=0.01)
    np.testing.assert_allclose(frames.apply_transform([[100.0, 0.0, 0.0]], transform), [[1.0, 0.0, 0.0]])


def test_uv_seams_are_merged_into_a_closed_solid():
    mesh = box_mesh([1.0, 1.0, 1.0])
    split = mesh.vertices[mesh.faces].reshape(-1, 3)  # every face with its own vertices, as at UV seams
    faces = np.arange(len(split)).reshape(-1, 3)
    assert not trimesh.Trimesh(split, faces, process=False).is_watertight
    solid = repair.make_solid(split, faces)
    assert solid.watertight
    assert len(solid.vertices) == 8


def test_floaters_are_removed_unless_asked_to_keep_them():
    body = box_mesh([1.0, 1.0, 1.0])
    speck = box_mesh([0.01, 0.01, 0.01], centre=[3.0, 0.0, 0.0])
    big = trimesh.util.concatenate([body, trimesh.creation.icosphere(subdivisions=4)])  # many faces, so the speck is < 1%
    soup = trimesh.util.concatenate([big, speck])
    solid = repair.make_solid(soup.vertices, soup.faces)
    assert solid.vertices[:, 0].max() < 2.0
    assert any("small disconnected" in w for w in solid.warnings)
    kept = repair.make_solid(soup.vertices, soup.faces, remove_floaters=False)
    assert kept.vertices[:, 0].max() == pytest.approx(3.005)


def test_closed_sheets_are_left_out_of_the_solid():
    body = box_mesh([1.0, 1.0, 1.0])
    quad = np.array([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    sheet = trimesh.Trimesh(quad, [[0, 1, 2], [0, 2, 3], [0, 2, 1], [0, 3, 2]], process=False)  # both sides
    soup = trimesh.util.concatenate([body, sheet])
    solid = repair.make_solid(soup.vertices, soup.faces, remove_floaters=False)
    assert solid.watertight
    assert solid.vertices[:, 0].max() == pytest.approx(0.5)
    assert any("enclose no volume" in w for w in solid.warnings)


def test_inconsistent_winding_and_degenerate_faces_are_repaired():
    mesh = box_mesh([1.0, 2.0, 3.0])
    faces = mesh.faces.copy()
    faces[::3] = faces[::3, ::-1]  # flip every third face
    faces = np.concatenate([faces, [[0, 0, 1]]])  # and add a degenerate one
    solid = repair.make_solid(mesh.vertices, faces)
    assert solid.watertight
    volume, _, _ = inertia.unit_mass_properties(solid.vertices, solid.faces)
    assert volume == pytest.approx(6.0)
    assert any("degenerate" in w for w in solid.warnings)


def test_nan_vertices_are_refused():
    mesh = box_mesh([1.0, 1.0, 1.0])
    vertices = mesh.vertices.copy()
    vertices[0, 1] = np.nan
    with pytest.raises(InputError) as info:
        repair.make_solid(vertices, mesh.faces)
    assert info.value.code == "bad_mesh"

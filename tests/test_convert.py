"""GLB -> Drake SDF packages end to end: files, frames, mass properties, contact
tags, the manifest, the fallback ladder and bad inputs. Every package is loaded
by Drake (options.validate), and some are checked in Drake directly."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from geomgen import conversion, convert_child
from geomgen.errors import ConvertError, InputError
from geomgen.geometry import materials
from geomgen.geometry.convert import ConversionReport, convert_file, convert_mesh
from geomgen.geometry.frames import gltf_to_drake
from geomgen.contract import ConvertOptions, sanitize_stem
from geomgen.geometry.sdf import DRAKE_NS, SDF_VERSION
from tests.conftest import SHARED_DATA

D = f"{{{DRAKE_NS}}}"


def glb_of(*meshes: trimesh.Trimesh) -> bytes:
    return trimesh.Scene(list(meshes)).export(file_type="glb")


def box_glb(extents=(0.2, 0.4, 0.3), rest_on_floor=True) -> bytes:
    box = trimesh.creation.box(extents)
    if rest_on_floor:
        box.apply_translation([0.0, extents[1] / 2.0, 0.0])
    return glb_of(box)


def textured_box() -> trimesh.Trimesh:
    """A box whose faces carry their own vertices and UVs (split seams), with a texture image."""
    box = trimesh.creation.box([0.3, 0.3, 0.3])
    box.apply_translation([0.0, 0.15, 0.0])
    vertices = box.vertices[box.faces].reshape(-1, 3)
    faces = np.arange(len(vertices)).reshape(-1, 3)
    uv = np.random.default_rng(0).uniform(size=(len(vertices), 2))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=image, roughnessFactor=0.7)
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return trimesh.Trimesh(vertices, faces, visual=visual, process=False)


def sdf_tree(report: ConversionReport) -> ET.Element:
    return ET.parse(report.sdf_path).getroot()


def read_obj(path: Path) -> np.ndarray:
    return np.array([[float(x) for x in line.split()[1:4]] for line in path.read_text().splitlines() if line.startswith("v ")])


def drake_body(sdf_path: Path):
    """The body of a one-link SDF as Drake loads it: (mass, COM in body frame, rotational inertia about COM)."""
    from pydrake.multibody.parsing import Parser
    from pydrake.multibody.plant import MultibodyPlant

    plant = MultibodyPlant(0.0)
    Parser(plant).AddModels(str(sdf_path))
    plant.Finalize()
    inertia = plant.GetBodyByName("base_link").default_spatial_inertia()
    com = inertia.get_com()
    about_com = inertia.Shift(com).CalcRotationalInertia().CopyToFullMatrix3()
    return inertia.get_mass(), np.asarray(com), about_com


# --- package layout and mass properties ----------------------------------------


def test_box_package_layout_mass_and_inertia(tmp_path):
    report = convert_mesh(box_glb(), "box.glb", tmp_path, "box", ConvertOptions(mass_kg=3.0, collision="hull"))
    package = tmp_path / "box"
    assert report.package_dir == package and report.sdf_path == package / "box.sdf"
    names = {p.name for p in report.files}
    assert names == {"box.sdf", "box.gltf", "box.bin", "box_collision_0.obj", "preview.png", "box.json"}
    assert sorted(p.name for p in package.iterdir()) == sorted(names)
    assert report.validated and report.watertight and report.inertia_source == "mesh"
    assert report.method == "hull" and report.pieces == 1 and report.fallbacks == []
    # glTF (0.2, 0.4, 0.3) is Drake x 0.2, y 0.3 (glTF z), z 0.4 (glTF y, up).
    np.testing.assert_allclose(report.bbox_m, [0.2, 0.3, 0.4], rtol=1e-6)
    assert report.mass_kg == 3.0
    assert report.volume_m3 == pytest.approx(0.024, rel=1e-6)
    np.testing.assert_allclose(report.com_m, [0.0, 0.0, 0.2], atol=1e-7)
    expected = 3.0 / 12.0 * np.diag([0.3**2 + 0.4**2, 0.2**2 + 0.4**2, 0.2**2 + 0.3**2])
    np.testing.assert_allclose(report.inertia_kg_m2, expected, rtol=1e-5, atol=1e-9)
    mass, com, about_com = drake_body(report.sdf_path)
    assert mass == pytest.approx(3.0)
    np.testing.assert_allclose(com, [0.0, 0.0, 0.2], atol=1e-7)
    np.testing.assert_allclose(about_com, expected, rtol=1e-5, atol=1e-9)
    root = sdf_tree(report)
    assert root.get("version") == SDF_VERSION
    assert root.find("model/link/visual/geometry/mesh/uri").text == "box.gltf"


def test_cylinder_mass_from_material_density(tmp_path):
    cylinder = trimesh.creation.cylinder(radius=0.05, height=0.2, sections=128)
    cylinder.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0]))  # axis along glTF +Y
    cylinder.apply_translation([0.0, 0.1, 0.0])
    report = convert_mesh(glb_of(cylinder), "can.glb", tmp_path, "can", ConvertOptions(material="aluminum"))
    volume = math.pi * 0.05**2 * 0.2
    assert report.density_kg_m3 == materials.MATERIALS["aluminum"].density_kg_m3
    assert report.mass_kg == pytest.approx(2700.0 * volume, rel=2e-3)
    side = report.mass_kg * (3 * 0.05**2 + 0.2**2) / 12.0
    # The can stands along Drake +Z: the small moment is izz.
    np.testing.assert_allclose(np.diag(report.inertia_kg_m2), [side, side, report.mass_kg * 0.05**2 / 2], rtol=2e-3)
    np.testing.assert_allclose(report.com_m, [0.0, 0.0, 0.1], atol=1e-6)
    assert report.mu == materials.MATERIALS["aluminum"].mu


def test_density_option_wins_over_material(tmp_path):
    report = convert_mesh(box_glb((0.1, 0.1, 0.1)), "b.glb", tmp_path, "b", ConvertOptions(density_kg_m3=100.0, material="metal", collision="hull"))
    assert report.mass_kg == pytest.approx(0.1)
    assert report.density_kg_m3 == 100.0


# --- frames ---------------------------------------------------------------------


def test_tall_y_up_box_stands_along_drake_z(tmp_path):
    report = convert_mesh(box_glb((0.1, 0.6, 0.1)), "tall.glb", tmp_path, "tall", ConvertOptions(mass_kg=1.0))
    assert report.com_m[2] == pytest.approx(0.3, abs=1e-6)
    points = np.concatenate([read_obj(p) for p in report.files if "_collision_" in p.name])
    np.testing.assert_allclose(np.ptp(points, axis=0), [0.1, 0.1, 0.6], atol=1e-6)
    assert points[:, 2].min() == pytest.approx(0.0, abs=1e-6)
    # The visual, turned the way Drake turns glTF, occupies the same box as the collision.
    visual = trimesh.load(report.package_dir / "tall.gltf", force="mesh")
    placed = gltf_to_drake(visual.vertices)
    np.testing.assert_allclose(placed.min(axis=0), points.min(axis=0), atol=1e-6)
    np.testing.assert_allclose(placed.max(axis=0), points.max(axis=0), atol=1e-6)
    _, com, _ = drake_body(report.sdf_path)
    assert com[2] == pytest.approx(0.3, abs=1e-6)


def test_z_up_input_and_dimensions(tmp_path):
    post = trimesh.creation.box([0.1, 0.2, 0.5])  # +Z up file: 0.5 m tall
    options = ConvertOptions(up_axis="z", dimensions=[0.2, 0.4, 1.0], collision="hull")
    report = convert_mesh(glb_of(post), "post.glb", tmp_path, "post", options)
    np.testing.assert_allclose(report.bbox_m, [0.2, 0.4, 1.0], rtol=1e-6)
    points = read_obj(report.package_dir / "post_collision_0.obj")
    np.testing.assert_allclose(np.ptp(points, axis=0), [0.2, 0.4, 1.0], atol=1e-6)
    visual = trimesh.load(report.package_dir / "post.gltf", force="mesh")
    np.testing.assert_allclose(np.ptp(gltf_to_drake(visual.vertices), axis=0), [0.2, 0.4, 1.0], atol=1e-6)


def test_scale_option(tmp_path):
    report = convert_mesh(box_glb((10.0, 20.0, 30.0)), "cm.glb", tmp_path, "cm", ConvertOptions(scale=0.01, collision="hull"))
    np.testing.assert_allclose(report.bbox_m, [0.1, 0.3, 0.2], rtol=1e-6)


# --- visual ---------------------------------------------------------------------


def test_textured_visual_keeps_uvs_and_writes_the_texture_file(tmp_path):
    report = convert_mesh(glb_of(textured_box()), "tex.glb", tmp_path, "tex", ConvertOptions(collision="hull"))
    gltf = json.loads((report.package_dir / "tex.gltf").read_text())
    assert gltf["buffers"] == [{"uri": "tex.bin", "byteLength": (report.package_dir / "tex.bin").stat().st_size}]
    (image,) = gltf["images"]
    assert image["uri"] == "tex_texture_0.png" and "bufferView" not in image
    assert Image.open(report.package_dir / image["uri"]).size == (16, 16)
    loaded = trimesh.load(report.package_dir / "tex.gltf", force="mesh", process=False)
    assert loaded.visual.uv.shape == (36, 2)
    assert report.watertight  # the split seams were merged for the solid
    assert report.volume_m3 == pytest.approx(0.027, rel=1e-6)


def test_gltf_file_with_external_buffers(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name, blob in trimesh.Scene(textured_box()).export(file_type="gltf").items():
        (source / name).write_bytes(blob)
    gltf_path = next(source.glob("*.gltf"))
    assert json.loads(gltf_path.read_text())["buffers"][0]["uri"]  # really external
    report = convert_file(gltf_path, tmp_path / "out", ConvertOptions(collision="hull"), name="crate")
    assert report.sdf_path == tmp_path / "out" / "crate" / "crate.sdf"
    assert report.validated and report.volume_m3 == pytest.approx(0.027, rel=1e-6)
    manifest = json.loads((report.package_dir / "crate.json").read_text())
    assert {entry["name"] for entry in manifest["inputs"]} >= {gltf_path.name}
    assert len(manifest["inputs"]) >= 2  # the .gltf and the buffer it references


def test_convert_file_names_the_package_after_the_file(tmp_path):
    path = tmp_path / "my mug (1).glb"
    path.write_bytes(box_glb((0.1, 0.1, 0.1)))
    report = convert_file(path, tmp_path / "out", ConvertOptions(collision="hull"))
    assert report.name == sanitize_stem("my mug (1)") == "my_mug_1_"  # the contract's one name rule


# --- contact properties ---------------------------------------------------------


def test_friction_and_hydroelastic_tags(tmp_path):
    options = ConvertOptions(material="rubber", hydroelastic=True, collision="hull")
    report = convert_mesh(box_glb(), "b.glb", tmp_path, "b", options)
    collision = sdf_tree(report).find("model/link/collision")
    assert collision.find(f"geometry/mesh/{D}declare_convex") is not None
    props = collision.find(f"{D}proximity_properties")
    assert float(props.find(f"{D}mu_dynamic").text) == 0.9
    assert float(props.find(f"{D}mu_static").text) == 0.9
    assert props.find(f"{D}compliant_hydroelastic") is not None
    assert float(props.find(f"{D}hydroelastic_modulus").text) == materials.MATERIALS["rubber"].hydroelastic_modulus_pa
    assert report.validated


def test_explicit_mu_and_modulus_and_defaults(tmp_path):
    options = ConvertOptions(mu=0.25, hydroelastic=True, hydroelastic_modulus_pa=3e6, collision="hull")
    props = sdf_tree(convert_mesh(box_glb(), "b.glb", tmp_path, "b", options)).find(f"model/link/collision/{D}proximity_properties")
    assert float(props.find(f"{D}mu_dynamic").text) == 0.25
    assert float(props.find(f"{D}hydroelastic_modulus").text) == 3e6
    plain = convert_mesh(box_glb(), "b.glb", tmp_path, "c", ConvertOptions(collision="hull"))
    props = sdf_tree(plain).find(f"model/link/collision/{D}proximity_properties")
    assert float(props.find(f"{D}mu_dynamic").text) == materials.DEFAULT_MU
    assert props.find(f"{D}compliant_hydroelastic") is None
    assert props.find(f"{D}hydroelastic_modulus") is None


def test_hydroelastic_package_loads_with_hydroelastic_contact(tmp_path):
    from pydrake.geometry import SceneGraph
    from pydrake.multibody.parsing import Parser
    from pydrake.multibody.plant import (
        AddMultibodyPlant,
        ContactModel,
        MultibodyPlantConfig,
    )
    from pydrake.systems.framework import DiagramBuilder

    report = convert_mesh(box_glb(), "b.glb", tmp_path, "b", ConvertOptions(hydroelastic=True, collision="hull"))
    builder = DiagramBuilder()
    plant, scene_graph = AddMultibodyPlant(MultibodyPlantConfig(time_step=1e-3, contact_model="hydroelastic"), builder)
    Parser(plant).AddModels(str(report.sdf_path))
    plant.Finalize()
    assert plant.get_contact_model() == ContactModel.kHydroelastic
    assert isinstance(scene_graph, SceneGraph)
    builder.Build()  # SceneGraph builds the compliant hydroelastic representation here


# --- manifest -------------------------------------------------------------------


def test_manifest_contents(tmp_path):
    data = box_glb()
    options = ConvertOptions(mass_kg=2.0, collision="coacd", collision_params={"threshold": 0.05})
    report = convert_mesh(data, "box.glb", tmp_path, "box", options)
    manifest = json.loads((report.package_dir / "box.json").read_text())
    assert manifest["inputs"] == [{"name": "box.glb", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}]
    assert manifest["options"] == options.to_dict()
    assert manifest["collision_params"]["threshold"] == 0.05
    assert manifest["method"] == "coacd" and manifest["fallbacks"] == []
    assert manifest["pieces"] == report.pieces
    assert manifest["mass_kg"] == 2.0
    assert manifest["volume_m3"] == pytest.approx(report.volume_m3)
    assert manifest["com_m"] == pytest.approx(report.com_m)
    assert manifest["bbox_m"] == pytest.approx([0.2, 0.3, 0.4])
    assert manifest["seconds"] > 0
    assert manifest["sdf_version"] == SDF_VERSION
    import geomgen

    assert manifest["geomgen_version"] == geomgen.__version__
    assert manifest["sdf_path"] == "box.sdf"
    assert set(manifest["files"]) == {p.name for p in report.files}
    assert report.to_dict()["files"] == manifest["files"]
    json.dumps(report.to_dict())  # JSON-safe


def test_reconverting_replaces_the_package(tmp_path):
    first = convert_mesh(box_glb(), "b.glb", tmp_path, "b", ConvertOptions(collision="vhacd", collision_params={"max_convex_hulls": 8}))
    second = convert_mesh(box_glb(), "b.glb", tmp_path, "b", ConvertOptions(collision="hull"))
    assert second.pieces == 1
    present = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert present == sorted(p.name for p in second.files)
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging folders left behind
    assert first.validated and second.validated


# --- the fallback ladder, through the one isolation layer -----------------------


def convert_isolated(tmp_path: Path, name: str, timeout_s: float, options: ConvertOptions) -> tuple[dict, Path]:
    """A box converted the way the SDF worker converts: in a child process
    driven by conversion.Conversion, with tests.plugins:selectable_convert
    (whose output name picks a failing decomposition). Returns the outcome and
    the package folder."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    task = convert_child.glb_task(box_glb(), "b.glb", name, "tests.plugins:selectable_convert")
    outcome = conversion.drive(conversion.Conversion(job_dir, task, options, timeout_s))
    return outcome, job_dir / convert_child.OUT_DIR / name


def test_native_crash_in_coacd_falls_back_to_vhacd(tmp_path):
    outcome, package = convert_isolated(tmp_path, "coacd_crash", 120.0, ConvertOptions())
    info = outcome["info"]
    assert info["method"] == "vhacd" and info["validated"]
    (reason,) = info["fallbacks"]
    assert reason.startswith("coacd: crashed (killed by SIGSEGV)")
    assert "synthetic native failure" in reason  # the method's own last words are kept
    assert any("made by vhacd" in w for w in info["warnings"])
    manifest = json.loads((package / "coacd_crash.json").read_text())
    assert manifest["fallbacks"] == info["fallbacks"] and manifest["options"]["collision"] == "coacd"


def test_hung_decomposition_falls_down_to_one_hull_within_the_deadline(tmp_path):
    # CoACD and V-HACD never return: each is stopped at half the time left when it
    # started, and the hull finishes within the one deadline.
    started_s = time.monotonic()
    outcome, package = convert_isolated(tmp_path, "decomp_hang", 8.0, ConvertOptions())
    assert time.monotonic() - started_s < 8.0
    info = outcome["info"]
    assert info["method"] == "hull" and info["pieces"] == 1
    assert [f.split(" after ")[0] for f in info["fallbacks"]] == ["coacd: timed out", "vhacd: timed out"]
    assert all("50% of the" in f for f in info["fallbacks"])
    manifest = json.loads((package / "decomp_hang.json").read_text())
    assert manifest["method"] == "hull" and manifest["fallbacks"] == info["fallbacks"]


# --- open meshes ----------------------------------------------------------------


def test_open_mesh_gets_inertia_from_the_collision_union(tmp_path):
    box = trimesh.creation.box([0.2, 0.2, 0.2])
    box.apply_translation([0.0, 0.1, 0.0])
    open_box = trimesh.Trimesh(box.vertices, box.faces[2:], process=False)
    report = convert_mesh(glb_of(open_box), "open.glb", tmp_path, "open", ConvertOptions(collision="hull", mass_kg=1.0))
    assert not report.watertight
    assert report.inertia_source == "collision_union"
    assert report.volume_m3 == pytest.approx(0.008, rel=1e-6)
    assert report.validated


# --- bad inputs -----------------------------------------------------------------


def _input_error(tmp_path, data: bytes, input_name: str = "in.glb", name: str = "x", **options) -> InputError:
    with pytest.raises(InputError) as info:
        convert_mesh(data, input_name, tmp_path, name, ConvertOptions(**options))
    assert not (tmp_path / name).exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    return info.value


def test_no_faces(tmp_path):
    points = trimesh.PointCloud(np.random.default_rng(0).uniform(size=(20, 3)))
    error = _input_error(tmp_path, trimesh.Scene(points).export(file_type="glb"))
    assert error.code == "bad_mesh" and "no triangle faces" in error.message


def test_flat_plane_is_zero_volume(tmp_path):
    plane = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]], [[0, 1, 2], [0, 2, 3]], process=False)
    error = _input_error(tmp_path, glb_of(plane))
    assert error.code == "zero_volume" and "flat" in error.message


def test_nan_vertices(tmp_path):
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, np.nan]], dtype=float)
    obj = "".join(f"v {x} {y} {z}\n" for x, y, z in vertices) + "f 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n"
    error = _input_error(tmp_path, obj.encode(), input_name="nan.obj")
    assert error.code == "bad_mesh" and "NaN" in error.message


def test_not_a_mesh(tmp_path):
    error = _input_error(tmp_path, b"this is a shopping list, not a mesh\n" * 3, input_name="list.glb")
    assert error.stage.value == "input"
    assert error.code in ("bad_mesh", "unknown_format")


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 200, "a..b"])
def test_bad_package_names(tmp_path, name):
    with pytest.raises(InputError) as info:
        convert_mesh(box_glb(), "b.glb", tmp_path, name, ConvertOptions())
    assert info.value.code == "bad_name"


def test_bad_options_are_input_errors(tmp_path):
    assert _input_error(tmp_path, box_glb(), collision_params={"nope": 1}).code == "bad_option"
    assert _input_error(tmp_path, box_glb(), up_axis="x").code == "bad_option"


def test_unwritable_output_is_a_convert_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConvertError) as info:
        convert_mesh(box_glb(), "b.glb", blocker, "b", ConvertOptions(collision="hull"))
    assert info.value.code == "write_failed"


# --- a real generated mesh ------------------------------------------------------


@pytest.mark.slow
def test_real_mesh_converts_collides_like_its_visual_and_stands(tmp_path):
    from geomgen.geometry.drake_check import collision_iou, drop_test

    source = SHARED_DATA / "scenesmith_assets" / "coffee_mug" / "coffee_mug.gltf"
    if not source.is_file():
        pytest.skip("shared test data not present")
    report = convert_file(source, tmp_path, ConvertOptions(material="ceramic"))
    assert report.method == "coacd" and report.validated and report.watertight
    assert report.pieces >= 4
    assert (report.package_dir / "coffee_mug_texture_0.png").is_file()
    assert collision_iou(report.sdf_path) >= 0.8
    drop = drop_test(report.sdf_path)
    assert drop.passed, drop


def test_node_transforms_are_kept_in_visual_and_collision(tmp_path):
    box = trimesh.creation.box([0.1, 0.2, 0.6])  # lying along glTF z
    scene = trimesh.Scene()
    # A node turns it upright (+90 degrees about x: z -> y) and lifts it to rest on y = 0.
    turn = trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0])
    turn[1, 3] = 0.3
    scene.add_geometry(box, transform=turn)
    report = convert_mesh(scene.export(file_type="glb"), "turned.glb", tmp_path, "turned", ConvertOptions(collision="hull"))
    np.testing.assert_allclose(report.bbox_m, [0.1, 0.2, 0.6], atol=1e-6)
    points = read_obj(report.package_dir / "turned_collision_0.obj")
    visual = trimesh.load(report.package_dir / "turned.gltf", force="mesh")
    placed = gltf_to_drake(visual.vertices)
    np.testing.assert_allclose(placed.min(axis=0), points.min(axis=0), atol=1e-6)
    np.testing.assert_allclose(placed.max(axis=0), points.max(axis=0), atol=1e-6)
    assert report.com_m[2] == pytest.approx(0.3, abs=1e-6)


def test_obj_with_material_library_keeps_its_texture(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name, blob in trimesh.exchange.obj.export_obj(textured_box(), include_texture=True, return_texture=True)[1].items():
        (source / name).write_bytes(blob)
    obj_text = trimesh.exchange.obj.export_obj(textured_box(), include_texture=True, mtl_name="crate.mtl")
    (source / "crate.obj").write_text(obj_text)
    report = convert_file(source / "crate.obj", tmp_path / "out", ConvertOptions(collision="hull"))
    gltf = json.loads((report.package_dir / "crate.gltf").read_text())
    assert len(gltf.get("images", [])) == 1
    assert report.volume_m3 == pytest.approx(0.027, rel=1e-6)


def test_root_transform_is_added_once_above_the_scene_roots(tmp_path):
    child = trimesh.creation.box([0.1, 0.1, 0.1])
    scene = trimesh.Scene()
    scene.add_geometry(child, node_name="lid", transform=trimesh.transformations.translation_matrix([0, 0.05, 0]))
    report = convert_mesh(scene.export(file_type="glb"), "s.glb", tmp_path, "s", ConvertOptions(scale=2.0, collision="hull"))
    gltf = json.loads((report.package_dir / "s.gltf").read_text())
    (root,) = gltf["scenes"][gltf["scene"]]["nodes"]
    assert gltf["nodes"][root]["name"] == "geomgen_root"
    parents = [i for i, node in enumerate(gltf["nodes"]) for c in node.get("children", [])]
    assert len(parents) == len({c for node in gltf["nodes"] for c in node.get("children", [])})  # one parent each
    visual = trimesh.load(report.package_dir / "s.gltf", force="mesh")
    np.testing.assert_allclose(visual.bounds, [[-0.1, 0.0, -0.1], [0.1, 0.2, 0.1]], atol=1e-6)


def test_pack_and_unpack_gltf_round_trip_byte_for_byte(tmp_path):
    from geomgen.geometry.visual import pack_gltf, split_glb, write_visual

    files = trimesh.Scene(textured_box()).export(file_type="gltf")
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    gltf_name = next(n for n in files if n.endswith(".gltf"))
    source = json.loads(files[gltf_name])
    glb = pack_gltf(files[gltf_name], tmp_path)
    tree, binary = split_glb(glb)
    assert json.loads(json.dumps(tree["accessors"])) == source["accessors"]
    assert len(tree["buffers"]) == 1 and "uri" not in tree["buffers"][0]
    # Without a scene list every parentless node is a root; the transform goes above them.
    tree.pop("scenes", None)
    tree.pop("scene", None)
    text = json.dumps(tree).encode()
    text += b" " * (-len(text) % 4)
    body = struct.pack("<II", len(text), 0x4E4F534A) + text + struct.pack("<II", len(binary), 0x004E4942) + binary
    rebuilt = struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body
    out = tmp_path / "out"
    out.mkdir()
    written = write_visual(rebuilt, out, "v", np.diag([2.0, 2.0, 2.0, 1.0]))
    assert [p.name for p in written] == ["v.gltf", "v.bin", "v_texture_0.png"]
    result = json.loads((out / "v.gltf").read_text())
    assert result["nodes"][result["scenes"][0]["nodes"][0]]["matrix"][0] == 2.0
    view = tree["bufferViews"][tree["images"][0]["bufferView"]]
    image = binary[view.get("byteOffset", 0) : view.get("byteOffset", 0) + view["byteLength"]]
    assert (out / "v_texture_0.png").read_bytes() == image  # not re-encoded
    assert len(result["accessors"]) == len(source["accessors"])
    visual = trimesh.load(out / "v.gltf", force="mesh")
    np.testing.assert_allclose(np.ptp(visual.vertices, axis=0), [0.6, 0.6, 0.6], atol=1e-6)


def test_options_may_come_as_a_wire_dict(tmp_path):
    report = convert_mesh(box_glb(), "b.glb", tmp_path, "b", {"mass_kg": 4.0, "collision": "hull"})
    assert report.mass_kg == 4.0 and report.method == "hull"
    with pytest.raises(InputError) as info:
        convert_mesh(box_glb(), "b.glb", tmp_path, "c", {"mass": 4.0})
    assert info.value.code == "bad_option"

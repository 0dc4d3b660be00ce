"""MJCF, URDF and USD written beside real packages, each judged by its own
engine: MuJoCo loads the MJCF with geomgen's mass and inertia and an object
dropped from 2 cm settles upright; Drake parses the URDF with the same spatial
inertia; usd-core reads back mass, centre of mass, principal inertia, the
convex-hull approximation on every collider and the friction."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import trimesh

from geomgen.contract import convert_options
from geomgen.errors import InputError
from geomgen.geometry.convert import ConversionReport, convert_file, convert_mesh
from geomgen.geometry.formats import FormatFiles, write_formats
from tests.conftest import SHARED_DATA
from tests.shapes import shape_glb

REAL_ASSETS = ("coffee_mug", "king_bed", "office_chair", "printer", "work_desk")
ALL = ["sdf", "mjcf", "urdf", "usd"]


def _formats(report: ConversionReport, formats=ALL) -> FormatFiles:
    return write_formats(
        report.package_dir,
        report.name,
        formats,
        visual_gltf=report.package_dir / f"{report.name}.gltf",
        collision_files=[p for p in report.files if "_collision_" in p.name],
        mass_kg=report.mass_kg,
        com_m=report.com_m,
        inertia_kg_m2=report.inertia_kg_m2,
        mu=report.mu,
    )


def _package(tmp: Path, name: str, glb: bytes, material: str | None = None) -> tuple[ConversionReport, FormatFiles]:
    options = {"collision": "hull", "validate": False}
    if material:
        options["material"] = material
    report = convert_mesh(glb, f"{name}.glb", tmp, name, convert_options(options))
    return report, _formats(report)


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, tuple[ConversionReport, FormatFiles]]:
    """A textured mug (texture through every format), an untextured table."""
    tmp = tmp_path_factory.mktemp("formats")
    return {
        "mug": _package(tmp, "mug", shape_glb("mug", textured=True), material="ceramic"),
        "table": _package(tmp, "table", shape_glb("table"), material="wood"),
    }


# --- judges, shared by the shapes and the real meshes -------------------------------------------


def _judge_mujoco(report: ConversionReport, mjcf: Path) -> None:
    mujoco = pytest.importorskip("mujoco", reason="mujoco is not installed (pip install mujoco)")
    model = mujoco.MjModel.from_xml_path(str(mjcf))
    body = model.body(report.name).id
    assert model.body_mass[body] == pytest.approx(report.mass_kg, rel=1e-6)
    np.testing.assert_allclose(model.body_ipos[body], report.com_m, rtol=1e-6, atol=1e-9)
    rotation = np.zeros(9)
    mujoco.mju_quat2Mat(rotation, model.body_iquat[body])
    rotation = rotation.reshape(3, 3)
    tensor = rotation @ np.diag(model.body_inertia[body]) @ rotation.T
    expected = np.asarray(report.inertia_kg_m2)
    np.testing.assert_allclose(tensor, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    # Collision geoms collide, the visual does not; friction is geomgen's mu.
    for geom in range(model.ngeom):
        name = model.geom(geom).name
        if "_collision_" in name:
            assert model.geom_contype[geom] and model.geom_conaffinity[geom] and model.geom_group[geom] == 3
            assert model.geom_friction[geom][0] == pytest.approx(report.mu)
        else:
            assert name.endswith("_visual") and model.geom_contype[geom] == 0 and model.geom_group[geom] == 2

    # Dropped from 2 cm onto a plane, upright: it stays upright and comes to rest.
    spec = mujoco.MjSpec.from_file(str(mjcf))
    spec.worldbody.add_geom(type=mujoco.mjtGeom.mjGEOM_PLANE, size=[20, 20, 0.1])
    spec.option.timestep = 0.001
    model = spec.compile()
    data = mujoco.MjData(model)
    lowest = min(
        trimesh.load(str(p), force="mesh", process=False).vertices[:, 2].min()
        for p in report.files
        if "_collision_" in p.name
    )
    data.qpos[:3] = [0.0, 0.0, 0.02 - lowest]
    data.qpos[3:7] = [1.0, 0.0, 0.0, 0.0]
    mujoco.mj_forward(model, data)
    poses = {}
    while data.time < 3.0:
        mujoco.mj_step(model, data)
        for mark_s in (2.0, 3.0):
            if mark_s not in poses and data.time >= mark_s - 1e-9:
                poses[mark_s] = (data.xpos[1].copy(), data.xmat[1].reshape(3, 3).copy())
    tilt_deg = math.degrees(math.acos(min(1.0, poses[3.0][1][2, 2])))
    assert tilt_deg < 5.0, f"{report.name} tipped {tilt_deg:.1f} degrees in MuJoCo"
    # At rest: over the last second it moved less than 1 mm and turned less than 0.5 degrees
    # (MuJoCo's soft contacts leave a sub-millimetre jitter, so velocities are not judged).
    (p2, r2), (p3, r3) = poses[2.0], poses[3.0]
    turned_deg = math.degrees(math.acos(np.clip((np.trace(r2.T @ r3) - 1.0) / 2.0, -1.0, 1.0)))
    assert np.linalg.norm(p3 - p2) < 1e-3 and turned_deg < 0.5, f"{report.name} still moving after 3 s"
    # On the floor, not through it (MuJoCo's soft contact sinks heavy objects by millimetres).
    assert data.qpos[2] == pytest.approx(-lowest, abs=1e-2)

def _judge_drake(report: ConversionReport, urdf: Path) -> None:
    pytest.importorskip("pydrake", reason="pydrake is not installed (pip install 'geomgen[drake]')")
    from pydrake.multibody.parsing import Parser
    from pydrake.multibody.plant import AddMultibodyPlantSceneGraph
    from pydrake.systems.framework import DiagramBuilder
    from pydrake.multibody.tree import RotationalInertia, SpatialInertia

    plant, scene_graph = AddMultibodyPlantSceneGraph(DiagramBuilder(), 0.001)
    parser = Parser(plant)
    parser.SetStrictParsing()  # a warning (an unknown tag, say) fails the test
    parser.AddModels(str(urdf))
    plant.Finalize()
    body = plant.GetBodyByName("base_link")
    got = body.default_spatial_inertia()
    i = np.asarray(report.inertia_kg_m2)
    central = RotationalInertia(i[0, 0], i[1, 1], i[2, 2], i[0, 1], i[0, 2], i[1, 2])
    want = SpatialInertia.MakeFromCentralInertia(report.mass_kg, np.asarray(report.com_m), central)
    assert got.get_mass() == pytest.approx(report.mass_kg, rel=1e-6)
    np.testing.assert_allclose(got.get_com(), report.com_m, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(got.CopyToFullMatrix6(), want.CopyToFullMatrix6(), rtol=1e-6, atol=1e-12)
    pieces = plant.GetCollisionGeometriesForBody(body)
    assert len(pieces) == report.pieces
    inspector = scene_graph.model_inspector()
    for piece in pieces:
        assert type(inspector.GetShape(piece)).__name__ == "Convex"
        friction = inspector.GetProximityProperties(piece).GetProperty("material", "coulomb_friction")
        assert friction.static_friction() == friction.dynamic_friction() == pytest.approx(report.mu)


def _judge_usd(report: ConversionReport, usda: Path) -> None:
    pytest.importorskip("pxr", reason="usd-core is not installed (pip install 'geomgen[usd]')")
    from pxr import Usd, UsdGeom, UsdPhysics, UsdShade

    stage = Usd.Stage.Open(str(usda))
    assert UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    assert UsdGeom.GetStageUpAxis(stage) == UsdGeom.Tokens.z
    body = stage.GetDefaultPrim()
    assert body.HasAPI(UsdPhysics.RigidBodyAPI) and body.HasAPI(UsdPhysics.MassAPI)
    mass = UsdPhysics.MassAPI(body)
    # USD keeps these as 32-bit floats.
    assert mass.GetMassAttr().Get() == pytest.approx(report.mass_kg, rel=1e-6)
    np.testing.assert_allclose(np.array(mass.GetCenterOfMassAttr().Get()), report.com_m, rtol=1e-6, atol=1e-7)
    moments = np.array(mass.GetDiagonalInertiaAttr().Get(), dtype=float)
    np.testing.assert_allclose(np.sort(moments), np.linalg.eigvalsh(np.asarray(report.inertia_kg_m2)), rtol=1e-5)
    quat = mass.GetPrincipalAxesAttr().Get()
    from scipy.spatial.transform import Rotation

    axes = Rotation.from_quat([*quat.GetImaginary(), quat.GetReal()]).as_matrix()
    expected = np.asarray(report.inertia_kg_m2)
    np.testing.assert_allclose(axes @ np.diag(moments) @ axes.T, expected, atol=1e-5 * np.abs(expected).max())

    colliders = [p for p in Usd.PrimRange(body) if p.HasAPI(UsdPhysics.CollisionAPI)]
    assert len(colliders) == report.pieces
    for prim in colliders:
        assert prim.HasAPI(UsdPhysics.MeshCollisionAPI)
        assert UsdPhysics.MeshCollisionAPI(prim).GetApproximationAttr().Get() == "convexHull"
        material, _ = UsdShade.MaterialBindingAPI(prim).ComputeBoundMaterial("physics")
        assert material and material.GetPrim().HasAPI(UsdPhysics.MaterialAPI)
        friction = UsdPhysics.MaterialAPI(material.GetPrim())
        assert friction.GetStaticFrictionAttr().Get() == pytest.approx(report.mu, rel=1e-6)
        assert friction.GetDynamicFrictionAttr().Get() == pytest.approx(report.mu, rel=1e-6)

    visual = UsdGeom.Mesh(stage.GetPrimAtPath(f"/{report.name}/visual"))
    assert len(visual.GetFaceVertexCountsAttr().Get()) > 0
    look, _ = UsdShade.MaterialBindingAPI(visual.GetPrim()).ComputeBoundMaterial()
    assert look and look.ComputeSurfaceSource()[0].GetIdAttr().Get() == "UsdPreviewSurface"


# --- the test shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["mug", "table"])
def test_mjcf_loads_in_mujoco_with_geomgens_inertia_and_drops_upright(packages, shape):
    report, written = packages[shape]
    _judge_mujoco(report, written.paths["mjcf"])


def test_mjcf_shows_the_texture(packages):
    mujoco = pytest.importorskip("mujoco", reason="mujoco is not installed (pip install mujoco)")
    report, written = packages["mug"]
    model = mujoco.MjModel.from_xml_path(str(written.paths["mjcf"]))
    assert model.ntex == 1 and model.nmat == 1
    visual = model.mesh(f"{report.name}_visual").id
    assert model.mesh_texcoordnum[visual] > 0


@pytest.mark.parametrize("shape", ["mug", "table"])
def test_urdf_parses_in_drake_with_the_same_spatial_inertia(packages, shape):
    report, written = packages[shape]
    _judge_drake(report, written.paths["urdf"])


@pytest.mark.parametrize("shape", ["mug", "table"])
def test_usd_carries_mass_inertia_convex_hulls_and_friction(packages, shape):
    report, written = packages[shape]
    _judge_usd(report, written.paths["usd"])


def test_usd_visual_has_uvs_and_reads_the_png(packages):
    pytest.importorskip("pxr", reason="usd-core is not installed (pip install 'geomgen[usd]')")
    from pxr import Usd, UsdGeom, UsdShade

    report, written = packages["mug"]
    stage = Usd.Stage.Open(str(written.paths["usd"]))
    mesh = stage.GetPrimAtPath(f"/{report.name}/visual")
    st = UsdGeom.PrimvarsAPI(mesh).GetPrimvar("st")
    assert st and len(st.Get()) == len(UsdGeom.Mesh(mesh).GetPointsAttr().Get())
    textures = [UsdShade.Shader(p) for p in stage.Traverse() if UsdShade.Shader(p) and UsdShade.Shader(p).GetIdAttr().Get() == "UsdUVTexture"]
    assert len(textures) == 1
    file = textures[0].GetInput("file").Get().path
    assert (written.paths["usd"].parent / file).is_file() and file.endswith(".png")


def test_visual_obj_is_the_gltf_visual_in_the_z_up_body_frame(packages):
    report, written = packages["mug"]
    visual = trimesh.load(str(report.package_dir / f"{report.name}_visual.obj"), force="mesh", process=False)
    # The same extents as the report's bounding box (x, y, z of the +Z-up frame), resting on z = 0.
    np.testing.assert_allclose(visual.extents, report.bbox_m, rtol=1e-6)
    assert visual.bounds[0][2] == pytest.approx(0.0, abs=1e-9)
    assert visual.visual.uv is not None and len(visual.visual.uv) == len(visual.vertices)


def test_only_the_formats_asked_are_written(tmp_path):
    report = convert_mesh(shape_glb("stool"), "stool.glb", tmp_path, "stool", convert_options({"collision": "hull", "validate": False}))
    before = set(report.package_dir.iterdir())
    assert _formats(report, ["sdf"]).paths == {}
    assert set(report.package_dir.iterdir()) == before
    written = _formats(report, ["URDF", "sdf", "urdf"])
    assert list(written.paths) == ["urdf"]
    assert set(report.package_dir.iterdir()) - before == set(written.files)
    assert {p.name for p in written.files} == {"stool.urdf", "stool_visual.obj", "stool_visual.mtl"}  # untextured


def test_an_unknown_format_is_refused(tmp_path):
    report = convert_mesh(shape_glb("stool"), "stool.glb", tmp_path, "stool", convert_options({"collision": "hull", "validate": False}))
    with pytest.raises(InputError) as caught:
        _formats(report, ["mjcf", "fbx"])
    assert caught.value.code == "bad_option"
    assert not (report.package_dir / "stool.xml").exists()


# --- the five real meshes ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("asset", REAL_ASSETS)
def test_real_meshes_in_every_format(tmp_path, asset):
    source = SHARED_DATA / "scenesmith_assets" / asset / f"{asset}.gltf"
    if not source.is_file():
        pytest.skip(f"{source} is not there")
    report = convert_file(source, tmp_path, convert_options({"collision": "hull", "validate": False}))
    written = _formats(report)
    assert (report.package_dir / f"{asset}_visual.png").is_file()  # the JPEG atlas, as PNG for MuJoCo
    _judge_mujoco(report, written.paths["mjcf"])
    _judge_drake(report, written.paths["urdf"])
    _judge_usd(report, written.paths["usd"])


def test_usd_without_usd_core_is_refused_before_any_work(monkeypatch):
    """Where the conversion is taken on (the SDF worker's job check, geomgen
    convert's options), not after the collision shapes are built."""
    import importlib.util

    from geomgen.geometry import formats as formats_module

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pxr" else real(name, *a))
    with pytest.raises(InputError) as info:
        formats_module.check_writable(["sdf", "usd"])
    assert info.value.code == "missing_dependency" and "geomgen[usd]" in info.value.message
    formats_module.check_writable(["sdf", "mjcf", "urdf"])  # the others need nothing more

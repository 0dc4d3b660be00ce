"""Issue 3's acceptance tests, judged by Drake: every GLB converted with the
default options gives an SDF that loads, has physically valid inertia, stands
upright and still after a 2 cm drop, and has collision geometry that hugs its
visual mesh. Inputs: the five real Hunyuan3D meshes and the trimesh test shapes.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import trimesh

from geomgen.geometry.drake_check import (
    PRECISE_IOU_CELLS,
    collision_iou,
    drop_test,
    validate_sdf,
)
from geomgen.contract import ConvertOptions
from tests.conftest import SHARED_DATA
from tests.shapes import SHAPES, shape_glb

REAL_MESHES = ("coffee_mug", "king_bed", "office_chair", "printer", "work_desk")
TEXTURED_SHAPES = ("stool", "mug", "chair")  # the others go through untextured
MAX_TILT_DEG = 5.0
MAX_SPEED_M_S = 0.05
MIN_IOU = 0.7


def real_mesh_glb(name: str) -> bytes:
    """The shipped glTF (buffers and texture beside it) as one GLB, as a GPU worker would send it."""
    scene = trimesh.load(SHARED_DATA / "scenesmith_assets" / name / f"{name}.gltf")
    buffer = io.BytesIO()
    scene.export(buffer, file_type="glb")
    return buffer.getvalue()


def convert_and_judge(data: bytes, name: str, out_dir: Path) -> dict:
    """Convert with default options, then ask Drake; returns every figure at once
    so a failure message shows the whole picture."""
    from geomgen.geometry.convert import convert_mesh

    report = convert_mesh(data, f"{name}.glb", out_dir, name, ConvertOptions())
    package = out_dir / name
    sdf = package / f"{name}.sdf"
    assert report.sdf_path == sdf
    info = validate_sdf(sdf)
    drop = drop_test(sdf, drop_height_m=0.02, duration_s=3.0, time_step_s=1e-3)
    return {
        "report": report,
        "info": info,
        "pieces": len(list(package.glob(f"{name}_collision_*.obj"))),
        "tilt_deg": drop.tilt_deg,
        "speed_m_s": drop.speed_m_s,
        # 256 cells: coarser grids misjudge thin boards by up to 0.1 (drake_check.collision_iou).
        "iou": collision_iou(sdf, cells=PRECISE_IOU_CELLS),
    }


def assert_sim_ready(result: dict) -> None:
    report = result["report"]
    summary = (
        f"method {report.method} (fallbacks {report.fallbacks}), "
        f"tilt {result['tilt_deg']:.2f} deg, speed {result['speed_m_s']:.4f} m/s, "
        f"IoU {result['iou']:.3f}, {result['pieces']} pieces, mass {result['info']['mass_kg']:.3f} kg, "
        f"com {[round(c, 4) for c in result['info']['com_m']]} m"
    )
    assert result["info"]["mass_kg"] > 0, summary
    assert result["info"]["collision_geometries"] == result["pieces"] == report.pieces > 0, summary
    assert result["tilt_deg"] < MAX_TILT_DEG, f"not upright after the drop: {summary}"
    assert result["speed_m_s"] < MAX_SPEED_M_S, f"not at rest after the drop: {summary}"
    assert result["iou"] >= MIN_IOU, f"collision does not hug the visual: {summary}"


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_is_sim_ready(name, tmp_path):
    assert_sim_ready(convert_and_judge(shape_glb(name, textured=name in TEXTURED_SHAPES), name, tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", REAL_MESHES)
def test_real_mesh_is_sim_ready(name, tmp_path):
    assert_sim_ready(convert_and_judge(real_mesh_glb(name), name, tmp_path))

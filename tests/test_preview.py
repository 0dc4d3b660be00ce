"""preview.png: the visual and the collision pieces side by side, rendered by
Drake's VTK engine in the conversion child, shipped in the package; skipped
with a warning (never a failed conversion) when it cannot be rendered."""

from __future__ import annotations

import colorsys
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geomgen import conversion
from geomgen.contract import ConvertOptions
from geomgen.geometry import convert as convert_module
from geomgen.geometry.convert import convert_mesh
from geomgen.geometry.preview import BACKGROUND_RGBA, PANEL_PX, PREVIEW_FILE, piece_colours
from tests.shapes import shape_glb

if importlib.util.find_spec("pydrake") is None:
    # CI installs the test extra, drake among it: there a missing renderer is a failure, not a skip.
    _reason = "the preview's renderer is Drake's VTK engine: pip install -e '.[test]' (or pip install drake)"
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError(_reason)
    pytest.skip(_reason, allow_module_level=True)

CAPTION_ROWS = 14  # the captions sit in the top rows of each half


def _halves(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (PANEL_PX, 2 * PANEL_PX, 3)
    # Below the captions, and clear of the divider line between the halves.
    return image[CAPTION_ROWS:, : PANEL_PX - 1], image[CAPTION_ROWS:, PANEL_PX + 1:]


def _foreground(panel: np.ndarray) -> np.ndarray:
    background = np.round(np.array(BACKGROUND_RGBA[:3]) * 255)
    return np.abs(panel.astype(float) - background).max(axis=-1) > 12


def _hues_present(panel: np.ndarray, mask: np.ndarray, colours: list, min_share: float) -> int:
    """How many of ``colours`` cover at least ``min_share`` of the masked pixels
    (matched by hue among saturated pixels: shading changes brightness, not hue)."""
    pixels = panel[mask].astype(float) / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
    saturated = hsv[(hsv[:, 1] > 0.35) & (hsv[:, 2] > 0.15)]
    found = 0
    for rgb in colours:
        hue = colorsys.rgb_to_hsv(*rgb)[0]
        distance = np.abs((saturated[:, 0] - hue + 0.5) % 1.0 - 0.5)
        found += (distance < 0.025).sum() >= min_share * len(pixels)
    return found


@pytest.fixture(scope="module")
def chair(tmp_path_factory) -> dict:
    """A textured chair converted by `geomgen convert`'s path: in a conversion child process."""
    out = tmp_path_factory.mktemp("preview")
    source = out / "chair.glb"
    source.write_bytes(shape_glb("chair", textured=True))
    info = conversion.convert_path(source, out, ConvertOptions(), timeout_s=240.0)
    return {"info": info, "package": out / "chair"}


def test_the_preview_shows_the_visual_and_every_collision_colour_from_one_camera(chair):
    package, info = chair["package"], chair["info"]
    assert info["preview"] == PREVIEW_FILE and PREVIEW_FILE in info["files"]
    manifest = json.loads((package / "chair.json").read_text())
    assert manifest["preview"] == PREVIEW_FILE and manifest["stage_s"]["preview"] > 0
    visual, collision = _halves(package / PREVIEW_FILE)
    visual_mask, collision_mask = _foreground(visual), _foreground(collision)
    # The object fills a fair part of each half, and neither half is all object.
    for mask in (visual_mask, collision_mask):
        assert 0.05 < mask.mean() < 0.8, f"foreground share {mask.mean():.3f}"
    # One camera: the pieces cover what the visual covers (they hug it).
    overlap = (visual_mask & collision_mask).sum() / (visual_mask | collision_mask).sum()
    assert overlap > 0.6, f"visual and collision silhouettes overlap only {overlap:.2f}"
    # The pieces wear their own distinct colours; the untextured-looking visual half does not.
    pieces = info["pieces"]
    assert pieces >= 3
    colours = piece_colours(pieces)
    assert _hues_present(collision, collision_mask, colours, 0.01) >= 3
    assert len({tuple(np.round(c, 3)) for c in colours}) == pieces


def test_the_preview_travels_with_the_package_files_an_sdf_worker_sends(chair, tmp_path):
    # What an SDF worker sends is every file of its out/ folder: preview.png among them.
    job_dir = tmp_path / "job"
    (job_dir / "out").mkdir(parents=True)
    shutil.copytree(chair["package"], job_dir / "out" / "chair")
    reply = conversion.package_files(job_dir, {"sdf_file": "chair/chair.sdf", "info": chair["info"]})
    assert reply["files"]["chair/preview.png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_preview_off_writes_none(tmp_path):
    report = convert_mesh(shape_glb("table"), "table.glb", tmp_path, "table", ConvertOptions(preview=False))
    assert report.preview is None and not (report.package_dir / PREVIEW_FILE).exists()
    assert "preview" not in report.stage_s
    assert not any("preview" in w for w in report.warnings)


def test_without_its_renderer_the_package_is_made_and_warns(tmp_path, monkeypatch):
    # pydrake is installed here; this is how a machine without it looks to the converter.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.split(".")[0] == "pydrake" else real_find_spec(name, *args))
    report = convert_mesh(shape_glb("table"), "table.glb", tmp_path, "table", ConvertOptions())
    assert report.sdf_path.is_file() and report.preview is None
    assert not (report.package_dir / PREVIEW_FILE).exists()
    assert any(w.startswith("no preview.png: its renderer, pydrake, is not installed") for w in report.warnings)
    assert report.checks["drake"]["status"] == "skipped"


def test_a_renderer_failure_costs_the_picture_only(tmp_path):
    warnings: list[str] = []
    bounds = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    made = convert_module._preview(tmp_path / PREVIEW_FILE, tmp_path / "missing.gltf", [], bounds, warnings)
    assert made is None and not (tmp_path / PREVIEW_FILE).exists()
    assert len(warnings) == 1 and warnings[0].startswith("no preview.png: rendering failed (")

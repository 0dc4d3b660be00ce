"""SAM 3 and the sam3d backend through the whole system, in real processes.

Every process started here gets tests/tiny_sam3.py's ``sitecustomize`` on its
PYTHONPATH: sam3's builder makes the tiny model, and the sam3d pipeline
allow-list takes the test stand-in for SAM 3D Objects. Everything else is the
real code: broker, GPU worker, backend process, SDF worker, ``geomgen generate``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sam3d

_SKIP = "the sam3d extra is not installed (bash .ci/install-sam3d.sh)"
pytest.importorskip("torch", reason=_SKIP)
pytest.importorskip("sam3.model_builder", reason=_SKIP)
pytest.importorskip("open_clip", reason=_SKIP)
pytest.importorskip("hydra.utils", reason=_SKIP)

import trimesh  # noqa: E402

from geomgen import GeometryClient, GeometryRequest  # noqa: E402
from tests import tiny_sam3  # noqa: E402
from tests.conftest import wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SQUARE_BOX_PX = [32, 20, 64, 60]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_sam3.write_checkpoint(tmp_path_factory.mktemp("sam3") / "sam3.pt")


@pytest.fixture
def env(tmp_path) -> dict:
    site = tiny_sam3.site_dir(tmp_path / "site")
    path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
            "U2NET_HOME": str(tmp_path / "u2net"), "GEOMGEN_CACHE_DIR": str(tmp_path / "cache")}


def _extent(glb: Path):
    scene = trimesh.load(glb, file_type="glb")
    low, high = scene.bounds
    return high - low, low


def test_image_to_sdf_through_a_sam3d_worker(procs, endpoints, checkpoint, env, tmp_path):
    from geomgen.geometry.drake_check import validate_sdf

    record = tmp_path / "calls.jsonl"
    config = tiny_sam3.stand_in_config(tmp_path / "weights", record_path=record)
    broker = f"127.0.0.1:{endpoints.client_port}"
    procs.start("broker", "--port", str(endpoints.client_port), env=env)
    worker = procs.start("gpu-worker", "--backend", "sam3d", "--broker", broker,
                         "--backend-option", f"sam3_checkpoint={checkpoint}",
                         "--backend-option", f"sam3d_checkpoint={config}",
                         "--backend-option", "device=cpu", "--backend-option", "threshold=0",
                         env=env, name="gpu-sam3d")
    procs.start("sdf-worker", "--broker", broker, "--procs", "1", env=env)

    image = tmp_path / "scene.png"
    image.write_bytes(tiny_sam3.scene_png())
    out, debug = tmp_path / "out", tmp_path / "debug"
    debug.mkdir()
    with GeometryClient(endpoints.client, timeout_s=300) as client:
        wait_for(lambda: client.health()["backends"].get("sam3d", {}).get("alive", 0) >= 1
                 and client.health()["sdf_slots"] >= 1 or worker.poll() is not None,
                 timeout_s=300, interval_s=0.5, what="the sam3d worker to load SAM 3 and say READY")
        assert worker.poll() is None, worker.log_path.read_text()[-3000:]
        requests = [
            GeometryRequest(image_path=str(image), output_dir=str(out), backend="sam3d", collision="hull",
                            mass_kg=2.0, debug_folder=str(debug)),
            # the old API's sam3d_config: nothing above confidence 1, a clear error for this item only
            GeometryRequest(image_path=str(image), output_dir=str(out), output_filename="giraffe", backend="sam3d",
                            collision="hull", sam3d_config={"mode": "text", "text_prompt": "a giraffe",
                                                            "threshold": 1.0}),
            GeometryRequest(image_path=str(image), output_dir=str(out), output_filename="again", backend="sam3d",
                            collision="hull", sam3d_config={"seed": 5, "texture": False}),
        ]
        results = dict(client.generate(requests))

    assert results[0].ok, results[0].error
    extent, low = _extent(Path(results[0].glb_path))
    assert extent == pytest.approx([0.32, 0.40, 0.10], abs=1e-4) and low[1] == pytest.approx(0.0, abs=1e-6)
    assert validate_sdf(Path(results[0].sdf_path))["mass_kg"] == pytest.approx(2.0)
    assert (debug / "scene_mask.png").is_file() and (debug / "scene_masked.png").is_file()
    assert not results[1].ok
    assert results[1].error_code == "no_detection" and "a giraffe" in results[1].error
    assert results[2].ok, results[2].error  # the worker served the next job after an error
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [call["alpha_box_px"] for call in calls] == [SQUARE_BOX_PX, SQUARE_BOX_PX]
    assert calls[1]["seed"] == 5 and calls[1]["kwargs"]["with_texture_baking"] is False
    assert worker.poll() is None


def test_a_worker_without_sam3d_objects_stops_at_start(procs, endpoints, checkpoint, env, tmp_path):
    config = tiny_sam3.stand_in_config(
        tmp_path / "hf", target="sam3d_objects.pipeline.inference_pipeline_pointmap.InferencePipelinePointMap")
    worker = procs.start("gpu-worker", "--backend", "sam3d", "--broker", f"127.0.0.1:{endpoints.client_port}",
                         "--backend-option", f"sam3_checkpoint={checkpoint}",
                         "--backend-option", f"sam3d_checkpoint={config}", env=env, name="gpu-sam3d")
    assert worker.wait(timeout=240) == 2
    message = worker.log_path.read_text()
    assert "sam3d_objects" in message and "pytorch3d" in message and "sam-3d-objects" in message
    assert "Traceback" not in message


def _generate(env: dict, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geomgen", "generate", *args, "--no-cache", "--json",
                           "--sdf-workers", "1", "--collision", "hull"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout_s)


def test_silhouette_with_segmenter_sam3_through_generate(checkpoint, env, tmp_path):
    image = tmp_path / "scene.png"
    image.write_bytes(tiny_sam3.scene_png())
    sam3 = ["--backend", "silhouette", "--height", "0.4", "--backend-option", "segmenter=sam3",
            "--backend-option", f"sam3_checkpoint={checkpoint}", "--backend-option", "sam3_threshold=0"]
    # Foreground mode: the red square, 32 x 40 px.
    done = _generate(env, str(image), "--out", str(tmp_path / "square"), *sam3)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["status"] == "ok", row
    extent, _ = _extent(Path(row["glb_path"]))
    assert extent[1] == pytest.approx(0.4) and extent[0] / extent[1] == pytest.approx(32 / 40, rel=0.06)
    assert Path(row["sdf_path"]).is_file()
    # Text mode: the tiny model's masks are the grey backdrop, which this prompt names: 96 x 80 px.
    done = _generate(env, str(image), "--out", str(tmp_path / "backdrop"), *sam3,
                     "--backend-option", "text_prompt=the grey backdrop")
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    extent, _ = _extent(Path(row["glb_path"]))
    assert extent[0] / extent[1] == pytest.approx(96 / 80, rel=0.06)


def test_hunyuan3d_with_segmenter_sam3_through_generate(checkpoint, env, tmp_path):
    pytest.importorskip("hy3dgen.shapegen", reason="the hunyuan3d extra is not installed")
    from tests.tiny_hunyuan import TINY_OCTREE_RESOLUTION, build_tiny_model

    models = tmp_path / "hy3dgen"
    build_tiny_model(models)
    env = {**env, "HY3DGEN_MODELS": str(models)}
    image = tmp_path / "photo.png"
    image.write_bytes(tiny_sam3.scene_png())  # RGB: no alpha, and no rembg model on this machine
    hunyuan = ["--backend", "hunyuan3d"]
    for option in ("model=tiny", "subfolder=tiny-dit", "device=cpu", f"octree_resolution={TINY_OCTREE_RESOLUTION}"):
        hunyuan += ["--backend-option", option]
    done = _generate(env, str(image), "--out", str(tmp_path / "plain"), *hunyuan)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["status"] == "error" and "u2net" in row["error"]  # without SAM 3 nothing cuts it out
    done = _generate(env, str(image), "--out", str(tmp_path / "sam3"), *hunyuan,
                     "--backend-option", "segmenter=sam3", "--backend-option", f"sam3_checkpoint={checkpoint}",
                     "--backend-option", "sam3_threshold=0", "--backend-option", "text_prompt=the red square")
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["status"] == "ok", row
    assert Path(row["glb_path"]).stat().st_size > 0 and Path(row["sdf_path"]).is_file()

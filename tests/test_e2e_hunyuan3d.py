"""Hunyuan3D-2 through the whole system: a real `geomgen gpu-worker --backend
hunyuan3d` process loads the tiny random-weight model through hy3dgen's real
loader on the CPU, the broker routes images to it, an SDF worker converts its
GLB, and Drake parses the result. Also: a worker whose weights are missing
exits at start with a message saying where it looked, and never says READY."""

from __future__ import annotations

from pathlib import Path

import pytest

from geomgen import GeometryClient, GeometryRequest
from tests.conftest import wait_for

pytestmark = pytest.mark.hunyuan3d

_SKIP = "the hunyuan3d extra is not installed (bash .ci/install-hunyuan3d.sh)"
pytest.importorskip("torch", reason=_SKIP)
pytest.importorskip("hy3dgen.shapegen", reason=_SKIP)

from geomgen.geometry.drake_check import validate_sdf  # noqa: E402
from tests.tiny_hunyuan import TINY_OCTREE_RESOLUTION, build_tiny_model, object_png  # noqa: E402

TINY_OPTIONS = ["model=tiny", "subfolder=tiny-dit", "device=cpu", f"octree_resolution={TINY_OCTREE_RESOLUTION}"]


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hy3dgen-models")
    build_tiny_model(root)
    return root


def _env(models_root: Path, tmp_path: Path) -> dict:
    # No hub, no rembg model: everything must come from the tiny local weights.
    return {"HY3DGEN_MODELS": str(models_root), "HF_HUB_OFFLINE": "1", "U2NET_HOME": str(tmp_path / "u2net"),
            "HF_HOME": str(tmp_path / "hf")}


def test_image_to_sdf_through_a_hunyuan3d_worker(procs, endpoints, models_root, tmp_path):
    env = _env(models_root, tmp_path)
    broker = f"127.0.0.1:{endpoints.client_port}"
    procs.start("broker", "--port", str(endpoints.client_port), env=env)
    args = ["gpu-worker", "--backend", "hunyuan3d", "--broker", broker]
    for option in TINY_OPTIONS:
        args += ["--backend-option", option]
    worker = procs.start(*args, env=env, name="gpu-hunyuan3d")
    procs.start("sdf-worker", "--broker", broker, "--procs", "1", env=env)

    rgba = tmp_path / "object.png"
    rgba.write_bytes(object_png(alpha=True))
    rgb = tmp_path / "object_rgb.png"
    rgb.write_bytes(object_png(alpha=False))
    out = tmp_path / "out"
    with GeometryClient(endpoints.client, timeout_s=120) as client:
        wait_for(lambda: client.health()["backends"].get("hunyuan3d", {}).get("alive", 0) >= 1
                 and client.health()["sdf_slots"] >= 1 or worker.poll() is not None,
                 timeout_s=240, interval_s=0.5, what="the hunyuan3d worker to load and say READY")
        assert worker.poll() is None, worker.log_path.read_text()[-2000:]
        requests = [
            GeometryRequest(image_path=str(rgba), output_dir=str(out), backend="hunyuan3d", collision="hull",
                            mass_kg=1.0),
            # no alpha and no rembg model here: a clear error for this item only
            GeometryRequest(image_path=str(rgb), output_dir=str(out), backend="hunyuan3d", collision="hull"),
            GeometryRequest(image_path=str(rgba), output_dir=str(out), output_filename="again", backend="hunyuan3d",
                            collision="hull", backend_options={"seed": "7"}),
        ]
        results = dict(client.generate(requests))

    assert results[0].ok, results[0].error
    assert Path(results[0].glb_path).stat().st_size > 0
    assert validate_sdf(Path(results[0].sdf_path))["mass_kg"] == pytest.approx(1.0)
    assert not results[1].ok
    assert results[1].stage in ("input", "generate") and "u2net" in results[1].error and "alpha" in results[1].error
    assert results[2].ok, results[2].error  # the worker served the next job after an error
    assert worker.poll() is None


def test_missing_weights_stop_the_worker_at_start(procs, endpoints, tmp_path):
    env = _env(tmp_path / "no-models", tmp_path)
    worker = procs.start("gpu-worker", "--backend", "hunyuan3d", "--broker", f"127.0.0.1:{endpoints.client_port}",
                         "--backend-option", "device=cpu", env=env, name="gpu-hunyuan3d")
    assert worker.wait(timeout=240) == 2
    message = worker.log_path.read_text()
    assert "no-models" in message  # where it looked
    assert "Traceback" not in message

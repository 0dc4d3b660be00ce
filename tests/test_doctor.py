"""geomgen doctor: the report comes out whatever is installed, and says why a
backend cannot load; weights and helper models are found where they are put."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from geomgen import doctor
from geomgen.backends.base import Backend


class CrashingCheckBackend(Backend):
    """A plug-in whose check() itself raises."""

    name = "crashing"

    @classmethod
    def check(cls):
        raise RuntimeError("probe blew up")

    def generate(self, job):
        raise AssertionError("never called")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One collect() with the hunyuan3d weights and rembg model laid out in temp folders
    (empty files: the doctor checks presence, it loads nothing)."""
    models = tmp_path_factory.mktemp("hy3dgen")
    for folder in ("hunyuan3d-dit-v2-0-turbo", "hunyuan3d-vae-v2-0-turbo"):
        path = models / "tencent" / "Hunyuan3D-2" / folder
        path.mkdir(parents=True)
        (path / "config.yaml").write_text("{}")
        (path / "model.fp16.safetensors").write_bytes(b"")
    u2net = tmp_path_factory.mktemp("u2net")
    (u2net / "u2net.onnx").write_bytes(b"")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HY3DGEN_MODELS", str(models))
        patch.setenv("U2NET_HOME", str(u2net))
        checks = doctor.collect()
    return {c.name: c for c in checks}, models, u2net


def test_every_fact_has_a_line(report):
    checks, _, _ = report
    for name in ("python", "geomgen", "torch", "hy3dgen", "weights full", "weights mini", "weights texture",
                 "rembg model", "texture extension", "sam3", "pydrake", "coacd",
                 "backend hunyuan3d", "backend sam3d", "backend silhouette", "backend mesh"):
        assert name in checks, name
        assert checks[name].detail, name
    assert checks["python"].ok and checks["geomgen"].ok
    assert checks["backend silhouette"].ok and checks["backend mesh"].ok


def test_weights_are_found_where_they_are_and_missing_ones_say_how_to_fetch(report):
    checks, models, _ = report
    assert checks["weights full"].ok
    assert str(models / "tencent/Hunyuan3D-2/hunyuan3d-dit-v2-0-turbo/model.fp16.safetensors") in checks["weights full"].detail
    assert not checks["weights mini"].ok
    assert "huggingface-cli download tencent/Hunyuan3D-2mini" in checks["weights mini"].detail
    assert not checks["weights texture"].ok and "texture=off" in checks["weights texture"].detail


def test_rembg_model_and_gpu_backends(report):
    checks, _, u2net = report
    rembg = checks["rembg model"]
    assert str(u2net / "u2net.onnx") in rembg.detail
    hunyuan = checks["backend hunyuan3d"]
    if checks["torch"].ok and checks["hy3dgen"].ok:
        # Weights are there; only a GPU can be missing.
        assert hunyuan.ok == checks["cuda"].ok
        if not hunyuan.ok:
            assert "no CUDA device" in hunyuan.detail
    else:
        assert not hunyuan.ok and ("geomgen[hunyuan3d]" in hunyuan.detail or "torch" in hunyuan.detail)


def test_render_lists_loadable_backends(report):
    checks, _, _ = report
    text = doctor.render(list(checks.values()))
    last = text.splitlines()[-1]
    assert last.startswith("backends that can load here:")
    assert "silhouette" in last and "mesh" in last
    assert any(line.split()[:2] == ["no", "sam3"] or line.split()[:2] == ["ok", "sam3"] for line in text.splitlines())


def test_a_crashing_probe_becomes_a_failed_line(monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(doctor, "_coacd", broken)
    monkeypatch.setattr(doctor, "_torch", broken)  # keeps this test quick
    checks = {c.name: c for c in doctor.collect()}
    assert not checks["coacd"].ok and "driver exploded" in checks["coacd"].detail
    assert checks["backend mesh"].ok


def test_a_plugin_whose_check_raises_gets_its_own_line(monkeypatch):
    monkeypatch.setenv("GEOMGEN_BACKENDS", "crashing=tests.test_doctor:CrashingCheckBackend")
    checks = {c.name: c for c in doctor.collect()}
    assert not checks["backend crashing"].ok and "probe blew up" in checks["backend crashing"].detail
    assert checks["backend silhouette"].ok


def test_module_entry_point_prints_json():
    done = subprocess.run([sys.executable, "-m", "geomgen.doctor", "--json"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert {"name", "ok", "detail"} <= set(rows[0]) and rows[0]["name"] == "python"
    assert any(row["name"] == "backend mesh" and row["ok"] for row in rows)

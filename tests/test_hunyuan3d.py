"""The hunyuan3d backend on the real hy3dgen pipeline, with tiny random weights on the CPU.

Weights are built by tests/tiny_hunyuan.py in hy3dgen's folder layout and loaded
through the backend's own load(); only the GPU (an injected CUDA out-of-memory
error) and rembg's model (a tiny ONNX file with u2net's interface) stand in for
what this machine cannot have.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.hunyuan3d

_SKIP = "the hunyuan3d extra is not installed (bash .ci/install-hunyuan3d.sh, or pip install 'geomgen[hunyuan3d]')"
torch = pytest.importorskip("torch", reason=_SKIP)
pytest.importorskip("torchvision", reason=_SKIP)
pytest.importorskip("hy3dgen.shapegen", reason=_SKIP)

import trimesh  # noqa: E402

from geomgen.backends import load_backend_class  # noqa: E402
from geomgen.backends._hy3d_weights import find_weights  # noqa: E402
from geomgen.backends.base import GenerationInput  # noqa: E402
from geomgen.backends.hunyuan3d import Hunyuan3DBackend  # noqa: E402
from geomgen.errors import BackendUnavailable, GenerateError, InputError  # noqa: E402
from .tiny_hunyuan import (  # noqa: E402
    TINY_OCTREE_RESOLUTION,
    build_tiny_model,
    build_tiny_rembg_model,
    build_tiny_vae,
    object_png,
)

TINY = {"model": "tiny", "subfolder": "tiny-dit", "device": "cpu", "octree_resolution": str(TINY_OCTREE_RESOLUTION)}


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hy3dgen-models")
    build_tiny_model(root)
    return root


@pytest.fixture(scope="module")
def isolated_env(models_root, tmp_path_factory):
    """HY3DGEN_MODELS at the tiny models, and no rembg model or hub cache to fall back on."""
    import huggingface_hub.constants

    empty = tmp_path_factory.mktemp("empty")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HY3DGEN_MODELS", str(models_root))
        patch.setenv("U2NET_HOME", str(empty / "u2net"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty / "hub"))
        yield empty


@pytest.fixture(scope="module")
def backend(isolated_env) -> Hunyuan3DBackend:
    instance = Hunyuan3DBackend(dict(TINY))
    instance.load()
    yield instance
    instance.close()


def job(data: bytes, tmp_path: Path, name: str = "object.png", **options) -> GenerationInput:
    return GenerationInput(input_name=name, input_data=data, work_dir=tmp_path, options=options)


def glb_mesh(glb: bytes) -> trimesh.Trimesh:
    scene = trimesh.load(io.BytesIO(glb), file_type="glb")
    return scene.to_geometry() if isinstance(scene, trimesh.Scene) else scene


# --- generation ----------------------------------------------------------------------


def test_registered_under_its_name():
    assert load_backend_class("hunyuan3d") is Hunyuan3DBackend
    assert Hunyuan3DBackend.uses_gpu and Hunyuan3DBackend.extra == "hunyuan3d"


def test_rgba_image_gives_a_glb_in_geomgen_conventions(backend, tmp_path):
    steps: list[str] = []
    request = job(object_png(alpha=True), tmp_path, max_faces=3000)
    request.progress = steps.append
    output = backend.generate(request)

    mesh = glb_mesh(output.glb)
    assert 0 < len(mesh.faces) <= 3000 < output.info["raw_faces"]
    assert output.info["faces"] == len(mesh.faces)
    low, high = mesh.bounds
    assert abs(low[1]) < 1e-6, "resting on y = 0"
    assert abs(low[0] + high[0]) < 1e-6 and abs(low[2] + high[2]) < 1e-6, "centred in x and z"
    assert np.allclose(high - low, output.info["extent_m"], atol=1e-5)
    assert output.info["background"] == "alpha" and output.info["texture"] is False
    assert output.info["device"] == "cpu" and output.info["dtype"] == "float32"
    assert output.info["steps"] == 5 and output.info["octree_resolution"] == TINY_OCTREE_RESOLUTION
    assert output.info["seconds"]["shape_s"] > 0
    assert any(step.startswith("shape:") for step in steps) and any("cleaning" in step for step in steps)


def test_seed_decides_the_shape(backend, tmp_path):
    data = object_png(alpha=True)
    first = glb_mesh(backend.generate(job(data, tmp_path, seed=7, steps=2)).glb)
    again = glb_mesh(backend.generate(job(data, tmp_path, seed="7", steps=2)).glb)
    other = glb_mesh(backend.generate(job(data, tmp_path, seed=8, steps=2)).glb)
    assert np.array_equal(first.faces, again.faces) and np.allclose(first.vertices, again.vertices)
    assert len(first.vertices) != len(other.vertices) or not np.allclose(first.vertices, other.vertices)


def test_debug_returns_the_image_the_model_saw(backend, tmp_path):
    request = job(object_png(alpha=True), tmp_path)
    request.debug = True
    output = backend.generate(request)
    from PIL import Image

    seen = Image.open(io.BytesIO(output.debug_files["hunyuan3d_input.png"]))
    assert seen.mode == "RGBA" and seen.size == (96, 96)


# --- per-request errors; the backend keeps serving -------------------------------------


def test_rgb_image_without_rembg_model_is_a_clear_error(backend, tmp_path, isolated_env):
    with pytest.raises(GenerateError) as caught:
        backend.generate(job(object_png(alpha=False), tmp_path, "photo.png"))
    error = caught.value
    assert error.code == "background_removal_unavailable" and error.stage.value == "generate"
    assert "photo.png" in error.message and "u2net.onnx" in error.message
    assert str(isolated_env / "u2net") in error.message and "RGBA" in error.message
    assert backend.generate(job(object_png(alpha=True), tmp_path)).glb


@pytest.mark.parametrize(
    "data, code",
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "bad_image"),
        (b"", "empty_input"),
        ("transparent", "no_object"),
    ],
)
def test_unusable_images_are_input_errors(backend, tmp_path, data, code):
    if data == "transparent":
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(buffer, format="PNG")
        data = buffer.getvalue()
    with pytest.raises(InputError) as caught:
        backend.generate(job(data, tmp_path, "broken.png"))
    assert caught.value.code == code and "broken.png" in caught.value.message


def test_exception_inside_the_pipeline_fails_only_that_job(backend, tmp_path):
    # A one-pixel-tall object passes geomgen's checks; hy3dgen's preprocessor raises.
    with pytest.raises(GenerateError) as caught:
        backend.generate(job(object_png(alpha=True, thin=True), tmp_path))
    assert caught.value.code == "pipeline_error"
    assert "shape generation failed (ValueError" in caught.value.message
    assert glb_mesh(backend.generate(job(object_png(alpha=True), tmp_path)).glb).faces.size


def test_cuda_out_of_memory_fails_the_job_and_the_next_one_runs(backend, tmp_path, monkeypatch):
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(backend._pipeline.model, "forward", out_of_memory)
    with pytest.raises(GenerateError) as caught:
        backend.generate(job(object_png(alpha=True), tmp_path))
    assert calls and caught.value.code == "gpu_out_of_memory"
    assert "ran out of GPU memory" in caught.value.message and "octree_resolution" in caught.value.message
    monkeypatch.undo()
    assert backend.generate(job(object_png(alpha=True), tmp_path)).glb


def test_texture_out_of_memory_names_the_shape_only_option(backend, tmp_path, monkeypatch):
    # The paint pipeline needs CUDA; a painter that runs out of memory stands in for it.
    def painter(mesh, image):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(backend, "_painter", painter)
    with pytest.raises(GenerateError) as caught:
        backend.generate(job(object_png(alpha=True), tmp_path))
    assert caught.value.code == "gpu_out_of_memory"
    assert "texture painting" in caught.value.message and "texture=off" in caught.value.message
    output = backend.generate(job(object_png(alpha=True), tmp_path, texture="off"))
    assert output.info["texture"] is False


@pytest.mark.parametrize(
    "options, code, words",
    [
        ({"steps": 0}, "bad_option", "steps must be an integer from 1"),
        ({"octree_resolution": "big"}, "bad_option", "octree_resolution"),
        ({"colour": "red"}, "bad_option", "unknown hunyuan3d option(s) colour"),
        ({"model": "tencent/Hunyuan3D-2"}, "fixed_option", "--backend-option model=tencent/Hunyuan3D-2"),
        ({"flashvdm": "off"}, "fixed_option", "flashvdm is fixed"),
    ],
)
def test_bad_request_options(backend, tmp_path, options, code, words):
    with pytest.raises(InputError) as caught:
        backend.generate(job(object_png(alpha=True), tmp_path, **options))
    assert caught.value.code == code and words in caught.value.message


def test_repeating_the_workers_own_load_options_is_fine(backend, tmp_path):
    output = backend.generate(job(object_png(alpha=True), tmp_path, model="tiny", device="cpu", dtype="auto",
                                  flashvdm=True, steps=1))
    assert output.info["steps"] == 1


def test_texture_on_request_where_the_worker_cannot_paint(backend, tmp_path):
    with pytest.raises(GenerateError) as caught:
        backend.generate(job(object_png(alpha=True), tmp_path, texture="on"))
    assert caught.value.code == "texture_unavailable"
    assert "CUDA" in caught.value.message and "texture=off" in caught.value.message


# --- background removal with a model on disk ------------------------------------------------


def test_rgb_image_is_cut_out_by_rembg_when_its_model_is_present(isolated_env, tmp_path, monkeypatch):
    pytest.importorskip("onnx", reason="building the stand-in rembg model needs the onnx package")
    build_tiny_rembg_model(tmp_path / "u2net")
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "u2net"))
    instance = Hunyuan3DBackend(dict(TINY))
    instance.load()
    try:
        request = job(object_png(alpha=False), tmp_path, "photo.png")
        request.debug = True
        output = instance.generate(request)
    finally:
        instance.close()
    assert output.info["background"] == "rembg:u2net"
    from PIL import Image

    alpha = np.asarray(Image.open(io.BytesIO(output.debug_files["hunyuan3d_input.png"])).getchannel("A"))
    assert 0.1 < (alpha >= 128).mean() < 0.25  # the block covers 1/6 of the picture
    assert len(glb_mesh(output.glb).faces) > 0


# --- loading ---------------------------------------------------------------------------------


def test_missing_weights_fail_at_load_saying_where_and_how(isolated_env, models_root):
    instance = Hunyuan3DBackend({"model": "tencent/Hunyuan3D-2", "device": "cpu"})
    with pytest.raises(BackendUnavailable) as caught:
        instance.load()
    message = caught.value.message
    assert str(models_root / "tencent/Hunyuan3D-2/hunyuan3d-dit-v2-0-turbo") in message
    assert "Hugging Face cache" in message and "huggingface-cli download tencent/Hunyuan3D-2" in message


def test_missing_local_folder_fails_at_load(isolated_env, tmp_path):
    folder = tmp_path / "no-such-model"
    with pytest.raises(BackendUnavailable) as caught:
        Hunyuan3DBackend({"model": str(folder), "device": "cpu"}).load()
    assert str(folder) in caught.value.message and "config.yaml" in caught.value.message


def test_corrupt_checkpoint_fails_at_load(isolated_env, tmp_path):
    folder = build_tiny_model(tmp_path, name="broken")
    (folder / "model.fp16.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(BackendUnavailable) as caught:
        Hunyuan3DBackend({"model": str(tmp_path / "broken"), "subfolder": "tiny-dit", "device": "cpu"}).load()
    assert "cannot load the shape model" in caught.value.message and str(folder) in caught.value.message


def test_flashvdm_family_needs_its_turbo_vae(isolated_env, models_root, tmp_path):
    build_tiny_model(models_root, name="tencent/Hunyuan3D-2mini", subfolder="hunyuan3d-dit-v2-mini-turbo")
    options = {"variant": "mini", "device": "cpu", "octree_resolution": str(TINY_OCTREE_RESOLUTION)}
    with pytest.raises(BackendUnavailable) as caught:
        Hunyuan3DBackend(options).load()
    assert "hunyuan3d-vae-v2-mini-turbo" in caught.value.message and "flashvdm=off" in caught.value.message

    Hunyuan3DBackend({**options, "flashvdm": "off"}).load()  # the DiT checkpoint's own VAE

    build_tiny_vae(models_root, "tencent/Hunyuan3D-2mini", "hunyuan3d-vae-v2-mini-turbo", seed=5)
    instance = Hunyuan3DBackend(options)
    instance.load()
    vae_weight = next(iter(instance._pipeline.vae.state_dict().values()))
    dit_vae = torch.load(find_weights("tencent/Hunyuan3D-2mini", "hunyuan3d-dit-v2-mini-turbo").checkpoint)["vae"]
    assert not torch.equal(vae_weight, next(iter(dit_vae.values())).float()), "the turbo VAE replaced the DiT's"
    assert instance.generate(job(object_png(alpha=True), tmp_path)).info["model"].endswith("mini-turbo")


def test_texture_on_with_cpu_fails_at_load(isolated_env):
    with pytest.raises(BackendUnavailable) as caught:
        Hunyuan3DBackend({**TINY, "texture": "on"}).load()
    assert "CUDA" in caught.value.message and "texture=off" in caught.value.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_default_device_needs_cuda(isolated_env):
    with pytest.raises(BackendUnavailable) as caught:
        Hunyuan3DBackend({"model": "tiny", "subfolder": "tiny-dit"}).load()
    assert "no CUDA device" in caught.value.message and "device=cpu" in caught.value.message


def test_bad_worker_option_is_an_input_error():
    with pytest.raises(InputError) as caught:
        Hunyuan3DBackend({"dtype": "int8"})
    assert "dtype must be one of" in caught.value.message


def test_check_reports_missing_default_weights(isolated_env, tmp_path, monkeypatch):
    monkeypatch.setenv("HY3DGEN_MODELS", str(tmp_path))
    reason = Hunyuan3DBackend.check()
    assert reason is not None and "hunyuan3d-dit-v2-0-turbo" in reason and str(tmp_path) in reason
    build_tiny_model(tmp_path, name="tencent/Hunyuan3D-2", subfolder="hunyuan3d-dit-v2-0-turbo")
    assert "hunyuan3d-vae-v2-0-turbo" in Hunyuan3DBackend.check()
    build_tiny_vae(tmp_path, "tencent/Hunyuan3D-2", "hunyuan3d-vae-v2-0-turbo")
    assert Hunyuan3DBackend.check() is None


"""SAM 3 segmentation and the sam3d backend on the CPU.

SAM 3 is sam3's real code with a tiny random-weight model (tests/tiny_sam3.py)
saved as the published checkpoint and loaded through sam3's real
``checkpoint_path``. SAM 3D Objects cannot run here (CUDA, pytorch3d, gated
weights): the reconstruction adapter loads its config through the real
loader and allow-list, and the tests' config builds ``StandInSam3dPipeline``,
a test double with the real pipeline's ``run`` interface.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.sam3d

_SKIP = "the sam3d extra is not installed (bash .ci/install-sam3d.sh)"
pytest.importorskip("torch", reason=_SKIP)
pytest.importorskip("sam3.model_builder", reason=_SKIP)
pytest.importorskip("open_clip", reason=_SKIP)
pytest.importorskip("hydra.utils", reason=_SKIP)

import trimesh  # noqa: E402
from PIL import Image  # noqa: E402

from geomgen.backends import _sam3d_pipeline  # noqa: E402
from geomgen.backends._sam3_segmenter import Sam3Segmenter  # noqa: E402
from geomgen.backends.base import GenerationInput  # noqa: E402
from geomgen.backends.sam3d import Sam3dBackend  # noqa: E402
from geomgen.errors import BackendUnavailable, GenerateError, InputError  # noqa: E402
from tests import tiny_sam3  # noqa: E402

# scene_png(): a 96 x 80 picture, the red square spans columns 32-63 and rows 20-59.
SQUARE_BOX_PX = [32, 20, 64, 60]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_sam3.write_checkpoint(tmp_path_factory.mktemp("sam3") / "sam3.pt")


@pytest.fixture(scope="module")
def segmenter(checkpoint) -> Sam3Segmenter:
    return Sam3Segmenter(str(checkpoint), "cpu")


@pytest.fixture
def stand_in_allowed(monkeypatch):
    monkeypatch.setattr(_sam3d_pipeline, "ALLOWED_TARGET_PREFIXES",
                        [*_sam3d_pipeline.ALLOWED_TARGET_PREFIXES, tiny_sam3.STAND_IN_PREFIX])


def _image(alpha: bool = False, size=(96, 80)) -> Image.Image:
    return Image.open(io.BytesIO(tiny_sam3.scene_png(size, alpha=alpha)))


def _box(mask: np.ndarray) -> list[int]:
    rows, cols = np.nonzero(mask)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


# --- SAM 3 ---------------------------------------------------------------------------


def test_foreground_mode_inverts_the_background_and_keeps_the_object(segmenter):
    found = segmenter.segment(_image(), "foreground", None, 0.0)
    assert found.prompt == "background" and found.mode == "foreground"
    assert found.mask.shape == (80, 96) and found.mask.dtype == bool
    assert _box(found.mask) == SQUARE_BOX_PX
    assert 0.97 * 32 * 40 <= found.mask.sum() <= 32 * 40  # the square (its corners may round), no border
    assert found.detections >= 1 and 0.0 < found.score <= 1.0


def test_text_mode_returns_the_best_mask_for_the_prompt(segmenter):
    found = segmenter.segment(_image(), "text", "  the red square ", 0.0)
    assert found.prompt == "the red square" and found.mode == "text"
    assert found.mask.shape == (80, 96)
    # The calibrated tiny model's masks are the grey background whatever the prompt.
    assert not found.mask[25:55, 40:60].any() and found.mask[:5].all()
    assert found.info()["segmenter"] == "sam3" and found.info()["prompt"] == "the red square"


def test_rgba_and_other_sizes_give_masks_of_the_input_size(segmenter):
    rgba = _image(alpha=True)
    assert rgba.mode == "RGBA"
    found = segmenter.segment(rgba, "foreground", None, 0.0)
    assert found.mask.shape == (80, 96)
    wide = segmenter.segment(_image(size=(150, 60)), "foreground", None, 0.0)
    assert wide.mask.shape == (60, 150)
    assert wide.rgba(_image(size=(150, 60))).size == (150, 60)


def test_a_threshold_nothing_passes_is_a_clear_error(segmenter):
    with pytest.raises(InputError) as caught:
        segmenter.segment(_image(), "text", "a giraffe", 1.0, input_name="scene.png")
    assert caught.value.code == "no_detection"
    assert "'a giraffe'" in caught.value.message and "scene.png" in caught.value.message
    assert "threshold" in caught.value.message


def test_text_mode_without_a_prompt_is_refused(segmenter):
    with pytest.raises(InputError) as caught:
        segmenter.segment(_image(), "text", "  ", 0.0)
    assert caught.value.code == "bad_option" and "text_prompt" in caught.value.message


def test_debug_files_use_the_old_servers_names(segmenter):
    image = _image()
    files = segmenter.segment(image, "foreground", None, 0.0).debug_files(image, "chair.jpg")
    assert set(files) == {"chair_mask.png", "chair_masked.png"}
    mask = np.asarray(Image.open(io.BytesIO(files["chair_mask.png"])))
    assert mask.shape == (80, 96) and _box(mask > 0) == SQUARE_BOX_PX
    masked = Image.open(io.BytesIO(files["chair_masked.png"]))
    assert masked.mode == "RGBA" and _box(np.asarray(masked)[..., 3] > 0) == SQUARE_BOX_PX


def test_a_checkpoint_with_wrong_keys_is_refused(tmp_path, checkpoint):
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    renamed = tmp_path / "renamed.pt"  # another model's layout: no "detector." prefix
    torch.save({"model": {key.replace("detector.", "tracker."): value for key, value in state.items()}}, renamed)
    with pytest.raises(BackendUnavailable) as caught:
        Sam3Segmenter(str(renamed), "cpu")
    assert "not a SAM 3 image-model checkpoint" in caught.value.message and str(renamed) in caught.value.message
    partial = tmp_path / "partial.pt"
    torch.save({"model": dict(list(state.items())[: len(state) // 2])}, partial)
    with pytest.raises(BackendUnavailable, match="are missing"):
        Sam3Segmenter(str(partial), "cpu")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(BackendUnavailable, match="cannot"):
        Sam3Segmenter(str(garbage), "cpu")
    with pytest.raises(BackendUnavailable, match="does not exist"):
        Sam3Segmenter(str(tmp_path / "nowhere.pt"), "cpu")


# --- the reconstruction adapter ------------------------------------------------------------


def test_config_loading_sets_what_the_upstream_entry_point_sets(tmp_path, stand_in_allowed):
    config = _sam3d_pipeline.read_config(str(tiny_sam3.stand_in_config(tmp_path / "weights")))
    pipeline = _sam3d_pipeline.instantiate(config)
    assert isinstance(pipeline, tiny_sam3.StandInSam3dPipeline)
    assert pipeline.built_with["workspace_dir"] == str((tmp_path / "weights").resolve())
    assert Path(pipeline.built_with["workspace_dir"]).is_absolute()
    assert pipeline.built_with["rendering_engine"] == "nvdiffrast"
    assert pipeline.built_with["compile_model"] is False
    assert pipeline.built_with["ss_generator_config_path"] == "ss_generator.yaml"


@pytest.mark.parametrize("target, extra", [
    ("os.system", ""),
    ("builtins.eval", ""),
    # allowed top level, forbidden nested in a list
    (tiny_sam3.STAND_IN_TARGET, "steps:\n  - _target_: subprocess.Popen\n    args: [id]\n"),
    ("sam3d_objects.__builtins__.eval", ""),
])
def test_a_config_naming_a_forbidden_target_is_refused(tmp_path, stand_in_allowed, target, extra):
    path = tiny_sam3.stand_in_config(tmp_path, target=target, extra=extra)
    with pytest.raises(BackendUnavailable) as caught:
        _sam3d_pipeline.read_config(str(path))
    assert "not allowed" in caught.value.message and str(path) in caught.value.message


def test_an_allowed_path_that_resolves_elsewhere_is_refused(tmp_path):
    # torchvision.transforms.transforms imports torch: the dotted path reaches torch.load.
    path = tiny_sam3.stand_in_config(tmp_path, target="torchvision.transforms.transforms.torch.load")
    config = _sam3d_pipeline.read_config(str(path))
    with pytest.raises(BackendUnavailable, match="outside the allowed packages"):
        _sam3d_pipeline.instantiate(config)


def _backend(checkpoint, config: Path, **options) -> Sam3dBackend:
    backend = Sam3dBackend({"sam3_checkpoint": str(checkpoint), "sam3d_checkpoint": str(config), "device": "cpu",
                            "threshold": "0", **options})
    backend.load()
    return backend


def _job(tmp_path, name="scene.png", debug=False, **options) -> GenerationInput:
    return GenerationInput(input_name=name, input_data=tiny_sam3.scene_png(), work_dir=tmp_path / "work",
                           options=options, debug=debug)


def test_the_backend_runs_the_pipeline_on_the_masked_image(tmp_path, checkpoint, stand_in_allowed):
    backend = _backend(checkpoint, tiny_sam3.stand_in_config(tmp_path / "weights"), seed="7")
    output = backend.generate(_job(tmp_path, debug=True))
    call = backend._pipeline.calls[-1]
    # The mask reached the alpha channel of the image the pipeline got.
    assert call["shape"] == [80, 96, 4] and call["dtype"] == "uint8" and call["mask"] is None
    assert call["alpha_box_px"] == SQUARE_BOX_PX
    assert call["alpha_fraction"] == pytest.approx(32 * 40 / (96 * 80), rel=0.03)
    assert call["seed"] == 7
    assert call["kwargs"] == {"stage1_only": False, "with_mesh_postprocess": True, "with_texture_baking": True,
                              "with_layout_postprocess": False, "use_vertex_color": False, "pointmap": None}
    # GLB conventions: +Y up, resting on y = 0, centred in x/z; the stand-in's
    # box is 0.32 x 0.40 x 0.10 m, placed off-centre; its UV texture is kept.
    scene = trimesh.load(io.BytesIO(output.glb), file_type="glb")
    low, high = scene.bounds
    assert low[1] == pytest.approx(0.0, abs=1e-6)
    assert (low[0] + high[0]) / 2 == pytest.approx(0.0, abs=1e-6)
    assert (low[2] + high[2]) / 2 == pytest.approx(0.0, abs=1e-6)
    assert high - low == pytest.approx([0.32, 0.40, 0.10], abs=1e-6)
    mesh = next(iter(scene.geometry.values()))
    assert mesh.visual.uv is not None and mesh.visual.material.baseColorTexture is not None
    assert output.info["mode"] == "foreground" and output.info["texture"] is True and output.info["seed"] == 7
    assert output.info["extent_m"] == pytest.approx([0.32, 0.40, 0.10])
    assert set(output.debug_files) == {"scene_mask.png", "scene_masked.png"}

    backend.generate(_job(tmp_path, texture="off", seed="3"))
    call = backend._pipeline.calls[-1]
    assert call["seed"] == 3
    assert call["kwargs"]["with_texture_baking"] is False and call["kwargs"]["use_vertex_color"] is True


def test_text_mode_and_the_old_option_names(tmp_path, checkpoint, stand_in_allowed):
    backend = _backend(checkpoint, tiny_sam3.stand_in_config(tmp_path / "weights"))
    output = backend.generate(_job(tmp_path, mode="text", object_description="the red square"))
    assert output.info["mode"] == "text" and output.info["prompt"] == "the red square"
    with pytest.raises(InputError, match="text_prompt"):
        backend.generate(_job(tmp_path, mode="text"))
    job = _job(tmp_path, mode="text")
    job.prompt = "a red box"  # the request's prompt names the object when no text_prompt is given
    assert backend.generate(job).info["prompt"] == "a red box"
    with pytest.raises(InputError, match="differ"):
        backend.generate(_job(tmp_path, mode="text", text_prompt="a", object_description="b"))
    with pytest.raises(InputError) as caught:
        backend.generate(_job(tmp_path, mode="text", text_prompt="a giraffe", threshold="1"))
    assert caught.value.code == "no_detection"


def test_gaussians_come_back_as_a_ply_in_the_debug_folder(tmp_path, checkpoint, stand_in_allowed):
    backend = _backend(checkpoint, tiny_sam3.stand_in_config(tmp_path / "weights"))
    output = backend.generate(_job(tmp_path, name="mug.jpg", debug=True, gaussians="on"))
    ply = trimesh.load(io.BytesIO(output.debug_files["mug_gaussians.ply"]), file_type="ply")
    assert len(ply.vertices) == 8
    with pytest.raises(InputError, match="debug_folder"):
        backend.generate(_job(tmp_path, gaussians="on"))


def test_a_pipeline_without_a_mesh_is_a_generate_error(tmp_path, checkpoint, stand_in_allowed, monkeypatch):
    backend = _backend(checkpoint, tiny_sam3.stand_in_config(tmp_path / "weights"))
    monkeypatch.setattr(backend._pipeline, "run", lambda *a, **k: {"glb": None})
    with pytest.raises(GenerateError) as caught:
        backend.generate(_job(tmp_path))
    assert caught.value.code == "no_surface"
    monkeypatch.setattr(backend._pipeline, "run", lambda *a, **k: 1 / 0)
    with pytest.raises(GenerateError) as caught:
        backend.generate(_job(tmp_path))
    assert caught.value.code == "pipeline_error" and "ZeroDivisionError" in caught.value.message


def test_start_up_names_what_is_missing(tmp_path, checkpoint, monkeypatch):
    real = tiny_sam3.stand_in_config(
        tmp_path / "hf", target="sam3d_objects.pipeline.inference_pipeline_pointmap.InferencePipelinePointMap")
    with pytest.raises(BackendUnavailable) as caught:
        _backend(checkpoint, real)
    message = caught.value.message
    assert "sam3d_objects" in message and "pytorch3d" in message
    assert "facebookresearch/sam-3d-objects" in message and "docs/sam3d.md" in message
    # No pipeline configured: everything this machine lacks for sam3d (check()'s sentence).
    monkeypatch.delenv("SAM3D_CHECKPOINT", raising=False)
    with pytest.raises(BackendUnavailable) as caught:
        Sam3dBackend({"sam3_checkpoint": str(checkpoint), "device": "cpu"}).load()
    assert caught.value.message == Sam3dBackend.check() and "sam3d_objects" in caught.value.message
    monkeypatch.setattr("geomgen.backends.sam3d.Sam3dBackend.check", classmethod(lambda cls: None))
    with pytest.raises(BackendUnavailable, match="no SAM 3D Objects pipeline given .option sam3d_checkpoint"):
        Sam3dBackend({"sam3_checkpoint": str(checkpoint), "device": "cpu"}).load()
    with pytest.raises(BackendUnavailable, match="does not exist"):
        _backend(checkpoint, tmp_path / "nowhere" / "pipeline.yaml")


def test_start_up_without_the_sam3_checkpoint(tmp_path, stand_in_allowed, monkeypatch):
    monkeypatch.delenv("SAM3_CHECKPOINT", raising=False)
    backend = Sam3dBackend({"sam3d_checkpoint": str(tiny_sam3.stand_in_config(tmp_path)), "device": "cpu"})
    with pytest.raises(BackendUnavailable) as caught:
        backend.load()
    assert "sam3_checkpoint" in caught.value.message and "facebook/sam3" in caught.value.message


def test_a_stand_in_run_is_recorded_for_other_processes(tmp_path, checkpoint, stand_in_allowed):
    record = tmp_path / "calls.jsonl"
    backend = _backend(checkpoint, tiny_sam3.stand_in_config(tmp_path / "weights", record_path=record))
    backend.generate(_job(tmp_path))
    assert json.loads(record.read_text().splitlines()[-1])["alpha_box_px"] == SQUARE_BOX_PX


# --- segmenter=sam3 on the other image backends ------------------------------------------


def test_silhouette_with_segmenter_sam3_cuts_the_object_out(tmp_path, checkpoint):
    from geomgen.backends.silhouette import SilhouetteBackend

    backend = SilhouetteBackend({"segmenter": "sam3", "sam3_checkpoint": str(checkpoint), "sam3_threshold": "0"})
    backend.load()
    output = backend.generate(_job(tmp_path, name="shelf.png", debug=True))
    assert output.info["segmentation"] == "sam3:foreground" and output.info["sam3"]["prompt"] == "background"
    assert set(output.debug_files) == {"shelf_mask.png", "shelf_masked.png"}
    output = backend.generate(_job(tmp_path, text_prompt="the grey backdrop"))
    assert output.info["segmentation"] == "sam3:text" and output.info["sam3"]["prompt"] == "the grey backdrop"


def test_sam3_options_without_segmenter_sam3_are_refused_not_ignored(tmp_path):
    from geomgen.backends.silhouette import SilhouetteBackend

    with pytest.raises(InputError) as caught:
        SilhouetteBackend({}).generate(_job(tmp_path, text_prompt="the chair"))
    assert caught.value.code == "bad_option" and "segmenter=sam3" in caught.value.message
    with pytest.raises(BackendUnavailable) as caught:
        SilhouetteBackend({"segmenter": "sam3"}).load()
    assert "sam3_checkpoint" in caught.value.message and "silhouette" in caught.value.message


def test_start_up_without_cuda(tmp_path, checkpoint, stand_in_allowed, monkeypatch):
    with pytest.raises(BackendUnavailable, match=r"device=cuda but torch sees 0 CUDA device\(s\)"):
        _backend(checkpoint, tiny_sam3.stand_in_config(tmp_path / "weights"), device="cuda")
    # SAM 3D Objects installed (as far as the module check can tell) but no GPU: CUDA is named.
    real = tiny_sam3.stand_in_config(
        tmp_path / "hf", target="sam3d_objects.pipeline.inference_pipeline_pointmap.InferencePipelinePointMap")
    monkeypatch.setattr(_sam3d_pipeline, "missing_modules", lambda config: [])
    with pytest.raises(BackendUnavailable, match="SAM 3D Objects runs on CUDA only.*32 GB"):
        _backend(checkpoint, real, device="auto")

"""A tiny random-weight SAM 3 image model for the tests, loaded through sam3's
real ``build_sam3_image_model(checkpoint_path=...)``.

SAM 3's architecture is fixed in ``sam3.model_builder`` (a 32-layer, 1024-wide
ViT and a 24-layer text encoder: about 850 M parameters). The tests shrink its
two big parts by replacing the private builder functions
``_create_vit_backbone`` and ``_create_text_encoder`` with ones that build the
same classes at 2 layers and 64 channels; everything else (neck, fusion
encoder, decoder, segmentation head, geometry encoder, processor) is sam3's own
code at its own size. ``write_checkpoint`` saves the weights the way the
published checkpoint stores them (``{"model": {"detector.<key>": tensor}}``), so
geomgen's loader reads them through the real checkpoint path and its own
missing-key check.

A worker process started by a test gets the same shrinking through
``site_dir``: a folder with a ``sitecustomize.py`` that calls ``install()``
when sam3's builder is first imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

TINY_WIDTH = 64
TINY_LAYERS = 2
SEED = 0


def _tiny_vit_backbone(compile_mode=None):
    from sam3.model.vitdet import ViT

    # The published ViT's settings, only narrower and shallower: the image stays
    # 1008 px in 14 px patches (72 x 72 tokens), which the neck and decoder expect.
    return ViT(
        img_size=1008, pretrain_img_size=336, patch_size=14, embed_dim=TINY_WIDTH, depth=TINY_LAYERS,
        num_heads=2, mlp_ratio=4.0, norm_layer="LayerNorm", drop_path_rate=0.0, qkv_bias=True,
        use_abs_pos=True, tile_abs_pos=True, global_att_blocks=(TINY_LAYERS - 1,), rel_pos_blocks=(),
        use_rope=True, use_interp_rope=True, window_size=24, pretrain_use_cls_token=True,
        retain_cls_token=False, ln_pre=True, ln_post=False, return_interm_layers=False,
        bias_patch_embed=False, compile_mode=compile_mode,
    )


def _tiny_text_encoder(bpe_path: str):
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer

    return VETextEncoder(tokenizer=SimpleTokenizer(bpe_path=bpe_path), d_model=256, width=TINY_WIDTH,
                         heads=2, layers=TINY_LAYERS)


def install() -> None:
    """Make ``sam3.model_builder`` build the tiny model in this process."""
    import sam3.model_builder as builder

    builder._create_vit_backbone = _tiny_vit_backbone
    builder._create_text_encoder = _tiny_text_encoder


def bpe_path() -> str:
    import open_clip.tokenizer

    return open_clip.tokenizer.default_bpe()


def build_tiny_model():
    """The tiny model with random weights, every parameter finite."""
    import torch

    install()
    from sam3.model_builder import build_sam3_image_model

    from geomgen.backends._sam3_segmenter import cpu_placement

    torch.manual_seed(SEED)
    with cpu_placement("cpu"):
        model = build_sam3_image_model(bpe_path=bpe_path(), device="cpu", eval_mode=True, checkpoint_path=None,
                                       load_from_HF=False)
    # VETextEncoder creates these two with torch.empty and leaves them to the
    # checkpoint; random ones must be initialised or the scores come out NaN.
    encoder = model.backbone.language_backbone.encoder
    with torch.no_grad():
        torch.nn.init.normal_(encoder.positional_embedding, std=0.01)
        projection = encoder.text_projection
        if isinstance(projection, torch.nn.Parameter):
            torch.nn.init.normal_(projection, std=TINY_WIDTH**-0.5)
    return model


def calibrate_mask_head(model, image_png: bytes | None = None, *, object_is: str = "outside"):
    """Make the tiny model's masks follow one picture, as a trained SAM 3 would.

    Random weights give masks unrelated to the image (often all of it). A
    linear probe on the segmentation head's pixel embeddings, fitted on
    ``image_png`` (``scene_png()``: a red square on grey), sets the instance
    head so that every query's mask is the grey background (``object_is``
    "outside": what foreground mode asks for with "background") or the square
    ("inside"). Only the last 1x1 convolution and the mask MLP's last layer
    change; the rest stays random. Returns the model.
    """
    import io

    import numpy as np
    import torch
    from PIL import Image
    from sam3.model.sam3_image_processor import Sam3Processor

    from geomgen.backends._sam3_segmenter import cpu_placement

    image = Image.open(io.BytesIO(image_png or scene_png())).convert("RGB")
    head = model.segmentation_head
    captured = {}
    hook = head.instance_seg_head.register_forward_hook(lambda mod, args, out: captured.setdefault("p", args[0]))
    processor = Sam3Processor(model, device="cpu", confidence_threshold=0.0)
    with cpu_placement("cpu"):
        processor.set_text_prompt("background", processor.set_image(image))
    hook.remove()
    pixels = captured["p"][0].float()  # (channels, rows, cols) at the head's resolution
    channels, rows, cols = pixels.shape
    grey = np.asarray(image.resize((cols, rows), Image.NEAREST)).astype(np.int16)
    inside = np.abs(grey - np.array([200, 200, 200])).sum(axis=-1) > 30
    target = torch.from_numpy(np.where(inside == (object_is == "inside"), 6.0, -6.0)).float().reshape(-1)
    features = torch.cat([pixels.reshape(channels, -1).T, torch.ones(rows * cols, 1)], dim=1)
    solution = torch.linalg.lstsq(features, target[:, None]).solution[:, 0]
    with torch.no_grad():
        head.instance_seg_head.weight.zero_()
        head.instance_seg_head.bias.zero_()
        head.instance_seg_head.weight[0, :, 0, 0] = solution[:-1]
        head.instance_seg_head.bias[0] = solution[-1]
        last = head.mask_predictor.mask_embed.layers[-1]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0] = 1.0
    return model


def write_checkpoint(path: Path, model=None, *, key_prefix: str = "detector.") -> Path:
    """Save the tiny model as the published checkpoint lays it out."""
    import torch

    model = model if model is not None else calibrate_mask_head(build_tiny_model())
    state = {key_prefix + key: value for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return path


SITECUSTOMIZE = '''\
# Written by tests/tiny_sam3.py for a test's worker processes: SAM 3 builds the
# tiny model, and the sam3d pipeline allow-list takes the test stand-in.
import importlib.abc, importlib.util, sys

HOOKS = {"sam3.model_builder": "install", "geomgen.backends._sam3d_pipeline": "allow_stand_in"}

class _TestHooks(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in HOOKS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        original = spec.loader.exec_module

        def exec_module(module, hook=HOOKS[name]):
            original(module)
            if __ROOT__ not in sys.path:
                sys.path.append(__ROOT__)
            import tests.tiny_sam3
            getattr(tests.tiny_sam3, hook)()

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _TestHooks())
'''


def site_dir(folder: Path) -> Path:
    """A folder for PYTHONPATH whose ``sitecustomize.py`` makes every Python
    process started with it build the tiny model instead of SAM 3's and allow
    the stand-in pipeline (``allow_stand_in``)."""
    folder.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parent.parent)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.replace("__ROOT__", repr(root)))
    return folder


def scene_png(size: tuple[int, int] = (96, 80), alpha: bool = False) -> bytes:
    """A red square on a plain grey background (RGBA: the background see-through)."""
    import io

    import numpy as np
    from PIL import Image

    width, height = size
    pixels = np.full((height, width, 4), (200, 200, 200, 0 if alpha else 255), dtype=np.uint8)
    pixels[height // 4: 3 * height // 4, width // 3: 2 * width // 3] = (220, 30, 30, 255)
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, "RGBA")
    (image if alpha else image.convert("RGB")).save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":  # python -m tests.tiny_sam3 OUT.pt
    write_checkpoint(Path(sys.argv[1]))


# --- the stand-in for SAM 3D Objects ------------------------------------------------

STAND_IN_TARGET = "tests.tiny_sam3.StandInSam3dPipeline"
STAND_IN_PREFIX = "tests.tiny_sam3.StandIn"


def allow_stand_in() -> None:
    """The test-only allow-list entry for the stand-in below."""
    from geomgen.backends import _sam3d_pipeline

    if STAND_IN_PREFIX not in _sam3d_pipeline.ALLOWED_TARGET_PREFIXES:
        _sam3d_pipeline.ALLOWED_TARGET_PREFIXES.append(STAND_IN_PREFIX)


class StandInGaussians:
    """TEST DOUBLE of SAM 3D Objects' Gaussian splat: ``save_ply`` writes a
    small point cloud."""

    def __init__(self, points):
        self.points = points

    def save_ply(self, path: str) -> None:
        import trimesh

        trimesh.PointCloud(self.points).export(path)


class StandInSam3dPipeline:
    """TEST DOUBLE of SAM 3D Objects' ``InferencePipelinePointMap`` (which
    needs CUDA, pytorch3d and gated weights). Built from pipeline.yaml by the
    real config loader; records what it was built with and every ``run`` call
    (to ``record_path`` as JSON lines when the config gives one) and returns
    what the real pipeline returns: ``glb``, a textured trimesh, +Y up, here a
    box as wide and tall as the mask's bounding box (1 m per 100 px), placed
    off-centre; and ``gs``, something with ``save_ply``."""

    def __init__(self, workspace_dir: str, rendering_engine: str, compile_model: bool,
                 record_path: str | None = None, **rest) -> None:
        self.built_with = {"workspace_dir": workspace_dir, "rendering_engine": rendering_engine,
                           "compile_model": compile_model, **rest}
        self.record_path = record_path
        self.calls: list[dict] = []

    def run(self, image, mask, seed, **kwargs):
        import json

        import numpy as np
        import trimesh
        from PIL import Image

        image = np.asarray(image)
        alpha = image[..., 3] >= 128
        rows, cols = np.nonzero(alpha)
        call = {"shape": list(image.shape), "dtype": str(image.dtype), "mask": mask, "seed": seed,
                "alpha_fraction": float(alpha.mean()),
                "alpha_box_px": [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1],
                "kwargs": kwargs, "built_with": self.built_with}
        self.calls.append(call)
        if self.record_path:
            with open(self.record_path, "a") as out:
                out.write(json.dumps(call) + "\n")
        width_m = (call["alpha_box_px"][2] - call["alpha_box_px"][0]) / 100.0
        height_m = (call["alpha_box_px"][3] - call["alpha_box_px"][1]) / 100.0
        box = trimesh.creation.box(extents=[width_m, height_m, 0.1])
        box.apply_translation([0.3, 0.2, -0.1])
        texture = Image.fromarray(image[..., :3])
        uv = np.column_stack([box.vertices[:, 0] / width_m + 0.5, box.vertices[:, 1] / height_m + 0.5]) % 1.0
        box.visual = trimesh.visual.TextureVisuals(uv=uv, image=texture)
        return {"glb": box, "gs": StandInGaussians(np.asarray(box.vertices)), "rotation": None,
                "translation": None, "scale": None}


def stand_in_config(folder: Path, *, record_path: Path | None = None, target: str = STAND_IN_TARGET,
                    extra: str = "") -> Path:
    """A pipeline.yaml that builds the stand-in, the way SAM 3D Objects' names
    its pipeline (a ``_target_`` plus settings, relative paths under it)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"_target_: {target}", "ss_generator_config_path: ss_generator.yaml", "dtype: float32"]
    if record_path is not None:
        lines.append(f"record_path: {record_path}")
    path = folder / "pipeline.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path

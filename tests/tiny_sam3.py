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
# Written by tests/tiny_sam3.py: shrink SAM 3 in this test's worker processes.
import importlib.abc, sys

class _TinySam3(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "sam3.model_builder":
            return None
        sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            sys.path.insert(0, {root!r})
            import tests.tiny_sam3
            tests.tiny_sam3.install()

        loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _TinySam3())
'''


def site_dir(folder: Path) -> Path:
    """A folder for PYTHONPATH whose ``sitecustomize.py`` makes every Python
    process started with it build the tiny model instead of SAM 3's."""
    folder.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parent.parent)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(root=root))
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

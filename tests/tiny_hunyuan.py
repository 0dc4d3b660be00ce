"""Tiny stand-ins for Hunyuan3D-2's weights, laid out like the published ones.

``build_tiny_model`` writes ``<root>/<name>/<subfolder>/config.yaml`` and
``model.fp16.ckpt`` the way hy3dgen reads them from ``$HY3DGEN_MODELS``: a 1-layer
Hunyuan3DDiT (hidden 64), a 1-layer ShapeVAE and a SingleImageEncoder whose
Dinov2 is built from a config dict (nothing downloaded). Random weights; the
real pipeline runs on a CPU in about a second per image. Also: a tiny turbo VAE
folder, a tiny ONNX model with rembg's u2net interface, and test images.
"""

from __future__ import annotations

from pathlib import Path

TINY_OCTREE_RESOLUTION = 32  # grid cells per side that keep volume decoding fast on a CPU

# Dinov2 backbone small enough to run in milliseconds: 28 px images, 14 px patches -> 2 x 2 tokens + CLS.
_DINO = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 28,
    "patch_size": 14,
    "num_channels": 3,
}


def tiny_config() -> dict:
    """The config.yaml contents, with the same targets as the published models."""
    return {
        "model": {
            "target": "hy3dgen.shapegen.models.Hunyuan3DDiT",
            "params": {
                "in_channels": 8,  # = the VAE's embed_dim
                "context_in_dim": _DINO["hidden_size"],
                "hidden_size": 64,
                "mlp_ratio": 2.0,
                "num_heads": 2,
                "depth": 1,
                "depth_single_blocks": 1,
                "axes_dim": [32],  # must sum to hidden_size / num_heads
                "theta": 10000,
                "qkv_bias": True,
            },
        },
        "vae": {
            "target": "hy3dgen.shapegen.models.ShapeVAE",
            "params": {
                "num_latents": 16,
                "embed_dim": 8,
                "width": 64,
                "heads": 2,
                "num_decoder_layers": 1,
                "num_freqs": 4,
                "include_pi": False,
                "qkv_bias": False,
                "qk_norm": True,
                "scale_factor": 1.0,
            },
        },
        "conditioner": {
            "target": "hy3dgen.shapegen.models.SingleImageEncoder",
            "params": {
                "main_image_encoder": {
                    "type": "DinoImageEncoder",
                    "kwargs": {"config": dict(_DINO), "image_size": _DINO["image_size"], "use_cls_token": True},
                }
            },
        },
        "scheduler": {
            "target": "hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
            "params": {"num_train_timesteps": 1000},
        },
        "image_processor": {
            "target": "hy3dgen.shapegen.preprocessors.ImageProcessorV2",
            "params": {"size": 64, "border_ratio": 0.15},
        },
    }


def build_tiny_model(root: Path, name: str = "tiny", subfolder: str = "tiny-dit", seed: int = 0) -> Path:
    """Write a tiny random-weight model under ``root/name/subfolder`` and return that folder.

    ``root`` plays the role of ``$HY3DGEN_MODELS``; load it with the hunyuan3d
    backend options ``model=<name> subfolder=<subfolder>``. The weights are saved
    in fp16 as ``model.fp16.ckpt`` (a torch state dict per component), exactly
    the layout hy3dgen reads. Deterministic for a given ``seed``.
    """
    import torch
    import yaml
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    folder = Path(root) / name / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    torch.manual_seed(seed)
    state = {}
    for part in ("model", "vae", "conditioner"):
        module = instantiate_from_config(config[part])
        state[part] = {key: value.half() for key, value in module.state_dict().items()}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    torch.save(state, folder / "model.fp16.ckpt")
    return folder


def build_tiny_vae(root: Path, name: str, subfolder: str, seed: int = 1) -> Path:
    """Write a stand-alone ShapeVAE folder (a FlashVDM "turbo VAE") matching the tiny model.

    Layout of hy3dgen's VAE folders: ``config.yaml`` with ``params`` and
    ``model.fp16.ckpt`` holding the VAE's state dict alone.
    """
    import torch
    import yaml
    from hy3dgen.shapegen.models import ShapeVAE

    folder = Path(root) / name / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    vae = tiny_config()["vae"]
    torch.manual_seed(seed)
    module = ShapeVAE(**vae["params"])
    (folder / "config.yaml").write_text(yaml.safe_dump(vae, sort_keys=False))
    torch.save({key: value.half() for key, value in module.state_dict().items()}, folder / "model.fp16.ckpt")
    return folder


def build_tiny_rembg_model(folder: Path, model: str = "u2net") -> Path:
    """Write ``folder/<model>.onnx``: a 1x1 convolution with u2net's input and output
    shapes, (1, 3, 320, 320) -> (1, 1, 320, 320), scoring dark pixels as foreground.

    rembg min-max normalises the score into the mask, so a dark object on a light
    background is cut out. Needs the ``onnx`` package.
    """
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [-1.0, -1.0, -1.0])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "w"], ["score"])],
        "tiny_u2net",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1, 320, 320])],
        initializer=[weight],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx_model.ir_version = 8  # readable by every onnxruntime since 1.10
    onnx.checker.check_model(onnx_model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model}.onnx"
    onnx.save(onnx_model, str(path))
    return path


def object_png(alpha: bool = True, size_px: int = 96, thin: bool = False) -> bytes:
    """A dark-red block on a background: transparent (RGBA cut-out) or white (RGB).

    ``thin`` makes the object one pixel tall, which hy3dgen's image preprocessor
    rejects with an exception from inside the pipeline.
    """
    import io

    import numpy as np
    from PIL import Image

    top, bottom = (size_px // 2, size_px // 2 + 1) if thin else (size_px // 4, 3 * size_px // 4)
    left, right = size_px // 3, 2 * size_px // 3
    if alpha:
        pixels = np.zeros((size_px, size_px, 4), np.uint8)
        pixels[top:bottom, left:right] = (150, 30, 30, 255)
        image = Image.fromarray(pixels, "RGBA")
    else:
        pixels = np.full((size_px, size_px, 3), 255, np.uint8)
        pixels[top:bottom, left:right] = (150, 30, 30)
        image = Image.fromarray(pixels, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

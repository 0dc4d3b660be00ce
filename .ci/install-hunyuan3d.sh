#!/usr/bin/env bash
# Installs the hunyuan3d extra (torch, torchvision, hy3dgen and what it imports)
# on a CI machine of this project's kind: Python 3.11, pip pointed at the local
# wheel folder where torch 2.14.1 and torchvision 0.29.1 lie. Idempotent; a few
# seconds when everything is already there.
set -euo pipefail

# Pinned so pip takes the local wheels: an unpinned torch resolves to a newer
# CUDA build of several GB from PyPI. hy3dgen imports torchvision without
# declaring it.
TORCH=("torch==2.14.1" "torchvision==0.29.1")

# hy3dgen's runtime imports, at the versions the tests ran with. Left out on
# purpose: gradio, fastapi and uvicorn (its demo web app), ninja and pybind11
# (only for building its optional C++ extensions), and opencv-python, whose cv2
# would overwrite the core's opencv-python-headless. onnx builds the test's
# stand-in rembg model.
DEPS=(
    "diffusers==0.42.1"
    "transformers==5.23.0"
    "accelerate==1.15.0"
    "einops==0.8.2"
    "omegaconf==2.4.0"
    "pymeshlab==2025.7.post1"
    "xatlas==0.0.11"
    "rembg==2.0.86"
    "onnxruntime==1.32.0"
    "pygltflib==1.16.5"
    "safetensors==0.8.0"
    "huggingface_hub==2.4.0"
    "onnx==1.23.2"
)

python -m pip install -q "${TORCH[@]}"
python -m pip install -q "${TORCH[@]}" "${DEPS[@]}"
python -m pip install -q --no-deps "hy3dgen==2.0.2"

# Fail here, not in the middle of the tests, if the set does not import.
python -c "import torch, torchvision, hy3dgen.shapegen, hy3dgen.texgen, rembg, pymeshlab; print('hunyuan3d extra: torch', torch.__version__, 'hy3dgen ok')"

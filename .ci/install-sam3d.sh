#!/usr/bin/env bash
# Installs the sam3d extra's CPU-testable part on a CI machine of this
# project's kind, after .ci/install-hunyuan3d.sh (torch 2.14.1 and
# torchvision 0.29.1 from the local wheel folder). Idempotent; a few seconds
# when everything is already there.
#
# SAM 3D Objects itself (sam3d_objects, pytorch3d, kaolin, MoGe, utils3d) is
# not on PyPI and needs CUDA: docs/sam3d.md says how to install it on a GPU
# machine. The tests stand in for its pipeline.
set -euo pipefail

TORCH=("torch==2.14.1" "torchvision==0.29.1")

# sam3 0.1.4 with --no-deps: its metadata asks for numpy<2.4 and
# huggingface-hub<2.0, which would downgrade what drake, mujoco and hy3dgen's
# stack (transformers 5) run with here; sam3's image model runs with both.
# Without the pin pip backtracks to sam3 0.0.1, an empty placeholder.
# Its runtime imports, at the versions the tests ran with, plus psutil (imported,
# not declared) and open_clip_torch (the CLIP BPE vocabulary sam3 does not ship).
# hydra-core (how SAM 3D Objects builds its pipeline.yaml) with --no-deps too:
# it declares omegaconf<2.4, and runs with hy3dgen's omegaconf 2.4, which
# vendors its own antlr; hydra's grammar needs antlr4 4.9.
DEPS=(
    "timm==1.0.31"
    "ftfy==6.3.1"
    "iopath==0.1.10"
    "pycocotools==2.0.11"
    "einops==0.8.2"
    "regex"
    "tqdm"
    "psutil"
    "open_clip_torch==3.3.0"
    "antlr4-python3-runtime==4.9.3"
    "omegaconf==2.4.0"
)

python -m pip install -q "${TORCH[@]}"
python -m pip install -q "${TORCH[@]}" "${DEPS[@]}"
python -m pip install -q --no-deps "sam3==0.1.4" "hydra-core==1.3.8"

# Fail here, not in the middle of the tests, if the set does not import; the
# other suites' packages must still import beside it.
python - <<'PY'
import numpy, torch, sam3.model_builder, sam3.model.sam3_image_processor, open_clip, psutil, hydra.utils
import trimesh
for optional in ("pydrake.all", "mujoco", "hy3dgen.shapegen"):
    try:
        __import__(optional)
    except ImportError as exc:
        raise SystemExit(f"the sam3d extra broke {optional}: {exc}")
print("sam3d extra: torch", torch.__version__, "numpy", numpy.__version__, "sam3 ok")
PY

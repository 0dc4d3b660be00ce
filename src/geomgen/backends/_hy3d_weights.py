"""Where Hunyuan3D-2 weights and helper models live on this machine.

Pure look-ups on the filesystem (and the Hugging Face cache, read offline), no
torch: the backend's load(), its check() and ``geomgen doctor`` share them, so
all three name the same places when something is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODELS_ROOT = "~/.cache/hy3dgen"  # hy3dgen's own default for $HY3DGEN_MODELS
# Checkpoint names hy3dgen reads, best first: model[.variant].{safetensors,ckpt}.
CHECKPOINT_NAMES = ("model.fp16.safetensors", "model.fp16.ckpt", "model.safetensors", "model.ckpt")
# The FlashVDM decoder of these model families runs on a step-distilled VAE of
# its own (the mapping hy3dgen's enable_flashvdm applies), keyed by the last
# component of the model id.
TURBO_VAES = {
    "Hunyuan3D-2": ("tencent/Hunyuan3D-2", "hunyuan3d-vae-v2-0-turbo"),
    "Hunyuan3D-2mv": ("tencent/Hunyuan3D-2", "hunyuan3d-vae-v2-0-turbo"),
    "Hunyuan3D-2mini": ("tencent/Hunyuan3D-2mini", "hunyuan3d-vae-v2-mini-turbo"),
}
PAINT_SUBFOLDERS = ("hunyuan3d-delight-v2-0", "hunyuan3d-paint-v2-0")


def models_root() -> Path:
    """``$HY3DGEN_MODELS``, or hy3dgen's default ``~/.cache/hy3dgen``."""
    return Path(os.path.expanduser(os.environ.get("HY3DGEN_MODELS") or DEFAULT_MODELS_ROOT))


def is_local_path(model: str) -> bool:
    """Whether ``model`` names a folder rather than a Hugging Face id."""
    return model.startswith(("/", "./", "../", "~")) or Path(os.path.expanduser(model)).is_dir()


@dataclass
class WeightsFolder:
    """One model folder: ``config.yaml`` plus a checkpoint, or where it was sought."""

    model: str
    subfolder: str
    folder: Path | None = None  # set when found
    checkpoint: Path | None = None
    looked_in: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.folder is not None

    @property
    def use_safetensors(self) -> bool:
        return self.checkpoint is not None and self.checkpoint.suffix == ".safetensors"

    def describe_missing(self) -> str:
        """A sentence: what is missing, where it was sought, how to fetch it."""
        places = "; ".join(self.looked_in) or "nowhere"
        if is_local_path(self.model):
            target = os.path.join(self.model, self.subfolder) if self.subfolder else self.model
            fetch = f"put config.yaml and one of {', '.join(CHECKPOINT_NAMES)} in {target}"
        else:
            fetch = (
                f"fetch them on a machine with internet access with `huggingface-cli download {self.model} "
                f"--include '{self.subfolder}/*' --local-dir {models_root() / self.model}` "
                "(or point HY3DGEN_MODELS at a folder holding <model>/<subfolder>)"
            )
        name = f"{self.model}/{self.subfolder}" if self.subfolder else self.model
        return f"weights {name} not found (looked in: {places}); {fetch}"


def checkpoint_fingerprint(path: Path | None, sample_bytes: int = 1024 * 1024) -> str:
    """``NAME:SIZE:SHA256`` of a checkpoint, hashing its first and last
    ``sample_bytes`` only (for the result cache's model identity)."""
    if path is None:
        return ""
    import hashlib

    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        hasher.update(handle.read(sample_bytes))
        if size > sample_bytes:
            handle.seek(max(sample_bytes, size - sample_bytes))
            hasher.update(handle.read(sample_bytes))
    return f"{path.name}:{size}:{hasher.hexdigest()}"


def _checkpoint_in(folder: Path) -> Path | None:
    if not (folder / "config.yaml").is_file():
        return None
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def _hub_cache_folder(model: str, subfolder: str) -> Path | None:
    """The folder of a Hugging Face cache snapshot holding ``subfolder/config.yaml``.

    Read from the cache only: never a network request.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(model, f"{subfolder}/config.yaml")
    except Exception:  # a malformed id is simply not in the cache
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def find_weights(model: str, subfolder: str) -> WeightsFolder:
    """Find ``config.yaml`` + checkpoint of ``model``/``subfolder``.

    ``model`` is a local folder (then ``model/subfolder``, or ``model`` itself
    when ``subfolder`` is empty) or a Hugging Face id, sought first under
    ``$HY3DGEN_MODELS/<model>/<subfolder>`` (hy3dgen's cache layout), then in
    the Hugging Face cache. Records every place it looked.
    """
    result = WeightsFolder(model, subfolder)
    if is_local_path(model):
        base = Path(os.path.expanduser(model))
        candidates = [base / subfolder if subfolder else base]
    else:
        candidates = [models_root() / model / subfolder]
    for folder in candidates:
        result.looked_in.append(str(folder))
        checkpoint = _checkpoint_in(folder)
        if checkpoint is not None:
            result.folder, result.checkpoint = folder, checkpoint
            return result
    if not is_local_path(model):
        result.looked_in.append("the Hugging Face cache")
        folder = _hub_cache_folder(model, subfolder)
        checkpoint = _checkpoint_in(folder) if folder is not None else None
        if checkpoint is not None:
            result.folder, result.checkpoint = folder, checkpoint
    return result


def turbo_vae_for(model: str) -> tuple[str, str] | None:
    """(model id, subfolder) of the FlashVDM VAE of ``model``'s family, if it has one."""
    return TURBO_VAES.get(model.rstrip("/").split("/")[-1])


@dataclass
class PaintWeights:
    """The two texture models (delight, multiview paint) of a paint model id or folder."""

    model: str
    root: Path | None = None  # folder holding both subfolders, when found
    looked_in: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.root is not None

    def describe_missing(self) -> str:
        places = "; ".join(self.looked_in) or "nowhere"
        wanted = " and ".join(PAINT_SUBFOLDERS)
        if is_local_path(self.model):
            fetch = f"put {wanted} in {self.model}"
        else:
            fetch = (
                f"fetch them with `huggingface-cli download {self.model} --include "
                + " --include ".join(f"'{s}/*'" for s in PAINT_SUBFOLDERS)
                + f" --local-dir {models_root() / self.model}`"
            )
        return f"texture models {wanted} of {self.model} not found (looked in: {places}); {fetch}, or use texture=off"


def find_paint_weights(model: str) -> PaintWeights:
    """Find the delight and paint model folders of ``model`` (local folder or id)."""
    result = PaintWeights(model)
    roots = [Path(os.path.expanduser(model))] if is_local_path(model) else [models_root() / model]
    for root in roots:
        result.looked_in.append(str(root))
        if all((root / sub).is_dir() for sub in PAINT_SUBFOLDERS):
            result.root = root
            return result
    if not is_local_path(model):
        result.looked_in.append("the Hugging Face cache")
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return result
        folders = []
        for sub in PAINT_SUBFOLDERS:
            hit = try_to_load_from_cache(model, f"{sub}/model_index.json")
            folders.append(Path(hit).parent.parent if isinstance(hit, str) else None)
        if folders[0] is not None and folders[0] == folders[1]:
            result.root = folders[0]
    return result


# --- background removal (rembg) ---------------------------------------------------


def rembg_model_file(model: str) -> Path | None:
    """The ONNX file of rembg model ``model`` if it is on disk, else None.

    rembg looks in ``$U2NET_HOME`` (default ``~/.u2net``) and, in newer
    releases, ``<rembg home>/models/<model>/``; a missing file makes it download
    at first use, which cannot work offline.
    """
    for folder in rembg_model_dirs(model):
        candidate = folder / f"{model}.onnx"
        if candidate.is_file():
            return candidate
    return None


def rembg_model_dirs(model: str) -> list[Path]:
    """Folders rembg reads ``<model>.onnx`` from, in its own order of preference."""
    legacy = Path(os.path.expanduser(os.environ.get("U2NET_HOME") or os.path.join(os.environ.get("XDG_DATA_HOME", "~"), ".u2net")))
    if os.environ.get("U2NET_HOME"):
        home = legacy
    else:
        xdg = os.environ.get("XDG_DATA_HOME")
        home = Path(os.path.expanduser(os.environ.get("REMBG_HOME") or (os.path.join(xdg, "rembg") if xdg else "~/.rembg")))
    return [home / "models" / model, legacy]


def rembg_missing_message(model: str) -> str:
    """How to make background removal work offline, naming the folders rembg reads."""
    folders = " or ".join(str(d) for d in rembg_model_dirs(model))
    return (
        f"the background-removal model {model}.onnx is not on this machine and cannot be downloaded here; "
        f"copy it into {folders} (or set U2NET_HOME to a folder holding it) and restart the worker, "
        "or send an RGBA image whose alpha channel already cuts the object out"
    )

"""Options of the hunyuan3d backend: names, defaults, validation.

Worker options (``--backend-option key=value``, strings) and per-request options
(``job.options``, msgpack values) go through the same parser. Options that pick
what is loaded are fixed per worker; the sampling options may change per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from geomgen.errors import InputError

# The old server's turbo settings: step-distilled DiT, 5 steps, FlashVDM decoding.
VARIANTS = {
    "full": ("tencent/Hunyuan3D-2", "hunyuan3d-dit-v2-0-turbo"),
    "mini": ("tencent/Hunyuan3D-2mini", "hunyuan3d-dit-v2-mini-turbo"),
}
DEFAULT_VARIANT = "full"
FAMILY_SUBFOLDERS = {model.split("/")[-1]: subfolder for model, subfolder in VARIANTS.values()}
DEFAULT_PAINT_MODEL = "tencent/Hunyuan3D-2"  # the only published paint model; mini shapes use it too
DEFAULT_REMBG_MODEL = "u2net"  # what hy3dgen's BackgroundRemover got from the rembg of its day
DEFAULT_STEPS = 5
DEFAULT_GUIDANCE = 5.0
DEFAULT_OCTREE_RESOLUTION = 256  # marching-cubes grid cells per side of the [-1.01, 1.01]^3 box
DEFAULT_NUM_CHUNKS = 8000  # query points decoded per forward pass of the volume decoder
DEFAULT_SEED = 1234
DEFAULT_MAX_FACES = 40_000  # hy3dgen FaceReducer's default budget (the SceneSmith assets have 40,000)

TEXTURE_MODES = ("auto", "on", "off")
DTYPES = {
    "auto": "auto",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")

# Changing one of these means loading other weights or another device: a worker's choice.
LOAD_OPTIONS = ("model", "subfolder", "variant", "flashvdm", "device", "dtype", "paint_model", "rembg_model")
REQUEST_OPTIONS = ("texture", "steps", "guidance", "octree_resolution", "num_chunks", "seed", "max_faces")
OPTION_NAMES = LOAD_OPTIONS + REQUEST_OPTIONS


@dataclass(frozen=True)
class Hy3dOptions:
    """Resolved options of one worker or one request. ``model``/``subfolder`` are
    filled from ``variant`` unless given; ``device``/``dtype``/``texture`` may stay
    "auto" until load() knows whether CUDA is there."""

    variant: str = DEFAULT_VARIANT
    model: str = VARIANTS[DEFAULT_VARIANT][0]
    subfolder: str = VARIANTS[DEFAULT_VARIANT][1]
    flashvdm: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float16 on CUDA, float32 on CPU) | float16 | bfloat16 | float32
    paint_model: str = DEFAULT_PAINT_MODEL
    rembg_model: str = DEFAULT_REMBG_MODEL
    texture: str = "auto"  # auto: paint where the paint pipeline can run (CUDA + weights + rasterizer)
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    octree_resolution: int = DEFAULT_OCTREE_RESOLUTION
    num_chunks: int = DEFAULT_NUM_CHUNKS
    seed: int = DEFAULT_SEED
    max_faces: int = DEFAULT_MAX_FACES

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_worker_options(options: dict[str, Any] | None) -> Hy3dOptions:
    """Options a worker starts with. Raises InputError ``bad_option`` naming the bad one."""
    values = _parse(options or {})
    model, subfolder = VARIANTS[values.get("variant", DEFAULT_VARIANT)]
    if "model" in values and "subfolder" not in values:
        # A published family gets its turbo DiT; any other model (a local folder,
        # a fine-tune) is taken to hold config.yaml and the checkpoint itself.
        subfolder = FAMILY_SUBFOLDERS.get(values["model"].rstrip("/").split("/")[-1], "")
    values.setdefault("model", model)
    values.setdefault("subfolder", subfolder)
    return replace(Hy3dOptions(), **values)


def merge_request_options(worker: Hy3dOptions, options: dict[str, Any] | None) -> Hy3dOptions:
    """The worker's options with one request's overrides applied.

    A load option may be repeated with the worker's own value; any other value
    raises InputError ``fixed_option`` saying how to start a worker that has it.
    """
    values = _parse(options or {})
    for name in LOAD_OPTIONS:
        if name in ("device", "dtype") and values.get(name) == "auto":
            continue  # "whatever the worker chose", which it resolved at load
        if name in values and values[name] != getattr(worker, name):
            raise InputError(
                f"option {name} is fixed when the worker starts (this worker has {name}="
                f"{_show(getattr(worker, name))}); start a hunyuan3d worker with "
                f"--backend-option {name}={_show(values[name])} for this request",
                code="fixed_option",
            )
    return replace(worker, **{k: v for k, v in values.items() if k in REQUEST_OPTIONS})


def _show(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _parse(options: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise InputError("hunyuan3d options must be a map of name -> value", code="bad_option")
    unknown = sorted(str(k) for k in set(options) - set(OPTION_NAMES))
    if unknown:
        raise InputError(
            f"unknown hunyuan3d option(s) {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}",
            code="bad_option",
        )
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        out[name] = _PARSERS[name](name, value)
    return out


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{name} must be a non-empty string, got {value!r}", code="bad_option")
    return value.strip()


def _subfolder(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {value!r}", code="bad_option")
    return value.strip().strip("/")


def _choice(choices: tuple[str, ...] | dict[str, str]):
    def parse(name: str, value: Any) -> str:
        text = (_show(value) if isinstance(value, bool) else str(value)).strip().lower()
        if text not in choices:
            raise InputError(f"{name} must be one of {', '.join(choices)}, got {value!r}", code="bad_option")
        return choices[text] if isinstance(choices, dict) else text

    return parse


def _switch(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InputError(f"{name} must be on or off, got {value!r}", code="bad_option")


def _texture(name: str, value: Any) -> str:
    if isinstance(value, bool) or str(value).strip().lower() in _TRUE + _FALSE:
        return "on" if _switch(name, value) else "off"
    return _choice(TEXTURE_MODES)(name, value)


def _device(name: str, value: Any) -> str:
    text = str(value).strip().lower()
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return text
    raise InputError(f"{name} must be auto, cpu, cuda or cuda:N, got {value!r}", code="bad_option")


def _number(low: float, high: float, integer: bool):
    def parse(name: str, value: Any) -> float | int:
        number: float | int = math.nan
        if not isinstance(value, bool):
            try:
                # int() first so that large seeds keep every digit
                number = int(value) if integer and not isinstance(value, float) else float(value)
            except (TypeError, ValueError):
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    number = math.nan
        if not (math.isfinite(number) and low <= number <= high) or (integer and number != int(number)):
            kind = "an integer" if integer else "a number"
            raise InputError(f"{name} must be {kind} from {low:g} to {high:g}, got {value!r}", code="bad_option")
        return int(number) if integer else number

    return parse


_PARSERS = {
    "model": _text,
    "subfolder": _subfolder,
    "variant": _choice(tuple(VARIANTS)),
    "flashvdm": _switch,
    "device": _device,
    "dtype": _choice(DTYPES),
    "paint_model": _text,
    "rembg_model": _text,
    "texture": _texture,
    "steps": _number(1, 200, integer=True),
    "guidance": _number(0.0, 100.0, integer=False),
    "octree_resolution": _number(16, 1024, integer=True),
    "num_chunks": _number(1000, 10_000_000, integer=True),
    "seed": _number(0, 2**63 - 1, integer=True),
    "max_faces": _number(100, 10_000_000, integer=True),
}

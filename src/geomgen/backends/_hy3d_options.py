"""Options of the hunyuan3d backend: names, defaults, validation.

Worker options (``--backend-option key=value``, strings) and per-request options
(``job.options``, msgpack values) go through the same parser. Options that pick
what is loaded are fixed per worker; the sampling options may change per request.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from geomgen.backends._sam3_segmenter import DEFAULT_THRESHOLD as DEFAULT_SAM3_THRESHOLD
from geomgen.backends._sam3_segmenter import SEGMENTER_OPTIONS
from geomgen.contract import SCOPE_HINT
from geomgen.errors import InputError
from geomgen.optionspec import OptionSpec, parse_options

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
DTYPES = ("auto", "float16", "bfloat16", "float32")
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
SWITCH_ALIASES = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}

# Declared for the client and the broker, which refuse a bad option before the
# request is queued; the worker parses with the same declarations. The options
# not per_request pick other weights or another device: a worker's choice.
OPTIONS = (
    OptionSpec("model", "text", VARIANTS[DEFAULT_VARIANT][0], per_request=False,
               help="Hugging Face name or local folder of the shape model"),
    OptionSpec("subfolder", "text", VARIANTS[DEFAULT_VARIANT][1], allow_empty=True, per_request=False),
    OptionSpec("variant", "choice", DEFAULT_VARIANT, choices=tuple(VARIANTS), per_request=False),
    OptionSpec("flashvdm", "switch", True, per_request=False),
    OptionSpec("device", "text", "auto", pattern=r"auto|cpu|cuda(:[0-9]+)?", per_request=False),
    OptionSpec("dtype", "choice", "auto", choices=DTYPES, aliases=DTYPE_ALIASES, per_request=False),
    OptionSpec("paint_model", "text", DEFAULT_PAINT_MODEL, per_request=False),
    OptionSpec("rembg_model", "text", DEFAULT_REMBG_MODEL, per_request=False),
    OptionSpec("texture", "choice", "auto", choices=TEXTURE_MODES, aliases=SWITCH_ALIASES),
    OptionSpec("steps", "integer", DEFAULT_STEPS, 1, 200),
    OptionSpec("guidance", "number", DEFAULT_GUIDANCE, 0.0, 100.0),
    OptionSpec("octree_resolution", "integer", DEFAULT_OCTREE_RESOLUTION, 16, 1024),
    OptionSpec("num_chunks", "integer", DEFAULT_NUM_CHUNKS, 1000, 10_000_000),
    OptionSpec("seed", "integer", DEFAULT_SEED, 0, 2**63 - 1),
    OptionSpec("max_faces", "integer", DEFAULT_MAX_FACES, 100, 10_000_000),
    *SEGMENTER_OPTIONS,  # segmenter=sam3: SAM 3 instead of rembg (backends/_sam3_segmenter.py)
)
OPTION_NAMES = tuple(spec.name for spec in OPTIONS)
LOAD_OPTIONS = tuple(spec.name for spec in OPTIONS if not spec.per_request)
REQUEST_OPTIONS = tuple(spec.name for spec in OPTIONS if spec.per_request)


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
    segmenter: str = "default"  # default: the alpha channel, else rembg; sam3: SAM 3 on every image
    sam3_checkpoint: str | None = None
    text_prompt: str | None = None  # with segmenter=sam3: the object to cut out; none: the foreground object
    sam3_threshold: float = DEFAULT_SAM3_THRESHOLD

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


def _parse(options: dict[str, Any]) -> dict[str, Any]:
    values = parse_options("hunyuan3d", OPTIONS, options, hint=SCOPE_HINT)
    if "subfolder" in values:
        values["subfolder"] = values["subfolder"].strip("/")
    return values


def _show(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)

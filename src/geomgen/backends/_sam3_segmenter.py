"""SAM 3 segmentation, shared by the image backends (``sam3d`` always;
``hunyuan3d`` and ``silhouette`` with ``segmenter=sam3``).

Two modes, as the old geometry server had them:

- ``foreground``: the object on a plain background. SAM 3 is prompted with
  "background"; the best mask is inverted and every piece of it touching the
  image border is dropped, so what is left is the object in the middle.
- ``text``: the object a text prompt names ("the red chair"), in a cluttered
  photo: the best-scoring mask for that prompt.

The model is SAM 3's own (``sam3`` on PyPI, Meta's code): built by
``sam3.model_builder.build_sam3_image_model`` from a local checkpoint only
(never fetched), run by ``sam3.model.sam3_image_processor.Sam3Processor``.
torch and sam3 are imported when a segmenter is built, never at module import.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from geomgen.errors import BackendUnavailable, InputError
from geomgen.optionspec import OptionSpec
from geomgen.backends._model_errors import first_line as _first_line

if TYPE_CHECKING:
    import PIL.Image

log = logging.getLogger(__name__)

MODES = ("foreground", "text")
FOREGROUND_PROMPT = "background"  # what foreground mode asks SAM 3 for, then inverts
DEFAULT_THRESHOLD = 0.5  # Sam3Processor's own default confidence
# Python modules the segmenter imports; `import sam3` alone is not enough
# (sam3 0.0.1 on PyPI is an empty placeholder without them).
REQUIRED_MODULES = ("torch", "torchvision", "sam3.model_builder", "sam3.model.sam3_image_processor",
                    "open_clip", "psutil")
INSTALL_HINT = "bash .ci/install-sam3d.sh, or pip install 'geomgen[sam3d]' (sam3==0.1.4)"
CHECKPOINT_HINT = ("download sam3.pt from the gated Hugging Face repository facebook/sam3 on a machine with "
                   "access and give its path as sam3_checkpoint=/path/to/sam3.pt")

# The options an image backend takes to use SAM 3 instead of its own foreground step.
SEGMENTER_OPTIONS = (
    OptionSpec("segmenter", "choice", "default", choices=("default", "sam3"), per_request=False,
               help="default: the backend's own foreground step; sam3: SAM 3 finds the object"),
    OptionSpec("sam3_checkpoint", "text", None, per_request=False, help="SAM 3 checkpoint file (sam3.pt)"),
    OptionSpec("text_prompt", "text", None,
               help="with segmenter=sam3: the object to cut out (\"the red chair\"); none: the foreground object"),
    OptionSpec("sam3_threshold", "number", DEFAULT_THRESHOLD, 0.0, 1.0, help="SAM 3 confidence threshold"),
)


@dataclass
class Segmentation:
    """What SAM 3 found in one image."""

    mask: np.ndarray  # bool (height, width), the input image's size
    score: float  # the chosen mask's confidence
    mode: str
    prompt: str
    detections: int  # masks above the threshold
    box_xyxy_px: list[float] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        return {"segmenter": "sam3", "mode": self.mode, "prompt": self.prompt, "score": round(self.score, 4),
                "detections": self.detections, "mask_fraction": round(float(self.mask.mean()), 4)}

    def rgba(self, image: "PIL.Image.Image") -> "PIL.Image.Image":
        """``image`` as RGBA with the mask as its alpha channel."""
        import PIL.Image

        rgb = np.asarray(image.convert("RGB"))
        alpha = self.mask.astype(np.uint8)[..., None] * 255
        return PIL.Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA")

    def debug_files(self, image: "PIL.Image.Image", input_name: str) -> dict[str, bytes]:
        """The old server's debug images: ``{stem}_mask.png`` and ``{stem}_masked.png``."""
        import PIL.Image

        stem = Path(input_name).stem or "input"
        mask_png = _png(PIL.Image.fromarray(self.mask.astype(np.uint8) * 255, "L"))
        return {f"{stem}_mask.png": mask_png, f"{stem}_masked.png": _png(self.rgba(image))}


def missing_modules() -> list[str]:
    """The segmenter's modules that cannot be found here. Looks at files only:
    ``find_spec("sam3.model_builder")`` would import sam3, and torch with it."""
    return [name for name in REQUIRED_MODULES if not module_exists(name)]


def module_exists(name: str) -> bool:
    """Whether module ``name`` (dotted) is installed, without importing any of it."""
    top, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not rest:
        return True
    for root in spec.submodule_search_locations or ():
        path = Path(root).joinpath(*rest)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return True
    return False


def checkpoint_problem(path: str | None) -> str | None:
    """Why ``path`` cannot be SAM 3's checkpoint, or None."""
    if not path:
        return f"no SAM 3 checkpoint given (option sam3_checkpoint); {CHECKPOINT_HINT}"
    file = Path(path).expanduser()
    if not file.is_file():
        return f"the SAM 3 checkpoint {file} does not exist; {CHECKPOINT_HINT}"
    return None


@contextlib.contextmanager
def cpu_placement(device: str) -> Iterator[None]:
    """On a CPU device, run SAM 3 code that hard-codes CUDA.

    sam3 0.1.4 builds some tensors with ``device="cuda"`` (position encoding and
    decoder caches) and pins memory on every box prompt (upstream issues #587
    and #550). While this context is active on ``device="cpu"``, torch factory
    calls asking for CUDA get the CPU and ``pin_memory`` is a no-op. On a CUDA
    device it does nothing.
    """
    if not device.startswith("cpu"):
        yield
        return
    import torch
    from torch.overrides import TorchFunctionMode

    pin_memory = torch.Tensor.pin_memory

    class _CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is pin_memory:
                return args[0]
            wanted = kwargs.get("device")
            if wanted is not None and torch.device(wanted).type == "cuda":
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    with _CudaToCpu():
        yield


def check_checkpoint_keys(model: Any, checkpoint: Path) -> None:
    """Check a checkpoint against the built model: sam3's own loader only prints
    missing keys, so a wrong file would give a model with random weights. The
    file is memory-mapped, not read a second time."""
    import torch

    try:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # an old (non-zip) torch file cannot be memory-mapped
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, a pickle with code in it
        raise BackendUnavailable(
            f"cannot read the SAM 3 checkpoint {checkpoint} ({type(exc).__name__}: {_first_line(exc)}); "
            f"{CHECKPOINT_HINT}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise BackendUnavailable(f"{checkpoint} holds no state dict; {CHECKPOINT_HINT}")
    # The published checkpoint's image-model weights carry the prefix "detector.".
    weights = {key[len("detector."):]: value for key, value in state.items()
               if isinstance(key, str) and key.startswith("detector.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise BackendUnavailable(
            f"{checkpoint} is not a SAM 3 image-model checkpoint: {len(missing)} of its {len(expected)} weights "
            f"are missing (first: {', '.join(missing[:3])}); {CHECKPOINT_HINT}")
    wrong = [key for key, value in expected.items() if tuple(weights[key].shape) != tuple(value.shape)]
    if wrong:
        raise BackendUnavailable(
            f"{checkpoint} does not fit SAM 3's architecture: {len(wrong)} weights have other shapes "
            f"(first: {wrong[0]} {tuple(weights[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}); "
            f"{CHECKPOINT_HINT}")


class Sam3Segmenter:
    """SAM 3's image model, loaded once from a local checkpoint."""

    def __init__(self, checkpoint: str | None, device: str) -> None:
        """Build the model and load the checkpoint. Raises BackendUnavailable
        naming what is missing (packages, checkpoint, a checkpoint of another model)."""
        missing = missing_modules()
        if missing:
            raise BackendUnavailable(f"SAM 3 needs {', '.join(missing)}, which cannot be imported here; {INSTALL_HINT}")
        problem = checkpoint_problem(checkpoint)
        if problem:
            raise BackendUnavailable(problem)
        assert checkpoint is not None
        self.checkpoint = Path(checkpoint).expanduser().resolve()
        self.device = device
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are local files only
        import open_clip.tokenizer
        import torch
        from sam3.model.sam3_image_processor import Sam3Processor
        from sam3.model_builder import build_sam3_image_model

        self._torch = torch
        # sam3's wheel ships no BPE vocabulary; open_clip's is the same CLIP one.
        bpe_path = open_clip.tokenizer.default_bpe()
        try:
            # sam3's own loader (checkpoint_path) reads the weights; it only prints
            # missing keys, so the file is checked against the model afterwards.
            with cpu_placement(device), contextlib.redirect_stdout(io.StringIO()):
                model = build_sam3_image_model(bpe_path=bpe_path, device="cpu", eval_mode=True,
                                               checkpoint_path=str(self.checkpoint), load_from_HF=False)
            check_checkpoint_keys(model, self.checkpoint)
            model = model.to(device).eval()
        except BackendUnavailable:
            raise
        except Exception as exc:  # out of memory, a torch/sam3 mismatch
            raise BackendUnavailable(
                f"cannot build SAM 3 from {self.checkpoint} on {device} ({type(exc).__name__}: {_first_line(exc)})"
            ) from None
        self.model = model
        self._processor = Sam3Processor(model, device=device, confidence_threshold=DEFAULT_THRESHOLD)

    def segment(self, image: "PIL.Image.Image", mode: str, prompt: str | None, threshold: float,
                input_name: str = "the image") -> Segmentation:
        """The object's mask in ``image`` (its own size).

        Raises InputError ``no_detection`` when SAM 3 finds nothing above
        ``threshold``, ``no_object`` when foreground mode leaves nothing away
        from the border, ``bad_option`` for text mode without a prompt.
        """
        if mode not in MODES:
            raise InputError(f"segmentation mode {mode!r} is not one of {', '.join(MODES)}", code="bad_option")
        if mode == "text":
            if not (prompt and prompt.strip()):
                raise InputError("mode text needs a text_prompt naming the object (\"the red chair\")",
                                 code="bad_option")
            query = prompt.strip()
        else:
            query = FOREGROUND_PROMPT
        # RGBA (and palette, greyscale) images fail inside sam3: it wants 3 channels.
        rgb = image.convert("RGB")
        processor = self._processor
        processor.confidence_threshold = threshold
        with cpu_placement(self.device):
            state = processor.set_image(rgb)
            state = processor.set_text_prompt(query, state)
        scores = state["scores"].float().cpu().numpy().reshape(-1)
        if scores.size == 0:
            raise InputError(
                f"SAM 3 found no {query!r} in {input_name} above confidence {threshold:g}; "
                + ("check the text_prompt or lower the threshold" if mode == "text"
                   else "lower the threshold, or use mode text with a text_prompt naming the object"),
                code="no_detection",
            )
        best = int(scores.argmax())
        mask = state["masks"][best].reshape(rgb.height, rgb.width).cpu().numpy().astype(bool)
        box = [round(float(v), 2) for v in state["boxes"][best].float().cpu().numpy().reshape(-1)]
        if mode == "foreground":
            mask = _drop_border_pieces(~mask)
            if not mask.any():
                raise InputError(
                    f"SAM 3's background covers all of {input_name} except pieces touching its border, so no "
                    "object is left; use mode text with a text_prompt naming the object",
                    code="no_object",
                )
            rows, cols = np.nonzero(mask)
            box = [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
        elif not mask.any():
            raise InputError(f"SAM 3's best mask for {query!r} in {input_name} is empty; check the text_prompt",
                             code="no_object")
        return Segmentation(mask=mask, score=float(scores[best]), mode=mode, prompt=query,
                            detections=int(scores.size), box_xyxy_px=box)

    def close(self) -> None:
        self._processor = None
        self.model = None


def _drop_border_pieces(mask: np.ndarray) -> np.ndarray:
    """``mask`` without its connected pieces that touch the image border."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return mask & ~np.isin(labels, border[border > 0])


def _png(image: "PIL.Image.Image") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()



# --- the segmenter=sam3 option of the other image backends ---------------------------


def load_for_backend(backend: str, options: dict[str, Any]) -> "Sam3Segmenter | None":
    """The SAM 3 segmenter an image backend's options ask for (``segmenter=sam3``),
    on the backend's ``device`` when it has one, else on CUDA when torch sees a
    GPU, else the CPU; None for ``segmenter=default``.
    Raises BackendUnavailable naming what is missing."""
    if options.get("segmenter") != "sam3":
        return None
    problem = checkpoint_problem(options.get("sam3_checkpoint"))
    if problem:
        raise BackendUnavailable(f"{backend} with segmenter=sam3: {problem}")
    missing = missing_modules()
    if missing:
        raise BackendUnavailable(f"{backend} with segmenter=sam3 needs {', '.join(missing)}, which cannot be "
                                 f"imported here; {INSTALL_HINT}")
    device = options.get("device") or "auto"
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Sam3Segmenter(options["sam3_checkpoint"], device)


def cut_out(segmenter: Sam3Segmenter, image: "PIL.Image.Image", input_name: str, text_prompt: str | None,
            threshold: float, debug: bool) -> tuple["PIL.Image.Image", dict[str, Any], dict[str, bytes]]:
    """``image`` as RGBA with SAM 3's mask as alpha (the object ``text_prompt``
    names, or without one the foreground object), the segmentation's facts
    for the result's info, and the debug images when ``debug``."""
    prompt = (text_prompt or "").strip() or None
    found = segmenter.segment(image, "text" if prompt else "foreground", prompt, threshold, input_name=input_name)
    return found.rgba(image), found.info(), (found.debug_files(image, input_name) if debug else {})


def refuse_unused(backend: str, segmenter: str, *option_sets: dict[str, Any]) -> None:
    """InputError ``bad_option`` when SAM 3's per-image options are given to a
    backend whose segmenter is not SAM 3: they would be silently ignored."""
    if segmenter == "sam3":
        return
    given = sorted({name for options in option_sets for name in options if name in ("text_prompt", "sam3_threshold")})
    if given:
        raise InputError(
            f"{', '.join(given)} applies with segmenter=sam3, and this {backend} worker has segmenter={segmenter}; "
            f"start a {backend} worker with --backend-option segmenter=sam3 --backend-option sam3_checkpoint=PATH",
            code="bad_option",
        )

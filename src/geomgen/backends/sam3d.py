"""The ``sam3d`` backend: SAM 3 finds the object, SAM 3D Objects reconstructs it.

One image in, one textured GLB out, as the old geometry server did it:

1. **Segmentation.** SAM 3 (``sam3``) in mode ``foreground`` (the object on a
   plain background: "background" is segmented, inverted, and pieces touching
   the border dropped) or ``text`` (the object ``text_prompt`` names, in a
   cluttered photo). See backends/_sam3_segmenter.py.
2. **Reconstruction.** SAM 3D Objects' pipeline (``pipeline.yaml``, loaded with
   an allow-list, backends/_sam3d_pipeline.py) runs on the image with the mask
   in its alpha channel: mesh post-processing and a baked UV texture (or
   vertex colours with ``texture=off``).
3. **Export.** The pipeline's mesh is +Y up and normalised; geomgen centres it,
   stands it on y = 0 and takes its units as metres; the request's conversion
   options (``dimensions``, ``height_m``, ``scale``) give the asset its real size.

Both models load once, in load(), from local files only; torch, sam3 and SAM
3D Objects are imported there, never at module import. Details: docs/sam3d.md.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from geomgen import defaults
from geomgen.backends import _sam3_segmenter as segmentation
from geomgen.backends import _sam3d_pipeline as reconstruction
from geomgen.backends.base import Backend, GenerationInput, GenerationOutput
from geomgen.errors import BackendUnavailable, GenerateError, GeomgenError, InputError
from geomgen.optionspec import OptionSpec
from geomgen.backends._model_errors import first_line as _first_line, is_out_of_memory as _is_out_of_memory

log = logging.getLogger(__name__)

DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"
PUBLISHED_GPU_GB = 32.0  # SAM 3D Objects' published need: an NVIDIA GPU with at least 32 GB
DEFAULT_SEED = 42
# Environment variables a worker may use instead of the options (the old server's).
CHECKPOINT_ENV = {"sam3_checkpoint": "SAM3_CHECKPOINT", "sam3d_checkpoint": "SAM3D_CHECKPOINT"}

# The old server's sam3d_config keys (a request's sam3d_config arrives as these
# options), plus seed, texture, gaussians and device. Checkpoints and device pick
# what is loaded, so they are fixed when the worker starts.
OPTIONS = (
    OptionSpec("sam3_checkpoint", "text", None, per_request=False,
               help="SAM 3 checkpoint file (sam3.pt); default $SAM3_CHECKPOINT"),
    OptionSpec("sam3d_checkpoint", "text", None, per_request=False,
               help="SAM 3D Objects pipeline.yaml (checkpoints/hf/pipeline.yaml); default $SAM3D_CHECKPOINT"),
    OptionSpec("mode", "choice", "foreground", choices=segmentation.MODES,
               help="foreground: the object on a plain background; text: the object text_prompt names"),
    OptionSpec("text_prompt", "text", None, help="what to segment in mode text (\"the red chair\")"),
    OptionSpec("object_description", "text", None, help="the old name of text_prompt"),
    OptionSpec("threshold", "number", segmentation.DEFAULT_THRESHOLD, 0.0, 1.0, help="SAM 3 confidence threshold"),
    OptionSpec("seed", "integer", DEFAULT_SEED, 0, 2**31 - 1, help="SAM 3D Objects' sampling seed"),
    OptionSpec("texture", "switch", True, help="bake a UV texture (off: vertex colours)"),
    OptionSpec("gaussians", "switch", False,
               help="also return the Gaussian splat as {stem}_gaussians.ply in the debug folder"),
    OptionSpec("device", "text", "auto", pattern=DEVICE_PATTERN, per_request=False,
               help="auto (CUDA), cuda, cuda:N, or cpu (segmentation only; SAM 3D Objects needs CUDA)"),
)


class Sam3dBackend(Backend):
    """SAM 3 segmentation + SAM 3D Objects reconstruction (see module docstring)."""

    name = "sam3d"
    input_kind = "image"
    uses_gpu = True
    generate_timeout_s = defaults.GPU_GENERATE_TIMEOUT_S
    extra = "sam3d"
    options_spec = OPTIONS

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self.settings = self.resolve_options(self.options)
        for name, variable in CHECKPOINT_ENV.items():
            if not self.settings[name] and os.environ.get(variable):
                self.settings[name] = os.environ[variable]
        _prompt(self.settings, required=False)  # text_prompt and object_description must agree
        self._torch: Any = None
        self._segmenter: segmentation.Sam3Segmenter | None = None
        self._pipeline: Any = None
        self._config: reconstruction.PipelineConfig | None = None

    # --- availability ---------------------------------------------------------

    @classmethod
    def check(cls) -> str | None:
        """Missing packages or checkpoints, without importing torch."""
        missing = segmentation.missing_modules()
        missing += [name for name in reconstruction.SAM3D_OBJECTS_MODULES if not segmentation.module_exists(name)]
        if missing:
            return (f"sam3d needs {', '.join(missing)}, which cannot be imported here; "
                    f"{segmentation.INSTALL_HINT}; {reconstruction.SAM3D_OBJECTS_INSTALL}")
        for name, variable in CHECKPOINT_ENV.items():
            if not os.environ.get(variable):
                return f"no {name}: start the worker with --backend-option {name}=PATH or set ${variable}"
        problem = segmentation.checkpoint_problem(os.environ[CHECKPOINT_ENV["sam3_checkpoint"]])
        if problem:
            return problem
        if not Path(os.environ[CHECKPOINT_ENV["sam3d_checkpoint"]]).expanduser().is_file():
            return f"{os.environ[CHECKPOINT_ENV['sam3d_checkpoint']]} does not exist; {reconstruction.WEIGHTS_HINT}"
        return None

    # --- loading ---------------------------------------------------------------

    def identity(self) -> str:
        """The base identity, the resolved settings (checkpoints from the
        environment included) and each weight file's fingerprint (name, size,
        SHA-256 of its first and last MiB): the SAM 3 checkpoint and the
        pipeline config."""
        from geomgen.backends._hy3d_weights import checkpoint_fingerprint

        files = [self.settings.get("sam3_checkpoint"), self.settings.get("sam3d_checkpoint")]
        prints = [checkpoint_fingerprint(Path(f).expanduser()) for f in files if f and Path(f).expanduser().is_file()]
        return f"{super().identity()} settings {sorted(self.settings.items(), key=str)!r} weights {prints}"

    def load(self) -> None:
        """Check the pipeline config, then load SAM 3 and SAM 3D Objects once.

        Raises BackendUnavailable naming what is missing: a package (with how
        to install it), a checkpoint, CUDA, or a config that builds something
        outside the allow-list.
        """
        if not self.settings["sam3d_checkpoint"]:
            # Nothing configured: say everything this machine lacks for sam3d.
            raise BackendUnavailable(self.check() or "no SAM 3D Objects pipeline given (option "
                                     f"sam3d_checkpoint); {reconstruction.WEIGHTS_HINT}")
        config = reconstruction.read_config(self.settings["sam3d_checkpoint"])
        missing = reconstruction.missing_modules(config)
        if missing:
            raise BackendUnavailable(
                f"the SAM 3D Objects pipeline {config.path} needs {', '.join(missing)}, which cannot be imported "
                f"here; {reconstruction.SAM3D_OBJECTS_INSTALL}")
        problem = segmentation.checkpoint_problem(self.settings["sam3_checkpoint"])
        if problem:
            raise BackendUnavailable(problem)
        if segmentation.missing_modules():
            raise BackendUnavailable(f"sam3d needs {', '.join(segmentation.missing_modules())}, which cannot be "
                                     f"imported here; {segmentation.INSTALL_HINT}")
        import torch

        self._torch = torch
        device = self._resolve_device(torch, config)
        self.settings["device"] = device
        self._segmenter = segmentation.Sam3Segmenter(self.settings["sam3_checkpoint"], device)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MoGe and DINO weights must be local too
        try:
            self._pipeline = reconstruction.instantiate(config)
        except GeomgenError:
            raise
        except Exception as exc:  # missing weights next to the yaml, CUDA extensions, out of memory
            self._free_gpu_memory()
            raise BackendUnavailable(
                f"cannot build the SAM 3D Objects pipeline from {config.path} ({type(exc).__name__}: "
                f"{_first_line(exc)}); check that the weights next to it are complete") from None
        if not callable(getattr(self._pipeline, "run", None)):
            raise BackendUnavailable(f"{config.path} built a {type(self._pipeline).__name__}, which has no run(); "
                                     "is it SAM 3D Objects' pipeline.yaml?")
        self._config = config
        log.info("sam3d loaded %s and %s on %s", self._segmenter.checkpoint, config.path, device)

    def _resolve_device(self, torch: Any, config: reconstruction.PipelineConfig) -> str:
        device = self.settings["device"]
        cuda = torch.cuda.is_available()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        if device == "auto":
            device = "cuda" if cuda else "cpu"
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or 0)
            if not cuda or index >= torch.cuda.device_count():
                raise BackendUnavailable(
                    f"device={self.settings['device']} but torch sees {torch.cuda.device_count() if cuda else 0} "
                    f"CUDA device(s) (CUDA_VISIBLE_DEVICES={visible}); SAM 3D Objects needs an NVIDIA GPU with at "
                    f"least {PUBLISHED_GPU_GB:g} GB; use --gpu to pick one")
        elif config.needs_sam3d_objects:
            raise BackendUnavailable(
                f"no CUDA device is visible (CUDA_VISIBLE_DEVICES={visible}) and SAM 3D Objects runs on CUDA only; "
                f"it needs an NVIDIA GPU with at least {PUBLISHED_GPU_GB:g} GB")
        return device

    # --- one job -----------------------------------------------------------------

    def generate(self, job: GenerationInput) -> GenerationOutput:
        """Image bytes -> GLB bytes (+Y up, resting on y = 0, centred in x/z).

        Raises InputError for an unusable image or option or when SAM 3 finds
        no object, GenerateError for a failure of the reconstruction (CUDA out
        of memory included; the worker stays usable).
        """
        if self._pipeline is None or self._segmenter is None:
            raise GenerateError("the sam3d backend was not loaded; the worker must call load() first",
                                code="backend_not_loaded")
        settings = self.resolve_options(self.options, job.options)
        for name in ("sam3_checkpoint", "sam3d_checkpoint", "device"):
            settings[name] = self.settings[name]  # load options: the client and broker checked they match
        if settings["mode"] == "text" and not (settings["text_prompt"] or settings["object_description"]):
            settings["text_prompt"] = job.prompt  # the request's prompt names the object
        prompt = _prompt(settings)
        if settings["gaussians"] and not job.debug:
            raise InputError("gaussians=on writes {stem}_gaussians.ply to the debug folder; give the request a "
                             "debug_folder, or send gaussians=off", code="bad_option")
        seconds: dict[str, float] = {}
        started_s = time.monotonic()
        device = settings["device"]
        on_cuda = device.startswith("cuda")
        if on_cuda:
            self._torch.cuda.reset_peak_memory_stats(device)

        from geomgen.inputs import decode_image

        image = decode_image(job.input_data, job.input_name)
        job.progress(f"segmenting with SAM 3 ({settings['mode']}{': ' + prompt if prompt else ''})")
        found = self._guarded("segmentation", lambda: self._segmenter.segment(
            image, settings["mode"], prompt, settings["threshold"], input_name=job.input_name))
        seconds["segmentation_s"] = time.monotonic() - started_s

        rgba = np.asarray(found.rgba(image))  # (rows, cols, 4) uint8, the mask in alpha
        job.progress("reconstructing with SAM 3D Objects" + (" and baking the texture" if settings["texture"] else ""))
        step_s = time.monotonic()
        output = self._guarded("reconstruction", lambda: self._pipeline.run(
            rgba, None, settings["seed"], **reconstruction.run_kwargs(settings["texture"])))
        seconds["reconstruction_s"] = time.monotonic() - step_s

        step_s = time.monotonic()
        glb, extent, faces = _export(output, job.input_name)
        debug = found.debug_files(image, job.input_name) if job.debug else {}
        if settings["gaussians"]:
            debug[f"{Path(job.input_name).stem or 'input'}_gaussians.ply"] = _gaussians_ply(output, job.work_dir)
        seconds["export_s"] = time.monotonic() - step_s
        seconds["total_s"] = time.monotonic() - started_s
        info = {
            **found.info(),
            "pipeline": str(self._config.path) if self._config else "",
            "device": device,
            "texture": bool(settings["texture"]),
            "seed": settings["seed"],
            "faces": faces,
            "extent_m": [round(float(v), 6) for v in extent],
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
        }
        if on_cuda:
            info["gpu_peak_gb"] = round(self._torch.cuda.max_memory_allocated(device) / 1024**3, 3)
        return GenerationOutput(glb=glb, info=info, debug_files=debug)

    def _guarded(self, stage: str, step: Callable[[], Any]) -> Any:
        """Run one model step; turn its failure into a GenerateError and free GPU memory."""
        failure: GeomgenError
        try:
            return step()
        except GeomgenError:
            raise
        except Exception as exc:  # noqa: BLE001 - any model failure is this job's
            if _is_out_of_memory(exc):
                failure = GenerateError(
                    f"{stage} ran out of GPU memory on {self.settings['device']} ({_first_line(exc)}); the worker "
                    f"freed its cache and goes on; SAM 3D Objects needs about {PUBLISHED_GPU_GB:g} GB, or send "
                    "texture=off", code="gpu_out_of_memory")
            else:
                log.exception("sam3d %s failed", stage)
                failure = GenerateError(f"{stage} failed ({type(exc).__name__}: {_first_line(exc)})",
                                        code="pipeline_error")
        self._free_gpu_memory()
        raise failure

    def _free_gpu_memory(self) -> None:
        gc.collect()
        torch = self._torch
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        if self._segmenter is not None:
            self._segmenter.close()
        self._segmenter = None
        self._pipeline = None
        self._free_gpu_memory()


# --- helpers -----------------------------------------------------------------------


def _prompt(settings: dict[str, Any], required: bool = True) -> str | None:
    """The text prompt: ``text_prompt``, or the old ``object_description``."""
    text, old = settings.get("text_prompt"), settings.get("object_description")
    if text and old and text.strip() != old.strip():
        raise InputError("text_prompt and object_description (its old name) differ; send one of them",
                         code="bad_option")
    prompt = (text or old or "").strip() or None
    if required and settings.get("mode") == "text" and prompt is None:
        raise InputError("mode text needs text_prompt (or object_description, or the request's prompt) naming "
                         "the object, e.g. sam3d.text_prompt='the red chair'", code="bad_option")
    return prompt


def _export(output: Any, input_name: str) -> tuple[bytes, np.ndarray, int]:
    """The pipeline's mesh (``output["glb"]``, +Y up) as GLB bytes in geomgen's
    conventions, its extent (3,) in metres and its face count."""
    import trimesh

    from geomgen.geometry.meshio import export_glb, scene_bounds, to_output_conventions

    mesh = output.get("glb") if isinstance(output, dict) else None
    if isinstance(mesh, trimesh.Trimesh):
        scene = trimesh.Scene(mesh)
    elif isinstance(mesh, trimesh.Scene):
        scene = mesh
    else:
        raise GenerateError(f"SAM 3D Objects returned no mesh for {input_name} (its output's glb is "
                            f"{type(mesh).__name__})", code="no_surface")
    faces = sum(len(g.faces) for g in scene.geometry.values() if hasattr(g, "faces"))
    if faces == 0:
        raise GenerateError(f"SAM 3D Objects returned an empty mesh for {input_name}", code="no_surface")
    scene = to_output_conventions(scene, up_axis="y")
    bounds = scene_bounds(scene)
    return export_glb(scene), bounds[1] - bounds[0], int(faces)


def _gaussians_ply(output: Any, work_dir: Path) -> bytes:
    gaussians = output.get("gs") if isinstance(output, dict) else None
    if gaussians is None or not callable(getattr(gaussians, "save_ply", None)):
        raise GenerateError("gaussians=on but SAM 3D Objects returned no Gaussian splat (output 'gs')",
                            code="pipeline_error")
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        path = Path(folder) / "gaussians.ply"
        gaussians.save_ply(str(path))
        return path.read_bytes()



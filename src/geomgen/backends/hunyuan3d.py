"""The ``hunyuan3d`` backend: Tencent's Hunyuan3D-2 (``hy3dgen``) on a GPU worker.

One image in, one GLB out: background removal unless the alpha channel already
cuts the object out, flow-matching shape diffusion with FlashVDM decoding,
floater and degenerate-face cleanup, FaceReducer to a face budget, optional
texture painting, export in geomgen's conventions. Pipelines load once, in
load(); torch and hy3dgen are imported there, never at module import.
Options and their defaults: backends/_hy3d_options.py and docs/hunyuan3d.md.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from geomgen import defaults
from geomgen.backends._hy3d_mesh import alpha_coverage, clean_mesh, export_glb_bytes, png_bytes
from geomgen.backends._hy3d_options import OPTIONS, Hy3dOptions, merge_request_options, parse_worker_options
from geomgen.backends._hy3d_weights import (
    checkpoint_fingerprint,
    find_paint_weights,
    find_weights,
    rembg_missing_message,
    rembg_model_file,
    turbo_vae_for,
)
from geomgen.backends.base import Backend, GenerationInput, GenerationOutput
from geomgen.errors import BackendUnavailable, GenerateError, GeomgenError, InputError
from geomgen.backends._model_errors import first_line as _first_line, is_out_of_memory as _is_out_of_memory

if TYPE_CHECKING:
    import PIL.Image
    import trimesh

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'geomgen[hunyuan3d]' (see .ci/install-hunyuan3d.sh for a tested set of versions)"
SHAPE_GPU_GB = 6.0  # published figure: shape generation
TEXTURED_GPU_GB = 24.5  # published figure: shape + texture in total


class Hunyuan3DBackend(Backend):
    """Hunyuan3D-2 shape (and texture) generation through hy3dgen."""

    name = "hunyuan3d"
    input_kind = "image"
    uses_gpu = True
    generate_timeout_s = defaults.GPU_GENERATE_TIMEOUT_S
    extra = "hunyuan3d"
    options_spec = OPTIONS

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self.settings: Hy3dOptions = parse_worker_options(self.options)
        self._torch: Any = None
        self._pipeline: Any = None  # Hunyuan3DDiTFlowMatchingPipeline
        self._painter: Any = None  # Hunyuan3DPaintPipeline, when texture painting is on
        self._texture_reason = "texture=off"  # why there is no painter
        self._rembg_session: Any = None
        self._rembg_reason = ""  # why background removal is unavailable
        self._segmenter: Any = None  # SAM 3, with segmenter=sam3
        self._weights_folder = ""

    # --- availability ---------------------------------------------------------

    @classmethod
    def check(cls) -> str | None:
        """Missing packages or default weights, without importing torch."""
        missing = [name for name in ("torch", "torchvision", "hy3dgen") if importlib.util.find_spec(name) is None]
        if missing:
            return f"{', '.join(missing)} not installed; {INSTALL_HINT}"
        settings = parse_worker_options({})
        weights = find_weights(settings.model, settings.subfolder)
        if not weights.found:
            return weights.describe_missing()
        turbo = turbo_vae_for(settings.model)
        if turbo is not None and not find_weights(*turbo).found:
            return find_weights(*turbo).describe_missing() + ", or start the worker with flashvdm=off"
        return None

    # --- loading ---------------------------------------------------------------

    def identity(self) -> str:
        """The base identity, the resolved settings (model, subfolder, device,
        dtype, steps, painter...) and each checkpoint's fingerprint: name, size
        and a SHA-256 of its first and last MiB (hashing gigabytes at every start
        would cost seconds; a retrained checkpoint of the same size and ends is
        not told apart)."""
        prints = [checkpoint_fingerprint(path) for path in getattr(self, "_checkpoints", [])]
        return f"{super().identity()} settings {self.settings!r} weights {prints}"

    def load(self) -> None:
        """Resolve weights, load the shape pipeline (and painter, background remover) once.

        Raises BackendUnavailable naming what is missing and how to provide it:
        packages, CUDA, weights (with every folder searched), texture models.
        """
        # hy3dgen's from_pretrained, and the diffusers/transformers loaders under its
        # paint pipeline, fall back to a hub download when a file is missing: offline
        # that hangs on retries. Weights are resolved to local files here, and the hub
        # client is told never to try (it reads this when huggingface_hub is imported).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import torch
            from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline
            from hy3dgen.shapegen.models.autoencoders import ShapeVAE
        except ImportError as exc:
            raise BackendUnavailable(f"hunyuan3d cannot import its packages ({exc}); {INSTALL_HINT}") from None
        self._torch = torch
        device = self._resolve_device(torch)
        dtype_name = self.settings.dtype
        if dtype_name == "auto":
            dtype_name = "float32" if device == "cpu" else "float16"
        self.settings = replace(self.settings, device=device, dtype=dtype_name)
        dtype = getattr(torch, dtype_name)

        weights = find_weights(self.settings.model, self.settings.subfolder)
        if not weights.found:
            raise BackendUnavailable(weights.describe_missing())
        turbo = turbo_vae_for(self.settings.model) if self.settings.flashvdm else None
        turbo_weights = find_weights(*turbo) if turbo else None
        if turbo_weights is not None and not turbo_weights.found:
            raise BackendUnavailable(turbo_weights.describe_missing() + ", or start the worker with flashvdm=off")
        self._weights_folder = str(weights.folder)
        self._checkpoints = [weights.checkpoint] + ([turbo_weights.checkpoint] if turbo_weights is not None else [])
        try:
            pipeline = Hunyuan3DDiTFlowMatchingPipeline.from_single_file(
                str(weights.checkpoint), str(weights.folder / "config.yaml"),
                device=device, dtype=dtype, use_safetensors=weights.use_safetensors,
            )
            if turbo_weights is not None:
                pipeline.vae = ShapeVAE.from_single_file(
                    str(turbo_weights.checkpoint), str(turbo_weights.folder / "config.yaml"),
                    device=device, dtype=dtype, use_safetensors=turbo_weights.use_safetensors,
                )
            if self.settings.flashvdm:
                # What hy3dgen's enable_flashvdm does after its VAE swap; "mc" needs
                # no extra package (its default "dmc" needs diso).
                pipeline.vae.enable_flashvdm_decoder(enabled=True, adaptive_kv_selection=True, topk_mode="mean", mc_algo="mc")
        except Exception as exc:  # corrupt files, config/checkpoint mismatch, OOM
            self._free_gpu_memory()
            raise BackendUnavailable(
                f"cannot load the shape model from {weights.folder} ({type(exc).__name__}: {exc}); "
                "check that config.yaml and the checkpoint belong together and are complete"
            ) from None
        self._pipeline = pipeline
        self._load_painter(device)
        if self.settings.segmenter == "sam3":
            from geomgen.backends._sam3_segmenter import load_for_backend

            self._segmenter = load_for_backend(self.name, self.settings.as_dict())
        else:
            self._load_background_remover()
        log.info("hunyuan3d loaded %s on %s (%s), flashvdm %s, texture %s",
                 weights.folder, device, dtype_name, "on" if self.settings.flashvdm else "off",
                 "on" if self._painter is not None else f"off ({self._texture_reason})")

    def _resolve_device(self, torch: Any) -> str:
        device = self.settings.device
        cuda = torch.cuda.is_available()
        if device == "auto":
            if not cuda:
                raise BackendUnavailable(
                    f"no CUDA device is visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                    f"Hunyuan3D-2 needs an NVIDIA GPU (about {SHAPE_GPU_GB:g} GB for shapes, {TEXTURED_GPU_GB:g} GB "
                    "with texture). To run it on the CPU anyway (slow), start the worker with device=cpu"
                )
            return "cuda"
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or 0)
            if not cuda or index >= torch.cuda.device_count():
                raise BackendUnavailable(
                    f"device={device} but torch sees {torch.cuda.device_count() if cuda else 0} CUDA device(s); "
                    "use --gpu to pick a GPU (the worker then sees it as cuda) or device=cpu"
                )
        return device

    def _load_painter(self, device: str) -> None:
        mode = self.settings.texture
        if mode == "off":
            self._texture_reason = "texture=off"
            return
        reason = self._painter_blocker(device)
        if reason is not None:
            if mode == "on":
                raise BackendUnavailable(f"texture=on but {reason}; start the worker with texture=off for shapes only")
            self._texture_reason = reason
            log.warning("hunyuan3d: no texture painting on this worker: %s", reason)
            return
        from hy3dgen.texgen.pipelines import Hunyuan3DPaintPipeline, Hunyuan3DTexGenConfig

        root = find_paint_weights(self.settings.paint_model).root
        config = Hunyuan3DTexGenConfig(str(root / "hunyuan3d-delight-v2-0"), str(root / "hunyuan3d-paint-v2-0"))
        config.device = device  # hy3dgen hard-codes "cuda"; honour cuda:N
        try:
            self._painter = Hunyuan3DPaintPipeline(config)
        except Exception as exc:
            self._free_gpu_memory()
            reason = f"the texture models in {root} failed to load ({type(exc).__name__}: {exc})"
            if mode == "on" or not _is_out_of_memory(exc):
                raise BackendUnavailable(f"{reason}; start the worker with texture=off for shapes only") from None
            self._texture_reason = reason
            log.warning("hunyuan3d: no texture painting on this worker: %s", reason)

    def _painter_blocker(self, device: str) -> str | None:
        """Why the paint pipeline cannot run here, or None."""
        if not device.startswith("cuda"):
            return "texture painting runs on CUDA only (its rasterizer is a CUDA extension) and device=cpu"
        if importlib.util.find_spec("custom_rasterizer") is None:
            return ("the custom_rasterizer CUDA extension is not built; build it from the Hunyuan3D-2 sources "
                    "(hy3dgen/texgen/custom_rasterizer: python setup.py install)")
        paint = find_paint_weights(self.settings.paint_model)
        return None if paint.found else paint.describe_missing()

    def _load_background_remover(self) -> None:
        model = self.settings.rembg_model
        if rembg_model_file(model) is None:
            self._rembg_reason = rembg_missing_message(model)
            log.warning("hunyuan3d: RGB images cannot be cut out on this worker: %s", self._rembg_reason)
            return
        try:
            from rembg import new_session

            self._rembg_session = new_session(model)
        except Exception as exc:  # a corrupt model file, an onnxruntime that cannot run it
            self._rembg_reason = f"the background-removal model {model} failed to load ({type(exc).__name__}: {exc})"
            log.warning("hunyuan3d: %s", self._rembg_reason)

    # --- one job -----------------------------------------------------------------

    def generate(self, job: GenerationInput) -> GenerationOutput:
        """Image bytes -> GLB bytes (+Y up, resting on y = 0, centred in x/z).

        The model's box ([-1.01, 1.01]^3) is taken as metres: objects come out up
        to about 2 m across; the request's conversion options set their real size.
        Raises InputError for an unusable image or option, GenerateError for a
        failure of the method (CUDA out of memory included; the worker stays usable).
        """
        if self._pipeline is None:
            raise GenerateError("the hunyuan3d backend was not loaded; the worker must call load() first")
        settings = merge_request_options(self.settings, job.options)
        from geomgen.backends._sam3_segmenter import refuse_unused

        refuse_unused(self.name, settings.segmenter, self.options, job.options)
        paint = self._wants_texture(settings)
        seconds: dict[str, float] = {}
        started_s = time.monotonic()
        on_cuda = settings.device.startswith("cuda")
        if on_cuda:
            self._torch.cuda.reset_peak_memory_stats(settings.device)

        from geomgen.inputs import decode_image

        image = decode_image(job.input_data, job.input_name)
        debug: dict[str, bytes] = {}
        if self._segmenter is not None:
            from geomgen.backends._sam3_segmenter import cut_out

            job.progress("segmenting with SAM 3")
            rgba, found, debug = cut_out(self._segmenter, image, job.input_name, settings.text_prompt,
                                         settings.sam3_threshold, job.debug)
            background = f"sam3:{found['mode']}"
        else:
            rgba, background = self._foreground(image, job)
        seconds["background_s"] = time.monotonic() - started_s

        job.progress(f"shape: {settings.steps} steps, octree {settings.octree_resolution}")
        step_s = time.monotonic()
        mesh = self._guarded("shape generation", lambda: self._shape(rgba, settings),
                             "lower octree_resolution or num_chunks, or use variant=mini")
        seconds["shape_s"] = time.monotonic() - step_s
        raw_faces = len(mesh.faces)

        job.progress(f"cleaning the mesh (at most {settings.max_faces} faces)")
        step_s = time.monotonic()
        mesh = clean_mesh(mesh, settings.max_faces)
        seconds["cleanup_s"] = time.monotonic() - step_s

        if paint:
            job.progress("painting the texture")
            step_s = time.monotonic()
            mesh = self._guarded("texture painting", lambda: self._painter(mesh, image=rgba),
                                 "send texture=off for a shape-only asset")
            seconds["texture_s"] = time.monotonic() - step_s

        step_s = time.monotonic()
        glb, extent = export_glb_bytes(mesh)
        seconds["export_s"] = time.monotonic() - step_s
        seconds["total_s"] = time.monotonic() - started_s
        info = {
            "model": f"{settings.model}/{settings.subfolder}".rstrip("/"),
            "weights": self._weights_folder,
            "device": settings.device,
            "dtype": settings.dtype,
            "texture": paint,
            "background": background,
            "steps": settings.steps,
            "guidance": settings.guidance,
            "octree_resolution": settings.octree_resolution,
            "seed": settings.seed,
            "raw_faces": raw_faces,
            "faces": int(len(mesh.faces)),
            "extent_m": [round(float(v), 6) for v in extent],
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
        }
        if on_cuda:
            info["gpu_peak_gb"] = round(self._torch.cuda.max_memory_allocated(settings.device) / 1024**3, 3)
        if job.debug:
            debug["hunyuan3d_input.png"] = png_bytes(rgba)
        return GenerationOutput(glb=glb, info=info, debug_files=debug)

    def _wants_texture(self, settings: Hy3dOptions) -> bool:
        if settings.texture == "on" and self._painter is None:
            raise GenerateError(
                f"texture=on but this worker paints no textures ({self._texture_reason}); send texture=off "
                "for a shape-only asset, or start a worker with texture=on where painting can run",
                code="texture_unavailable",
            )
        return settings.texture != "off" and self._painter is not None

    def _foreground(self, image: "PIL.Image.Image", job: GenerationInput) -> tuple["PIL.Image.Image", str]:
        """The RGBA image the model sees and how its background was removed."""
        coverage = alpha_coverage(image)
        if coverage == "empty":
            raise InputError(
                f"{job.input_name}: the image is fully transparent, so there is no object to reconstruct",
                code="no_object",
            )
        if coverage == "cutout":
            return image, "alpha"
        if self._rembg_session is None:
            raise GenerateError(f"{job.input_name} has no alpha channel to cut the object out, and {self._rembg_reason}",
                                code="background_removal_unavailable")
        job.progress(f"removing the background ({self.settings.rembg_model})")
        from rembg import remove

        # The call hy3dgen's BackgroundRemover makes, with the model named here
        # instead of rembg's version-dependent default.
        cut = self._guarded("background removal", lambda: remove(
            image.convert("RGB"), session=self._rembg_session, bgcolor=[255, 255, 255, 0]).convert("RGBA"),
            "send an RGBA image that is already cut out")
        if alpha_coverage(cut) == "empty":
            raise InputError(f"{job.input_name}: background removal found no object in the image", code="no_object")
        return cut, f"rembg:{self.settings.rembg_model}"

    def _shape(self, rgba: "PIL.Image.Image", settings: Hy3dOptions) -> "trimesh.Trimesh":
        torch = self._torch
        # A private CPU generator: the same seed gives the same shape on any device,
        # and torch's global random state is left alone.
        generator = torch.Generator(device="cpu").manual_seed(settings.seed)
        meshes = self._pipeline(
            image=rgba,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            octree_resolution=settings.octree_resolution,
            num_chunks=settings.num_chunks,
            generator=generator,
            output_type="trimesh",
            enable_pbar=False,
        )
        mesh = meshes[0] if meshes else None
        if mesh is None or len(mesh.faces) == 0:
            raise GenerateError(
                "the shape model found no surface for this image (its occupancy field never crosses the "
                "iso-level); try another seed, more steps or a clearer picture of the object",
                code="no_surface",
            )
        return mesh

    def _guarded(self, stage: str, step: Callable[[], Any], memory_hint: str) -> Any:
        """Run one pipeline step; turn its failure into a GenerateError and free GPU memory."""
        failure: GeomgenError
        try:
            return step()
        except GeomgenError:
            raise
        except Exception as exc:  # noqa: BLE001 - any pipeline failure is this job's
            if _is_out_of_memory(exc):
                failure = GenerateError(
                    f"{stage} ran out of GPU memory on {self.settings.device} ({_first_line(exc)}); "
                    f"the worker freed its cache and goes on; {memory_hint}",
                    code="gpu_out_of_memory",
                )
            else:
                log.exception("hunyuan3d %s failed", stage)
                failure = GenerateError(f"{stage} failed ({type(exc).__name__}: {_first_line(exc)})",
                                        code="pipeline_error")
        # Outside the except block, so the traceback and the tensors its frames
        # hold are gone before the cache is emptied.
        self._free_gpu_memory()
        raise failure

    def _free_gpu_memory(self) -> None:
        gc.collect()
        torch = self._torch
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        self._pipeline = None
        self._painter = None
        self._rembg_session = None
        if self._segmenter is not None:
            self._segmenter.close()
        self._segmenter = None
        self._free_gpu_memory()


# --- helpers -----------------------------------------------------------------------



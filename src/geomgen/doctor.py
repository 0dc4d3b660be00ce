"""``geomgen doctor``: what this machine can run, and why not.

Collects one Check per fact (Python, packages, CUDA devices and their memory,
model weights, helper models, native extensions, each backend's own check) and
renders them as a table. ``python -m geomgen.doctor [--json]`` runs it too.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import sys
from importlib import metadata
from typing import NamedTuple

GIB = 1024**3
# Report order; each topic is answered by the function _<topic> below.
PROBES = ("python", "geomgen", "torch", "hy3dgen", "hunyuan_weights", "rembg_model", "texture_extension",
          "sam3", "pydrake", "coacd", "backends")


class Check(NamedTuple):
    """One line of the report. ``ok`` False means "not available here", with the why in ``detail``."""

    name: str
    ok: bool
    detail: str


def collect() -> list[Check]:
    """Every check, in report order. Never raises: a check that crashes is reported as failed."""
    checks: list[Check] = []
    for topic in PROBES:
        try:
            checks.extend(globals()[f"_{topic}"]())
        except Exception as exc:  # noqa: BLE001 - the report must come out whatever breaks
            checks.append(Check(topic, False, f"the check itself failed ({type(exc).__name__}: {exc})"))
    return checks


def render(checks: list[Check]) -> str:
    """A plain-text table: ``ok``/``no``, name, detail; then the backends that can load."""
    width = max((len(c.name) for c in checks), default=0)
    lines = ["geomgen doctor"]
    lines += [f"  {'ok' if c.ok else 'no'}  {c.name.ljust(width)}  {c.detail}" for c in checks]
    loadable = [c.name.removeprefix("backend ") for c in checks if c.name.startswith("backend ") and c.ok]
    lines.append("")
    lines.append(f"backends that can load here: {', '.join(loadable) or 'none'}")
    return "\n".join(lines)


# --- probes ------------------------------------------------------------------------


def _python() -> list[Check]:
    return [Check("python", True, f"{platform.python_version()} ({sys.executable})")]


def _geomgen() -> list[Check]:
    from geomgen import __version__

    return [Check("geomgen", True, f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})")]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown version"


def _import(module: str) -> tuple[object | None, str]:
    """(module, "") or (None, why it cannot be imported)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None, "not installed"
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # noqa: BLE001 - a broken install raises anything
        return None, f"installed but fails to import ({type(exc).__name__}: {exc})"


def _torch() -> list[Check]:
    torch, why = _import("torch")
    if torch is None:
        return [Check("torch", False, f"{why}; needed by hunyuan3d and sam3d: pip install 'geomgen[hunyuan3d]'")]
    checks = [Check("torch", True, f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none (CPU build)'}")]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        checks.append(Check("cuda", False, f"no CUDA device visible{where}; GPU backends need one"))
        return checks
    count = torch.cuda.device_count()
    checks.append(Check("cuda", True, f"{count} device(s), driver runtime {torch.version.cuda}"))
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        try:
            free_b, total_b = torch.cuda.mem_get_info(index)
            memory = f"{free_b / GIB:.1f} GiB free of {total_b / GIB:.1f} GiB"
        except Exception as exc:  # noqa: BLE001 - a busy or broken device still gets its line
            memory = f"{props.total_memory / GIB:.1f} GiB (free unknown: {exc})"
        checks.append(Check(f"cuda:{index}", True, f"{props.name}, compute {props.major}.{props.minor}, {memory}"))
    return checks


def _hy3dgen() -> list[Check]:
    module, why = _import("hy3dgen.shapegen")
    if module is None:
        return [Check("hy3dgen", False, f"{why}; pip install 'geomgen[hunyuan3d]' (see docs/hunyuan3d.md)")]
    return [Check("hy3dgen", True, f"{_version('hy3dgen')}, shape pipeline importable")]


def _hunyuan_weights() -> list[Check]:
    from geomgen.backends._hy3d_options import DEFAULT_PAINT_MODEL, VARIANTS
    from geomgen.backends._hy3d_weights import find_paint_weights, find_weights, models_root, turbo_vae_for

    checks = []
    for variant, (model, subfolder) in VARIANTS.items():
        found = find_weights(model, subfolder)
        turbo = turbo_vae_for(model)
        parts = [f"{found.checkpoint}" if found.found else found.describe_missing()]
        turbo_ok = True
        if turbo is not None:
            vae = find_weights(*turbo)
            turbo_ok = vae.found
            if vae.found:
                parts.append(f"FlashVDM VAE {vae.checkpoint}")
            elif found.found:
                parts.append(f"FlashVDM VAE: {vae.describe_missing()}")
            else:
                parts.append(f"its FlashVDM VAE {turbo[1]} is missing too (fetch it the same way)")
        checks.append(Check(f"weights {variant}", found.found and turbo_ok, "; ".join(parts)))
    paint = find_paint_weights(DEFAULT_PAINT_MODEL)
    checks.append(Check("weights texture", paint.found, str(paint.root) if paint.found else paint.describe_missing()))
    checks.append(Check("HY3DGEN_MODELS", True, f"{models_root()}" + ("" if os.environ.get("HY3DGEN_MODELS") else " (default)")))
    return checks


def _rembg_model() -> list[Check]:
    from geomgen.backends._hy3d_options import DEFAULT_REMBG_MODEL
    from geomgen.backends._hy3d_weights import rembg_missing_message, rembg_model_file

    path = rembg_model_file(DEFAULT_REMBG_MODEL)
    if path is None:
        return [Check("rembg model", False, rembg_missing_message(DEFAULT_REMBG_MODEL))]
    installed = importlib.util.find_spec("rembg") is not None
    detail = f"{path}" + ("" if installed else " (but the rembg package is not installed)")
    return [Check("rembg model", installed, detail)]


def _texture_extension() -> list[Check]:
    module, why = _import("custom_rasterizer")
    if module is None:
        return [Check("texture extension", False,
                      f"custom_rasterizer {why}: build it from the Hunyuan3D-2 sources "
                      "(hy3dgen/texgen/custom_rasterizer, python setup.py install) on a CUDA machine; "
                      "without it hunyuan3d makes shapes only")]
    return [Check("texture extension", True, f"custom_rasterizer {_version('custom_rasterizer')}")]


def _sam3() -> list[Check]:
    """SAM 3 (the modules the segmenter uses, not just ``import sam3``: sam3
    0.0.1 is an empty placeholder), SAM 3D Objects, their checkpoints and
    whether a visible GPU has SAM 3D Objects' published 32 GB."""
    from geomgen.backends import _sam3_segmenter as seg
    from geomgen.backends import _sam3d_pipeline as rec
    from geomgen.backends.sam3d import CHECKPOINT_ENV, PUBLISHED_GPU_GB

    checks = []
    missing = seg.missing_modules()
    if not missing:
        module, why = _import("sam3.model_builder")
        if module is None:
            missing = [f"sam3.model_builder ({why})"]
    checks.append(Check("sam3", not missing, f"sam3 {_version('sam3')}" if not missing else
                        f"{', '.join(missing)} cannot be imported; {seg.INSTALL_HINT}"))
    absent = [name for name in rec.SAM3D_OBJECTS_MODULES if not seg.module_exists(name)]
    checks.append(Check("SAM 3D Objects", not absent, "sam3d_objects " + _version("sam3d_objects") if not absent
                        else f"{', '.join(absent)} not installed; {rec.SAM3D_OBJECTS_INSTALL}"))
    for option, variable in CHECKPOINT_ENV.items():
        path = os.environ.get(variable)
        if not path:
            checks.append(Check(option, False, f"${variable} not set; the sam3d worker then needs "
                                               f"--backend-option {option}=PATH"))
        else:
            found = os.path.isfile(os.path.expanduser(path))
            checks.append(Check(option, found, path if found else f"{path} does not exist"))
    torch, _ = _import("torch")
    if torch is not None and torch.cuda.is_available():
        sizes = [torch.cuda.get_device_properties(i).total_memory / GIB for i in range(torch.cuda.device_count())]
        big = max(sizes)
        checks.append(Check("sam3d GPU memory", big >= PUBLISHED_GPU_GB,
                            f"largest visible GPU {big:.1f} GiB; SAM 3D Objects needs at least {PUBLISHED_GPU_GB:g} GB"))
    else:
        checks.append(Check("sam3d GPU memory", False, "no CUDA device visible; SAM 3D Objects needs an NVIDIA GPU "
                                                       f"with at least {PUBLISHED_GPU_GB:g} GB"))
    return checks


def _pydrake() -> list[Check]:
    module, why = _import("pydrake.multibody.parsing")
    return [Check("pydrake", module is not None,
                  f"drake {_version('drake')}" if module is not None else f"{why}; SDF validation is skipped without it: pip install 'geomgen[drake]'")]


def _coacd() -> list[Check]:
    module, why = _import("coacd")
    return [Check("coacd", module is not None, _version("coacd") if module is not None else f"{why}; collision falls back to V-HACD or one hull")]


def _backends() -> list[Check]:
    from geomgen.backends import backend_names, load_backend_class
    from geomgen.errors import GeomgenError

    torch, torch_problem = _import("torch")
    cuda = bool(torch is not None and torch.cuda.is_available())
    checks = []
    for name in backend_names():
        try:
            cls = load_backend_class(name)
            reason = cls.check()
        except GeomgenError as exc:
            checks.append(Check(f"backend {name}", False, exc.message))
            continue
        except Exception as exc:  # noqa: BLE001 - one broken plug-in must not hide the others
            checks.append(Check(f"backend {name}", False, f"its check() failed ({type(exc).__name__}: {exc})"))
            continue
        if reason is not None:
            checks.append(Check(f"backend {name}", False, reason))
        elif cls.uses_gpu and torch is None:
            checks.append(Check(f"backend {name}", False, f"torch {torch_problem}"))
        elif cls.uses_gpu and not cuda:
            checks.append(Check(f"backend {name}", False, "installed and ready, but no CUDA device is visible here"))
        else:
            kind = "GPU" if cls.uses_gpu else "CPU"
            checks.append(Check(f"backend {name}", True, f"can load ({kind}, {cls.input_kind} input)"))
    return checks


def main(argv: list[str] | None = None) -> int:
    """``python -m geomgen.doctor [--json]``: print the report; exit 0."""
    args = sys.argv[1:] if argv is None else argv
    checks = collect()
    if "--json" in args:
        print(json.dumps([c._asdict() for c in checks], indent=2))
    else:
        print(render(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``sam3d`` backend: SAM 3 text-prompted segmentation plus SAM 3D Objects
reconstruction on a GPU. Registered by name only in this version: the
integration is not written yet, so the worker refuses to start with a reason.
"""

from __future__ import annotations

import importlib.util

from geomgen import defaults
from geomgen.backends.base import Backend, GenerationInput, GenerationOutput
from geomgen.errors import BackendUnavailable, GenerateError
from geomgen.optionspec import OptionSpec

# Python packages the integration needs: torch, SAM 3 (``sam3``) and SAM 3D
# Objects (``sam3d_objects``), whose checkpoints are downloaded separately.
REQUIRED_MODULES = ("torch", "sam3", "sam3d_objects")
INSTALL_HINT = "install geomgen[sam3d] and the SAM 3D Objects checkpoints"
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"

# The old server's sam3d_config keys (a request's sam3d_config arrives as these
# options), plus seed, texture and device. Checkpoints and device pick what is
# loaded, so they are fixed when the worker starts.
OPTIONS = (
    OptionSpec("sam3_checkpoint", "text", None, per_request=False, help="SAM 3 checkpoint file"),
    OptionSpec("sam3d_checkpoint", "text", None, per_request=False, help="SAM 3D Objects pipeline.yaml"),
    OptionSpec("mode", "choice", "foreground", choices=("foreground", "text"),
               help="foreground: the object on a plain background; text: the object the text prompt names"),
    OptionSpec("text_prompt", "text", None, help="what to segment in mode text"),
    OptionSpec("object_description", "text", None, help="the old name of text_prompt"),
    OptionSpec("threshold", "number", 0.5, 0.0, 1.0, help="SAM 3 confidence threshold"),
    OptionSpec("seed", "integer", 42, 0, 2**63 - 1),
    OptionSpec("texture", "switch", True, help="bake a UV texture"),
    OptionSpec("device", "text", "auto", pattern=DEVICE_PATTERN, per_request=False),
)


def _missing_modules() -> list[str]:
    # find_spec looks the package up without importing it (no torch import here).
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


class Sam3dBackend(Backend):
    """SAM 3D Objects on a GPU; not implemented in this version (see ``check``)."""

    name = "sam3d"
    input_kind = "image"
    uses_gpu = True
    generate_timeout_s = defaults.GPU_GENERATE_TIMEOUT_S
    extra = "sam3d"
    options_spec = OPTIONS

    @classmethod
    def check(cls) -> str | None:
        """Why the backend cannot load here: its packages are missing, or, when
        they are present, that this version of geomgen has no sam3d integration."""
        missing = _missing_modules()
        if missing:
            return f"sam3d needs {', '.join(missing)}, which cannot be imported here; {INSTALL_HINT}"
        return (
            "the sam3d backend is not implemented in this version of geomgen; "
            "use hunyuan3d on a GPU or silhouette on a CPU"
        )

    def load(self) -> None:
        """Always raises BackendUnavailable with the reason from ``check``."""
        raise BackendUnavailable(self.check() or INSTALL_HINT, code="backend_unavailable")

    def generate(self, job: GenerationInput) -> GenerationOutput:
        raise GenerateError(
            "the sam3d backend is not loaded (its worker cannot start: " + (self.check() or INSTALL_HINT) + ")",
            code="backend_not_loaded",
        )

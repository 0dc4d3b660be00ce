"""The ``sam3d`` backend: SAM 3 text-prompted segmentation plus SAM 3D Objects
reconstruction on a GPU. Registered by name only in this version: the
integration is not written yet, so the worker refuses to start with a reason.
"""

from __future__ import annotations

import importlib.util

from geomgen.backends.base import Backend, GenerationInput, GenerationOutput
from geomgen.errors import BackendUnavailable, GenerateError

# Python packages the integration needs: torch, SAM 3 (``sam3``) and SAM 3D
# Objects (``sam3d_objects``), whose checkpoints are downloaded separately.
REQUIRED_MODULES = ("torch", "sam3", "sam3d_objects")
INSTALL_HINT = "install geomgen[sam3d] and the SAM 3D Objects checkpoints"


def _missing_modules() -> list[str]:
    # find_spec looks the package up without importing it (no torch import here).
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


class Sam3dBackend(Backend):
    """SAM 3D Objects on a GPU; not implemented in this version (see ``check``)."""

    name = "sam3d"
    input_kind = "image"
    uses_gpu = True
    extra = "sam3d"

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

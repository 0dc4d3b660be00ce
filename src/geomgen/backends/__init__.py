"""Backend registry: built-in backends by name, plus third-party plug-ins.

Third parties register a Backend subclass under the ``geomgen.backends``
entry-point group, or, without packaging, through the ``GEOMGEN_BACKENDS``
environment variable: ``name=package.module:ClassName`` pairs separated by
commas. Built-ins are imported lazily so that naming a GPU backend never
imports torch.
"""

from __future__ import annotations

import importlib
import os
from importlib import metadata

from geomgen.backends.base import Backend, GenerationInput, GenerationOutput
from geomgen.errors import BackendUnavailable, UnknownBackend

__all__ = [
    "Backend",
    "GenerationInput",
    "GenerationOutput",
    "BUILTIN",
    "GPU_BACKENDS",
    "CPU_BACKENDS",
    "backend_names",
    "load_backend_class",
    "find_backend_class",
]

# name -> "module:attribute"
BUILTIN: dict[str, str] = {
    "hunyuan3d": "geomgen.backends.hunyuan3d:Hunyuan3DBackend",
    "sam3d": "geomgen.backends.sam3d:Sam3dBackend",
    "silhouette": "geomgen.backends.silhouette:SilhouetteBackend",
    "mesh": "geomgen.backends.mesh:MeshBackend",
}
GPU_BACKENDS = ("hunyuan3d", "sam3d")  # tried in this order by backend=auto
CPU_BACKENDS = ("silhouette", "mesh")
ENTRY_POINT_GROUP = "geomgen.backends"
ENV_VAR = "GEOMGEN_BACKENDS"


def _plugin_specs() -> dict[str, str]:
    specs: dict[str, str] = {}
    try:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            specs[ep.name] = ep.value
    except Exception:  # a broken distribution must not break the registry
        pass
    for item in os.environ.get(ENV_VAR, "").split(","):
        item = item.strip()
        if item:
            name, sep, spec = item.partition("=")
            if sep and ":" in spec:
                specs[name.strip()] = spec.strip()
    return specs


def _specs() -> dict[str, str]:
    return {**BUILTIN, **_plugin_specs()}


def backend_names() -> list[str]:
    """All registered backend names: built-ins first, then plug-ins."""
    return list(_specs())


def load_backend_class(name: str) -> type[Backend]:
    """The Backend subclass registered as ``name``.

    Raises UnknownBackend for a name nobody registered and BackendUnavailable
    when its module cannot be imported here.
    """
    specs = _specs()
    spec = specs.get(name)
    if spec is None:
        raise UnknownBackend(f"unknown backend {name!r}; known backends: {', '.join(specs)}")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} cannot be imported ({exc})") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendUnavailable(f"backend {name!r}: {spec} is not a geomgen Backend subclass")
    return cls


def find_backend_class(name: str) -> type[Backend] | None:
    """The Backend subclass registered here as ``name``, or None when it is not
    registered or not importable here (a plug-in installed only where its
    workers run): the client and the broker then leave its checks to them."""
    try:
        return load_backend_class(name)
    except (UnknownBackend, BackendUnavailable):
        return None

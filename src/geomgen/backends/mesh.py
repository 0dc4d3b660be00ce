"""The ``mesh`` backend: an existing mesh file imported as is and brought to
geomgen's GLB conventions (+Y up, metres, resting on y = 0, centred in x/z).
"""

from __future__ import annotations

import math
import time
from typing import Any

from geomgen.backends.base import Backend, GenerationInput, GenerationOutput, scoped_options, unknown_options_error
from geomgen.errors import InputError

# Length units a file may be written in -> metres per unit.
UNIT_SCALE_M = {"m": 1.0, "cm": 0.01, "mm": 0.001, "in": 0.0254}
OPTION_NAMES = ("up_axis", "scale", "unit")


def parse_mesh_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate mesh-backend options into ``{"up_axis": str, "scale": float | None}``.

    ``options`` come as strings from ``--backend-option`` or typed from a
    request: ``up_axis`` y|z (default y), ``scale`` (a number > 0), ``unit``
    (m, cm, mm, in: the file's unit, a scale to metres). ``unit`` and
    ``scale`` multiply. Keys may be scoped as ``mesh.KEY`` (see
    backends.base.scoped_options). Raises InputError ``bad_option``.
    """
    options = scoped_options(options, "mesh")
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise unknown_options_error("mesh", unknown, OPTION_NAMES)
    up_axis = str(options.get("up_axis", "y")).strip().lower()
    if up_axis not in ("y", "z"):
        raise InputError(f"up_axis must be 'y' or 'z', got {options['up_axis']!r}", code="bad_option")
    scale = None
    if options.get("scale") is not None:
        scale = _positive_number("scale", options["scale"])
    unit = options.get("unit")
    if unit is not None:
        key = str(unit).strip().lower()
        if key not in UNIT_SCALE_M:
            raise InputError(
                f"unit must be one of {', '.join(UNIT_SCALE_M)}, got {unit!r}", code="bad_option"
            )
        scale = UNIT_SCALE_M[key] * (scale if scale is not None else 1.0)
    return {"up_axis": up_axis, "scale": scale}


def _positive_number(name: str, value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {value!r}", code="bad_option")
    return number


class MeshBackend(Backend):
    """Mesh file (GLB, glTF with embedded data, OBJ, PLY, STL) in, normalised GLB out."""

    name = "mesh"
    input_kind = "mesh"
    uses_gpu = False

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        parse_mesh_options(self.options)  # a bad worker-wide option fails at start

    def generate(self, job: GenerationInput) -> GenerationOutput:
        from geomgen.geometry.meshio import export_glb, load_mesh, scene_bounds, to_output_conventions

        opts = parse_mesh_options({**self.options, **(job.options or {})})
        started = time.perf_counter()
        scene = load_mesh(job.input_data, job.input_name)
        loaded_s = time.perf_counter() - started
        job.progress("mesh loaded")
        scene = to_output_conventions(scene, up_axis=opts["up_axis"], scale=opts["scale"])
        glb = export_glb(scene)
        bounds = scene_bounds(scene)
        extents_m = (bounds[1] - bounds[0]).tolist()
        info = {
            "faces": int(sum(len(g.faces) for g in scene.geometry.values())),
            "vertices": int(sum(len(g.vertices) for g in scene.geometry.values())),
            "parts": len(scene.geometry),
            "extents_m": [round(v, 6) for v in extents_m],
            "up_axis": opts["up_axis"],
            "scale": opts["scale"] if opts["scale"] is not None else 1.0,
            "load_s": round(loaded_s, 4),
            "total_s": round(time.perf_counter() - started, 4),
        }
        warnings = scene.metadata.get("warnings") or []
        if warnings:
            info["warnings"] = list(warnings)
        return GenerationOutput(glb=glb, info=info)

"""The ``mesh`` backend: an existing mesh file imported as is and brought to
geomgen's GLB conventions (+Y up, metres, resting on y = 0, centred in x/z).
"""

from __future__ import annotations

import time
from typing import Any

from geomgen.backends.base import Backend, GenerationInput, GenerationOutput
from geomgen.optionspec import OptionSpec

# Length units a file may be written in -> metres per unit.
UNIT_SCALE_M = {"m": 1.0, "cm": 0.01, "mm": 0.001, "in": 0.0254}
OPTIONS = (
    OptionSpec("up_axis", "choice", "y", choices=("y", "z"), help="the file's up axis"),
    OptionSpec("scale", "number", None, 1e-9, 1e9, help="uniform scale to metres"),
    OptionSpec("unit", "choice", None, choices=tuple(UNIT_SCALE_M), help="the file's length unit"),
)


def mesh_settings(opts: dict[str, Any]) -> tuple[str, float | None]:
    """(up axis, scale to metres or None) from resolved options: ``unit`` and ``scale`` multiply."""
    scale = opts["scale"]
    if opts["unit"] is not None:
        scale = UNIT_SCALE_M[opts["unit"]] * (scale if scale is not None else 1.0)
    return opts["up_axis"], scale


class MeshBackend(Backend):
    """Mesh file (GLB, glTF with embedded data, OBJ, PLY, STL) in, normalised GLB out."""

    name = "mesh"
    input_kind = "mesh"
    uses_gpu = False
    options_spec = OPTIONS

    def generate(self, job: GenerationInput) -> GenerationOutput:
        from geomgen.geometry.meshio import export_glb, load_mesh, scene_bounds, to_output_conventions

        up_axis, scale = mesh_settings(self.resolve_options(self.options, job.options))
        started = time.perf_counter()
        scene = load_mesh(job.input_data, job.input_name)
        loaded_s = time.perf_counter() - started
        job.progress("mesh loaded")
        scene = to_output_conventions(scene, up_axis=up_axis, scale=scale)
        glb = export_glb(scene)
        bounds = scene_bounds(scene)
        extents_m = (bounds[1] - bounds[0]).tolist()
        info = {
            "faces": int(sum(len(g.faces) for g in scene.geometry.values())),
            "vertices": int(sum(len(g.vertices) for g in scene.geometry.values())),
            "parts": len(scene.geometry),
            "extents_m": [round(v, 6) for v in extents_m],
            "up_axis": up_axis,
            "scale": scale if scale is not None else 1.0,
            "load_s": round(loaded_s, 4),
            "total_s": round(time.perf_counter() - started, 4),
        }
        warnings = scene.metadata.get("warnings") or []
        if warnings:
            info["warnings"] = list(warnings)
        return GenerationOutput(glb=glb, info=info)

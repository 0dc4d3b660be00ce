"""CoACD settings tried against geomgen's defaults on one real mesh: CPU
seconds of the conversion (this process and CoACD's threads, which a shared
machine's load disturbs less than wall seconds), pieces and collision IoU.

    OMP_NUM_THREADS=1 python benchmarks/convert_variants.py printer \\
        '[["base", {}, null], ["n6", {"mcts_nodes": 6}, null], ["f2500", {}, 2500]]'

Each variant: [label, collision_params (CoACD's names), simplify_faces or null].
One JSON line per variant; Drake validation and the preview are off (the
same for every variant), so the seconds are the conversion's own.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_convert import MESHES, mesh_glb  # noqa: E402
from geomgen.contract import ConvertOptions  # noqa: E402


def _cpu_s() -> float:
    """CPU seconds of this process and its ended children (decomposition workers)."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in MESHES:
        sys.exit(__doc__)
    import pydrake.multibody.plant  # noqa: F401 - imported before the clock

    from geomgen.geometry.convert import convert_mesh
    from geomgen.geometry.drake_check import PRECISE_IOU_CELLS, collision_iou

    name, variants = sys.argv[1], json.loads(sys.argv[2])
    glb = mesh_glb(name)
    with tempfile.TemporaryDirectory(prefix="convert_variants_") as tmp:
        for label, params, faces in variants:
            options = ConvertOptions(collision_params=params, simplify_faces=faces, preview=False, validate=False)
            cpu_start_s, start = _cpu_s(), time.perf_counter()
            report = convert_mesh(glb, f"{name}.glb", Path(tmp) / label, name, options)
            seconds, cpu_s = time.perf_counter() - start, _cpu_s() - cpu_start_s
            iou = collision_iou(report.sdf_path, cells=PRECISE_IOU_CELLS)
            print(json.dumps({"mesh": name, "label": label, "params": params, "simplify_faces": faces,
                              "s": round(seconds, 1), "cpu_s": round(cpu_s, 1), "pieces": report.pieces,
                              "iou": round(iou, 4), "load_1min": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()

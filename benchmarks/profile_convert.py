"""Where a conversion's seconds go, stage by stage, on the five real meshes:
loading, repair (the closed solid), simplification, CoACD, mass properties,
the visual glTF rewrite, the SDF and other formats, the Drake check and the
preview, read from the manifest's ``stage_s``.

    python benchmarks/profile_convert.py [--meshes coffee_mug ...] [--repeat 1] [--json PATH]

Options are geomgen's defaults unless ``--collision-params JSON`` /
``--simplify-faces N`` are given (to profile a candidate setting).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_convert import MESHES, mesh_glb  # noqa: E402
from benchmarks.machine import machine  # noqa: E402
from geomgen.contract import ConvertOptions  # noqa: E402

STAGES = ("load", "repair", "simplify", "decompose", "mass", "visual", "sdf", "formats", "drake_check",
          "mujoco_check", "preview")


def profile(meshes: list[str], options: ConvertOptions, repeat: int) -> dict:
    import pydrake.multibody.plant  # noqa: F401 - imported before the clock, as in a warm conversion child

    from geomgen.geometry.convert import convert_mesh

    rows = []
    with tempfile.TemporaryDirectory(prefix="profile_convert_") as tmp:
        for name in meshes:
            glb = mesh_glb(name)
            for run in range(repeat):
                start = time.perf_counter()
                report = convert_mesh(glb, f"{name}.glb", Path(tmp), name, options)
                seconds = time.perf_counter() - start
                row = {"mesh": name, "run": run, "seconds": round(seconds, 2), "pieces": report.pieces,
                       "stage_s": report.stage_s, "load_1min": round(os.getloadavg()[0], 2)}
                rows.append(row)
                print(f"{name:13s} {seconds:6.1f} s  " + "  ".join(
                    f"{stage} {report.stage_s.get(stage, 0):.2f}" for stage in STAGES if stage in report.stage_s)
                    + f"  (load {row['load_1min']})", flush=True)
    total = sum(r["seconds"] for r in rows)
    shares = {stage: sum(r["stage_s"].get(stage, 0.0) for r in rows) for stage in STAGES}
    shares["other"] = total - sum(shares.values())
    return {"rows": rows, "total_s": round(total, 2),
            "stage_total_s": {k: round(v, 2) for k, v in shares.items()},
            "stage_share": {k: round(v / total, 3) for k, v in shares.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meshes", nargs="+", default=list(MESHES), choices=MESHES)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--collision-params", type=json.loads, default=None, help="CoACD parameters, as JSON")
    parser.add_argument("--simplify-faces", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "convert_profile.json")
    args = parser.parse_args()
    options = ConvertOptions(collision_params=args.collision_params or {}, simplify_faces=args.simplify_faces)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "load_average_at_start": os.getloadavg(), **profile(args.meshes, options, args.repeat)}
    print("\n| stage | seconds | share |\n|---|---|---|")
    for stage, seconds in result["stage_total_s"].items():
        print(f"| {stage} | {seconds:.1f} | {result['stage_share'][stage]:.1%} |")
    print(f"| **total** | **{result['total_s']:.1f}** | |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

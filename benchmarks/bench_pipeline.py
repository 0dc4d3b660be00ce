"""Pipeline overlap: does SDF conversion hide behind GPU time?

A synthetic backend takes T seconds per job (benchmarks/synthetic.py), two GPU
workers run it, one SDF worker with two conversion processes converts each GLB
for real (repair, collision, mass properties, SDF, Drake check). The ideal
makespan for N jobs is N*T/2 (the GPUs never wait) plus one conversion (the
last GLB's). Reported: makespan / ideal; the goal is <= 1.10.

    python benchmarks/bench_pipeline.py [--jobs 40] [--t 0.5] [--collision hull]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_model  # noqa: E402
from geomgen import GeometryClient, GeometryRequest  # noqa: E402
from geomgen.endpoints import Endpoints  # noqa: E402
from geomgen.geometry.convert import convert_mesh  # noqa: E402
from geomgen.contract import ConvertOptions  # noqa: E402
from tests.conftest import free_base_port  # noqa: E402

SAMPLE_MESH = next((REPO / "src" / "geomgen" / "samples").glob("*.glb"))


def one_conversion_s(glb: bytes, collision: str, tmp: Path, repeats: int = 3) -> float:
    """Median seconds of one conversion in this process (warm imports)."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        convert_mesh(glb, SAMPLE_MESH.name, tmp / f"single{i}", "single", ConvertOptions(collision=collision))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(jobs: int, t_s: float, collision: str, tmp: Path) -> dict:
    endpoints = Endpoints.from_base("127.0.0.1", free_base_port())
    env = {**os.environ, "GEOMGEN_BACKENDS": "timed=benchmarks.synthetic:TimedBackend", "PYTHONPATH": str(REPO)}
    broker = f"127.0.0.1:{endpoints.client_port}"
    geomgen = [sys.executable, "-m", "geomgen"]
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([*geomgen, "broker", "--port", str(endpoints.client_port), "--no-cache"], **quiet)]
    for _ in range(2):
        procs.append(subprocess.Popen([*geomgen, "gpu-worker", "--backend", "timed", "--broker", broker,
                                       "--backend-option", f"delay_s={t_s}"], **quiet))
    procs.append(subprocess.Popen([*geomgen, "sdf-worker", "--procs", "2", "--broker", broker], **quiet))
    try:
        with GeometryClient(address=endpoints.client) as client:
            deadline = time.monotonic() + 60
            while True:
                stats = client.health()
                if stats["backends"].get("timed", {}).get("alive", 0) >= 2 and stats.get("sdf_free", 0) >= 2:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stack not ready: {stats}")
                time.sleep(0.2)
            requests = [
                GeometryRequest(image_path=str(SAMPLE_MESH), output_dir=str(tmp / "out"), output_filename=f"job{i}",
                                backend="timed", collision=collision)
                for i in range(jobs)
            ]
            start = time.perf_counter()
            results = [r for _, r in client.generate(requests)]
            makespan = time.perf_counter() - start
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=15)
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed; first: {failed[0].error}")
    convert_s = [r.timings.get("convert_s", 0.0) for r in results]
    return {"makespan_s": makespan, "convert_s_median": statistics.median(convert_s), "convert_s_max": max(convert_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--t", type=float, default=0.5, help="synthetic GPU seconds per job")
    parser.add_argument("--collision", default="hull", choices=("hull", "vhacd", "coacd"))
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "pipeline.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        single_s = one_conversion_s(SAMPLE_MESH.read_bytes(), args.collision, tmp)
        row = run(args.jobs, args.t, args.collision, tmp)
    ideal = args.jobs * args.t / 2 + single_s
    row.update(
        jobs=args.jobs, t_s=args.t, collision=args.collision, one_conversion_s=single_s, ideal_s=ideal,
        ratio=row["makespan_s"] / ideal, cpus=os.cpu_count(), processor=cpu_model(), input=SAMPLE_MESH.name,
    )
    print(json.dumps(row, indent=2))
    print(f"makespan {row['makespan_s']:.2f} s / ideal {ideal:.2f} s = {row['ratio']:.3f} (goal <= 1.10)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()

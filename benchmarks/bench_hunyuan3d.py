"""Hunyuan3D-2 backend fixed costs, on the tiny random-weight model (CPU).

Two parts:
1. In process: import of torch + hy3dgen, load() of the tiny model, then
   seconds per generate() for a few octree resolutions (volume decoding and
   marching cubes grow with its cube; everything else is the pipeline's fixed
   cost).
2. Through the stack: a broker, one real ``geomgen gpu-worker --backend
   hunyuan3d --backend-option device=cpu`` process and one SDF worker; the
   worker's start-up to READY, then seconds per job for JOBS sequential
   requests (GLB from the worker, SDF with one convex hull).

    python benchmarks/bench_hunyuan3d.py [--jobs 5] [--repeats 5] [--threads N] [--json]

``--threads`` sets torch's intra-op threads here and in the worker (through
OMP_NUM_THREADS); on a small machine shared with other work one thread gives
steadier figures than torch's default of one per core.

On a GPU machine with the published weights under $HY3DGEN_MODELS, ``--real``
instead times the real model on the package's RGBA sample images: load seconds,
seconds per asset and peak GPU memory, shape only and with texture:

    python benchmarks/bench_hunyuan3d.py --real [--option variant=mini ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_base_port  # noqa: E402
from tests.tiny_hunyuan import TINY_OCTREE_RESOLUTION, build_tiny_model, object_png  # noqa: E402

OCTREES = (TINY_OCTREE_RESOLUTION, 64)  # 128 and up cost minutes per call on a 2-core CPU


def _summary(values: list[float]) -> dict:
    return {"median_s": round(statistics.median(values), 4), "min_s": round(min(values), 4),
            "max_s": round(max(values), 4), "n": len(values)}


def in_process(root: Path, repeats: int, work: Path) -> dict:
    """Import, load and generate timings inside this process."""
    os.environ["HY3DGEN_MODELS"] = str(root)
    # In a fresh interpreter: this one imported both to build the tiny model.
    import_s = float(subprocess.run(
        [sys.executable, "-c", "import time; t = time.perf_counter(); import torch, hy3dgen.shapegen; "
         "print(time.perf_counter() - t)"], capture_output=True, text=True, check=True).stdout.split()[-1])
    from geomgen.backends.base import GenerationInput
    from geomgen.backends.hunyuan3d import Hunyuan3DBackend

    import torch

    start = time.perf_counter()
    backend = Hunyuan3DBackend({"model": "tiny", "subfolder": "tiny-dit", "device": "cpu", "texture": "off"})
    backend.load()
    load_s = time.perf_counter() - start
    image = object_png(alpha=True, size_px=256)
    per_octree = {}
    for octree in OCTREES:
        times, cpu_times, steps = [], [], {}
        for i in range(repeats + 1):  # the first call warms caches and is dropped
            job = GenerationInput("object.png", image, work, options={"octree_resolution": octree})
            start, start_cpu = time.perf_counter(), time.process_time()
            output = backend.generate(job)
            if i:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - start_cpu)
                for key, value in output.info["seconds"].items():
                    steps.setdefault(key, []).append(value)
        per_octree[str(octree)] = {**_summary(times), "cpu_median_s": round(statistics.median(cpu_times), 4),
                                   "faces": output.info["faces"],
                                   "raw_faces": output.info["raw_faces"],
                                   "step_median_s": {k: round(statistics.median(v), 4) for k, v in steps.items()}}
    backend.close()
    return {"import_s": round(import_s, 2), "load_s": round(load_s, 3), "torch_threads": torch.get_num_threads(),
            "generate": per_octree}


def through_stack(root: Path, jobs: int, work: Path) -> dict:
    """Worker start-up to READY and seconds per job through broker, GPU worker and SDF worker."""
    from geomgen import GeometryClient, GeometryRequest
    from geomgen.endpoints import Endpoints

    endpoints = Endpoints.from_base("127.0.0.1", free_base_port())
    broker = f"127.0.0.1:{endpoints.client_port}"
    env = {**os.environ, "HY3DGEN_MODELS": str(root), "PYTHONPATH": str(REPO)}
    geomgen = [sys.executable, "-m", "geomgen"]
    logs = open(work / "stack.log", "wb")
    quiet = {"env": env, "stdout": logs, "stderr": subprocess.STDOUT}
    procs = [subprocess.Popen([*geomgen, "broker", "--host", "127.0.0.1", "--port", str(endpoints.client_port), "--no-cache"], **quiet),
             subprocess.Popen([*geomgen, "sdf-worker", "--procs", "1", "--broker", broker], **quiet)]
    image = work / "object.png"
    image.write_bytes(object_png(alpha=True, size_px=256))
    try:
        with GeometryClient(address=endpoints.client) as client:
            _wait(lambda: client.health().get("sdf_slots", 0) >= 1, "the SDF worker")
            started = time.perf_counter()
            procs.append(subprocess.Popen([*geomgen, "gpu-worker", "--backend", "hunyuan3d", "--broker", broker,
                                           "--backend-option", "model=tiny", "--backend-option", "subfolder=tiny-dit",
                                           "--backend-option", "device=cpu",
                                           "--backend-option", f"octree_resolution={TINY_OCTREE_RESOLUTION}"], **quiet))
            _wait(lambda: client.health()["backends"].get("hunyuan3d", {}).get("alive", 0) >= 1,
                  "the hunyuan3d worker", procs[-1])
            ready_s = time.perf_counter() - started
            per_job, generate_s, convert_s = [], [], []
            for i in range(jobs):
                request = GeometryRequest(image_path=str(image), output_dir=str(work / "out"),
                                          output_filename=f"job{i}", backend="hunyuan3d", collision="hull")
                start = time.perf_counter()
                [(_, result)] = list(client.generate([request]))
                per_job.append(time.perf_counter() - start)
                if not result.ok:
                    raise RuntimeError(f"job {i} failed: {result.stage}/{result.error_code}: {result.error}")
                generate_s.append(result.timings.get("generate_s", float("nan")))
                convert_s.append(result.timings.get("convert_s", float("nan")))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        logs.close()
    return {"worker_ready_s": round(ready_s, 2), "per_job": _summary(per_job),
            "generate_s_median": round(statistics.median(generate_s), 4),
            "convert_s_median": round(statistics.median(convert_s), 4)}


def real_model(options: dict[str, str], repeats: int, work: Path) -> dict:
    """The published model on CUDA: per texture mode, load seconds, seconds per
    asset and the peak GPU memory the backend reports (``gpu_peak_gb``)."""
    from geomgen.backends.base import GenerationInput
    from geomgen.backends.hunyuan3d import Hunyuan3DBackend

    from PIL import Image

    # The RGBA samples (mug, vase): no background-removal model needed.
    images = [p for p in sorted((REPO / "src" / "geomgen" / "samples").glob("*.png")) if Image.open(p).mode == "RGBA"]
    report = {}
    for texture in ("off", "on"):
        start = time.perf_counter()
        backend = Hunyuan3DBackend({**options, "texture": texture})
        try:
            backend.load()
        except Exception as exc:  # texture=on needs paint weights and custom_rasterizer
            report[f"texture_{texture}"] = {"error": str(exc)}
            continue
        load_s = time.perf_counter() - start
        times, peaks = [], []
        for i in range(repeats + 1):
            image = images[i % len(images)]
            start = time.perf_counter()
            output = backend.generate(GenerationInput(image.name, image.read_bytes(), work))
            if i:  # the first call warms CUDA kernels and is dropped
                times.append(time.perf_counter() - start)
                peaks.append(output.info.get("gpu_peak_gb", float("nan")))
        backend.close()
        report[f"texture_{texture}"] = {"load_s": round(load_s, 2), **_summary(times), "gpu_peak_gb": max(peaks)}
    return report


def _wait(predicate, what: str, proc: subprocess.Popen | None = None, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout_s} s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5, help="sequential jobs through the stack")
    parser.add_argument("--repeats", type=int, default=5, help="timed generate() calls per octree resolution")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    parser.add_argument("--real", action="store_true", help="time the published model on CUDA instead")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="hunyuan3d option for --real (repeatable)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch here and in the worker process
    if args.real:
        options = dict(item.split("=", 1) for item in args.option)
        with tempfile.TemporaryDirectory(prefix="bench-hy3d-") as tmp:
            print(json.dumps(real_model(options, args.repeats, Path(tmp)), indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="bench-hy3d-") as tmp:
        work = Path(tmp)
        root = work / "models"
        build_tiny_model(root)
        report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                  "load_average_before": os.getloadavg()[0],
                  "in_process": in_process(root, args.repeats, work),
                  "stack": through_stack(root, args.jobs, work),
                  "load_average_after": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    ip, st = report["in_process"], report["stack"]
    print(f"machine: {report['machine']}; 1-minute load average {report['load_average_before']:.1f} before, "
          f"{report['load_average_after']:.1f} after (other processes share the cores)")
    print(f"import torch + hy3dgen: {ip['import_s']} s; load() of the tiny model: {ip['load_s']} s; "
          f"torch threads: {ip['torch_threads']}")
    for octree, row in ip["generate"].items():
        print(f"generate, octree {octree}: median {row['median_s']} s (min {row['min_s']}, max {row['max_s']}, "
              f"n {row['n']}; CPU {row['cpu_median_s']} s), {row['raw_faces']} -> {row['faces']} faces, "
              f"steps {row['step_median_s']}")
    print(f"stack: worker start to READY {st['worker_ready_s']} s; per job (GLB + hull SDF) median "
          f"{st['per_job']['median_s']} s (generate {st['generate_s_median']} s, convert {st['convert_s_median']} s)")


if __name__ == "__main__":
    main()

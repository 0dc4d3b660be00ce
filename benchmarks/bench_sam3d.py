"""SAM 3 segmentation seconds per image on the CPU, with the tiny model.

The tiny model (tests/tiny_sam3.py: sam3's own architecture with a 2-layer,
64-wide ViT and text encoder) through sam3's real code on the CPU: load
seconds, then seconds per image in foreground and text mode. The image goes
through SAM 3 at 1008 x 1008 whatever its size, so the cost is the fusion
encoder, decoder and segmentation head at full size plus the tiny backbone.

    python benchmarks/bench_sam3d.py [--repeats 5] [--threads N] [--json]

On a GPU machine with SAM 3D Objects installed and the weights
($SAM3_CHECKPOINT, $SAM3D_CHECKPOINT), ``--real`` times the whole sam3d
backend on the package's sample images: load seconds, seconds per asset and
peak GPU memory, texture on and off:

    python benchmarks/bench_sam3d.py --real [--option mode=foreground ...]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _summary(values: list[float]) -> dict:
    return {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
            "max_s": round(max(values), 3), "n": len(values)}


def tiny_segmentation(repeats: int, work: Path) -> dict:
    """Load and per-image seconds of SAM 3 with the tiny model on the CPU."""
    import torch
    from PIL import Image

    from geomgen.backends._sam3_segmenter import Sam3Segmenter
    from tests import tiny_sam3

    checkpoint = tiny_sam3.write_checkpoint(work / "sam3.pt")
    start = time.perf_counter()
    segmenter = Sam3Segmenter(str(checkpoint), "cpu")
    load_s = time.perf_counter() - start
    report = {"load_s": round(load_s, 2), "torch_threads": torch.get_num_threads(),
              "checkpoint_mb": round(checkpoint.stat().st_size / 2**20, 1)}
    for mode, prompt, size in (("foreground", None, (96, 80)), ("text", "the red square", (96, 80)),
                               ("foreground", None, (1024, 768))):
        image = Image.open(io.BytesIO(tiny_sam3.scene_png(size)))
        segmenter.segment(image, mode, prompt, 0.0)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            segmenter.segment(image, mode, prompt, 0.0)
            times.append(time.perf_counter() - start)
        report[f"{mode}_{size[0]}x{size[1]}"] = _summary(times)
    return report


def real_model(options: dict[str, str], repeats: int, work: Path) -> dict:
    """The published SAM 3 + SAM 3D Objects on CUDA: per texture mode, load
    seconds, seconds per asset and the peak GPU memory (``gpu_peak_gb``)."""
    from geomgen.backends.base import GenerationInput
    from geomgen.backends.sam3d import Sam3dBackend

    images = sorted((REPO / "src" / "geomgen" / "samples").glob("*.png"))
    report = {}
    for texture in ("off", "on"):
        start = time.perf_counter()
        backend = Sam3dBackend({**options, "texture": texture})
        backend.load()
        load_s = time.perf_counter() - start
        times, peaks, segment = [], [], []
        for i in range(repeats + 1):
            image = images[i % len(images)]
            start = time.perf_counter()
            output = backend.generate(GenerationInput(image.name, image.read_bytes(), work))
            if i:  # the first call warms CUDA kernels and is dropped
                times.append(time.perf_counter() - start)
                peaks.append(output.info.get("gpu_peak_gb", float("nan")))
                segment.append(output.info["seconds"]["segmentation_s"])
        backend.close()
        report[f"texture_{texture}"] = {"load_s": round(load_s, 2), **_summary(times), "gpu_peak_gb": max(peaks),
                                        "segmentation_median_s": round(statistics.median(segment), 3)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    parser.add_argument("--real", action="store_true", help="time the published models on CUDA instead")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="sam3d option for --real (repeatable)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-sam3d-") as tmp:
        if args.real:
            options = dict(item.split("=", 1) for item in args.option)
            print(json.dumps(real_model(options, args.repeats, Path(tmp)), indent=2))
            return
        report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                  "load_average_before": os.getloadavg()[0],
                  "tiny_sam3_cpu": tiny_segmentation(args.repeats, Path(tmp)),
                  "load_average_after": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    tiny = report["tiny_sam3_cpu"]
    print(f"machine: {report['machine']}; 1-minute load average {report['load_average_before']:.1f} before, "
          f"{report['load_average_after']:.1f} after (other processes share the cores)")
    print(f"tiny SAM 3 load: {tiny['load_s']} s ({tiny['checkpoint_mb']} MB checkpoint), "
          f"torch threads {tiny['torch_threads']}")
    for key, row in tiny.items():
        if isinstance(row, dict):
            print(f"{key}: median {row['median_s']} s per image (min {row['min_s']}, max {row['max_s']}, n {row['n']})")


if __name__ == "__main__":
    main()

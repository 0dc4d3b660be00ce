"""The result cache: the same batch twice through a real broker, the second
time answered from the cache; and `geomgen generate` run twice.

The broker is `python -m geomgen broker --cache-dir TMP`, with one GPU worker
of the test backend `instant` (tests/plugins.py) holding each job
``--gpu-s`` seconds (a stand-in for GPU time) and returning its GLB input as
is, so the entry size is the input size. Pass 1 computes every item (misses),
pass 2 asks for the same items under other output names (hits). Reported: each
pass's wall time, the client's per-item seconds (median, max) and the
broker's cache counters. With --generate it also times `geomgen generate` on
the bundled samples twice with a fresh per-user cache (embedded stack, default
conversion settings).

    python benchmarks/bench_cache.py [--items 20] [--mib 4] [--gpu-s 1.0] [--generate] [--json out.json]
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

from geomgen import GeometryClient, GeometryRequest
from geomgen.server import free_base_port
from tests.plugins import box_glb


def glb_of(size_bytes: int, salt: int) -> bytes:
    """The test box GLB with bytes appended after its declared length: distinct, of the size asked."""
    base = box_glb()
    pad = max(0, size_bytes - len(base))
    return base + salt.to_bytes(8, "big") + b"\0" * pad


def one_pass(client: GeometryClient, inputs: list[Path], out: Path, tag: str) -> dict:
    requests = [GeometryRequest(image_path=str(p), output_dir=str(out), output_filename=f"{tag}{i}",
                                backend="instant", want_sdf=False) for i, p in enumerate(inputs)]
    started = time.monotonic()
    results = dict(client.generate(requests))
    wall_s = time.monotonic() - started
    assert all(r.ok for r in results.values()), [r.error for r in results.values() if not r.ok]
    seconds = [r.timings["client_s"] for r in results.values()]
    return {"wall_s": round(wall_s, 3), "item_median_s": round(statistics.median(seconds), 4),
            "item_max_s": round(max(seconds), 4), "cached": sum(r.cached for r in results.values())}


def broker_passes(items: int, mib: float, gpu_s: float) -> dict:
    env = {**os.environ, "GEOMGEN_BACKENDS": "instant=tests.plugins:InstantBackend", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        port = free_base_port()
        address = f"127.0.0.1:{port}"
        procs = [subprocess.Popen([sys.executable, "-m", "geomgen", "broker", "--port", str(port), "--cache-dir",
                                   str(tmp_path / "cache")], env=env, stderr=subprocess.DEVNULL),
                 subprocess.Popen([sys.executable, "-m", "geomgen", "gpu-worker", "--backend", "instant", "--broker",
                                   address, "--backend-option", f"delay_s={gpu_s}"], env=env,
                                  stderr=subprocess.DEVNULL)]
        try:
            inputs = []
            for n in range(items):
                path = tmp_path / f"in{n}.glb"
                path.write_bytes(glb_of(int(mib * 1024 * 1024), n))
                inputs.append(path)
            with GeometryClient(f"tcp://{address}", timeout_s=120) as client:
                deadline = time.monotonic() + 120
                while client.health().get("backends", {}).get("instant", {}).get("alive", 0) < 1:
                    if time.monotonic() > deadline:
                        raise SystemExit("the worker did not register")
                    time.sleep(0.2)
                first = one_pass(client, inputs, tmp_path / "out", "a")
                while client.health()["cache"].get("pending_writes", 0):
                    time.sleep(0.05)
                second = one_pass(client, inputs, tmp_path / "out", "b")
                cache = client.health()["cache"]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)
    return {"items": items, "entry_mib": mib, "gpu_s": gpu_s, "miss_pass": first, "hit_pass": second,
            "cache": {k: cache[k] for k in ("entries", "bytes", "hits", "misses", "generate_hits")}}


def generate_twice() -> dict:
    samples = REPO / "src" / "geomgen" / "samples"
    inputs = [str(samples / name) for name in ("mug.png", "chair.png", "table.glb")]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GEOMGEN_CACHE_DIR": str(Path(tmp) / "cache")}
        command = [sys.executable, "-m", "geomgen", "generate", *inputs, "--out", str(Path(tmp) / "out"),
                   "--height", "0.5"]
        for run in ("first_s", "second_s"):
            started = time.monotonic()
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=1800)
            out[run] = round(time.monotonic() - started, 2)
    out["command"] = "geomgen generate mug.png chair.png table.glb --out DIR --height 0.5 (twice)"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--mib", type=float, default=4.0, help="size of each input, hence each entry, MiB")
    parser.add_argument("--gpu-s", type=float, default=1.0, help="seconds the stand-in GPU holds each job")
    parser.add_argument("--generate", action="store_true", help="also time `geomgen generate` twice")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    figures = {"broker": broker_passes(args.items, args.mib, args.gpu_s)}
    if args.generate:
        figures["generate"] = generate_twice()
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

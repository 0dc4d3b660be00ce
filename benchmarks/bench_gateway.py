"""HTTP gateway overhead against the ZeroMQ client, on a fast backend.

A real broker, ``--workers`` GPU-worker processes of the test backend
``instant`` (tests.plugins: a GLB back at once) and a real ``geomgen gateway``
process, all on loopback. Two measures, as in issue 11:

1. Per item: one-item batches one after another, alternately through the
   ZeroMQ client (one long-lived GeometryClient) and through the gateway (one
   keep-alive HTTP session, the old client's way: stream=True, iter_lines);
   the median of each and the median added by the gateway, in ms.
2. 32 concurrent batches of ``--items`` items: through the gateway (32 HTTP
   streams at once) against the same items through the ZeroMQ client (32
   threads with a GeometryClient each, and one client with every item);
   wall time of each and the ratio, best of ``--rounds`` rounds.

Every item has its own output name, so the gateway's table of finished items
never answers one (that would flatter it).

    python benchmarks/bench_gateway.py [--single 300] [--items 8] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import machine  # noqa: E402
from geomgen.client import GeometryClient, GeometryRequest  # noqa: E402
from geomgen.server import free_base_port  # noqa: E402
from tests.plugins import box_glb  # noqa: E402

# The benchmark's own ZeroMQ clients see the same backend registry as the gateway,
# so both run the same client-side checks (with the backend installed, the client
# checks the input kind and options itself).
os.environ.update({"GEOMGEN_BACKENDS": "instant=tests.plugins:InstantBackend", "PYTHONPATH": str(REPO)})
ENV = dict(os.environ)
BATCHES = 32


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "geomgen", *args], env=ENV, stdout=out,
                                stderr=subprocess.STDOUT)


def wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def http_batch(session: requests.Session, url: str, items: list[dict]) -> int:
    reply = session.post(f"{url}/generate_geometries", json=items, stream=True, timeout=300)
    reply.raise_for_status()
    ok = 0
    for line in reply.iter_lines():
        if line:
            ok += json.loads(line)["status"] == "success"
    return ok


def zmq_batch(client: GeometryClient, items: list[dict]) -> int:
    requests_ = [GeometryRequest(image_path=i["image_path"], output_dir=i["output_dir"], prompt=i["prompt"],
                                 output_filename=i["output_filename"], backend="instant", want_sdf=False)
                 for i in items]
    return sum(result.ok for _, result in client.generate(requests_))


def items_for(image: Path, out: Path, n: int) -> list[dict]:
    return [{"image_path": str(image), "output_dir": str(out), "prompt": "a box", "debug_folder": None,
             "output_filename": f"g{uuid.uuid4().hex[:12]}", "backend": "instant", "sam3d_config": None,
             "scene_id": None} for _ in range(n)]


def per_item(broker: str, url: str, image: Path, out: Path, count: int) -> dict:
    http_ms, zmq_ms = [], []
    with GeometryClient(broker, keys=None) as client, requests.Session() as session:
        for _ in range(20):  # warm both paths
            zmq_batch(client, items_for(image, out, 1))
            http_batch(session, url, items_for(image, out, 1))
        for _ in range(count):
            started = time.perf_counter()
            assert zmq_batch(client, items_for(image, out, 1)) == 1
            zmq_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            assert http_batch(session, url, items_for(image, out, 1)) == 1
            http_ms.append((time.perf_counter() - started) * 1000)
    return {"items": count, "zmq_median_ms": round(statistics.median(zmq_ms), 3),
            "http_median_ms": round(statistics.median(http_ms), 3),
            "added_median_ms": round(statistics.median(http_ms) - statistics.median(zmq_ms), 3),
            "added_median_of_pairs_ms": round(statistics.median(h - z for h, z in zip(http_ms, zmq_ms)), 3)}


def concurrent(broker: str, url: str, image: Path, out: Path, per_batch: int) -> dict:
    batches = [items_for(image, out, per_batch) for _ in range(BATCHES)]

    def run_threads(fn) -> float:
        done: list[int] = []
        threads = [threading.Thread(target=lambda b=b: done.append(fn(b))) for b in batches]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(done) == BATCHES * per_batch, f"{sum(done)} of {BATCHES * per_batch} succeeded"
        return time.perf_counter() - started

    def over_http(batch: list[dict]) -> int:
        with requests.Session() as session:
            return http_batch(session, url, batch)

    def over_zmq(batch: list[dict]) -> int:
        with GeometryClient(broker, keys=None) as client:
            return zmq_batch(client, batch)

    http_s = run_threads(over_http)
    batches = [items_for(image, out, per_batch) for _ in range(BATCHES)]
    zmq_threads_s = run_threads(over_zmq)
    everything = [i for b in (items_for(image, out, per_batch) for _ in range(BATCHES)) for i in b]
    started = time.perf_counter()
    with GeometryClient(broker, keys=None, max_in_flight=BATCHES * per_batch) as client:
        assert zmq_batch(client, everything) == len(everything)
    zmq_one_s = time.perf_counter() - started
    return {"http_s": http_s, "zmq_32_clients_s": zmq_threads_s, "zmq_one_client_s": zmq_one_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=300, help="one-item batches per path for the per-item measure")
    parser.add_argument("--items", type=int, default=8, help="items in each of the 32 concurrent batches")
    parser.add_argument("--workers", type=int, default=2, help="instant GPU-worker processes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the concurrent measure (best kept)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    image, out = work / "box.glb", work / "out"
    image.write_bytes(box_glb())
    port, http_port = free_base_port(), free_base_port(count=1)
    broker, url = f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"
    children = [start(["broker", "--host", "127.0.0.1", "--port", str(port), "--no-cache"], work / "broker.log")]
    try:
        children += [start(["gpu-worker", "--backend", "instant", "--broker", broker], work / f"worker{n}.log")
                     for n in range(args.workers)]
        children.append(start(["gateway", "--broker", broker, "--port", str(http_port), "--allow-root", str(work)],
                              work / "gateway.log"))
        with GeometryClient(broker, keys=None) as client:
            wait(lambda: client.health().get("backends", {}).get("instant", {}).get("alive") == args.workers, 120,
                 "the workers")

        def gateway_up() -> bool:
            try:
                return requests.get(f"{url}/health", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait(gateway_up, 60, "the gateway")
        single = per_item(broker, url, image, out, args.single)
        rounds = [concurrent(broker, url, image, out, args.items) for _ in range(args.rounds)]
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)
    best = {key: round(min(r[key] for r in rounds), 3) for key in rounds[0]}
    report = {
        "machine": machine(),
        "workers": args.workers,
        "per_item": single,
        "concurrent": {"batches": BATCHES, "items_per_batch": args.items, "rounds": rounds, "best": best,
                       "ratio_vs_32_clients": round(best["http_s"] / best["zmq_32_clients_s"], 3),
                       "ratio_vs_one_client": round(best["http_s"] / best["zmq_one_client_s"], 3)},
        "targets": {"added_median_ms": 5.0, "ratio": 1.2},
        "command": " ".join(["python", *sys.argv]),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

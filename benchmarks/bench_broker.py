"""Broker overhead: jobs/s and dispatch latency through a real broker process.

Client and synthetic GPU workers are played by this process over loopback TCP
with the real protocol; the broker is `python -m geomgen broker`. Dispatch
latency is client send -> worker receive, measured on one clock, with as many
synthetic workers as requests in flight so it measures routing, not waiting
for a worker; its percentiles are over the steady state (after the first N
requests, which leave together), the burst reported apart. Workers answer at
once (saturation) or hold each job for a jittered stand-in of GPU time.

    python benchmarks/bench_broker.py [--jobs 5000] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import math
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine  # noqa: E402
from geomgen import protocol  # noqa: E402
from geomgen.endpoints import Endpoints  # noqa: E402
from tests.conftest import free_base_port  # noqa: E402

BACKEND = "bench"


def tiny_glb() -> bytes:
    """A 10 cm box as GLB, in glTF conventions (+Y up, resting on y = 0)."""
    import trimesh

    box = trimesh.creation.box(extents=(0.1, 0.1, 0.1))
    box.apply_translation((0, 0.05, 0))
    return trimesh.Scene(box).export(file_type="glb")


def start_broker(endpoints: Endpoints) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "geomgen", "broker", "--host", "127.0.0.1", "--port", str(endpoints.client_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class Harness:
    """One client DEALER and N worker DEALERs in this process, one poller."""

    def __init__(self, endpoints: Endpoints, n_workers: int):
        self.ctx = zmq.Context()
        self.client = self.ctx.socket(zmq.DEALER)
        self.client.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.connect(endpoints.client)
        self.workers = []
        for _ in range(n_workers):
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoints.worker)
            wid = uuid.uuid4().hex
            sock.send_multipart(protocol.encode(protocol.WorkerReady(worker_id=wid, backend=BACKEND)))
            self.workers.append((sock, wid))
        self.poller = zmq.Poller()
        self.poller.register(self.client, zmq.POLLIN)
        for sock, _ in self.workers:
            self.poller.register(sock, zmq.POLLIN)
        self.glb = tiny_glb()

    def wait_workers(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.client.send_multipart(protocol.encode(protocol.HealthQuery()))
            if self.client.poll(2000):
                _, reply = protocol.decode(self.client.recv_multipart(), protocol.BROKER_TO_CLIENT)
                if isinstance(reply, protocol.HealthReply):
                    alive = reply.stats.get("backends", {}).get(BACKEND, {}).get("alive", 0)
                    if alive >= len(self.workers):
                        return
            self._drain_workers()
        raise RuntimeError("synthetic workers never became alive at the broker")

    def _drain_workers(self) -> None:
        for sock, _ in self.workers:
            while sock.poll(0):
                sock.recv_multipart()

    def run(self, jobs: int, in_flight: int, hold_s: float = 0.0) -> dict:
        """``jobs`` requests, ``in_flight`` kept outstanding; each synthetic
        worker holds its job 0.5-1.5 x ``hold_s`` before answering (a stand-in
        for GPU time)."""
        sent_at: dict[str, float] = {}
        held: list[tuple[float, int, zmq.Socket, list[bytes]]] = []  # heap of (due, seq, socket, reply frames)
        jitter = random.Random(0)
        latencies: list[tuple[int, float]] = []  # (request number, client send -> worker receive)
        next_id = 0
        done = 0
        start = time.perf_counter()

        def send_one() -> None:
            nonlocal next_id
            rid = f"r{next_id}"
            next_id += 1
            msg = protocol.ClientRequest(
                request_id=rid, backend=BACKEND, input_name=f"{rid}.glb", input_data=b"x",
                output_name=rid, want_sdf=False, events=False,  # as GeometryClient.generate() asks
            )
            sent_at[rid] = time.perf_counter()
            self.client.send_multipart(protocol.encode(msg))

        # As timeit does: no collector pauses of this measuring process inside the timings.
        gc.collect()
        gc.disable()
        for _ in range(min(in_flight, jobs)):
            send_one()
        worker_of = {sock: wid for sock, wid in self.workers}
        while done < jobs:
            wait_ms = 5000 if not held else max(0, math.ceil((held[0][0] - time.perf_counter()) * 1e3))
            events = dict(self.poller.poll(wait_ms))
            while held and held[0][0] <= time.perf_counter():
                _, _, sock, frames = heapq.heappop(held)
                sock.send_multipart(frames)
            if not events and not held and wait_ms == 5000:
                raise RuntimeError(f"stalled after {done} of {jobs} jobs")
            for sock, _ in self.workers:
                if sock in events:
                    frames = sock.recv_multipart()
                    cmd, msg = protocol.decode(frames, protocol.BROKER_TO_WORKER)
                    if cmd is protocol.Command.REQUEST:
                        rid = msg.input_name[:-4]
                        latencies.append((int(rid[1:]), time.perf_counter() - sent_at[rid]))
                        reply = protocol.JobResult(job_id=msg.job_id, attempt=msg.attempt, ok=True, glb=self.glb)
                        if hold_s > 0:
                            # GPU times vary; identical holds would keep all workers in lockstep bursts.
                            due = time.perf_counter() + hold_s * jitter.uniform(0.5, 1.5)
                            heapq.heappush(held, (due, len(latencies), sock, protocol.encode(reply)))
                        else:
                            sock.send_multipart(protocol.encode(reply))
                    elif cmd is protocol.Command.HEARTBEAT:
                        sock.send_multipart(protocol.encode(protocol.WorkerHeartbeat(worker_id=worker_of[sock])))
            if self.client in events:
                while self.client.poll(0):
                    cmd, msg = protocol.decode(self.client.recv_multipart(), protocol.BROKER_TO_CLIENT)
                    if cmd is protocol.Command.FINAL:
                        if not msg.ok:
                            raise RuntimeError(f"job failed: {msg.error}")
                        done += 1
                        if next_id < jobs:
                            send_one()
        elapsed = time.perf_counter() - start
        gc.enable()
        # The first ``in_flight`` requests leave together, a burst each one of which
        # waits for those ahead of it; every later one is sent as a result comes
        # back, with ``in_flight`` outstanding: the steady state the goal is about.
        burst = sorted(s for n, s in latencies if n < in_flight)
        steady = sorted(s for n, s in latencies if n >= in_flight) or burst
        return {
            "jobs": jobs,
            "in_flight": in_flight,
            "hold_s": hold_s,
            "seconds": elapsed,
            "jobs_per_s": jobs / elapsed,
            "dispatch_p50_ms": 1e3 * _quantile(steady, 0.5),
            "dispatch_p99_ms": 1e3 * _quantile(steady, 0.99),
            "dispatch_max_ms": 1e3 * steady[-1],
            "initial_burst_p50_ms": 1e3 * _quantile(burst, 0.5),
            "initial_burst_max_ms": 1e3 * burst[-1],
        }

    def close(self) -> None:
        for sock, wid in self.workers:
            sock.send_multipart(protocol.encode(protocol.Disconnect(reason="benchmark done", worker_id=wid)))
        self.ctx.destroy(linger=0)


# (requests in flight, seconds each synthetic worker holds a job). Held jobs make
# "in flight" mean jobs at workers, as with real GPU time; with no hold, every
# request in flight is waiting on the broker or the harness (a saturation test).
SCENARIOS = ((1, 0.0), (10, 0.0), (100, 0.0), (100, 0.1))


def broker_alone(jobs: int) -> list[dict]:
    rows = []
    for in_flight, hold_s in SCENARIOS:
        endpoints = Endpoints.from_base("127.0.0.1", free_base_port())
        broker = start_broker(endpoints)
        try:
            harness = Harness(endpoints, n_workers=in_flight)
            harness.wait_workers()
            harness.run(min(jobs, 200), in_flight, hold_s)  # warm-up
            cpu_before_s = _cpu_seconds(broker.pid)
            count = jobs if in_flight > 1 else max(500, jobs // 5)
            if hold_s:
                count = min(count, int(30 * in_flight / hold_s))  # about 30 s at most
            rows.append(harness.run(count, in_flight, hold_s))
            # The broker's own CPU per job: what it could sustain on one core, apart from this harness.
            rows[-1]["broker_cpu_ms_per_job"] = 1e3 * (_cpu_seconds(broker.pid) - cpu_before_s) / rows[-1]["jobs"]
            harness.close()
        finally:
            broker.terminate()
            broker.wait(timeout=10)
        print(f"broker alone   in_flight={in_flight:>3} hold={hold_s:.2f} s: {rows[-1]['jobs_per_s']:8.0f} jobs/s  "
              f"dispatch p50 {rows[-1]['dispatch_p50_ms']:.2f} ms  p99 {rows[-1]['dispatch_p99_ms']:.2f} ms  "
              f"(first {in_flight} at once: max {rows[-1]['initial_burst_max_ms']:.1f} ms)  "
              f"broker CPU {rows[-1]['broker_cpu_ms_per_job']:.3f} ms/job")
    return rows


def full_pipeline(jobs: int, tmp: Path) -> dict:
    """Broker + one real GPU worker (synthetic backend, no delay) + one SDF worker (2 procs,
    hull collision, Drake validation) through the Python client."""
    from geomgen import GeometryClient, GeometryRequest

    endpoints = Endpoints.from_base("127.0.0.1", free_base_port())
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GEOMGEN_BACKENDS": "timed=benchmarks.synthetic:TimedBackend", "PYTHONPATH": str(repo)}
    broker_arg = f"127.0.0.1:{endpoints.client_port}"
    procs = [
        subprocess.Popen([sys.executable, "-m", "geomgen", "broker", "--port", str(endpoints.client_port)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "geomgen", "gpu-worker", "--backend", "timed", "--backend-option",
                          "delay_s=0", "--broker", broker_arg], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "geomgen", "sdf-worker", "--procs", "2", "--broker", broker_arg],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    glb = tmp / "box.glb"
    glb.write_bytes(tiny_glb())
    try:
        with GeometryClient(address=endpoints.client) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                stats = client.health()
                if stats["backends"].get("timed", {}).get("alive") and stats.get("sdf_free", 0) >= 2:
                    break
                time.sleep(0.2)
            reqs = [GeometryRequest(image_path=str(glb), output_dir=str(tmp / "out"), output_filename=f"j{i}",
                                    backend="timed", collision="hull") for i in range(jobs)]
            start = time.perf_counter()
            results = [r for _, r in client.generate(reqs)]
            elapsed = time.perf_counter() - start
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} jobs failed, first: {failed[0]}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=15)
    row = {"jobs": jobs, "seconds": elapsed, "jobs_per_s": jobs / elapsed}
    print(f"broker + GPU worker + SDF worker (2 procs, hull, Drake check): {row['jobs_per_s']:.1f} jobs/s over {jobs}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000, help="jobs per broker-alone run")
    parser.add_argument("--pipeline-jobs", type=int, default=40, help="jobs through the full pipeline")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "broker.json")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "machine": machine(),
            "broker_alone": broker_alone(args.jobs),
            "full_pipeline": full_pipeline(args.pipeline_jobs, Path(tmp)),
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[int(q * (len(sorted_values) - 1))]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()

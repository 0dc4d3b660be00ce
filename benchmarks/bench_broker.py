"""Broker overhead: jobs/s and dispatch latency through a real broker process.

The broker is `python -m geomgen broker`; the client is this process (one
DEALER) and the synthetic GPU workers are N DEALERs in a child process (as real
workers are other processes), all over loopback TCP with the real protocol.
Dispatch latency is client send -> worker receive, both taken on
CLOCK_MONOTONIC, with as many synthetic workers as requests in flight so it
measures routing, not waiting for a worker; its percentiles are over the
steady state (after the first N requests, which leave together), the burst
reported apart. Workers answer at once (saturation) or hold each job for a
jittered stand-in of GPU time.

Each scenario also runs against benchmarks/floor_broker.py, a forwarder that
does nothing but route, alternating with the real broker so both see the
same machine: the difference is what geomgen's broker costs, the floor what
Python, pyzmq, loopback TCP and this machine's scheduler cost.

With --curve it runs the saturation scenarios at 10 and 100 in flight against
the geomgen broker with CURVE off and with CURVE on (`--keys`: every peer of
the harness has a key, the client one of role client, the worker farm one of
role gpu-worker), alternating in the same minutes, and reports on / off for
throughput and the broker's CPU per job, per thread (Python's and ZeroMQ's
I/O thread, where the encryption runs). Figures in results/curve.json.

    python benchmarks/bench_broker.py [--jobs 5000] [--rounds 3] [--json out.json] [--baseline-src DIR]
    python benchmarks/bench_broker.py --curve [--jobs 20000] [--rounds 3]    # ~1 min here
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import multiprocessing
import os
import random
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine  # noqa: E402
from geomgen import protocol  # noqa: E402
from geomgen.endpoints import Endpoints  # noqa: E402
from geomgen.keys import (  # noqa: E402
    PeerKeys,
    add_peer,
    apply_client_curve,
    init_keys,
    load_peer_keys,
)
from geomgen.server import free_base_port  # noqa: E402

BACKEND = "bench"


def tiny_glb() -> bytes:
    """A 10 cm box as GLB, in glTF conventions (+Y up, resting on y = 0)."""
    import trimesh

    box = trimesh.creation.box(extents=(0.1, 0.1, 0.1))
    box.apply_translation((0, 0.05, 0))
    return trimesh.Scene(box).export(file_type="glb")


def clock() -> float:
    """CLOCK_MONOTONIC in seconds: one clock for every process on this machine,
    so a send time taken by the client and a receive time taken by a worker compare."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def worker_farm(worker_url: str, n_workers: int, glb: bytes, control, keys: PeerKeys | None = None) -> None:
    """N synthetic GPU workers (DEALER sockets) in one process, as a separate
    program from the client, as real GPU workers are. Each records when it
    received a job, answers it (at once, or after holding it), and answers the
    broker's heartbeats. ``control`` (a multiprocessing connection) takes
    ("hold", seconds), ("report",) -> {request number: receive time} since the
    last report, and ("stop",). With ``keys`` every worker is a CURVE client
    (one gpu-worker key for the farm, as for the workers of one machine)."""
    ctx = zmq.Context()
    # epoll over the sockets' ZMQ_FDs wakes for the sockets that have news, not a
    # zmq_poll over all N: the farm's cost stays per message, whatever N is.
    selector = selectors.EpollSelector()
    workers: dict[zmq.Socket, str] = {}
    for _ in range(n_workers):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            apply_client_curve(sock, keys)
        sock.connect(worker_url)
        wid = uuid.uuid4().hex
        sock.send_multipart(protocol.encode(protocol.WorkerReady(worker_id=wid, backend=BACKEND)))
        workers[sock] = wid
        selector.register(sock.getsockopt(zmq.FD), selectors.EVENT_READ, sock)
    selector.register(control.fileno(), selectors.EVENT_READ, None)
    to_check = set(workers)  # ZMQ_FD is edge-like: after a wake-up or a send, read EVENTS until no POLLIN
    received: dict[int, float] = {}
    held: list[tuple[float, int, zmq.Socket, list[bytes]]] = []  # heap of (due, seq, socket, reply frames)
    jitter = random.Random(0)
    hold_s = 0.0
    gc.disable()  # as timeit does: no collector pauses inside the timings
    while True:
        wait_s = 0 if to_check else 1.0 if not held else max(0.0, held[0][0] - clock())
        for key, _ in selector.select(wait_s):
            if key.data is not None:
                to_check.add(key.data)
        # Receive (and time) everything that is here before answering any of it:
        # each real worker is its own process, waiting in recv, not behind the others.
        arrived = []
        for sock in to_check:
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                arrived.append((sock, sock.recv_multipart(), clock()))
        to_check.clear()
        for sock, frames, now in arrived:
            cmd = frames[0][protocol.HEADER_LEN - 1] if len(frames) == 2 else None
            if cmd == protocol.Command.REQUEST:
                # Only the three fields the answer needs: the load generator stays light
                # so that the broker, not this process, is what the figures measure.
                job = msgpack.unpackb(frames[1])
                received[int(job["input_name"][1:-4])] = now
                reply = protocol.encode(protocol.JobResult(job_id=job["job_id"], attempt=job["attempt"], ok=True,
                                                           glb=glb))
                if hold_s > 0:
                    # GPU times vary; identical holds would keep all workers in lockstep bursts.
                    heapq.heappush(held, (now + hold_s * jitter.uniform(0.5, 1.5), len(received), sock, reply))
                    continue
                sock.send_multipart(reply)
            elif cmd == protocol.Command.HEARTBEAT:
                sock.send_multipart(protocol.encode(protocol.WorkerHeartbeat(worker_id=workers[sock])))
            to_check.add(sock)
        while held and held[0][0] <= clock():
            _, _, sock, frames = heapq.heappop(held)
            sock.send_multipart(frames)
            to_check.add(sock)
        while control.poll():
            order = control.recv()
            if order[0] == "hold":
                hold_s = order[1]
            elif order[0] == "report":
                control.send(received)
                received = {}
            elif order[0] == "stop":
                for sock, wid in workers.items():
                    sock.send_multipart(protocol.encode(protocol.Disconnect(reason="benchmark done", worker_id=wid)))
                ctx.destroy(linger=0)
                return


class Harness:
    """The client (one DEALER in this process) and a worker farm (a child process)."""

    def __init__(self, endpoints: Endpoints, n_workers: int, keys: BenchKeys | None = None):
        self.n_workers = n_workers
        self.ctx = zmq.Context()
        self.client = self.ctx.socket(zmq.DEALER)
        self.client.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        self.client.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            apply_client_curve(self.client, keys.client)
        self.client.connect(endpoints.client)
        mp = multiprocessing.get_context("spawn")
        self.control, farm_end = mp.Pipe()
        self.farm = mp.Process(target=worker_farm, daemon=True, args=(
            endpoints.worker, n_workers, tiny_glb(), farm_end, keys.gpu_worker if keys is not None else None))
        self.farm.start()

    def wait_workers(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.client.send_multipart(protocol.encode(protocol.HealthQuery()))
            if self.client.poll(2000):
                _, reply = protocol.decode(self.client.recv_multipart(), protocol.BROKER_TO_CLIENT)
                if isinstance(reply, protocol.HealthReply):
                    if reply.stats.get("backends", {}).get(BACKEND, {}).get("alive", 0) >= self.n_workers:
                        return
            time.sleep(0.1)
        raise RuntimeError("synthetic workers never became alive at the broker")

    def run(self, jobs: int, in_flight: int, hold_s: float = 0.0) -> dict:
        """``jobs`` requests, ``in_flight`` kept outstanding; each synthetic
        worker holds its job 0.5-1.5 x ``hold_s`` before answering (a stand-in
        for GPU time)."""
        self.control.send(("hold", hold_s))
        sent_at: list[float] = []
        next_id = 0
        done = 0

        def send_one() -> None:
            nonlocal next_id
            rid = f"r{next_id}"
            msg = protocol.ClientRequest(
                request_id=rid, backend=BACKEND, input_name=f"{rid}.glb", input_data=b"x",
                output_name=rid, want_sdf=False, events=False,  # as GeometryClient.generate() asks
            )
            frames = protocol.encode(msg)
            sent_at.append(clock())
            self.client.send_multipart(frames)
            next_id += 1

        gc.collect()
        gc.disable()  # as timeit does: no collector pauses of this measuring process inside the timings
        start = clock()
        for _ in range(min(in_flight, jobs)):
            send_one()
        self.client.setsockopt(zmq.RCVTIMEO, 5000)
        while done < jobs:
            try:
                frames = self.client.recv_multipart()
            except zmq.Again:
                raise RuntimeError(f"stalled after {done} of {jobs} jobs") from None
            if frames[0][protocol.HEADER_LEN - 1] != protocol.Command.FINAL:
                continue  # the glb_ready event: a real client writes the GLB; this one only counts results
            cmd, msg = protocol.decode(frames, protocol.BROKER_TO_CLIENT)
            if cmd is protocol.Command.FINAL:
                if not msg.ok:
                    raise RuntimeError(f"job failed: {msg.error}")
                done += 1
                if next_id < jobs:
                    send_one()
        elapsed = clock() - start
        gc.enable()
        self.control.send(("report",))
        received = self.control.recv()
        latencies = [(n, received[n] - sent_at[n]) for n in range(jobs)]
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
        self.control.send(("stop",))
        self.farm.join(timeout=10)
        self.ctx.destroy(linger=0)


# (requests in flight, seconds each synthetic worker holds a job). Held jobs make
# "in flight" mean jobs at workers, as with real GPU time (at 0.1 s about 900
# jobs/s, at 1 s about 95); with no hold, every request in flight is waiting on
# the broker or the harness: a saturation test.
SCENARIOS = ((1, 0.0), (10, 0.0), (100, 0.0), (100, 0.1), (100, 1.0))
BROKERS = ("geomgen", "floor")  # floor: benchmarks/floor_broker.py, the least a broker on these sockets does
# --curve: the saturation scenarios the target is about (issue 10), geomgen with CURVE off and on.
CURVE_SCENARIOS = ((10, 0.0), (100, 0.0))
CURVE_BROKERS = ("geomgen", "curve")  # curve: `geomgen broker --keys`, the harness's peers with keys
CURVE_TARGET = 0.8  # jobs/s with CURVE on at least this times with it off (issue 10)

# Messages queued towards this harness's client, given to every broker explicitly so
# that a baseline checkout with another default is measured the same way: at 100
# (once the default), one client with 100 requests in flight at saturation lost
# results and the run stalled.
CLIENT_SEND_HWM = 1000

BASELINE_SRC: str | None = None  # --baseline-src: another checkout's src/, run as broker "baseline"


class BenchKeys:
    """A key folder for broker "curve" (made in ``folder`` by `geomgen keys init`)
    with one client key for the harness's client and one gpu-worker key for its farm."""

    def __init__(self, folder: Path):
        self.folder = folder
        init_keys(folder)
        broker_public = folder / "broker.key"
        self.client = load_peer_keys(add_peer(folder, "client", "bench-client")[1], broker_public)
        self.gpu_worker = load_peer_keys(add_peer(folder, "gpu-worker", "bench-workers")[1], broker_public)


BENCH_KEYS: BenchKeys | None = None  # --curve: made once per run, used by every "curve" broker


def start_broker(kind: str, endpoints: Endpoints) -> subprocess.Popen:
    env = None
    if kind == "floor":
        command = [sys.executable, str(Path(__file__).with_name("floor_broker.py")), str(endpoints.client_port)]
    else:
        command = [sys.executable, "-m", "geomgen", "broker", "--host", "127.0.0.1",
                   "--port", str(endpoints.client_port)]
        if kind == "baseline":
            env = {**os.environ, "PYTHONPATH": BASELINE_SRC}
        else:  # the baseline's broker has neither the option nor the limit
            command += ["--client-send-hwm", str(CLIENT_SEND_HWM)]
        if kind == "curve":
            command += ["--keys", str(BENCH_KEYS.folder)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def one_run(kind: str, jobs: int, in_flight: int, hold_s: float) -> dict:
    endpoints = Endpoints.from_base("127.0.0.1", free_base_port())
    broker = start_broker(kind, endpoints)
    try:
        # CURVE's handshakes (and ZAP's checks) happen here, when the peers connect, not in the timings.
        harness = Harness(endpoints, n_workers=in_flight, keys=BENCH_KEYS if kind == "curve" else None)
        harness.wait_workers()
        harness.run(min(jobs, 200), in_flight, hold_s)  # warm-up
        cpu_before_s = _cpu_seconds(broker.pid)
        threads_before_s = _thread_cpu_seconds(broker.pid)
        harness_before_s = {"client": sum(_thread_cpu_seconds(os.getpid()).values()),
                            "workers": sum(_thread_cpu_seconds(harness.farm.pid).values())}
        count = jobs if in_flight > 1 else max(500, jobs // 5)
        if hold_s:
            count = min(count, int(20 * in_flight / hold_s))  # about 20 s at most
        row = harness.run(count, in_flight, hold_s)
        # The broker's own CPU per job: what it could sustain on one core, apart from this harness.
        row["broker_cpu_ms_per_job"] = 1e3 * (_cpu_seconds(broker.pid) - cpu_before_s) / row["jobs"]
        # Which thread it is spent on: Python's (the loop) or ZeroMQ's I/O thread (framing, TCP, and CURVE's crypto).
        threads_after_s = _thread_cpu_seconds(broker.pid)
        row["broker_cpu_ms_per_job_by_thread"] = {
            name: round(1e3 * (seconds - threads_before_s.get(name, 0.0)) / row["jobs"], 4)
            for name, seconds in threads_after_s.items()}
        # The harness's share of the same cores (with CURVE on, its peers encrypt too).
        row["client_cpu_ms_per_job"] = round(
            1e3 * (sum(_thread_cpu_seconds(os.getpid()).values()) - harness_before_s["client"]) / row["jobs"], 4)
        row["workers_cpu_ms_per_job"] = round(
            1e3 * (sum(_thread_cpu_seconds(harness.farm.pid).values()) - harness_before_s["workers"]) / row["jobs"], 4)
        row["load_1min"] = os.getloadavg()[0]
        harness.close()
    finally:
        broker.terminate()
        broker.wait(timeout=10)
    return {"broker": kind, **row}


def broker_alone(jobs: int, rounds: int, brokers: tuple[str, ...], scenarios=SCENARIOS) -> list[dict]:
    """Every scenario ``rounds`` times, the brokers (geomgen and the floor, or
    geomgen with CURVE off and on) alternating, so that all see the same
    machine (its load moves by the minute)."""
    rows = []
    for in_flight, hold_s in scenarios:
        for round_no in range(rounds):
            for kind in brokers:
                row = one_run(kind, jobs, in_flight, hold_s)
                rows.append({"round": round_no, **row})
                print(f"{kind:8s} in_flight={in_flight:>3} hold={hold_s:.2f} s: {row['jobs_per_s']:8.0f} jobs/s  "
                      f"dispatch p50 {row['dispatch_p50_ms']:.2f} ms  p99 {row['dispatch_p99_ms']:.2f} ms  "
                      f"(first {in_flight} at once: max {row['initial_burst_max_ms']:.1f} ms)  "
                      f"broker CPU {row['broker_cpu_ms_per_job']:.3f} ms/job  load {row['load_1min']:.2f}", flush=True)
    return rows


def summarize(rows: list[dict], brokers: tuple[str, ...], scenarios=SCENARIOS) -> list[dict]:
    """Per scenario and broker: medians over the rounds."""
    out = []
    for in_flight, hold_s in scenarios:
        for kind in brokers:
            mine = [r for r in rows if (r["in_flight"], r["hold_s"], r["broker"]) == (in_flight, hold_s, kind)]
            if not mine:
                continue
            out.append({"broker": kind, "in_flight": in_flight, "hold_s": hold_s, "rounds": len(mine),
                        **{key: statistics.median(r[key] for r in mine) for key in (
                            "jobs_per_s", "dispatch_p50_ms", "dispatch_p99_ms", "dispatch_max_ms",
                            "broker_cpu_ms_per_job", "client_cpu_ms_per_job", "workers_cpu_ms_per_job")},
                        "dispatch_p99_ms_each": [round(r["dispatch_p99_ms"], 2) for r in mine],
                        "jobs_per_s_each": [round(r["jobs_per_s"]) for r in mine],
                        "broker_cpu_ms_per_job_by_thread": {
                            name: statistics.median(r["broker_cpu_ms_per_job_by_thread"].get(name, 0.0) for r in mine)
                            for name in sorted({n for r in mine for n in r["broker_cpu_ms_per_job_by_thread"]})}})
    return out


def curve_ratios(medians: list[dict]) -> list[dict]:
    """Per scenario, CURVE on / off from the medians: throughput against the
    target, and what the broker's CPU per job became."""
    out = []
    for in_flight, hold_s in CURVE_SCENARIOS:
        off, on = ({m["broker"]: m for m in medians if (m["in_flight"], m["hold_s"]) == (in_flight, hold_s)}.get(k)
                   for k in CURVE_BROKERS)
        if off is None or on is None:
            continue
        ratio = on["jobs_per_s"] / off["jobs_per_s"]
        out.append({"in_flight": in_flight, "hold_s": hold_s, "jobs_per_s_on_over_off": round(ratio, 3),
                    "target": CURVE_TARGET, "met": ratio >= CURVE_TARGET,
                    "broker_cpu_ms_per_job_on_over_off": round(
                        on["broker_cpu_ms_per_job"] / off["broker_cpu_ms_per_job"], 3),
                    "dispatch_p50_ms_on_minus_off": round(on["dispatch_p50_ms"] - off["dispatch_p50_ms"], 3),
                    "dispatch_p99_ms_on_minus_off": round(on["dispatch_p99_ms"] - off["dispatch_p99_ms"], 3)})
    return out


def curve_comparison(jobs: int, rounds: int, json_path: Path) -> None:
    """--curve: CURVE off and on, alternating, at 10 and 100 in flight."""
    global BENCH_KEYS
    with tempfile.TemporaryDirectory() as tmp:
        BENCH_KEYS = BenchKeys(Path(tmp) / "keys")
        result = {
            "machine": machine(),
            "command": " ".join(["python", *sys.argv]),
            "broker_alone": (rows := broker_alone(jobs, rounds, CURVE_BROKERS, CURVE_SCENARIOS)),
            "broker_alone_medians": (medians := summarize(rows, CURVE_BROKERS, CURVE_SCENARIOS)),
            "curve_on_over_off": (ratios := curve_ratios(medians)),
            "load_1min_end": round(os.getloadavg()[0], 2),
        }
    print("medians over the rounds:")
    for m in medians:
        print(f"  {m['broker']:8s} in_flight={m['in_flight']:>3}: {m['jobs_per_s']:7.0f} jobs/s "
              f"(each: {m['jobs_per_s_each']})  p50 {m['dispatch_p50_ms']:.2f} ms  p99 {m['dispatch_p99_ms']:.2f} ms "
              f"(each: {m['dispatch_p99_ms_each']})  broker CPU {m['broker_cpu_ms_per_job']:.3f} ms/job "
              f"{m['broker_cpu_ms_per_job_by_thread']}")
    for r in ratios:
        print(f"  in_flight={r['in_flight']:>3}: CURVE on / off {r['jobs_per_s_on_over_off']:.3f} x jobs/s "
              f"(target {r['target']}: {'met' if r['met'] else 'NOT met'}), broker CPU per job "
              f"{r['broker_cpu_ms_per_job_on_over_off']:.2f} x")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {json_path}")


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
    parser.add_argument("--jobs", type=int, help="jobs per broker-alone run (default 5000, with --curve 20000: "
                        "the saturated runs are over in about a second otherwise)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each scenario per broker, alternating")
    parser.add_argument("--pipeline-jobs", type=int, default=40, help="jobs through the full pipeline")
    parser.add_argument("--json", type=Path, help="where the figures go "
                        "(default results/broker.json, with --curve results/curve.json)")
    parser.add_argument("--baseline-src", help="also run the broker of another checkout (its src/ folder), "
                        "e.g. from `git worktree add /tmp/old COMMIT`, as broker 'baseline'")
    parser.add_argument("--curve", action="store_true", help="only the saturation scenarios at 10 and 100 in "
                        "flight, geomgen with CURVE off and on (issue 10's target); no full pipeline")
    args = parser.parse_args()
    results = Path(__file__).parent / "results"
    if args.curve:
        curve_comparison(args.jobs or 20000, args.rounds, args.json or results / "curve.json")
        return
    args.json = args.json or results / "broker.json"
    args.jobs = args.jobs or 5000
    global BASELINE_SRC
    brokers = BROKERS
    if args.baseline_src:
        BASELINE_SRC = str(Path(args.baseline_src).resolve())
        brokers = ("baseline", *BROKERS)
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "machine": machine(),
            "baseline_src": BASELINE_SRC,
            "baseline_commit": _commit_of(BASELINE_SRC) if BASELINE_SRC else None,
            "broker_alone": (rows := broker_alone(args.jobs, args.rounds, brokers)),
            "broker_alone_medians": (medians := summarize(rows, brokers)),
            "full_pipeline": full_pipeline(args.pipeline_jobs, Path(tmp)),
        }
    print("medians over the rounds:")
    for m in medians:
        print(f"  {m['broker']:8s} in_flight={m['in_flight']:>3} hold={m['hold_s']:.2f} s: "
              f"{m['jobs_per_s']:7.0f} jobs/s  p50 {m['dispatch_p50_ms']:.2f} ms  "
              f"p99 {m['dispatch_p99_ms']:.2f} ms (each: {m['dispatch_p99_ms_each']})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[int(q * (len(sorted_values) - 1))]


def _commit_of(folder: str) -> str | None:
    """The git commit a checkout's folder is at, if it is one."""
    done = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of each of a process's threads, by name: "main" for Python's,
    else the name the thread gave itself (ZeroMQ's I/O thread is "ZMQbg/IO/0");
    threads of one name summed. From /proc's schedstat (Linux), which counts in
    nanoseconds where stat counts in 10 ms ticks."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
            out[name] = out.get(name, 0.0) + int((task / "schedstat").read_text().split()[0]) / 1e9
        except OSError:  # the thread ended in between
            continue
    return out


if __name__ == "__main__":
    main()

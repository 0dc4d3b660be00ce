"""Chaos: a long mixed run while workers, a client and the broker are killed.

Everything runs as a user would run it, as separate processes over loopback
TCP: one broker (`python -m geomgen broker`, a short client liveness window and
admission limits low enough that the flooding client is refused `busy`), GPU
workers for `mesh`, `silhouette` and a slow synthetic backend
(benchmarks/chaos_backend.py, through GEOMGEN_BACKENDS), SDF workers, and four
clients, each a subprocess running `GeometryClient.generate()` over its own
batch and writing one JSON line per result: two ordinary mixed clients, one
flooding (max_in_flight 2000), one SIGKILLed mid-batch. Meanwhile a driver,
on a seeded schedule, SIGKILLs random GPU or SDF workers (and starts
replacements), SIGSTOPs random workers for a few seconds, restarts the broker
once (SIGTERM, then a new one on the same ports) and kills that one client.

Reported: items submitted, results, completed, failed by stage/code, lost
(surviving clients' items without a result: must be 0), duplicated (two
results for one item, or one SDF package written twice: must be 0),
GPU-seconds the slow backend spent for the killed client after it died,
peak broker RSS (/proc/<pid>/statm every 100 ms, both incarnations), wall
time, results/s and the broker's health at the end. Logs of every process stay
in a temporary folder whose path is printed.

    python benchmarks/bench_chaos.py [--jobs 3000] [--seed 1] [--client-liveness-s 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine  # noqa: E402
from geomgen import protocol  # noqa: E402
from geomgen.errors import ProtocolError  # noqa: E402
from geomgen.server import free_base_port  # noqa: E402

SLOW_BACKEND = "slow=benchmarks.chaos_backend:ChaosSlowBackend"
SAMPLES = ROOT / "src" / "geomgen" / "samples"
IMAGES = ("chair.png", "lamp.png", "mug.png", "vase.png")
PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20
# Workers of each kind at the start; a killed one is replaced at once.
FLEET = {"mesh": 2, "silhouette": 1, "slow": 2, "sdf": 2}
# Share of each client's batch, by client tag.
SHARES = {"a": 0.2, "b": 0.2, "flood": 0.48, "killed": 0.12}
# Broker health counters the report keeps (docs/architecture.md, Health).
COUNTERS = ("accepted", "rejected", "completed", "failed", "cancelled", "retried", "sdf_repushed", "stale_results",
            "dropped_messages", "clients_lost", "jobs_dropped", "results_undelivered", "admission")
READY_TIMEOUT_S = 180.0  # workers importing trimesh and pydrake on 2 shared cores
STOP_WAIT_S = 10.0  # a SIGTERMed broker gets this long before SIGKILL


# --- the client role (a subprocess of the driver) --------------------------------


def client_main(spec_path: str) -> int:
    """Run one client's batch through GeometryClient.generate(); one JSON line
    per result, flushed at once (so a killed client leaves what it had), and
    a count of every output file the client library wrote."""
    import geomgen.client as client_module
    from geomgen import GeometryClient, GeometryRequest

    spec = json.loads(Path(spec_path).read_text())
    writes: collections.Counter = collections.Counter()
    write_file, write_package = client_module.write_file, client_module.write_package

    def counted_file(path, data):
        writes[f"glb:{path}"] += 1
        return write_file(path, data)

    def counted_package(folder, files, **kw):
        written = write_package(folder, files, **kw)
        for path in written.values():
            if str(path).endswith(".sdf"):
                writes[f"sdf:{path}"] += 1
        return written

    # Only this subprocess's view of the client library: counts writes, changes nothing.
    client_module.write_file, client_module.write_package = counted_file, counted_package
    requests = [GeometryRequest(**item) for item in spec["requests"]]
    code = 0
    try:
        with open(spec["results"], "a", buffering=1) as results, \
                GeometryClient(spec["address"], max_in_flight=spec["max_in_flight"]) as client:
            for index, result in client.generate(requests):
                results.write(json.dumps({"i": index, "ok": result.ok, "stage": result.stage,
                                          "code": result.error_code, "backend": result.backend,
                                          "attempts": result.attempts, "t": time.time(),
                                          "error": None if result.ok else (result.error or "")[:200]}) + "\n")
    except Exception:  # noqa: BLE001  reported to the driver, which counts the items as lost
        traceback.print_exc()
        code = 1
    finally:
        Path(spec["writes"]).write_text(json.dumps({k: v for k, v in writes.items() if v > 1}
                                                   | {"_total": sum(writes.values())}))
    return code


# --- inputs and batches ---------------------------------------------------------


def make_inputs(folder: Path) -> dict:
    """Small mesh inputs in geomgen's conventions, and one that is not a mesh."""
    import trimesh

    folder.mkdir(parents=True)
    box = trimesh.creation.box(extents=(0.1, 0.2, 0.1))
    box.apply_translation((0, 0.1, 0))
    sphere = trimesh.creation.icosphere(subdivisions=1, radius=0.05)
    sphere.apply_translation((0, 0.05, 0))
    (folder / "box.glb").write_bytes(box.export(file_type="glb"))
    sphere.export(folder / "ball.obj")
    (folder / "broken.glb").write_bytes(b"glTF" + os.urandom(200))
    return {"box": folder / "box.glb", "ball": folder / "ball.obj", "table": SAMPLES / "table.glb",
            "broken": folder / "broken.glb"}


def build_batch(tag: str, count: int, rng: random.Random, inputs: dict, work: Path) -> tuple[list[dict], set[int]]:
    """One client's requests (as GeometryRequest keyword dicts) and the indices
    meant to fail (a corrupt input). Slow-backend items get an input file of
    their own whose name carries the client's tag and the item's index, which
    is what the slow backend's job log records."""
    out = work / "out" / tag
    slow_inputs = work / "in" / tag
    slow_inputs.mkdir(parents=True)
    box = inputs["box"].read_bytes()
    requests, broken = [], set()
    flood = tag == "flood"
    for index in range(count):
        base = {"output_dir": str(out), "output_filename": f"{tag}_{index:05d}", "want_sdf": False,
                "collision": "hull"}
        roll = rng.random()
        if flood:  # cheap and many: mesh without SDF, and short slow jobs
            kind = "mesh" if roll < 0.7 else "slow"
        elif tag == "killed":
            kind = "slow"
        else:
            kind = ("mesh" if roll < 0.45 else "mesh_sdf" if roll < 0.53 else "silhouette" if roll < 0.59
                    else "silhouette_sdf" if roll < 0.62 else "broken" if roll < 0.63 else "slow_sdf" if roll < 0.66
                    else "slow")
        if kind.startswith("mesh"):
            item = {**base, "backend": "mesh", "image_path": str(inputs[rng.choice(("box", "ball", "table"))]),
                    "want_sdf": kind == "mesh_sdf"}
        elif kind.startswith("silhouette"):
            item = {**base, "backend": "silhouette", "image_path": str(SAMPLES / rng.choice(IMAGES)),
                    "want_sdf": kind == "silhouette_sdf"}
        elif kind == "broken":
            item = {**base, "backend": "mesh", "image_path": str(inputs["broken"])}
            broken.add(index)
        else:
            path = slow_inputs / f"{tag}-{index:05d}.glb"
            path.write_bytes(box)
            delay_s = (rng.uniform(0.01, 0.05) if flood else rng.uniform(0.8, 1.6) if tag == "killed"
                       else rng.uniform(0.1, 0.6))
            item = {**base, "backend": "slow", "image_path": str(path), "want_sdf": kind == "slow_sdf",
                    "backend_options": {"delay_s": round(delay_s, 3)}}
        requests.append(item)
    return requests, broken


# --- processes ----------------------------------------------------------------------


@dataclass
class Proc:
    """One process the driver started, in a session of its own so that it and
    whatever it forks can be killed as a group."""

    name: str
    kind: str  # broker, mesh, silhouette, slow, sdf, client
    popen: subprocess.Popen
    log: Path
    started_s: float = field(default_factory=time.monotonic)
    stopped: bool = False  # SIGSTOPped now
    killed: bool = False
    descendants: set = field(default_factory=set)  # child processes seen, for the orphan check and cleanup

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


class Fleet:
    """Starts, signals and always cleans up the benchmark's processes."""

    def __init__(self, work: Path, port: int, env: dict, broker_args: list[str]) -> None:
        self.work, self.port, self.env, self.broker_args = work, port, env, broker_args
        self.procs: list[Proc] = []
        self.counts: collections.Counter = collections.Counter()
        self.broker: Proc | None = None
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def _start(self, name: str, kind: str, argv: list[str]) -> Proc:
        log = self.work / "logs" / f"{name}.log"
        with open(log, "ab") as sink:
            popen = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=str(ROOT), start_new_session=True)
        proc = Proc(name, kind, popen, log)
        self.procs.append(proc)
        return proc

    def start_broker(self) -> Proc:
        self.counts["broker"] += 1
        self.broker = self._start(f"broker-{self.counts['broker']}", "broker",
                                  [sys.executable, "-m", "geomgen", "broker", "--host", "127.0.0.1",
                                   "--port", str(self.port), "--no-cache", *self.broker_args, "-v"])
        return self.broker

    def start_worker(self, kind: str) -> Proc:
        self.counts[kind] += 1
        broker = f"127.0.0.1:{self.port}"
        if kind == "sdf":
            argv = [sys.executable, "-m", "geomgen", "sdf-worker", "--broker", broker, "--procs", "1"]
        else:
            argv = [sys.executable, "-m", "geomgen", "gpu-worker", "--backend", kind, "--broker", broker]
        name = f"{kind}-{self.counts[kind]}"
        return self._start(name, kind, [*argv, "--worker-id", name, "-v"])

    def start_client(self, tag: str, spec: Path) -> Proc:
        return self._start(f"client-{tag}", "client", [sys.executable, str(Path(__file__).resolve()), "--client",
                                                        str(spec)])

    def workers(self) -> list[Proc]:
        return [p for p in self.procs if p.kind not in ("broker", "client") and not p.killed and p.alive()]

    def signal(self, proc: Proc, sig: int) -> None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    def cleanup(self) -> None:
        """SIGKILL every process started here, its process group, and every
        descendant seen (backend processes and conversion children call setsid,
        so they are in groups of their own)."""
        for proc in self.procs:
            if proc.alive():
                proc.descendants |= set(descendants(proc.pid))
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            for pid in proc.descendants:
                if is_ours(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process now."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> list[int]:
    """Live (not zombie) descendants of ``pid``."""
    table = _proc_table()
    children = collections.defaultdict(list)
    for child, (parent, state) in table.items():
        if state != "Z":
            children[parent].append(child)
    found, todo = [], [pid]
    while todo:
        for child in children[todo.pop()]:
            found.append(child)
            todo.append(child)
    return found


def is_ours(pid: int) -> bool:
    """Still a live Python process of geomgen's (the pid was not reused)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return state != "Z" and b"python" in cmdline


class Sampler(threading.Thread):
    """The broker's RSS every 100 ms, and its health once a second (a raw
    DEALER, as bench_flood does), across broker restarts."""

    def __init__(self, fleet: Fleet, address: str) -> None:
        super().__init__(daemon=True)
        self.fleet, self.address = fleet, address
        self.peak_mib: dict[int, float] = {}  # broker incarnation -> peak RSS
        self.last_stats: dict[int, dict] = {}  # broker incarnation -> its last health answer
        self.health_ms: list[float] = []
        self.health_at: list[float] = []  # when each timed query was sent (monotonic)
        self.health_missed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        query = protocol.encode(protocol.HealthQuery())
        next_rss = next_health = time.monotonic()
        pending: tuple[int, float] | None = None  # (incarnation, sent at)
        while not self.stop.is_set():
            # Wait on the socket itself, so an answer is timed when it arrives.
            wake = min(next_rss, next_health if pending is None else pending[1] + 5.0)
            if sock.poll(max(0, int((wake - time.monotonic()) * 1000))):
                frames = sock.recv_multipart()
                try:
                    _, reply = protocol.decode(frames, protocol.BROKER_TO_CLIENT)
                except ProtocolError:
                    continue  # not a health answer; nothing else is ours
                if pending is not None and hasattr(reply, "stats"):
                    self.health_ms.append((time.monotonic() - pending[1]) * 1e3)
                    self.health_at.append(pending[1])
                    self.last_stats[pending[0]] = dict(reply.stats)
                    pending = None
                continue
            now = time.monotonic()
            broker, incarnation = self.fleet.broker, self.fleet.counts["broker"]
            if now >= next_rss:
                next_rss = now + 0.1
                try:
                    with open(f"/proc/{broker.pid}/statm") as statm:
                        rss = int(statm.read().split()[1]) * PAGE_MIB
                    self.peak_mib[incarnation] = max(self.peak_mib.get(incarnation, 0.0), rss)
                except (OSError, AttributeError):
                    pass  # between two brokers
            if pending is not None and now - pending[1] > 5.0:
                self.health_missed += 1
                pending = None
            if pending is None and now >= next_health:
                next_health = now + 1.0
                if broker is not None and broker.alive():
                    try:
                        sock.send_multipart(query, flags=zmq.NOBLOCK)
                        pending = (incarnation, now)
                    except zmq.Again:
                        pass
        sock.close(0)


def wait_ready(address: str, want: dict, timeout_s: float) -> dict:
    """Block until the broker reports the wanted live workers, or raise."""
    from geomgen import GeometryClient

    deadline = time.monotonic() + timeout_s
    stats: dict = {}
    with GeometryClient(address, timeout_s=5.0) as client:
        while time.monotonic() < deadline:
            try:
                stats = client.health(timeout_s=2.0)
            except Exception:  # noqa: BLE001  broker still starting
                time.sleep(0.5)
                continue
            backends = stats.get("backends", {})
            ok = all(backends.get(k, {}).get("alive", 0) >= n for k, n in want.items() if k != "sdf")
            if ok and len(stats.get("sdf_workers", {}) or []) >= want.get("sdf", 0):
                return stats
            time.sleep(0.5)
    raise RuntimeError(f"workers not ready after {timeout_s:g} s: {json.dumps(stats)[:2000]}")


# --- the chaos schedule -------------------------------------------------------------


def schedule(rng: random.Random, horizon_s: float) -> list[tuple[float, str, float]]:
    """(time after start, action, parameter) on a seeded schedule: worker kills
    every 8-16 s, worker stops (2-8 s long) every 6-14 s, one client kill at
    12-20 s, one broker restart at 35-55 s."""
    events = [(rng.uniform(12, 20), "kill_client", 0.0), (rng.uniform(35, 55), "restart_broker", 0.0)]
    t = 8.0
    while t < horizon_s:
        events.append((t, "kill_worker", 0.0))
        t += rng.uniform(8, 16)
    t = 5.0
    while t < horizon_s:
        events.append((t, "stop_worker", rng.uniform(2, 8)))
        t += rng.uniform(6, 14)
    return sorted(events)


# --- accounting ---------------------------------------------------------------------


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass  # a line cut by SIGKILL
    return lines


def wasted_gpu_s(job_log: Path, tag: str, killed_at: float | None, window_s: float) -> dict:
    """Slow-backend time spent on the killed client's jobs that started after it
    died; a job without an end line (its worker was killed) counts up to the
    end of the run. Also split at the end of the liveness window (+1 s for the
    broker's tick and the worker's heartbeat)."""
    starts: dict[tuple[str, float], dict] = {}
    ends: dict[tuple[str, float], float] = {}
    runs_per_input: collections.Counter = collections.Counter()
    for record in read_lines(job_log):
        if record["event"] == "start":
            starts[(record["input"], record["t"])] = record
            runs_per_input[record["input"]] += 1
        else:
            ends[(record["input"], record["start"])] = record["t"]
    last = max([*ends.values(), *(k[1] for k in starts)], default=0.0)
    report = {"jobs_started_after_kill": 0, "seconds_after_kill": 0.0,
              "jobs_started_after_window": 0, "seconds_after_window": 0.0, "unfinished_jobs": 0}
    if killed_at is not None:
        for (name, start), record in starts.items():
            if not name.startswith(f"{tag}-") or start < killed_at:
                continue
            end = ends.get((name, start))
            if end is None:
                report["unfinished_jobs"] += 1
                end = last
            report["jobs_started_after_kill"] += 1
            report["seconds_after_kill"] += end - start
            if start > killed_at + window_s + 1.0:
                report["jobs_started_after_window"] += 1
                report["seconds_after_window"] += end - start
    report["seconds_after_kill"] = round(report["seconds_after_kill"], 2)
    report["seconds_after_window"] = round(report["seconds_after_window"], 2)
    report["slow_jobs_started"] = sum(runs_per_input.values())
    report["slow_inputs_run_more_than_once"] = sum(1 for n in runs_per_input.values() if n > 1)
    return report


def account(batches: dict, killed_tag: str, work: Path, client_codes: dict) -> dict:
    """Per item, from the clients' result lines and write counts."""
    failed: collections.Counter = collections.Counter()
    report = {"submitted": 0, "results": 0, "completed": 0, "failed": 0, "failed_expected_bad_input": 0,
              "lost": 0, "duplicated": 0, "killed_client_no_result_expected": 0, "glb_rewritten": 0,
              "sdf_written_twice": 0, "clients": {}}
    lost_examples, duplicate_examples = [], []
    for tag, (requests, broken) in batches.items():
        lines = [r for r in read_lines(work / f"results-{tag}.jsonl") if "i" in r]
        per_index = collections.Counter(r["i"] for r in lines)
        first = {}
        for r in lines:
            first.setdefault(r["i"], r)
        writes_path = work / f"writes-{tag}.json"
        writes = json.loads(writes_path.read_text()) if writes_path.exists() else {}
        missing = [i for i in range(len(requests)) if i not in per_index]
        dups = [i for i, n in per_index.items() if n > 1]
        sdf_twice = [k for k in writes if k.startswith("sdf:")]
        glb_twice = [k for k in writes if k.startswith("glb:")]
        ok = sum(1 for r in first.values() if r["ok"])
        for r in first.values():
            if not r["ok"]:
                if r["i"] in broken:
                    report["failed_expected_bad_input"] += 1
                else:
                    failed[f"{r['stage']}/{r['code']}"] += 1
        report["submitted"] += len(requests)
        report["results"] += len(first)
        report["completed"] += ok
        report["failed"] += len(first) - ok
        report["duplicated"] += len(dups) + len(sdf_twice)
        report["sdf_written_twice"] += len(sdf_twice)
        report["glb_rewritten"] += len(glb_twice)
        duplicate_examples += [f"{tag}#{i}" for i in dups[:5]] + sdf_twice[:5]
        if tag == killed_tag:
            report["killed_client_no_result_expected"] += len(missing)
        else:
            report["lost"] += len(missing)
            lost_examples += [f"{tag}#{i}" for i in missing[:10]]
        report["clients"][tag] = {"items": len(requests), "results": len(first), "completed": ok,
                                  "missing": len(missing), "duplicated": len(dups), "exit_code": client_codes[tag],
                                  "max_attempts": max((r.get("attempts") or 0 for r in first.values()), default=0)}
    report["failed_by_code"] = dict(failed.most_common())
    report["lost_examples"] = lost_examples
    report["duplicate_examples"] = duplicate_examples
    return report


def log_summary(path: Path, context: int = 14) -> dict:
    """Counts of a log's WARNING and ERROR lines, and the first traceback (or
    ERROR line) with ``context`` lines after it, as evidence for the report."""
    if not path.exists():
        return {}
    lines = path.read_text(errors="replace").splitlines()
    first = next((i for i, line in enumerate(lines) if "Traceback" in line or " ERROR " in line
                  or " CRITICAL " in line), None)
    return {"warnings": sum(" WARNING " in line for line in lines),
            "errors": sum(" ERROR " in line or " CRITICAL " in line for line in lines),
            "first_error": [] if first is None else lines[max(0, first - 1):first + context]}


def source_state() -> dict:
    """The commit and the uncommitted source files now: other people edit this
    tree while benchmarks run, and a process started mid-edit runs a mix."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_src": git("status", "--porcelain", "src").splitlines()}


def changed_since(wall_time: float) -> list[str]:
    """Source files of geomgen modified after ``wall_time`` (time.time())."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "src" / "geomgen").rglob("*.py")
                  if p.stat().st_mtime > wall_time)


# --- the driver ---------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="items over all clients")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--client-liveness-s", type=float, default=3.0, help="the broker's --client-liveness")
    parser.add_argument("--max-jobs", type=int, default=600, help="the broker's --max-jobs")
    parser.add_argument("--max-client-jobs", type=int, default=250, help="the broker's --max-client-jobs")
    parser.add_argument("--max-run-s", type=float, default=900.0, help="give up (and report a hang) after this")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the client role, run by the driver
    args = parser.parse_args()
    if args.client:
        sys.exit(client_main(args.client))

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="geomgen-chaos-"))
    print(f"logs and outputs under {work}", file=sys.stderr, flush=True)
    port = free_base_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "GEOMGEN_BACKENDS": SLOW_BACKEND, "CHAOS_JOB_LOG": str(work / "slow-jobs.jsonl"),
           "PYTHONUNBUFFERED": "1"}
    os.environ.update(GEOMGEN_BACKENDS=SLOW_BACKEND)  # this process's own client reads the registry too
    broker_args = ["--client-liveness", str(args.client_liveness_s), "--max-jobs", str(args.max_jobs),
                   "--max-client-jobs", str(args.max_client_jobs)]
    inputs = make_inputs(work / "inputs")
    counts = {tag: max(4, round(args.jobs * share)) for tag, share in SHARES.items()}
    batches = {tag: build_batch(tag, n, rng, inputs, work) for tag, n in counts.items()}
    plan = schedule(random.Random(args.seed + 1), args.max_run_s)
    target_rng = random.Random(args.seed + 2)

    source, run_started = source_state(), time.time()
    fleet = Fleet(work, port, env, broker_args)
    sampler = Sampler(fleet, address)
    events: list[dict] = []
    clients: dict[str, Proc] = {}
    killed_at: float | None = None
    restart: dict = {}
    timed_out = False
    try:
        fleet.start_broker()
        for kind, n in FLEET.items():
            for _ in range(n):
                fleet.start_worker(kind)
        sampler.start()
        started = time.monotonic()
        wait_ready(address, FLEET, READY_TIMEOUT_S)
        ready_s = time.monotonic() - started
        print(f"fleet ready in {ready_s:.1f} s; broker log {fleet.broker.log}", file=sys.stderr, flush=True)

        for tag, (requests, _) in batches.items():
            spec = work / f"spec-{tag}.json"
            spec.write_text(json.dumps({"address": address, "requests": requests,
                                        "max_in_flight": 2000 if tag == "flood" else 64,
                                        "results": str(work / f"results-{tag}.jsonl"),
                                        "writes": str(work / f"writes-{tag}.json")}))
            clients[tag] = fleet.start_client(tag, spec)
        t0 = time.monotonic()
        resume: list[tuple[float, Proc]] = []  # (when, stopped worker)
        pending = list(plan)

        def note(action: str, **facts) -> None:
            event = {"t_s": round(time.monotonic() - t0, 2), "action": action, **facts}
            events.append(event)
            print(json.dumps(event), file=sys.stderr, flush=True)

        while True:
            now = time.monotonic()
            survivors = [p for tag, p in clients.items() if tag != "killed" or killed_at is None]
            if all(not p.alive() for p in survivors):
                break
            if now - t0 > args.max_run_s:
                timed_out = True
                note("gave_up", still_running=[p.name for p in survivors if p.alive()])
                break
            for when, proc in [r for r in resume if r[0] <= now]:
                fleet.signal(proc, signal.SIGCONT)
                proc.stopped = False
                resume.remove((when, proc))
                note("sigcont", worker=proc.name, pid=proc.pid)
            while pending and pending[0][0] <= now - t0:
                _, action, parameter = pending.pop(0)
                if action == "kill_client":
                    victim = clients["killed"]
                    if victim.alive():
                        killed_at = time.time()
                        os.killpg(victim.pid, signal.SIGKILL)
                        victim.killed = True
                        note("kill_client", client=victim.name, pid=victim.pid,
                             results_so_far=len(read_lines(work / "results-killed.jsonl")))
                elif action == "restart_broker":
                    old = fleet.broker
                    down = time.monotonic()
                    fleet.signal(old, signal.SIGTERM)
                    try:
                        exit_code = old.popen.wait(timeout=STOP_WAIT_S)
                    except subprocess.TimeoutExpired:
                        os.killpg(old.pid, signal.SIGKILL)
                        exit_code = f"did not stop in {STOP_WAIT_S:g} s after SIGTERM; SIGKILLed"
                    new = fleet.start_broker()
                    restart = {"old_pid": old.pid, "old_exit_code": exit_code, "new_pid": new.pid,
                               "stop_s": round(time.monotonic() - down, 2)}
                    note("restart_broker", **restart)
                elif action == "kill_worker":
                    candidates = [p for p in fleet.workers() if not p.stopped]
                    if candidates:
                        victim = target_rng.choice(candidates)
                        victim.descendants |= set(descendants(victim.pid))
                        fleet.signal(victim, signal.SIGKILL)
                        victim.killed = True
                        replacement = fleet.start_worker(victim.kind)
                        note("sigkill_worker", worker=victim.name, pid=victim.pid, replacement=replacement.name)
                elif action == "stop_worker":
                    candidates = [p for p in fleet.workers() if not p.stopped]
                    if candidates:
                        victim = target_rng.choice(candidates)
                        fleet.signal(victim, signal.SIGSTOP)
                        victim.stopped = True
                        resume.append((now + parameter, victim))
                        note("sigstop_worker", worker=victim.name, pid=victim.pid, for_s=round(parameter, 2))
            time.sleep(0.1)
        wall_s = time.monotonic() - t0
        for _, proc in resume:
            fleet.signal(proc, signal.SIGCONT)

        from geomgen import GeometryClient

        try:
            with GeometryClient(address, timeout_s=5.0) as client:
                health = client.health(timeout_s=5.0)
        except Exception as exc:  # noqa: BLE001  reported, not raised: the report is the point
            health = {"error": repr(exc)}
        # Children of SIGKILLed workers (a backend process, a forkserver, a
        # conversion child) that outlived them.
        orphans = {p.name: [pid for pid in p.descendants if is_ours(pid)] for p in fleet.procs
                   if p.kind != "client" and p.killed}
        orphans = {k: v for k, v in orphans.items() if v}
        broker_alive = fleet.broker.alive()
        client_codes = {tag: p.popen.poll() for tag, p in clients.items()}
    finally:
        sampler.stop.set()
        fleet.cleanup()
        sampler.join(timeout=2)

    items = account(batches, "killed", work, client_codes)
    source["changed_during_run"] = changed_since(run_started)
    broker_logs = [p.log for p in fleet.procs if p.kind == "broker"]
    worker_errors = {p.name: log_summary(p.log, 8) for p in fleet.procs if p.kind != "broker"}
    health_ms = sorted(sampler.health_ms)
    report = {
        "benchmark": "chaos",
        "machine": machine(),
        "seed": args.seed,
        "source": source,
        "settings": {"jobs": args.jobs, "clients": counts, "fleet": FLEET, "broker_args": broker_args,
                     "client_liveness_window_s": args.client_liveness_s, "flood_max_in_flight": 2000},
        "wall_s": round(wall_s, 1),
        "fleet_ready_s": round(ready_s, 1),
        "results_per_s": round(items["results"] / wall_s, 1) if wall_s else None,
        "timed_out": timed_out,
        "items": items,
        # Items re-sent to the second broker count in both; its first count is the last sample before SIGTERM.
        "accepted_by_broker": {"incarnation_1": sampler.last_stats.get(1, {}).get("accepted"),
                               "incarnation_2": health.get("accepted")},
        "gpu_seconds_wasted_on_dead_client": wasted_gpu_s(work / "slow-jobs.jsonl", "killed", killed_at,
                                                          args.client_liveness_s),
        "broker": {"peak_rss_mib": {f"incarnation_{k}": round(v, 1) for k, v in sampler.peak_mib.items()},
                   "restart": restart, "alive_at_end": broker_alive,
                   "health_answers": len(sampler.health_ms), "health_missed": sampler.health_missed,
                   "health_ms": {"p50": round(health_ms[len(health_ms) // 2], 1),
                                 "p99": round(health_ms[int(len(health_ms) * 0.99)], 1),
                                 "max": round(health_ms[-1], 1)} if health_ms else None,
                   "health_over_250_ms_at_t_s": [[round(at - t0, 1), round(ms)] for at, ms in
                                                 zip(sampler.health_at, sampler.health_ms) if ms > 250][:20],
                   "counters_before_restart": {k: sampler.last_stats.get(1, {}).get(k) for k in COUNTERS},
                   "logs": [str(p) for p in broker_logs]},
        "health_at_end": {k: health.get(k) for k in (*COUNTERS, "in_flight", "queue_size", "sdf_queued",
                                                    "sdf_in_flight", "jobs", "error")},
        "health_backends_at_end": {k: {f: v.get(f) for f in ("alive", "busy", "idle", "lost", "registrations")}
                                   for k, v in (health.get("backends") or {}).items()},
        "chaos": events,
        "orphaned_processes_of_killed_workers": orphans,
        "broker_logs": {p.name: log_summary(p.log) for p in fleet.procs if p.kind == "broker"},
        "worker_log_errors": {k: v for k, v in worker_errors.items() if v.get("errors")},
        "work_dir": str(work),
    }
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    for tag in batches:  # outputs are big and checked already; the logs stay
        subprocess.run(["rm", "-rf", str(work / "out" / tag), str(work / "in" / tag)], check=False)


if __name__ == "__main__":
    main()

"""Workers stopped the way a batch system stops a job: SIGTERM to every process
of it at once (Slurm's scancel or time limit with proctrack/linuxproc or
cgroup), the backend and conversion children included. A job a worker held
either finishes or goes back to the broker; no item fails or is lost."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from geomgen import GeometryClient, GeometryRequest
from tests.conftest import REPO, wait_for
from tests.plugins import box_glb

ENV = {"GEOMGEN_BACKENDS": "slow=tests.plugins:SlowBackend", "PYTHONPATH": str(REPO)}
SLOW_CONVERT = {**ENV, "GEOMGEN_CONVERT_FN": "tests.test_sigterm:slow_convert"}


def slow_convert(data: bytes, input_name: str, out_dir: Path, name: str, options):
    """The real conversion after 3 s, so that a test can stop a worker in the middle of it."""
    from geomgen.geometry.convert import convert_mesh

    threading.Event().wait(3.0)
    return convert_mesh(data, input_name, out_dir, name, options)


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += tree(child)
    return found


def sigterm_tree(pid: int) -> int:
    """SIGTERM ``pid`` and all its descendants, as slurmd does; returns how many were signalled."""
    pids = tree(pid)
    for each in pids:
        try:
            os.kill(each, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return len(pids)


def _health(endpoints) -> dict:
    with GeometryClient(endpoints.client, timeout_s=30) as client:
        return client.health()


def _busy_worker(endpoints, pids_by_id: dict[str, int]) -> int | None:
    for worker in _health(endpoints).get("workers", []):
        if worker.get("busy") and worker.get("worker_id") in pids_by_id:
            return pids_by_id[worker["worker_id"]]
    return None


def _run_batch(endpoints, requests, results: list) -> threading.Thread:
    def run() -> None:
        with GeometryClient(endpoints.client, timeout_s=120) as client:
            results.extend(result for _, result in client.generate(requests))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_gpu_worker_hands_back_its_job_when_its_whole_process_tree_gets_sigterm(procs, endpoints, tmp_path):
    """Two workers of a 6 s backend (longer than the worker's 5 s stop grace);
    the busy one and its backend process get SIGTERM together: it exits 0, its
    job is handed back and the other worker completes it: both items ok."""
    procs.start("broker", "--host", "127.0.0.1", "--port", str(endpoints.client_port), env=ENV)
    workers = {}
    for name in ("a", "b"):
        proc = procs.start("gpu-worker", "--backend", "slow", "--broker", endpoints.client, "--worker-id", name,
                           "--backend-option", "delay_s=6", env=ENV, name=f"gpu-worker-{name}")
        workers[name] = proc
    wait_for(lambda: _health(endpoints)["backends"].get("slow", {}).get("alive", 0) == 2, timeout_s=60,
             what="two slow workers")
    mesh = tmp_path / "box.glb"
    mesh.write_bytes(box_glb())
    requests = [GeometryRequest(image_path=mesh, output_dir=tmp_path / "out", output_filename=f"box_{i}",
                                backend="slow", want_sdf=False) for i in range(2)]
    results: list = []
    thread = _run_batch(endpoints, requests, results)
    busy_pid = wait_for(lambda: _busy_worker(endpoints, {n: p.pid for n, p in workers.items()}), timeout_s=30,
                        what="a busy worker")
    victim = next(proc for proc in workers.values() if proc.pid == busy_pid)
    assert sigterm_tree(victim.pid) >= 2  # the worker and at least its backend process
    assert victim.wait(timeout=30) == 0
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert sorted(r.index for r in results) == [0, 1]
    assert all(r.ok for r in results), [(r.error_code, r.error) for r in results]
    stats = _health(endpoints)
    assert stats["completed"] == 2 and stats["failed"] == 0
    assert stats["retried"] == 1  # the job the stopped worker held ran again on the other


def test_sdf_worker_leaves_its_conversions_to_the_broker_when_its_whole_process_tree_gets_sigterm(
        procs, endpoints, tmp_path):
    """An SDF worker whose conversion children get SIGTERM with it: the
    conversions are re-pushed to a second SDF worker, every item is ok."""
    procs.start("broker", "--host", "127.0.0.1", "--port", str(endpoints.client_port), "--sdf-lease", "2", env=ENV)
    procs.start("gpu-worker", "--backend", "slow", "--broker", endpoints.client, "--backend-option", "delay_s=0",
                env=ENV)
    first = procs.start("sdf-worker", "--broker", endpoints.client, "--procs", "2", "--worker-id", "first",
                        env=SLOW_CONVERT, name="sdf-first")
    wait_for(lambda: (lambda s: s["backends"].get("slow", {}).get("alive", 0) == 1 and len(s["sdf_workers"]) == 1)(
        _health(endpoints)), timeout_s=60, what="a worker and an SDF worker")
    mesh = tmp_path / "box.glb"
    mesh.write_bytes(box_glb())
    requests = [GeometryRequest(image_path=mesh, output_dir=tmp_path / "out", output_filename=f"box_{i}",
                                backend="slow", collision="hull") for i in range(2)]
    results: list = []
    thread = _run_batch(endpoints, requests, results)
    wait_for(lambda: _health(endpoints)["sdf_free"] < 2, timeout_s=30, what="a conversion to start")
    assert sigterm_tree(first.pid) >= 2
    assert first.wait(timeout=30) == 0
    procs.start("sdf-worker", "--broker", endpoints.client, "--procs", "2", "--worker-id", "second",
                env=SLOW_CONVERT, name="sdf-second")
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert sorted(r.index for r in results) == [0, 1]
    assert all(r.ok for r in results), [(r.stage, r.error_code, r.error) for r in results]

"""The broker's result cache through real processes: a broker with a cache
folder, GPU workers (the test backends of tests/plugins.py) and an SDF worker
over loopback TCP, and the Python client. That a hit costs no worker time is
read from the broker's health counts, which only a worker's result moves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geomgen import GeometryClient, GeometryRequest
from tests.conftest import REPO, wait_for

PLUGINS = "instant=tests.plugins:InstantBackend,failing=tests.plugins:FailingBackend"
ENV = {"GEOMGEN_BACKENDS": PLUGINS, "PYTHONPATH": str(REPO)}
SAMPLES = REPO / "src" / "geomgen" / "samples"


class CachedStack:
    """A broker with a result cache in ``cache_dir``, and its workers."""

    def __init__(self, procs, endpoints, cache_dir: Path):
        self.procs, self.endpoints, self.cache_dir = procs, endpoints, cache_dir
        self.address = f"127.0.0.1:{endpoints.client_port}"
        self.broker = None

    def start_broker(self, *extra: str):
        self.broker = self.procs.start("broker", "--host", "127.0.0.1", "--port", str(self.endpoints.client_port),
                                       "--heartbeat-interval", "0.2", "--cache-dir", str(self.cache_dir), *extra,
                                       env=ENV)
        return self.broker

    def gpu_worker(self, backend: str = "instant", *options: str):
        args = ["gpu-worker", "--backend", backend, "--broker", self.address, "--heartbeat-interval", "0.2"]
        for option in options:
            args += ["--backend-option", option]
        return self.procs.start(*args, env=ENV, name=f"gpu-{backend}")

    def sdf_worker(self):
        return self.procs.start("sdf-worker", "--broker", self.address, "--procs", "1", "--heartbeat-interval", "0.2",
                                env=ENV)

    def client(self) -> GeometryClient:
        return GeometryClient(address=self.endpoints.client, timeout_s=60.0)

    def wait_ready(self, client: GeometryClient, backends=("instant",), sdf: bool = True) -> dict:
        def ready():
            stats = client.health()
            alive = all(stats["backends"].get(b, {}).get("alive", 0) >= 1 for b in backends)
            return stats if alive and (not sdf or stats.get("sdf_slots", 0) >= 1) else None

        return wait_for(ready, timeout_s=90, interval_s=0.2, what=f"workers {backends}")


@pytest.fixture
def stack(procs, endpoints, tmp_path):
    return CachedStack(procs, endpoints, tmp_path / "cache")


def one(client: GeometryClient, request: GeometryRequest):
    results = dict(client.generate([request]))
    assert list(results) == [0]
    return results[0]


def request_for(tmp_path: Path, input_path: Path, out: str, name: str = "thing", **kw) -> GeometryRequest:
    kw.setdefault("collision", "hull")  # decomposition has its own tests; keep these fast
    return GeometryRequest(image_path=str(input_path), output_dir=str(tmp_path / out), output_filename=name,
                           backend=kw.pop("backend", "instant"), **kw)


def mesh_file(tmp_path: Path, name: str, subdivisions: int = 2, radius_m: float = 0.1) -> Path:
    """A GLB of an icosphere (the instant backend returns a GLB input as is)."""
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius_m)
    sphere.apply_translation([0.0, radius_m, 0.0])
    path = tmp_path / name
    path.write_bytes(sphere.export(file_type="glb"))
    return path


def obj_file(tmp_path: Path, name: str, comment: str) -> Path:
    """An OBJ triangle; the instant backend turns any non-GLB input into the same box, so two
    OBJ files that differ (here, by a comment) give two GPU jobs with one GLB."""
    path = tmp_path / name
    path.write_text(f"# {comment}\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    return path


def package_bytes(result) -> dict[str, bytes]:
    root = result.package_dir
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def settled(client: GeometryClient) -> dict:
    """The cache's health map once its writer thread has stored every queued result."""
    def written() -> dict | None:
        cache = client.health()["cache"]
        return cache if cache["pending_writes"] == 0 else None

    return wait_for(written, timeout_s=60, what="the cache's writes")


def worker_counts(stats: dict) -> tuple[int, int]:
    """(GLBs the instant workers returned, packages the SDF workers returned), as the broker counted them."""
    gpu = stats["backends"].get("instant", {}).get("completed", 0) + stats["backends"].get("instant", {}).get("failed", 0)
    sdf = sum(w["completed"] + w["failed"] for w in stats["sdf_workers"])
    return gpu, sdf


def test_a_hit_is_answered_without_any_worker(stack, tmp_path):
    stack.start_broker()
    stack.gpu_worker()
    stack.sdf_worker()
    source = mesh_file(tmp_path, "ball.glb")
    with stack.client() as client:
        stack.wait_ready(client)
        first = one(client, request_for(tmp_path, source, "first"))
        assert first.ok, first.error
        assert not first.cached and first.info["cache"] == {"generate": "miss", "convert": "miss"}
        assert worker_counts(client.health()) == (1, 1)

        second = one(client, request_for(tmp_path, source, "second"))
        assert second.ok, second.error
        assert second.cached and second.attempts == 0
        assert second.info["cache"] == {"generate": "hit", "convert": "hit"}
        assert second.glb_path.read_bytes() == first.glb_path.read_bytes() == source.read_bytes()
        assert package_bytes(second) == package_bytes(first)
        assert second.info.get("mass_kg") == first.info.get("mass_kg")
        stats = client.health()
        assert worker_counts(stats) == (1, 1), "a worker saw the cached request"
        cache = settled(client)
        assert cache["enabled"] and cache["generate_hits"] == 1 and cache["convert_hits"] == 1
        assert cache["generate_misses"] == 1 and cache["convert_misses"] == 1
        assert cache["entries"] == 2 and cache["bytes"] > len(source.read_bytes())
        # The store's own count of misses has one more: the GPU lookup is made again at dispatch.
        assert cache["hits"] == 2 and cache["misses"] == 3
    # geomgen health shows it too
    shown = subprocess.run([sys.executable, "-m", "geomgen", "health", "--broker", stack.address],
                           capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "result cache: 2 hits, 2 misses; 2 entries" in shown.stdout


def test_glb_only_hit_and_failures_are_never_cached(stack, tmp_path):
    stack.start_broker()
    stack.gpu_worker()
    stack.gpu_worker("failing")
    source = mesh_file(tmp_path, "ball.glb")
    with stack.client() as client:
        stack.wait_ready(client, ("instant", "failing"), sdf=False)
        first = one(client, request_for(tmp_path, source, "a", want_sdf=False))
        second = one(client, request_for(tmp_path, source, "b", want_sdf=False))
        assert first.ok and not first.cached
        assert second.ok and second.cached and second.info["cache"] == {"generate": "hit"}
        assert second.glb_path.read_bytes() == source.read_bytes()
        for out in ("f1", "f2"):
            failed = one(client, request_for(tmp_path, source, out, backend="failing", want_sdf=False))
            assert not failed.ok and not failed.cached
        stats = client.health()
        assert stats["backends"]["failing"]["failed"] == 2, "the second failure must run again"
        assert settled(client)["entries"] == 1


def test_fresh_computes_again_and_refreshes_the_cache(stack, tmp_path):
    stack.start_broker()
    stack.gpu_worker()
    stack.sdf_worker()
    source = mesh_file(tmp_path, "ball.glb")
    with stack.client() as client:
        stack.wait_ready(client)
        assert one(client, request_for(tmp_path, source, "a")).ok
        fresh = one(client, request_for(tmp_path, source, "b", fresh=True))
        assert fresh.ok and not fresh.cached
        assert fresh.info["cache"] == {"generate": "fresh", "convert": "fresh"}
        assert worker_counts(client.health()) == (2, 2)
        cache = settled(client)
        assert cache["fresh"] == 1 and cache["writes"] == 4  # stored again
        again = one(client, request_for(tmp_path, source, "c"))
        assert again.ok and again.cached
        assert worker_counts(client.health()) == (2, 2)


def test_other_options_or_another_model_miss(stack, tmp_path):
    """Changing a conversion option misses the conversion cache only; a backend
    option misses the GPU cache; a worker with other worker-wide options
    (another model identity) misses it too, and the same GLB then hits the
    conversion cache: the SDF worker never sees it."""
    stack.start_broker()
    worker = stack.gpu_worker()
    stack.sdf_worker()
    with stack.client() as client:
        stack.wait_ready(client)
        box_a = obj_file(tmp_path, "a.obj", "first")
        assert one(client, request_for(tmp_path, box_a, "base")).ok
        assert worker_counts(client.health()) == (1, 1)

        heavier = one(client, request_for(tmp_path, box_a, "mass", mass_kg=3.0))
        assert heavier.ok and not heavier.cached
        assert heavier.info["cache"] == {"generate": "hit", "convert": "miss"}
        assert heavier.info["mass_kg"] == pytest.approx(3.0)
        assert worker_counts(client.health()) == (1, 2)

        slower = one(client, request_for(tmp_path, box_a, "opt", backend_options={"delay_s": 0.01}))
        assert slower.ok and slower.info["cache"] == {"generate": "miss", "convert": "hit"}
        assert worker_counts(client.health()) == (2, 2)

        other_input = one(client, request_for(tmp_path, obj_file(tmp_path, "b.obj", "second"), "other"))
        assert other_input.ok and other_input.info["cache"] == {"generate": "miss", "convert": "hit"}
        assert worker_counts(client.health()) == (3, 2), "the SDF worker saw a cached conversion"

        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        wait_for(lambda: client.health()["backends"]["instant"]["alive"] == 0, timeout_s=30, what="worker gone")
        stack.gpu_worker("instant", "delay_s=0")  # same backend, other worker-wide options: another identity
        stack.wait_ready(client)
        other_model = one(client, request_for(tmp_path, box_a, "model"))
        assert other_model.ok and other_model.info["cache"] == {"generate": "miss", "convert": "hit"}
        assert not other_model.cached
        assert worker_counts(client.health()) == (4, 2)


def test_a_restarted_broker_answers_from_its_warm_cache(stack, tmp_path):
    stack.start_broker()
    stack.gpu_worker()
    stack.sdf_worker()
    source = mesh_file(tmp_path, "ball.glb")
    with stack.client() as client:
        stack.wait_ready(client)
        first = one(client, request_for(tmp_path, source, "before"))
        assert first.ok and not first.cached
    stack.broker.send_signal(signal.SIGTERM)
    assert stack.broker.wait(timeout=30) == 0
    stack.start_broker()
    with stack.client() as client:
        stack.wait_ready(client)  # the workers reconnect: their model identity is known again
        after = one(client, request_for(tmp_path, source, "after"))
        assert after.ok and after.cached, after.info.get("cache")
        assert package_bytes(after) == package_bytes(first)
        stats = client.health()
        assert worker_counts(stats) == (0, 0)
        assert stats["cache"]["entries"] == 2


def test_a_request_queued_before_any_worker_is_looked_up_at_dispatch(stack, tmp_path):
    """A broker restarted with a warm cache, asked before a worker told it the
    model's identity: the request waits, and is answered from the cache the
    moment a worker registers, without that worker running it."""
    stack.start_broker()
    gpu = stack.gpu_worker()
    source = mesh_file(tmp_path, "ball.glb")
    with stack.client() as client:
        stack.wait_ready(client, sdf=False)
        assert one(client, request_for(tmp_path, source, "before", want_sdf=False)).ok
    gpu.send_signal(signal.SIGTERM)
    gpu.wait(timeout=30)
    stack.broker.send_signal(signal.SIGTERM)
    stack.broker.wait(timeout=30)
    stack.start_broker()
    with stack.client() as client:
        wait_for(lambda: client.health(), timeout_s=30, what="broker up")
        started = []

        def events():
            for event in client.generate_events([request_for(tmp_path, source, "after", want_sdf=False)]):
                if event.kind == "queued" and not started:
                    started.append(stack.gpu_worker())
                if event.kind == "final":
                    return event.result
            return None

        result = events()
        assert result is not None and result.ok and result.cached, result and result.error
        assert client.health()["backends"]["instant"]["completed"] == 0


def test_a_request_behind_an_identical_one_is_answered_by_its_result(stack, tmp_path):
    """A batch sent twice (a retry behind the original): with one worker the
    copy waits in the queue, and when its turn comes the original's result,
    just stored, answers it; the worker runs the input once."""
    stack.start_broker()
    stack.gpu_worker("instant", "delay_s=1")
    source = mesh_file(tmp_path, "ball.glb")
    with stack.client() as client:
        stack.wait_ready(client, sdf=False)
        original, retry = (request_for(tmp_path, source, out, want_sdf=False) for out in ("original", "retry"))
        results = dict(client.generate([original, retry]))
        assert results[0].ok and results[1].ok, (results[0].error, results[1].error)
        assert results[0].info["cache"] == {"generate": "miss"} and not results[0].cached
        assert results[1].info["cache"] == {"generate": "hit"} and results[1].cached
        assert results[1].glb_path.read_bytes() == results[0].glb_path.read_bytes()
        assert client.health()["backends"]["instant"]["completed"] == 1
        cache = settled(client)
        assert cache["generate_hits"] == 1 and cache["generate_misses"] == 2  # each job counted once


def test_a_result_whose_client_left_is_still_cached(stack, tmp_path):
    """A client that gives up while its job runs: the worker's GLB, which cost
    GPU time, goes into the cache all the same, so asking again costs none."""
    stack.start_broker()
    stack.gpu_worker("instant", "delay_s=1.5")
    source = mesh_file(tmp_path, "ball.glb")
    with stack.client() as client:
        stack.wait_ready(client, sdf=False)
        for event in client.generate_events([request_for(tmp_path, source, "gave_up", want_sdf=False)]):
            if event.kind == "generating":
                break  # leaving the loop cancels the request
        wait_for(lambda: client.health()["stale_results"] >= 1 or None, timeout_s=30,
                 what="the cancelled job's result reaching the broker")
        assert client.health()["backends"]["instant"]["completed"] == 0  # not counted: its job was gone
        settled(client)
        again = one(client, request_for(tmp_path, source, "again", want_sdf=False))
        assert again.ok and again.cached and again.info["cache"] == {"generate": "hit"}
        assert client.health()["backends"]["instant"]["completed"] == 0


def test_eviction_keeps_the_most_recently_used(stack, tmp_path):
    # three different GLBs of the same size
    meshes = [mesh_file(tmp_path, f"m{n}.glb", subdivisions=3, radius_m=0.1 + 0.01 * n) for n in range(3)]
    entry_bytes = max(len(p.read_bytes()) for p in meshes) + 2048
    stack.start_broker("--cache-size", str(int(entry_bytes * 2.5)))  # room for two entries
    stack.gpu_worker()
    with stack.client() as client:
        stack.wait_ready(client, sdf=False)

        def run(n: int, out: str):
            result = one(client, request_for(tmp_path, meshes[n], out, want_sdf=False))
            assert result.ok, result.error
            settled(client)  # written, so the order of use is the one on disk
            return result.cached

        assert [run(0, "a"), run(1, "b"), run(0, "c")] == [False, False, True]  # 1 is now the least recent
        assert run(2, "d") is False  # evicts 1
        assert run(0, "e") is True
        assert run(1, "f") is False
        cache = settled(client)
        assert cache["evictions"] >= 1 and cache["entries"] == 2 and cache["bytes"] <= cache["max_bytes"]


def test_corrupt_entries_are_misses(stack, tmp_path):
    stack.start_broker()
    stack.gpu_worker()
    source = mesh_file(tmp_path, "ball.glb")
    with stack.client() as client:
        stack.wait_ready(client, sdf=False)
        assert one(client, request_for(tmp_path, source, "a", want_sdf=False)).ok
        settled(client)
        for path in (stack.cache_dir / "entries").rglob("*"):
            if path.is_file():
                path.write_bytes(path.read_bytes()[:-7] + b"garbage")
        again = one(client, request_for(tmp_path, source, "b", want_sdf=False))
        assert again.ok and not again.cached
        assert again.glb_path.read_bytes() == source.read_bytes()
        assert client.health()["cache"]["corrupt"] == 1


def test_no_cache_broker(stack, tmp_path):
    stack.start_broker("--no-cache")
    stack.gpu_worker()
    source = mesh_file(tmp_path, "ball.glb")
    with stack.client() as client:
        stack.wait_ready(client, sdf=False)
        for out in ("a", "b"):
            result = one(client, request_for(tmp_path, source, out, want_sdf=False))
            assert result.ok and not result.cached and "cache" not in result.info
        stats = client.health()
        assert stats["cache"] == {"enabled": False}
        assert stats["backends"]["instant"]["completed"] == 2
    assert not stack.cache_dir.exists()


def test_bad_cache_size_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "geomgen", "broker", "--cache-size", "lots"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert "cache size 'lots' is not a size" in out.stderr


def test_generate_twice_costs_seconds_the_second_time(tmp_path, private_result_cache):
    """`geomgen generate` with its embedded stack: the second identical run is
    answered from the per-user cache ($GEOMGEN_CACHE_DIR here)."""
    image = SAMPLES / "mug.png"
    command = [sys.executable, "-m", "geomgen", "generate", str(image), "--out", str(tmp_path / "out"), "--json",
               "--height", "0.1", "--collision", "hull", "--sdf-workers", "1"]
    rows, seconds = [], []
    for _ in range(2):
        started = time.monotonic()
        run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        seconds.append(time.monotonic() - started)
        assert run.returncode == 0, run.stderr[-2000:]
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    assert rows[0]["status"] == rows[1]["status"] == "ok"
    assert rows[0]["cached"] is False and rows[1]["cached"] is True
    assert any(private_result_cache.rglob("index.sqlite3"))
    fresh = subprocess.run(command + ["--fresh"], capture_output=True, text=True, timeout=600, check=False)
    assert fresh.returncode == 0 and json.loads(fresh.stdout.strip().splitlines()[-1])["cached"] is False
    print(f"generate: first run {seconds[0]:.1f} s, second run {seconds[1]:.1f} s")


def test_the_http_gateway_reports_broker_hits_and_passes_fresh(stack, tmp_path, procs):
    """Through `geomgen gateway`: a second item with the same input and options
    (another output name, so not the gateway's own recent item) is a broker
    cache hit; `fresh` computes it anew."""
    import requests

    from tests.conftest import free_base_port

    stack.start_broker()
    stack.gpu_worker()
    port = free_base_port(1)
    procs.start("gateway", "--broker", stack.address, "--port", str(port), "--allow-root", str(tmp_path), env=ENV,
                name="gateway")
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{url}/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(up, timeout_s=60, interval_s=0.1, what="the gateway")
    source = mesh_file(tmp_path, "ball.glb")
    with stack.client() as client:
        stack.wait_ready(client, sdf=False)

    def run(name: str, **extension) -> dict:
        item = {"image_path": str(source), "output_dir": str(tmp_path / "out"), "prompt": "a ball",
                "output_filename": name, "backend": "instant", "geomgen": extension}
        reply = requests.post(f"{url}/generate_geometries", json=[item], timeout=120)
        assert reply.status_code == 200, reply.text
        line = json.loads(reply.text.strip().splitlines()[-1])
        assert line["status"] == "success", line
        return line["geomgen"]

    assert run("first.glb")["cached"] is False
    assert run("second.glb")["cached"] is True
    assert run("third.glb", fresh=True)["cached"] is False
    with stack.client() as client:
        assert client.health()["backends"]["instant"]["completed"] == 2
    bad = requests.post(f"{url}/generate_geometries", timeout=60, json=[
        {"image_path": str(source), "output_dir": str(tmp_path / "out"), "prompt": "p", "geomgen": {"fresh": 1}}])
    assert bad.status_code == 400 and "fresh must be true or false" in bad.text


def test_geometry_server_passes_its_cache_settings(tmp_path):
    """GeometryServer (behind `geomgen serve`) hands cache_dir and cache_size to its broker."""
    from geomgen import GeometryServer

    folder = tmp_path / "server-cache"
    table = SAMPLES / "table.glb"
    with GeometryServer(backends=["mesh"], sdf_workers=0, base_port=0, cache_dir=str(folder),
                        cache_size="50M") as server:
        server.wait_until_ready(120)
        with GeometryClient(server.address, timeout_s=60) as client:
            results = [one(client, GeometryRequest(image_path=str(table), output_dir=str(tmp_path / "out"),
                                                   output_filename=f"t{n}", backend="mesh", want_sdf=False))
                       for n in range(2)]
            cache = client.health()["cache"]
    assert [r.cached for r in results] == [False, True]
    assert cache["dir"] == str(folder) and cache["max_bytes"] == 50 * 1024**2
    assert (folder / "index.sqlite3").is_file()


def test_generate_no_cache_runs_without_one(tmp_path, private_result_cache):
    table = SAMPLES / "table.glb"
    command = [sys.executable, "-m", "geomgen", "generate", str(table), "--out", str(tmp_path / "out"), "--json",
               "--no-sdf", "--no-cache"]
    for _ in range(2):
        run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads(run.stdout.strip().splitlines()[-1])["cached"] is False
    assert not any(private_result_cache.iterdir())
    refused = subprocess.run(command + ["--broker", "127.0.0.1:1"], capture_output=True, text=True, timeout=60,
                             check=False)
    assert refused.returncode == 2 and "--no-cache applies to the embedded stack" in refused.stderr

"""The HTTP gateway over real HTTP on loopback: a `geomgen gateway` process in
front of a real broker and CPU workers, spoken to the way the old geometry
server's client does (requests with stream=True, iter_lines, a dataclass built
from each line with exactly the old keys)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from geomgen.client import GeometryClient
from tests.conftest import REPO, ProcessGroup, free_base_port, wait_for
from tests.plugins import box_glb

ENV = {"GEOMGEN_BACKENDS": "instant=tests.plugins:InstantBackend,slow=tests.plugins:SlowBackend",
       "PYTHONPATH": str(REPO)}
KEEPALIVE_S = 0.5
OLD_KEYS = {"status", "num_workers", "scheduler_queue_size", "active_clients", "processing_active", "total_requests",
            "completed_requests", "failed_requests", "avg_processing_time_seconds", "avg_end_to_end_latency_seconds",
            "avg_queue_wait_seconds", "max_queue_wait_seconds", "workers"}
OLD_WORKER_KEYS = {"gpu_id", "pid", "alive", "completed_requests", "failed_requests", "total_requests", "proportion"}


@dataclass
class OldResponse:
    """The old client's view of one line: any other key raises TypeError."""

    index: int
    status: str
    data: dict | None
    error: str | None


@dataclass
class Stack:
    procs: ProcessGroup
    broker: str
    root: Path  # the gateway's allowed root
    outside: Path  # a folder outside it
    url: str
    gateway: subprocess.Popen

    def health(self) -> dict:
        with GeometryClient(self.broker, timeout_s=10, keys=None) as client:
            return client.health()


def start_gateway(procs: ProcessGroup, broker: str, *args: str, headers: dict | None = None):
    port = free_base_port(1)
    url = f"http://127.0.0.1:{port}"
    proc = procs.start("gateway", "--broker", broker, "--port", str(port), "--keepalive", str(KEEPALIVE_S), *args,
                       env=ENV, name="gateway")

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the gateway exited: {Path(proc.log_path).read_text()}")
        try:
            return requests.get(f"{url}/health", timeout=2, headers=headers).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(up, timeout_s=60, interval_s=0.1, what="the gateway's /health")
    return proc, url


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    root = tmp_path_factory.mktemp("root")
    outside = tmp_path_factory.mktemp("outside")
    procs = ProcessGroup(logs)
    port = free_base_port()
    broker = f"127.0.0.1:{port}"
    try:
        procs.start("broker", "--host", "127.0.0.1", "--port", str(port), env=ENV)
        for backend in ("instant", "instant", "slow"):
            procs.start("gpu-worker", "--backend", backend, "--broker", broker, env=ENV, name=f"gpu-{backend}")
        with GeometryClient(broker, timeout_s=10, keys=None) as client:
            wait_for(lambda: (lambda b: b.get("instant", {}).get("alive") == 2 and b.get("slow", {}).get("alive"))(
                client.health()["backends"]), timeout_s=90, interval_s=0.2, what="the workers")
        gateway, url = start_gateway(procs, broker, "--allow-root", str(root), "--max-items", "40",
                                     "--max-body-bytes", "100000")
        yield Stack(procs, broker, root, outside, url, gateway)
    finally:
        procs.stop_all()


def make_input(folder: Path, name: str = "box.glb", salt: bytes = b"") -> Path:
    """A GLB input; ``salt`` (appended after the GLB's declared length) makes its bytes unique."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(box_glb() + salt)
    return path


def item(image: Path, out: Path, prompt: str = "a box", **extra) -> dict:
    """An item as the old client sends it: all eight keys, nulls included."""
    return {"image_path": str(image), "output_dir": str(out), "prompt": prompt, "debug_folder": None,
            "output_filename": None, "backend": "instant", "sam3d_config": None, "scene_id": None, **extra}


def post(url: str, items, timeout_s: float = 60.0, headers: dict | None = None):
    """POST a batch like the old client: (responses by index, blank lines seen)."""
    reply = requests.post(f"{url}/generate_geometries", json=items, stream=True, timeout=timeout_s, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/x-ndjson")
    answers: dict[int, OldResponse] = {}
    blanks = 0
    for line in reply.iter_lines():
        if not line:
            blanks += 1
            continue
        fields = json.loads(line)
        if "geomgen" in items[fields["index"]]:  # an item that asked for geomgen's fields: not the old client's
            fields.pop("geomgen")
        answer = OldResponse(**fields)
        assert answer.index not in answers
        answers[answer.index] = answer
    return answers, blanks


def test_success_lines_carry_exactly_the_old_keys(stack):
    image = make_input(stack.root / "in")
    out = stack.root / "out-ok"
    answers, _ = post(stack.url, [item(image, out, output_filename="named.glb"),
                                  item(image, out, prompt="a red box")])
    assert sorted(answers) == [0, 1]
    assert all(a.status == "success" and a.error is None for a in answers.values())
    assert answers[0].data == {"geometry_path": str(out / "named.glb")}
    unnamed = Path(answers[1].data["geometry_path"])
    assert unnamed.is_absolute() and unnamed.is_file()
    assert unnamed.name.startswith(f"geometry_{hashlib.md5(b'a red box').hexdigest()[:8]}_")
    # The extension key asks for geomgen's fields, which then come under their own key.
    raw = requests.post(f"{stack.url}/generate_geometries", json=[item(image, out, output_filename="extended",
                                                                       geomgen={})], timeout=60)
    line = json.loads(raw.text.strip().splitlines()[-1])
    assert set(line) == {"index", "status", "data", "error", "geomgen"}
    assert line["geomgen"]["backend"] == "instant"


def test_per_item_errors_leave_the_rest_of_the_batch_going(stack):
    good = make_input(stack.root / "in")
    away = make_input(stack.outside / "in")
    (stack.root / "link").symlink_to(stack.outside / "in", target_is_directory=True)
    (stack.root / "a-file").write_text("not a folder")
    out = stack.root / "out-errors"
    batch = [
        item(stack.root / "in" / "missing.glb", out),
        item(good, stack.root / "a-file" / "sub"),  # an output_dir that cannot be made
        item(away, out),  # outside the allowed root
        item(stack.root / "link" / "box.glb", out),  # a symlink pointing out
        item(Path(f"{stack.root}/in/../../{stack.outside.name}/in/box.glb"), out),  # .. leading out
        item(good, stack.outside / "out"),  # writing outside
        item(good, out, output_filename="fine"),
    ]
    answers, _ = post(stack.url, batch)
    assert sorted(answers) == list(range(len(batch)))
    errors = {i: a.error for i, a in answers.items() if a.status == "error"}
    assert set(errors) == {0, 1, 2, 3, 4, 5}
    assert all(answers[i].data is None for i in errors)
    assert "does not exist" in errors[0]
    assert "output_dir" in errors[1]
    for index in (2, 3, 4):
        assert "image_path" in errors[index] and "outside this gateway's allowed roots" in errors[index]
    assert "output_dir" in errors[5] and "allowed roots" in errors[5]
    assert not (stack.outside / "out").exists()
    assert answers[6].status == "success"


@pytest.mark.parametrize("body, status, words", [
    (b"", 400, ["empty"]),
    (b"{not json", 400, ["not JSON"]),
    (b'{"image_path": "x"}', 400, ["list"]),
    (b"[]", 400, ["empty"]),
    (b'[{"image_path": "a", "output_dir": "b", "prompt": "c"}, 7]', 400, ["item 1", "object"]),
    (b'[{"image_path": "a", "prompt": "c"}]', 400, ["item 0", "output_dir"]),
    (b'[{"image_path": "a", "output_dir": "b", "prompt": "c", "colour": 1}]', 400, ["item 0", "colour"]),
    (b'[{"image_path": "a", "output_dir": "b", "prompt": "c", "geomgen": {"want_sdf": 1}}]', 400,
     ["item 0", "want_sdf"]),
    (json.dumps([{"image_path": "a", "output_dir": "b", "prompt": "c"}] * 41).encode(), 413, ["41 items"]),
    (b"[" + b" " * 200_000 + b"]", 413, ["limit"]),
])
def test_bad_bodies_are_refused_whole(stack, body, status, words):
    before = stack.health()["accepted"]
    reply = requests.post(f"{stack.url}/generate_geometries", data=body, timeout=30,
                          headers={"Content-Type": "application/json"})
    assert reply.status_code == status
    message = reply.json()["error"]
    assert all(word in message for word in words), message
    assert stack.health()["accepted"] == before


def test_blank_lines_keep_a_slow_batch_alive(stack):
    image = make_input(stack.root / "in")
    slow = item(image, stack.root / "out-slow", backend="slow", geomgen={"backend_options": {"delay_s": 2.5}})
    answers, blanks = post(stack.url, [slow], timeout_s=KEEPALIVE_S * 4)  # read timeout far below the item's time
    assert answers[0].status == "success", answers[0].error
    assert blanks >= 2


def test_a_reposted_batch_reuses_finished_work(stack):
    out = stack.root / "out-repost"
    batch = [item(make_input(stack.root / "in-repost", f"{n}.glb", salt=bytes([n])), out, prompt=f"thing {n}",
                  output_filename=None if n % 2 else f"named{n}") for n in range(4)]
    first, _ = post(stack.url, batch)
    assert all(a.status == "success" for a in first.values())
    accepted = stack.health()["accepted"]
    again, _ = post(stack.url, batch)
    assert {i: a.data for i, a in again.items()} == {i: a.data for i, a in first.items()}
    assert stack.health()["accepted"] == accepted  # the broker got no new job
    # Different bytes under the same name are new work.
    make_input(stack.root / "in-repost", "0.glb", salt=b"changed")
    post(stack.url, batch[:1])
    assert stack.health()["accepted"] == accepted + 1


def test_32_concurrent_streams_all_complete(stack):
    image = make_input(stack.root / "in")
    results: dict[int, dict] = {}

    def one(n: int) -> None:
        out = stack.root / f"out-many-{n}"
        batch = [item(image, out, output_filename=f"o{k}", geomgen={"backend_options": {"delay_s": 0.05}})
                 for k in range(3)]
        results[n] = post(stack.url, batch, timeout_s=120)[0]

    threads = [threading.Thread(target=one, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert sorted(results) == list(range(32))
    assert all(a.status == "success" for answers in results.values() for a in answers.values())
    assert all(len(answers) == 3 for answers in results.values())


def test_a_client_that_leaves_has_its_items_cancelled(stack):
    image = make_input(stack.root / "in")
    cancelled = stack.health()["cancelled"]
    slow = [item(image, stack.root / "out-leave", backend="slow", output_filename=f"s{k}",
                 geomgen={"backend_options": {"delay_s": 30}}) for k in range(2)]
    reply = requests.post(f"{stack.url}/generate_geometries", json=slow, stream=True, timeout=30)
    wait_for(lambda: stack.health()["in_flight"] == 2, timeout_s=30, what="both items at the broker")
    reply.close()
    stats = wait_for(lambda: (lambda s: s if s["cancelled"] >= cancelled + 2 else None)(stack.health()),
                     timeout_s=30, what="the broker cancelling both items")
    assert stats["in_flight"] == 0 or stats["jobs"]["generating"] <= 1


def test_health_has_the_old_keys(stack):
    reply = requests.get(f"{stack.url}/health", timeout=10)
    assert reply.status_code == 200
    health = reply.json()
    assert OLD_KEYS <= set(health) and "geomgen" in health
    assert health["status"] == "healthy"
    assert health["num_workers"] == 3
    assert all(set(w) == OLD_WORKER_KEYS for w in health["workers"])
    assert set(health["geomgen"]["backends"]) >= {"instant", "slow"}


def test_metrics_parse_as_prometheus_text(stack):
    image = make_input(stack.root / "in")
    post(stack.url, [item(image, stack.root / "out-metrics", output_filename="m")])
    reply = requests.get(f"{stack.url}/metrics", timeout=10)
    assert reply.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    assert families["geomgen_broker_up"].samples[0].value == 1
    backends = {s.labels["backend"] for s in families["geomgen_backend_jobs"].samples}
    assert {"instant", "slow"} <= backends
    stages = {s.labels["stage"] for s in families["geomgen_stage_seconds_mean"].samples}
    assert stages == {"queue_wait", "generate", "convert", "total"}
    items = {s.labels["outcome"]: s.value for s in families["geomgen_gateway_items"].samples
             if s.name.endswith("_total")}
    assert items["success"] >= 1
    routes = {s.labels["route"] for s in families["geomgen_gateway_http_requests"].samples}
    assert "/generate_geometries" in routes


def test_a_token_guards_every_route_but_health(stack, tmp_path):
    token = "t" * 32
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    _, url = start_gateway(stack.procs, stack.broker, "--allow-root", str(stack.root), "--token-file",
                           str(token_file))
    good = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
        assert requests.get(f"{url}/metrics", timeout=10, headers=headers).status_code == 401
        assert requests.post(f"{url}/generate_geometries", json=[], timeout=10, headers=headers).status_code == 401
        assert requests.post(f"{url}/shutdown", timeout=10, headers=headers).status_code == 401
    assert requests.get(f"{url}/metrics", timeout=10, headers=good).status_code == 200
    answers, _ = post(url, [item(make_input(stack.root / "in"), stack.root / "out-token", output_filename="t")],
                      headers=good)
    assert answers[0].status == "success"


def test_off_loopback_needs_a_token_or_insecure(stack):
    result = subprocess.run(["python", "-m", "geomgen", "gateway", "--broker", stack.broker, "--host", "0.0.0.0",
                             "--port", str(free_base_port(1))], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **ENV})
    assert result.returncode == 2
    assert "--token-file" in result.stderr and "--insecure" in result.stderr


def test_shutdown_ends_the_gateway(stack):
    proc, url = start_gateway(stack.procs, stack.broker, "--allow-root", str(stack.root))
    reply = requests.post(f"{url}/shutdown", timeout=10)
    assert reply.status_code == 200
    assert proc.wait(timeout=30) == 0


def test_health_is_503_without_a_broker(procs, tmp_path):
    port = free_base_port(1)
    dead = f"127.0.0.1:{free_base_port()}"
    proc = procs.start("gateway", "--broker", dead, "--port", str(port), env=ENV, name="gateway")

    def status() -> int | None:
        assert proc.poll() is None, Path(proc.log_path).read_text()
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code
        except requests.ConnectionError:
            return None

    assert wait_for(status, timeout_s=60, interval_s=0.2, what="an answer from /health") == 503


def test_geometry_server_starts_a_gateway(tmp_path, monkeypatch):
    from geomgen.server import GeometryServer

    monkeypatch.chdir(tmp_path)
    image = make_input(tmp_path / "in")
    with GeometryServer(backends=["instant"], sdf_workers=0, host="127.0.0.1", base_port=0, env=ENV,
                        http="127.0.0.1:0", http_options={"allow_roots": None, "default_backend": "instant"}) as server:
        assert server.http_address.startswith("http://127.0.0.1:")
        answers, _ = post(server.http_address, [item(image, tmp_path / "out", backend=None)])
        assert answers[0].status == "success", answers[0].error


def test_shutdown_stops_a_serve_stack_with_http(procs, tmp_path):
    port = free_base_port(1)
    serve = procs.start("serve", "--backend", "instant", "--sdf-workers", "0", "--port", "0", "--http",
                        f"127.0.0.1:{port}", "--log-dir", str(tmp_path / "serve-logs"), env=ENV, name="serve")

    def ready() -> bool:  # serve says so once its workers and its gateway answer
        log = Path(serve.log_path).read_text()
        assert serve.poll() is None, log
        return "HTTP API on http://127.0.0.1:" in log

    wait_for(ready, timeout_s=90, interval_s=0.2, what="serve --http ready")
    assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    assert requests.post(f"http://127.0.0.1:{port}/shutdown", timeout=10).status_code == 200
    assert serve.wait(timeout=30) == 0


def test_a_gateway_reaches_a_broker_with_keys(tmp_path, monkeypatch):
    """serve --keys --http: the gateway is a CURVE client of the broker with a
    client key made for it, and the old HTTP API works in front of it."""
    from geomgen.server import GeometryServer

    monkeypatch.chdir(tmp_path)
    image = make_input(tmp_path / "in")
    keys_dir = tmp_path / "keys"
    with GeometryServer(backends=["instant"], sdf_workers=0, host="127.0.0.1", base_port=0, env=ENV,
                        keys_dir=keys_dir, http="127.0.0.1:0",
                        http_options={"allow_roots": None, "default_backend": "instant"}) as server:
        answers, _ = post(server.http_address, [item(image, tmp_path / "out", backend=None)])
        assert answers[0].status == "success", answers[0].error
    assert (keys_dir / "clients" / "gateway.key").is_file()

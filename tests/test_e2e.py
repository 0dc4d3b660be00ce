"""End to end through real processes: broker, GPU workers, SDF workers and the
Python client over loopback TCP, on the CPU backends and the test backends of
tests/plugins.py. Every SDF produced here is parsed by Drake."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import zmq

from geomgen import GeometryClient, GeometryRequest, protocol
from geomgen.geometry.drake_check import validate_sdf
from tests.conftest import REPO, wait_for

SAMPLES = REPO / "src" / "geomgen" / "samples"
PLUGINS = (
    "instant=tests.plugins:InstantBackend,slow=tests.plugins:SlowBackend,"
    "failing=tests.plugins:FailingBackend"
)
ENV = {"GEOMGEN_BACKENDS": PLUGINS, "PYTHONPATH": str(REPO)}
HULL = {"collision": "hull"}  # decomposition has its own tests; keep these fast


def sample(kind: str) -> Path:
    suffixes = {"image": (".png", ".jpg"), "mesh": (".glb",)}[kind]
    found = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in suffixes)
    assert found, f"no {kind} sample in {SAMPLES}"
    return found[0]


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _glb_with_external_buffer() -> bytes:
    """A GLB whose mesh data lives in a file next to it: unusable when only bytes travel."""
    import json
    import struct

    gltf = {
        "asset": {"version": "2.0"},
        "buffers": [{"uri": "external.bin", "byteLength": 36}],
        "bufferViews": [{"buffer": 0, "byteOffset": 0, "byteLength": 36}],
        "accessors": [{"bufferView": 0, "componentType": 5126, "count": 3, "type": "VEC3",
                       "min": [0, 0, 0], "max": [1, 1, 0]}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}}]}],
        "nodes": [{"mesh": 0}],
        "scenes": [{"nodes": [0]}],
    }
    body = json.dumps(gltf).encode()
    body += b" " * (-len(body) % 4)
    return struct.pack("<III", 0x46546C67, 2, 12 + 8 + len(body)) + struct.pack("<II", len(body), 0x4E4F534A) + body


class Stack:
    """A broker and workers as separate processes, torn down by `procs`."""

    def __init__(self, procs, endpoints):
        self.procs = procs
        self.endpoints = endpoints
        self.broker_arg = f"127.0.0.1:{endpoints.client_port}"
        self.broker = None

    def start_broker(self, *extra: str):
        self.broker = self.procs.start(
            "broker", "--host", "127.0.0.1", "--port", str(self.endpoints.client_port), *extra, env=ENV
        )
        return self.broker

    def gpu_worker(self, backend: str, *options: str):
        args = ["gpu-worker", "--backend", backend, "--broker", self.broker_arg]
        for opt in options:
            args += ["--backend-option", opt]
        return self.procs.start(*args, env=ENV, name=f"gpu-{backend}")

    def sdf_worker(self, procs_n: int = 1):
        return self.procs.start("sdf-worker", "--broker", self.broker_arg, "--procs", str(procs_n), env=ENV)

    def client(self, timeout_s: float = 60.0) -> GeometryClient:
        return GeometryClient(address=self.endpoints.client, timeout_s=timeout_s)

    def wait_ready(self, client: GeometryClient, backends: dict[str, int], sdf_slots: int = 1, timeout_s=60.0):
        def ready():
            stats = client.health()
            per_backend = stats.get("backends", {})
            ok = all(per_backend.get(b, {}).get("alive", 0) >= n for b, n in backends.items())
            return stats if ok and stats.get("sdf_slots", 0) >= sdf_slots else None

        return wait_for(ready, timeout_s=timeout_s, interval_s=0.2, what=f"workers {backends} and SDF slots")


@pytest.fixture
def stack(procs, endpoints):
    return Stack(procs, endpoints)


def _request(tmp_path: Path, input_path: Path, name: str, **kw) -> GeometryRequest:
    kw.setdefault("collision", "hull")
    return GeometryRequest(image_path=str(input_path), output_dir=str(tmp_path / "out"), output_filename=name, **kw)


def test_cpu_backends_end_to_end(stack, tmp_path):
    """An image through silhouette and a mesh through mesh, to Drake-valid SDFs."""
    stack.start_broker()
    stack.gpu_worker("silhouette")
    stack.gpu_worker("mesh")
    stack.sdf_worker(2)
    with stack.client() as client:
        stack.wait_ready(client, {"silhouette": 1, "mesh": 1}, sdf_slots=2)
        requests = [
            _request(tmp_path, sample("image"), "from_image", backend="silhouette", mass_kg=2.0),
            _request(tmp_path, sample("mesh"), "from_mesh", backend="mesh", density_kg_m3=700.0),
        ]
        results = dict(client.generate(requests))
    assert sorted(results) == [0, 1]
    for index, result in results.items():
        assert result.ok, f"item {index}: {result.stage}/{result.error_code}: {result.error}"
        assert Path(result.glb_path).is_file() and Path(result.glb_path).stat().st_size > 0
        report = validate_sdf(Path(result.sdf_path))
        assert report["mass_kg"] > 0
    assert results[0].backend == "silhouette" and results[1].backend == "mesh"
    assert validate_sdf(Path(results[0].sdf_path))["mass_kg"] == pytest.approx(2.0)


def test_batch_with_bad_items_keeps_going(stack, tmp_path):
    """Per-item errors inside one batch: each bad item gets its own clear error,
    the good ones succeed, and the broker keeps serving afterwards."""
    stack.start_broker("--no-worker-timeout", "2")
    stack.gpu_worker("silhouette")
    stack.gpu_worker("mesh")
    stack.sdf_worker(1)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(sample("image").read_bytes()[:200])
    text = tmp_path / "notes.txt"
    text.write_text("this is neither an image nor a mesh\n")
    nan_obj = tmp_path / "nan.obj"
    nan_obj.write_text("v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_declaring(40_000, 40_000))
    external = tmp_path / "external.glb"
    external.write_bytes(_glb_with_external_buffer())
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("a file where a folder should be\n")
    good = sample("image")
    requests = [
        _request(tmp_path, good, "good_a", backend="silhouette"),
        _request(tmp_path, tmp_path / "missing.png", "missing", backend="silhouette"),
        _request(tmp_path, empty, "empty", backend="silhouette"),
        _request(tmp_path, truncated, "truncated", backend="silhouette"),
        _request(tmp_path, text, "text", backend="silhouette"),
        _request(tmp_path, nan_obj, "nan", backend="mesh"),
        _request(tmp_path, good, "unknown_backend", backend="no-such-backend"),
        _request(tmp_path, good, "no_worker", backend="instant"),
        _request(tmp_path, good, "../escape", backend="silhouette"),
        _request(tmp_path, good, "bad_mass", backend="silhouette", mass_kg=-1.0),
        _request(tmp_path, good, "good_b", backend="silhouette", scene_id="s2"),
        _request(tmp_path, bomb, "bomb", backend="silhouette"),
        _request(tmp_path, external, "external", backend="mesh"),
        GeometryRequest(image_path=str(good), output_dir=str(not_a_dir / "out"), backend="silhouette"),
    ]
    with stack.client() as client:
        stack.wait_ready(client, {"silhouette": 1, "mesh": 1})
        results = dict(client.generate(requests))
        assert sorted(results) == list(range(len(requests))), "every item gets exactly one result"
        expect_stage = {
            1: "input", 2: "input", 3: "input", 4: "input", 5: "input",
            6: "input", 7: "transport", 8: "input", 9: "input", 11: "input", 12: "input", 13: "input",
        }
        for index, stage in expect_stage.items():
            result = results[index]
            assert not result.ok, f"item {index} should fail"
            assert result.stage == stage, f"item {index}: {result.stage}/{result.error_code}: {result.error}"
            assert result.error and len(result.error) > 10
        assert results[6].error_code == "unknown_backend"
        assert results[7].error_code == "no_worker"
        assert results[11].error_code == "image_too_large"
        assert results[12].error_code == "bad_mesh" and "external" in results[12].error
        for index in (0, 10):
            assert results[index].ok, results[index].error
            validate_sdf(Path(results[index].sdf_path))
        assert not (tmp_path / "escape.glb").exists()
        # the broker is still serving
        again = dict(client.generate([_request(tmp_path, good, "after", backend="silhouette")]))
        assert again[0].ok, again[0].error
        assert client.health()["failed"] >= 3


def test_round_robin_across_scenes(stack, tmp_path):
    """Scene A queues 6 jobs before scene B's 2; with one worker the completion
    order interleaves B's jobs right after A's first ones instead of last."""
    stack.start_broker()
    stack.gpu_worker("slow", "delay_s=0.3")
    stack.sdf_worker(1)
    mesh = sample("mesh")
    requests = [_request(tmp_path, mesh, f"a{i}", backend="slow", scene_id="A", want_sdf=False) for i in range(6)]
    requests += [_request(tmp_path, mesh, f"b{i}", backend="slow", scene_id="B", want_sdf=False) for i in range(2)]
    with stack.client() as client:
        stack.wait_ready(client, {"slow": 1})
        order = [requests[i].scene_id for i, result in client.generate(requests) if result.ok]
    assert len(order) == 8
    # strict round-robin: B's two jobs complete within the first five results
    b_positions = [i for i, scene in enumerate(order) if scene == "B"]
    assert b_positions[-1] <= 4, order


def test_gpu_worker_killed_mid_job(stack, tmp_path):
    """SIGKILL the worker running a job: the job is re-run on another worker and
    the client gets exactly one result for it."""
    stack.start_broker("--heartbeat-interval", "0.2")
    workers = [stack.gpu_worker("slow", "delay_s=2") for _ in range(2)]
    stack.sdf_worker(1)
    with stack.client() as client:
        stack.wait_ready(client, {"slow": 2})
        req = _request(tmp_path, sample("mesh"), "victim", backend="slow")
        killed = False
        finals = []
        for event in client.generate_events([req]):
            if event.kind == "generating" and not killed:
                busy = wait_for(
                    lambda: [w for w in client.health()["workers"] if w.get("busy")],
                    timeout_s=10, what="a busy worker",
                )
                pid = busy[0]["pid"]
                assert pid in [w.pid for w in workers]
                os.kill(pid, signal.SIGKILL)
                killed = True
            if event.kind == "final":
                finals.append(event.result)
    assert killed
    assert len(finals) == 1
    assert finals[0].ok, finals[0].error
    assert finals[0].attempts == 2
    validate_sdf(Path(finals[0].sdf_path))


def test_sdf_worker_killed_mid_job(stack, tmp_path):
    """SIGKILL the SDF worker holding a job: its lease runs out, the job is
    pushed again to a new SDF worker, and the client gets one result."""
    stack.start_broker("--heartbeat-interval", "0.2", "--sdf-lease", "2")
    stack.gpu_worker("instant")
    first = stack.sdf_worker(1)
    with stack.client() as client:
        stack.wait_ready(client, {"instant": 1})
        # a conversion slow enough to be caught mid-job: CoACD on the sample mesh
        req = _request(tmp_path, sample("mesh"), "victim", backend="instant", collision="coacd")
        finals = []
        killed = False
        for event in client.generate_events([req]):
            if event.kind == "converting" and not killed:
                wait_for(lambda: any(w.get("held") for w in client.health()["sdf_workers"]),
                         timeout_s=10, what="an SDF worker holding the job")
                first.send_signal(signal.SIGKILL)
                first.wait(timeout=10)
                killed = True
                stack.sdf_worker(1)
            if event.kind == "final":
                finals.append(event.result)
    assert killed and len(finals) == 1
    assert finals[0].ok, finals[0].error
    validate_sdf(Path(finals[0].sdf_path))


def test_stray_peer_garbage_is_dropped(stack, tmp_path, zctx):
    """Malformed, oversized-looking, wrong-version and wrong-frame-count messages
    on the client port are dropped; the broker keeps serving."""
    stack.start_broker()
    stack.gpu_worker("instant")
    stack.sdf_worker(1)
    stray = zctx.socket(zmq.DEALER)
    stray.setsockopt(zmq.LINGER, 0)
    stray.connect(stack.endpoints.client)
    good_header = protocol.header(protocol.Command.REQUEST)
    stray.send_multipart([b"hello"])
    stray.send_multipart([good_header, b"\xc1\xc1 not msgpack"])
    stray.send_multipart([protocol.header(protocol.Command.REQUEST, version=99), b"\x80"])
    stray.send_multipart([good_header, b"\x80", b"extra"])
    stray.send_multipart([b"GGP\x01\x63", b"\x80"])  # unknown command
    stray.send_multipart([good_header, b"\x81\xaarequest_id\x05"])  # wrong type, no fields
    # a worker port intruder too
    intruder = zctx.socket(zmq.DEALER)
    intruder.setsockopt(zmq.LINGER, 0)
    intruder.connect(stack.endpoints.worker)
    intruder.send_multipart([b"\x00" * 10])
    with stack.client() as client:
        stack.wait_ready(client, {"instant": 1})
        results = dict(client.generate([_request(tmp_path, sample("mesh"), "ok", backend="instant")]))
    assert results[0].ok, results[0].error
    assert stack.broker.poll() is None
    stray.close()
    intruder.close()


def test_broker_restart_loses_nothing(stack, tmp_path):
    """The broker dies with a job queued; a new broker on the same ports comes up;
    the client re-sends what the new broker does not know and gets its result."""
    stack.start_broker("--heartbeat-interval", "0.2")
    stack.sdf_worker(1)
    with stack.client(timeout_s=60) as client:
        req = _request(tmp_path, sample("mesh"), "survivor", backend="instant")
        finals = []
        restarted = False
        for event in client.generate_events([req]):
            if event.kind == "queued" and not restarted:
                stack.broker.send_signal(signal.SIGKILL)
                stack.broker.wait(timeout=10)
                stack.start_broker("--heartbeat-interval", "0.2")
                stack.gpu_worker("instant")
                restarted = True
            if event.kind == "final":
                finals.append(event.result)
    assert restarted and len(finals) == 1
    assert finals[0].ok, finals[0].error
